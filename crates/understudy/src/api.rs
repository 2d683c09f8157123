//! The local API on `<data-dir>/api.sock`: JSON over HTTP/1.1, one closed set of routes. It
//! translates requests into calls on [`Shared`] and the replication tasks, and the host's typed
//! errors into status codes: not found 404, conflict (already exists, wrong state) 409, invalid
//! 400, "retry later" 503; anything unexpected 500, never a 4xx.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::anyhow;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use proto::{
    CreateVm, EnableReplication, ExportPoint, ImportVm, ReplicaServerConfig, ServePoint,
    SetReplication, UnservePoint,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use host::error::{bad_request, kind_of, not_found, ErrorKind};

use host::owner::HostCommand;
use host::primary::Cmd;
use host::Shared;

/// Largest API request body; every request is a small JSON document.
const API_BODY_MAX_BYTES: usize = 1 << 20;

/// The HTTP status of an error: the host's typed refusals map to 4xx/503 here and only here;
/// anything else is unexpected and answers 500 (logged once, here).
fn status_of(e: &anyhow::Error) -> StatusCode {
    match kind_of(e) {
        Some(ErrorKind::NotFound) => StatusCode::NOT_FOUND,
        Some(ErrorKind::Conflict) => StatusCode::CONFLICT,
        Some(ErrorKind::Invalid) => StatusCode::BAD_REQUEST,
        Some(ErrorKind::Transient) => StatusCode::SERVICE_UNAVAILABLE,
        None => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match route(shared, req).await {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => {
            let status = status_of(&e);
            let transient = status == StatusCode::SERVICE_UNAVAILABLE;
            if status.is_server_error() && !transient {
                tracing::error!("{method} {path}: {status}: {e:#}");
            } else {
                tracing::debug!("{method} {path}: {status}: {e:#}");
            }
            let err = proto::ApiError {
                error: host::errfmt::one_line(&e),
                transient,
            };
            json_response(status, serde_json::to_vec(&err).unwrap_or_default())
        }
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn to_json<T: Serialize>(v: &T) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> anyhow::Result<T> {
    let bytes = Limited::new(req.into_body(), API_BODY_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid request: {e}")))
}

/// A request body that may be empty (an older client's `POST` without one): the default.
async fn body_or_default<T: DeserializeOwned + Default>(
    req: Request<Incoming>,
) -> anyhow::Result<T> {
    let bytes = Limited::new(req.into_body(), API_BODY_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| bad_request(format!("reading request body: {e}")))?
        .to_bytes();
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid request: {e}")))
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> anyhow::Result<Vec<u8>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let m = req.method().clone();
    let owner = shared.owner();
    match (m, parts.as_slice()) {
        (Method::GET, ["v1", "host"]) => to_json(&shared.host_info()),
        (Method::GET, ["v1", "events"]) => to_json(&shared.events.recent(None)),
        (Method::POST, ["v1", "trust", "reload"]) => {
            shared.tls.refresh()?;
            to_json(&serde_json::json!({"reloaded": true}))
        }
        (Method::GET, ["v1", "replica-server"]) => to_json(&shared.replica_config()),
        (Method::POST, ["v1", "replica-server"]) => {
            let cfg: ReplicaServerConfig = body(req).await?;
            to_json(
                &owner
                    .call(|r| HostCommand::EnableReplicaServer(cfg, r))
                    .await?,
            )
        }
        (Method::POST, ["v1", "replica-server", "disable"]) => {
            to_json(&owner.call(HostCommand::DisableReplicaServer).await?)
        }
        (Method::GET, ["v1", "vms"]) => to_json(&shared.vm_infos()),
        (Method::POST, ["v1", "vms"]) => {
            let r: CreateVm = body(req).await?;
            to_json(&owner.call(|reply| HostCommand::CreateVm(r, reply)).await?)
        }
        (Method::POST, ["v1", "vms", "import"]) => {
            let r: ImportVm = body(req).await?;
            let images: Vec<PathBuf> = r.images.iter().map(PathBuf::from).collect();
            if let Some(p) = images.iter().find(|p| !p.is_absolute()) {
                return Err(bad_request(format!(
                    "image path {} must be absolute",
                    p.display()
                )));
            }
            to_json(
                &owner
                    .call(|reply| HostCommand::ImportVm {
                        name: r.name,
                        images,
                        reply,
                    })
                    .await?,
            )
        }
        (Method::GET, ["v1", "vms", name]) => to_json(&shared.vm_info(name)?),
        (Method::POST, ["v1", "vms", name, "set"]) => {
            let r: proto::SetVm = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(&owner.call(|reply| HostCommand::SetVm(r, reply)).await?)
        }
        (Method::GET, ["v1", "replication"]) => to_json(&shared.all_status()),
        (Method::GET, ["v1", "vms", name, "replication"]) => to_json(&shared.status(name)?),
        (Method::GET, ["v1", "vms", name, "replication", "measure"]) => {
            let mut m = shared.replication(name)?.measure();
            // Health as `status` judges it (over the monitoring interval).
            m.health = shared.status(name)?.health;
            to_json(&m)
        }
        (Method::POST, ["v1", "vms", name, "replication", "reset-statistics"]) => {
            shared.reset_statistics(name)?;
            to_json(&serde_json::json!({"reset": true}))
        }
        (Method::POST, ["v1", "vms", name, "replication", "enable"]) => {
            let r: EnableReplication = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(&shared.enable_replication(r).await?)
        }
        (Method::POST, ["v1", "vms", name, "replication", "set"]) => {
            let r: SetReplication = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(
                &owner
                    .call(|reply| HostCommand::SetReplication(r, reply))
                    .await?,
            )
        }
        (Method::POST, ["v1", "vms", name, "replication", "reverse"]) => {
            let r: proto::ReverseReplication = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(&shared.reverse_replication(r).await?)
        }
        (Method::POST, ["v1", "vms", name, "replication", "remove"]) => {
            let vm = name.to_string();
            let message = owner
                .call(|reply| HostCommand::RemoveReplication { vm, reply })
                .await?;
            to_json(&serde_json::json!({ "message": message }))
        }
        (Method::POST, ["v1", "vms", name, "replication", "resynchronize"]) => {
            let repl = shared.replication(name)?;
            let r: proto::Resynchronize = body(req).await?;
            repl.command(|reply| Cmd::Resume {
                resync: true,
                at_unix_ns: r.at_unix_ns,
                reply,
            })
            .await??;
            to_json(&repl.status())
        }
        (Method::POST, ["v1", "vms", name, "replication", "import-media"]) => {
            let r: proto::ImportMedia = body(req).await?;
            to_json(&shared.import_media(name, &r.from).await?)
        }
        (Method::POST, ["v1", "vms", name, "replication", "start"]) => {
            let repl = shared.replication(name)?;
            let r: proto::StartReplication = body_or_default(req).await?;
            if let Some(dir) = r.to_media {
                if !r.use_existing.is_empty() || r.at_unix_ns.is_some() {
                    return Err(bad_request(
                        "--to-media writes the initial copy now: give it alone",
                    ));
                }
                let manifest = host::primary::start_to_media(&shared, &repl, dir).await?;
                return to_json(&manifest);
            }
            match (r.use_existing.is_empty(), r.at_unix_ns) {
                (true, None) => repl.command(Cmd::Start).await??,
                (true, Some(at_unix_ns)) => {
                    repl.command(|reply| Cmd::StartAt { at_unix_ns, reply })
                        .await??
                }
                (false, None) => {
                    host::primary::start_from_existing(&shared, &repl, r.use_existing).await?
                }
                (false, Some(_)) => {
                    return Err(bad_request(
                        "an initial replication from an existing copy starts now: give --at or --use-existing, not both",
                    ))
                }
            }
            to_json(&repl.status())
        }
        (Method::POST, ["v1", "vms", name, "replication", action]) => {
            let repl = shared.replication(name)?;
            match *action {
                "suspend" => repl.command(Cmd::Suspend).await??,
                "resume" => {
                    repl.command(|reply| Cmd::Resume {
                        resync: false,
                        at_unix_ns: None,
                        reply,
                    })
                    .await??
                }
                "sync" => return to_json(&repl.command(Cmd::Sync).await??),
                "resync-cancel" | "resync-stop" => repl.command(Cmd::ResyncCancel).await??,
                other => return Err(not_found(format!("unknown replication action {other:?}"))),
            }
            to_json(&repl.status())
        }
        (Method::POST, ["v1", "vms", name, "failover", "start"]) => {
            let req: proto::FailoverStart = body(req).await?;
            let vm = name.to_string();
            to_json(
                &owner
                    .call(|reply| HostCommand::FailoverStart { vm, req, reply })
                    .await?,
            )
        }
        (Method::POST, ["v1", "vms", name, "failover", "prepare"]) => {
            let repl = shared.replication(name)?;
            repl.command(Cmd::Prepare).await??;
            to_json(&repl.status())
        }
        (Method::POST, ["v1", "vms", name, "failover", "complete"]) => {
            let vm = name.to_string();
            to_json(
                &owner
                    .call(|reply| HostCommand::FailoverComplete { vm, reply })
                    .await?,
            )
        }
        (Method::POST, ["v1", "vms", name, "failover", "stop"]) => {
            let r: proto::FailoverStop = body(req).await?;
            let vm = name.to_string();
            let stopped = owner
                .call(|reply| HostCommand::FailoverStop {
                    vm,
                    test: r.test,
                    reply,
                })
                .await?;
            to_json(&serde_json::json!({ "stopped": stopped }))
        }
        (Method::GET, ["v1", "points", name]) => to_json(&shared.points(name)?),
        (Method::POST, ["v1", "points", name, "export"]) => {
            let r: ExportPoint = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            if !Path::new(&r.to).is_absolute() {
                return Err(bad_request(format!(
                    "destination {} must be absolute",
                    r.to
                )));
            }
            let s = shared.clone();
            to_json(&blocking(move || s.export_point(&r)).await?)
        }
        (Method::POST, ["v1", "backup", name]) => {
            let r: proto::BackupPoint = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            let s = shared.clone();
            to_json(&blocking(move || s.backup(&r)).await?)
        }
        (Method::GET, ["v1", "progress", id]) => match shared.progress.get(id) {
            Some((done_bytes, total_bytes)) => to_json(&proto::Progress {
                done_bytes,
                total_bytes,
            }),
            None => Err(not_found(format!("no operation {id} in progress"))),
        },
        (Method::GET, ["v1", "points", name, "served"]) => to_json(&shared.served_points(name)?),
        (Method::POST, ["v1", "points", name, "serve"]) => {
            let r: ServePoint = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(
                &owner
                    .call(|reply| HostCommand::ServePoint(r, reply))
                    .await?,
            )
        }
        (Method::POST, ["v1", "points", name, "unserve"]) => {
            let r: UnservePoint = body(req).await?;
            if r.vm != *name {
                return Err(bad_request("VM name in path and body differ"));
            }
            to_json(
                &owner
                    .call(|reply| HostCommand::UnservePoint(r, reply))
                    .await?,
            )
        }
        (m, _) => Err(not_found(format!("no such API route: {m} {path}"))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("worker task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn unexpected_errors_are_500_never_a_4xx() {
        assert_eq!(
            status_of(&anyhow!("disk on fire")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let io = std::io::Error::other("EIO");
        let e = Err::<(), _>(io).context("writing the catalog").unwrap_err();
        assert_eq!(status_of(&e), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn typed_refusals_keep_their_status_through_context() {
        let e = Err::<(), _>(host::error::conflict("VM web already exists"))
            .context("creating web")
            .unwrap_err();
        assert_eq!(status_of(&e), StatusCode::CONFLICT);
        assert_eq!(status_of(&not_found("no VM")), StatusCode::NOT_FOUND);
        assert_eq!(status_of(&bad_request("bad")), StatusCode::BAD_REQUEST);
        assert_eq!(
            status_of(&host::error::transient("busy")),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
