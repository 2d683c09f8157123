//! The replica side of replication: the peer routes that accept hellos and deltas from
//! trusted, allowed primaries and commit them into the replica store. A delta becomes a
//! recovery point only when the store has made it durable (promise 2); anything malformed,
//! foreign or out of sequence is refused with a named reason and changes nothing.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use proto::peer::{DeltaReply, Hello, HelloReply, PeerError};
use replica::{ReplicaError, ReplicaVm};
use transport::{BoxBody, PeerInfo};

use super::events;
use super::primary::delta_key;
use super::Shared;

/// Largest hello body; it lists at most a few disks.
const HELLO_MAX_BYTES: usize = 64 << 10;
/// Recovery points kept per replica VM; older deltas are folded into the base images. (The
/// recovery-history policy — hourly points, any-point window — will replace this bound.)
pub const RETAIN_POINTS: usize = 64;
/// Body chunks buffered between the network task and the writer thread of one upload.
const UPLOAD_QUEUE_CHUNKS: usize = 16;
/// How often retention runs on its own, besides after every commit: a replica whose commits
/// fail (disk full, out of descriptors) still folds and frees space, so it recovers by
/// itself. The same pass opens replica VMs that could not be opened yet (transient failures).
pub const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

struct Refusal {
    status: StatusCode,
    err: PeerError,
}

fn refuse(status: StatusCode, code: &str, error: impl Into<String>) -> Refusal {
    Refusal {
        status,
        err: PeerError {
            code: code.into(),
            error: error.into(),
            expected_seq: None,
        },
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: PeerInfo,
) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let who = peer.name.clone().unwrap_or_else(|| peer.addr.to_string());
    match route(&shared, req, &peer).await {
        Ok(body) => reply(StatusCode::OK, body),
        Err(r) => {
            tracing::warn!(peer = %who, "refused {path}: {} ({})", r.err.error, r.err.code);
            shared.events.emit(
                events::PEER_REFUSED,
                None,
                "warning",
                &format!("refused {path} from {who}: {}", r.err.error),
            );
            reply(r.status, serde_json::to_vec(&r.err).unwrap_or_default())
        }
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<BoxBody> {
    let mut resp = Response::new(transport::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: &PeerInfo,
) -> Result<Vec<u8>, Refusal> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    if let Some(why) = shared.replica_store_problem() {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            why,
        ));
    }
    let (store, cfg) = shared.replica_store().ok_or_else(|| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "replica_disabled",
            format!(
                "{} is not a replica server (run `understudy replica-server enable`)",
                shared.host_name
            ),
        )
    })?;
    let name = peer.name.clone().unwrap_or_default();
    if !allowed(&cfg.allow, &name) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!("peer {name:?} is not in this replica server's allow list"),
        ));
    }
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, ["v1", "replicas", vm, "hello"]) => {
            let bytes = http_body_util::Limited::new(req.into_body(), HELLO_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("reading hello: {e}"),
                    )
                })?
                .to_bytes();
            let hello: Hello = serde_json::from_slice(&bytes).map_err(|e| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("invalid hello: {e}"),
                )
            })?;
            if hello.vm != *vm {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "VM name in path and body differ",
                ));
            }
            super::vms::validate_vm_name(vm)
                .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
            let disks: Vec<delta::DiskEntry> = hello
                .disks
                .iter()
                .map(|d| delta::DiskEntry {
                    index: d.index,
                    size_bytes: d.size_bytes,
                })
                .collect();
            let store2 = store.clone();
            let vm_name = vm.to_string();
            let key = delta_key(&hello.replication_id);
            let generation = hello.generation;
            let rvm = tokio::task::spawn_blocking(move || {
                store2.create_vm(&vm_name, generation, &disks, key)
            })
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            .map_err(|e| match e {
                // The store's own trouble is retried, not a conflict of relationships.
                ReplicaError::Io { .. } | ReplicaError::Verifying { .. } => replica_refusal(e),
                _ => refuse(StatusCode::CONFLICT, "conflict", e.to_string()),
            })?;
            shared.note_replica_primary(vm, &hello.primary_host);
            Ok(serde_json::to_vec(&hello_reply(&rvm)).unwrap_or_default())
        }
        (Method::GET, ["v1", "replicas", vm, "state"]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            Ok(serde_json::to_vec(&hello_reply(&rvm)).unwrap_or_default())
        }
        (Method::PUT, ["v1", "replicas", vm, "deltas", seq]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            let seq: u64 = seq.parse().map_err(|_| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "sequence must be a number",
                )
            })?;
            let point = receive(rvm.clone(), seq, req.into_body()).await?;
            // Retention runs after the answer so it never adds to replication latency.
            tokio::task::spawn_blocking(move || retain(&rvm));
            shared.events.emit(
                events::POINT_COMMITTED,
                Some(vm),
                "info",
                &format!(
                    "point {} committed ({} bytes stored)",
                    point.seq, point.stored_bytes
                ),
            );
            Ok(serde_json::to_vec(&point).unwrap_or_default())
        }
        (m, _) => Err(refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such route {m} {path}"),
        )),
    }
}

/// Folds `rvm` down to [`RETAIN_POINTS`] points (blocking).
fn retain(rvm: &ReplicaVm) {
    if let Err(e) = rvm.retain(RETAIN_POINTS) {
        tracing::error!(vm = %rvm.vm_id(), "retention failed: {e}");
    }
}

/// Retention on its own schedule ([`RETENTION_INTERVAL`]), on a blocking thread, never in a
/// peer request's path; each pass also retries opening replica VMs still pending.
pub fn spawn_retention(shared: Arc<Shared>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the store was just opened
        loop {
            tick.tick().await;
            shared.retry_replica_store();
            let Some((store, _)) = shared.replica_store() else {
                continue;
            };
            let pass = tokio::task::spawn_blocking(move || {
                store.open_pending();
                for rvm in store.vms() {
                    retain(&rvm);
                }
                if let Err(e) = store.relieve_index_pressure() {
                    tracing::error!("folding to relieve the replica index failed: {e}");
                }
            });
            if let Err(e) = pass.await {
                tracing::error!("retention pass failed: {e}");
            }
        }
    });
}

/// A refusal for a VM the store does not list: unknown, or not opened yet.
fn missing(store: &replica::ReplicaStore, vm: &str) -> Refusal {
    if store.is_pending(vm) {
        return replica_refusal(ReplicaError::Verifying { vm_id: vm.into() });
    }
    unknown(vm)
}

fn unknown(vm: &str) -> Refusal {
    refuse(
        StatusCode::NOT_FOUND,
        "unknown_vm",
        format!("no replica of {vm} here; the primary must say hello first"),
    )
}

fn hello_reply(rvm: &ReplicaVm) -> HelloReply {
    HelloReply {
        vm: rvm.vm_id().to_string(),
        latest_seq: rvm.latest_seq(),
        generation: rvm.generation(),
        damage: rvm.damage(),
    }
}

/// Streams an upload into the store on a blocking thread and commits it.
async fn receive(rvm: Arc<ReplicaVm>, seq: u64, mut body: Incoming) -> Result<DeltaReply, Refusal> {
    let expected = rvm.latest_seq() + 1;
    if seq != expected {
        let mut r = refuse(
            StatusCode::CONFLICT,
            "out_of_sequence",
            format!("delta {seq} is out of sequence: the replica expects {expected}"),
        );
        r.err.expected_seq = Some(expected);
        return Err(r);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(UPLOAD_QUEUE_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || -> Result<DeltaReply, ReplicaError> {
        use std::io::Write;
        let mut incoming = rvm.begin_receive()?;
        while let Some(chunk) = rx.blocking_recv() {
            if incoming.write_all(&chunk).is_err() {
                // The store keeps the named reason; commit reports it and discards the upload.
                break;
            }
        }
        let point = rvm.commit(incoming);
        // The upload's buffers are free now: give them back (see `heap`).
        super::heap::give_back();
        let point = point?;
        Ok(DeltaReply {
            seq: point.seq,
            cut_time_unix_ns: point.cut_time_unix_ns,
            stored_bytes: point.stored_bytes,
        })
    });
    let mut network_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    if tx.send(data).await.is_err() {
                        break; // the writer stopped: its error says why
                    }
                }
            }
            Err(e) => {
                network_error = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(e) = network_error {
        drop(tx);
        // Dropping the incoming upload without commit discards it.
        let _ = writer.await;
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "upload_interrupted",
            format!("upload interrupted: {e}"),
        ));
    }
    drop(tx);
    match writer.await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(replica_refusal(e)),
        Err(e) => Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

fn replica_refusal(e: ReplicaError) -> Refusal {
    let msg = e.to_string();
    if let ReplicaError::Verifying { .. } = e {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "verifying", msg);
    }
    if e.is_transient() {
        // Out of descriptors or memory: nothing is wrong with the delta or the store.
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "store_busy", msg);
    }
    match e {
        // The primary takes `damaged` as "resynchronization required", with this reason.
        ReplicaError::VmDamaged { .. } => refuse(StatusCode::CONFLICT, "damaged", msg),
        ReplicaError::OutOfSequence { expected, .. } => {
            let mut r = refuse(StatusCode::CONFLICT, "out_of_sequence", msg);
            r.err.expected_seq = Some(expected);
            r
        }
        // Everything that is wrong with the delta itself (docs/formats/peer-protocol.md),
        // including truncation; only the replica's own failures are store errors.
        ReplicaError::Delta(_)
        | ReplicaError::Incomplete { .. }
        | ReplicaError::TooManyFrames { .. }
        | ReplicaError::WrongVm { .. }
        | ReplicaError::WrongGeneration { .. }
        | ReplicaError::DiskMismatch => refuse(StatusCode::BAD_REQUEST, "corrupt_delta", msg),
        _ => refuse(StatusCode::INTERNAL_SERVER_ERROR, "store_error", msg),
    }
}

/// Allow-list match: `*` allows any trusted peer; a pattern may hold one `*` wildcard
/// (`*.example.com`, `web-*`); otherwise names must match exactly.
pub fn allowed(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.split_once('*') {
        None => p == name,
        Some((pre, post)) => {
            name.len() >= pre.len() + post.len() && name.starts_with(pre) && name.ends_with(post)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{allowed, replica_refusal};
    use hyper::StatusCode;
    use replica::ReplicaError;

    #[test]
    fn truncated_delta_is_refused_as_corrupt_not_as_a_store_error() {
        for e in [
            ReplicaError::Incomplete {
                received_bytes: 131,
            },
            ReplicaError::TooManyFrames { max: 1 },
            ReplicaError::WrongVm {
                expected: "web".into(),
                got: "db".into(),
            },
            ReplicaError::WrongGeneration {
                expected: 1,
                got: 2,
            },
            ReplicaError::DiskMismatch,
        ] {
            let r = replica_refusal(e);
            assert_eq!(
                (r.status, r.err.code.as_str()),
                (StatusCode::BAD_REQUEST, "corrupt_delta"),
                "{}",
                r.err.error
            );
        }
        let io = ReplicaError::Io {
            op: "write",
            path: "/x".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(replica_refusal(io).err.code, "store_error");
    }

    #[test]
    fn allow_list_patterns() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(allowed(&p(&["*"]), "anything"));
        assert!(allowed(&p(&["*.example.com"]), "a.example.com"));
        assert!(!allowed(&p(&["*.example.com"]), "example.com"));
        assert!(allowed(&p(&["web-*"]), "web-1"));
        assert!(!allowed(&p(&["primary"]), "primary2"));
        assert!(!allowed(&p(&[]), "x"));
    }
}
