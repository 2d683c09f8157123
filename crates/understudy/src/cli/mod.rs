//! The command-line client: parses user input, calls the local daemon, prints results for
//! humans (tables, progress bars) or scripts (`--json`). Never opens a disk image.

mod api;
pub mod events;
mod output;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use proto::{
    Compression, CreateVm, EnableReplication, ExportPoint, HistoryPolicy, ImportVm, Measure,
    PointInfo, ReplicaServerConfig, ReplicationState, ReplicationStatus, ServePoint, ServedPoint,
    SetReplication, SyncResult, UnservePoint, VmInfo,
};
use serde_json::Value;

pub use api::{Api, ApiFailure};

/// How often `replication start --wait` polls the daemon: often enough that a script waiting
/// on it learns of completion within 50 ms (a poll is one local request, ~0.1 ms of CPU).
const WAIT_POLL: Duration = Duration::from_millis(50);

pub fn identity(data_dir: &Path) -> anyhow::Result<()> {
    // The daemon writes the CA of the identity it serves with (generated or --ca) at start.
    let pem = std::fs::read_to_string(data_dir.join("identity.pem")).with_context(|| {
        format!(
            "no identity in {} yet: start the daemon once with `understudy serve --data-dir {} --listen HOST:PORT --name NAME`",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    print!("{pem}");
    Ok(())
}

pub fn trust_add(data_dir: &Path, file: &Path, scope: &transport::Scope) -> anyhow::Result<()> {
    let store = transport::TrustStore::open(&data_dir.join("trust"))?;
    let added = store.add_scoped(file, scope)?;
    // A running daemon picks the new trust up for new connections at once.
    let api = Api::new(data_dir);
    let _ = api.post::<_, Value>("/v1/trust/reload", &serde_json::json!({}));
    let subject = added.subject.as_deref().unwrap_or("certificate");
    let scope = format!(
        "as {} for {}",
        added.scope.roles(),
        added.scope.names.join(", ")
    );
    if added.newly_added {
        println!("trusted {subject} ({}) {scope}", added.fingerprint);
    } else {
        println!("{subject} ({}) is trusted {scope}", added.fingerprint);
    }
    Ok(())
}

pub fn trust_list(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store = transport::TrustStore::open(&data_dir.join("trust"))?;
    let list = store.list()?;
    if json {
        let items: Vec<Value> = list
            .iter()
            .map(|t| serde_json::json!({"subject": t.subject, "fingerprint": t.fingerprint, "path": t.path,
                "names": t.scope.names, "replica": t.scope.replica, "primary": t.scope.primary}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for t in list {
            println!(
                "{}  {}  as {} for {}",
                t.fingerprint,
                t.subject.as_deref().unwrap_or("-"),
                t.scope.roles(),
                t.scope.names.join(", ")
            );
        }
    }
    Ok(())
}

pub fn replica_server_enable(
    api: &Api,
    storage: &Path,
    allow: Vec<String>,
    trust_group: Option<String>,
    monitoring_interval: Option<&str>,
) -> anyhow::Result<()> {
    let storage = absolute(storage)?;
    let monitoring_interval_secs = monitoring_interval
        .map(parse_duration_secs)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--monitoring-interval: {e}"))?;
    let allow = if allow.is_empty() {
        vec!["*".to_string()]
    } else {
        allow
    };
    let cfg = ReplicaServerConfig {
        enabled: true,
        storage: storage.display().to_string(),
        allow,
        trust_group,
        store_id: None,
        monitoring_interval_secs,
        status: None,
    };
    let cfg: ReplicaServerConfig = api.post("/v1/replica-server", &cfg)?;
    println!(
        "replica server enabled: storage {}, allowing {}",
        cfg.storage,
        cfg.allow.join(", ")
    );
    Ok(())
}

pub fn replica_server_disable(api: &Api) -> anyhow::Result<()> {
    let _: ReplicaServerConfig = api.post("/v1/replica-server/disable", &serde_json::json!({}))?;
    println!("replica server disabled");
    Ok(())
}

pub fn replica_server_show(api: &Api, json: bool) -> anyhow::Result<()> {
    let cfg: Option<ReplicaServerConfig> = api.get("/v1/replica-server")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
    } else {
        match cfg {
            Some(c) if c.enabled => println!(
                "enabled, storage {} ({}), allow {}",
                c.storage,
                c.status.as_deref().unwrap_or("unknown"),
                c.allow.join(", ")
            ),
            _ => println!("disabled"),
        }
    }
    Ok(())
}

pub fn vm_create(api: &Api, name: &str, disks: &[String]) -> anyhow::Result<()> {
    let sizes = disks
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vm: VmInfo = api.post(
        "/v1/vms",
        &CreateVm {
            name: name.to_string(),
            disk_sizes_bytes: sizes,
        },
    )?;
    output::print_vm(&vm);
    Ok(())
}

pub fn vm_import(api: &Api, name: &str, images: &[PathBuf]) -> anyhow::Result<()> {
    let images = images
        .iter()
        .map(|p| absolute(p).map(|p| p.display().to_string()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vm: VmInfo = api.post(
        "/v1/vms/import",
        &ImportVm {
            name: name.to_string(),
            images,
        },
    )?;
    output::print_vm(&vm);
    Ok(())
}

pub fn vm_list(api: &Api, json: bool) -> anyhow::Result<()> {
    let vms: Vec<VmInfo> = api.get("/v1/vms")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        output::print_vm_table(&vms);
    }
    Ok(())
}

/// `vm set NAME ...`: `req` as the flags gave it; the guest agent socket is made absolute.
pub fn vm_set(api: &Api, guest_agent: Option<&Path>, mut req: proto::SetVm) -> anyhow::Result<()> {
    if let Some(p) = guest_agent {
        req.guest_agent = Some(absolute(p)?.display().to_string());
    }
    let vm: VmInfo = api.post(&format!("/v1/vms/{}/set", path_segment(&req.vm)?), &req)?;
    output::print_vm(&vm);
    Ok(())
}

pub fn vm_show(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let vm: VmInfo = api.get(&format!("/v1/vms/{}", path_segment(name)?))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vm)?);
    } else {
        output::print_vm(&vm);
    }
    Ok(())
}

pub fn replication_enable(
    api: &Api,
    name: &str,
    replica: &str,
    frequency: u32,
    compression: &str,
    disks: Option<Vec<u32>>,
    history: &crate::HistoryArgs,
) -> anyhow::Result<()> {
    let history = history_policy(history)?;
    if !(1..=3600).contains(&frequency) {
        bail!("--frequency must be between 1 and 3600 seconds (Hyper-V's 30, 300 and 900 included), got {frequency}");
    }
    let compression = if compression == "none" {
        Compression::None
    } else {
        Compression::Zstd
    };
    let req = EnableReplication {
        vm: name.to_string(),
        replica: replica.to_string(),
        frequency_secs: frequency,
        compression,
        disks,
        history,
    };
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{}/replication/enable", path_segment(name)?),
        &req,
    )?;
    println!(
        "replication enabled for {} to {} every {} s (disks {:?}); run `understudy replication start {}`",
        st.vm, st.peer, st.frequency_secs, st.disks, st.vm
    );
    Ok(())
}

/// The history flags of `replication enable` as a policy: `None` when none was given (the
/// replica then keeps its newest 64 points); a flag not given is 0 / off.
fn history_policy(h: &crate::HistoryArgs) -> anyhow::Result<Option<HistoryPolicy>> {
    if h.recovery_history.is_none()
        && h.app_consistent_every.is_none()
        && h.keep_every_point_for.is_none()
    {
        return Ok(None);
    }
    Ok(Some(HistoryPolicy {
        recovery_history: h.recovery_history.unwrap_or(0),
        app_consistent_every_hours: h.app_consistent_every,
        keep_every_point_for_secs: match &h.keep_every_point_for {
            Some(d) => parse_history_window_secs(d)?,
            None => 0,
        },
    }))
}

/// `--keep-every-point-for`: `90s`, `30m`, `4h`, `1h30m` or plain seconds; `0` turns the
/// window off (unlike `points serve --for`, [`parse_duration_secs`]).
pub fn parse_history_window_secs(s: &str) -> anyhow::Result<u64> {
    let bad = || {
        anyhow::anyhow!(
            "--keep-every-point-for takes a duration such as 30m, 4h, 90s or 1h30m, got {s:?}"
        )
    };
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
        any = true;
    }
    if !any || !num.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

pub fn replication_set(
    api: &Api,
    name: &str,
    frequency: Option<u32>,
    compression: Option<&str>,
    history: &crate::HistoryArgs,
    (auto_resynchronize, resynchronize_window): (Option<bool>, Option<String>),
    lag_warning_cycles: Option<u32>,
) -> anyhow::Result<()> {
    let keep = match &history.keep_every_point_for {
        Some(d) => Some(parse_history_window_secs(d)?),
        None => None,
    };
    let req = SetReplication {
        vm: name.to_string(),
        frequency_secs: frequency,
        compression: compression.map(|c| {
            if c == "none" {
                Compression::None
            } else {
                Compression::Zstd
            }
        }),
        recovery_history: history.recovery_history,
        app_consistent_every_hours: history.app_consistent_every,
        keep_every_point_for_secs: keep,
        auto_resynchronize,
        resynchronize_window,
        lag_warning_cycles,
    };
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{}/replication/set", path_segment(name)?),
        &req,
    )?;
    println!(
        "{}: every {} s, compression {}, {}, {}, {}",
        st.vm,
        st.frequency_secs,
        match st.compression {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        },
        output::history_summary(st.history.as_ref()),
        output::auto_resync_summary(&st),
        match st.lag_warning_cycles {
            Some(n) => format!("lag warning after {n} cycles"),
            None => "lag warning after 3 cycles or 1 h".to_string(),
        }
    );
    Ok(())
}

pub fn replication_start(
    api: &Api,
    name: &str,
    wait: bool,
    timeout_secs: Option<u64>,
    use_existing: Vec<String>,
    at: Option<&str>,
) -> anyhow::Result<()> {
    let deadline = timeout_secs.map(|t| std::time::Instant::now() + Duration::from_secs(t));
    let seg = path_segment(name)?;
    let from_existing = !use_existing.is_empty();
    let at_unix_ns = match at {
        None => None,
        Some(t) => Some(proto::time::unix_ns_from_rfc3339(t).ok_or_else(|| {
            anyhow::anyhow!("invalid --at {t:?}: give an RFC 3339 time, e.g. 2026-12-03T18:30:00Z")
        })?),
    };
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{seg}/replication/start"),
        &proto::StartReplication {
            use_existing,
            at_unix_ns,
            to_media: None,
        },
    )?;
    if !wait && st.state == ReplicationState::ReadyForInitialReplication {
        if let Some(t) = at {
            println!("initial replication of {name} scheduled at {t}; it starts by itself then");
            return Ok(());
        }
    }
    if !wait {
        if from_existing {
            println!("initial replication of {name} started from the existing copy on the replica: only the blocks that differ are sent; follow it with `understudy replication status {name}`");
            return Ok(());
        }
        println!("initial replication of {name} started; follow it with `understudy replication status {name}`");
        return Ok(());
    }
    let mut progress = output::Progress::start(format!("initial replication of {name}"));
    loop {
        let st: ReplicationStatus = api.get(&format!("/v1/vms/{seg}/replication"))?;
        if let Some(p) = &st.progress {
            if let Some(e) = &st.last_error {
                progress.message(format!("retrying: {e}"));
            }
            progress.set(p.done_bytes, p.total_bytes);
        }
        match st.state {
            ReplicationState::Replicating | ReplicationState::Suspended => break,
            ReplicationState::ResynchronizationRequired => {
                bail!(
                    "{name}: resynchronization required: {}",
                    st.resync_reason.unwrap_or_default()
                )
            }
            _ => {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    progress.abandon();
                    let why = st
                        .last_error
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default();
                    return Err(ApiFailure {
                        message: format!(
                            "initial replication of {name} is not complete after {} s; it goes on in the background{why}",
                            timeout_secs.unwrap_or(0)
                        ),
                        transient: true,
                    }
                    .into());
                }
                std::thread::sleep(WAIT_POLL)
            }
        }
    }
    progress.finish();
    println!("initial replication of {name} complete");
    Ok(())
}

pub fn replication_sync(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let r: SyncResult = api.post(
        &format!("/v1/vms/{}/replication/sync", path_segment(name)?),
        &serde_json::json!({}),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: point {} committed ({} changed, {} sent, {} ms)",
            r.vm,
            r.seq,
            output::bytes(r.delta_bytes),
            output::bytes(r.sent_bytes),
            r.latency_ms
        );
    }
    Ok(())
}

pub fn replication_status(api: &Api, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let list: Vec<ReplicationStatus> = match name {
        Some(n) => vec![api.get(&format!("/v1/vms/{}/replication", path_segment(n)?))?],
        None => api.get("/v1/replication")?,
    };
    if json {
        if name.is_some() {
            println!("{}", serde_json::to_string_pretty(&list[0])?);
        } else {
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
    } else {
        output::print_status(&list);
        // One VM on a terminal while it resynchronizes: where it stands, as a bar.
        if let (Some(_), [st]) = (name, list.as_slice()) {
            if let (Some(r), true) = (&st.resync, std::io::stderr().is_terminal()) {
                let mut progress = output::Progress::to("resynchronization", true);
                output::show_resync(&mut progress, r);
                progress.abandon();
            }
        }
    }
    Ok(())
}

pub fn replication_reset_statistics(api: &Api, name: &str) -> anyhow::Result<()> {
    let _: serde_json::Value = api.post(
        &format!(
            "/v1/vms/{}/replication/reset-statistics",
            path_segment(name)?
        ),
        &serde_json::json!({}),
    )?;
    println!("{name}: statistics reset; measure counts from now");
    Ok(())
}

pub fn replication_measure(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let m: Measure = api.get(&format!(
        "/v1/vms/{}/replication/measure",
        path_segment(name)?
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        output::print_measure(&m);
    }
    Ok(())
}

pub fn replication_action(api: &Api, name: &str, action: &str) -> anyhow::Result<()> {
    replication_action_path(api, name, &format!("replication/{action}"))
}

/// POSTs to `/v1/vms/NAME/<path>` and prints the replication state it answers.
pub fn replication_action_path(api: &Api, name: &str, path: &str) -> anyhow::Result<()> {
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{}/{path}", path_segment(name)?),
        &serde_json::json!({}),
    )?;
    println!("{}: {:?}", st.vm, st.state);
    Ok(())
}

/// `failover prepare NAME`: fences the VM and waits until its last changes are committed on
/// the replica, showing the pending bytes going out.
pub fn failover_prepare(api: &Api, name: &str) -> anyhow::Result<()> {
    let seg = path_segment(name)?;
    let status_path = format!("/v1/vms/{seg}/replication");
    let pending = |api: &Api| {
        api.get::<ReplicationStatus>(&status_path)
            .ok()
            .map(|st| st.pending_bytes)
    };
    let at_start = pending(api).unwrap_or(0);
    let progress = output::Progress::start(format!("failover prepare of {name}"));
    let st: ReplicationStatus = with_progress(
        progress,
        || pending(api).map(|p| (at_start.saturating_sub(p), at_start)),
        || {
            api.post(
                &format!("/v1/vms/{seg}/failover/prepare"),
                &serde_json::json!({}),
            )
        },
    )?;
    println!("{}: {:?}", st.vm, st.state);
    Ok(())
}

/// `replication start NAME --to-media DIR`.
pub fn replication_start_to_media(api: &Api, name: &str, dir: &str) -> anyhow::Result<()> {
    let dir = absolute(Path::new(dir))?.display().to_string();
    let m: serde_json::Value = api.post(
        &format!("/v1/vms/{}/replication/start", path_segment(name)?),
        &proto::StartReplication {
            to_media: Some(dir.clone()),
            ..Default::default()
        },
    )?;
    println!(
        "point 1 of {name} written to {dir} ({} bytes); carry it to the replica host and run `understudy replication import-media {name} --from DIR` there",
        m["delta_bytes"]
    );
    Ok(())
}

/// `replication import-media NAME --from DIR` (on the replica host).
pub fn replication_import_media(api: &Api, name: &str, from: &str) -> anyhow::Result<()> {
    let from = absolute(Path::new(from))?.display().to_string();
    let r: proto::peer::DeltaReply = api.post(
        &format!("/v1/vms/{}/replication/import-media", path_segment(name)?),
        &proto::ImportMedia { from: from.clone() },
    )?;
    println!(
        "point {} of {name} imported from {from} ({} bytes stored); the primary adopts it at its next cycle",
        r.seq, r.stored_bytes
    );
    Ok(())
}

/// `replication resume NAME --resynchronize [--at TIME] [--wait]`.
pub fn resynchronize(api: &Api, name: &str, at: Option<&str>, wait: bool) -> anyhow::Result<()> {
    let at_unix_ns = match at {
        None => None,
        Some(t) => Some(proto::time::unix_ns_from_rfc3339(t).ok_or_else(|| {
            anyhow::anyhow!("invalid --at {t:?}: give an RFC 3339 time, e.g. 2026-12-03T18:30:00Z")
        })?),
    };
    let seg = path_segment(name)?;
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{seg}/replication/resynchronize"),
        &proto::Resynchronize { at_unix_ns },
    )?;
    println!("{}: {:?}", st.vm, st.state);
    if wait {
        wait_resync(api, name, seg)?;
    }
    Ok(())
}

/// How often `--wait` asks for the status of a resynchronization.
const RESYNC_POLL: Duration = Duration::from_millis(250);

/// `--wait`: follows a resynchronization (a bar on a terminal) until the VM replicates again
/// (Ok) or it stops without completing (an error saying why).
fn wait_resync(api: &Api, name: &str, seg: &str) -> anyhow::Result<()> {
    let mut progress = output::Progress::start(format!("resynchronization of {name}"));
    let mut waiting_told = false;
    loop {
        let st: ReplicationStatus = api.get(&format!("/v1/vms/{seg}/replication"))?;
        match (&st.resync, &st.resync_start_time) {
            (Some(r), _) => output::show_resync(&mut progress, r),
            (None, Some(at)) if !waiting_told => {
                waiting_told = true;
                progress.message(format!("waiting: starts at {at}"));
            }
            _ => {}
        }
        match st.state {
            ReplicationState::Replicating => {
                progress.finish();
                println!(
                    "resynchronization of {name} complete (point {})",
                    st.last_seq
                );
                return Ok(());
            }
            ReplicationState::Resynchronizing | ReplicationState::WaitingForStartResynchronize => {
                std::thread::sleep(RESYNC_POLL)
            }
            ReplicationState::ResynchronizationRequired => {
                progress.abandon();
                bail!(
                    "{name}: the resynchronization stopped; resynchronization required: {}",
                    st.resync_reason.unwrap_or_default()
                )
            }
            other => {
                progress.abandon();
                bail!("{name}: the resynchronization stopped: replication is {other:?}")
            }
        }
    }
}

/// `failover start NAME [--point] [--test] [--start] [--json]`. A launch command that failed
/// (`--start`) is an error (exit 1) after the answer is printed: the failover stays.
pub fn failover_start(
    api: &Api,
    name: &str,
    req: proto::FailoverStart,
    json: bool,
) -> anyhow::Result<()> {
    let info: proto::FailoverInfo = api.post(
        &format!("/v1/vms/{}/failover/start", path_segment(name)?),
        &req,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "{}: {} of {} at point {}; writable disks:",
            info.served_as,
            if info.test {
                "test failover"
            } else {
                "failover"
            },
            info.vm,
            info.point
        );
        for d in &info.disks {
            println!("  disk {}: {}", d.index, d.nbd_uri);
        }
        if let (Some(l), false) = (&info.launched, info.launch_failed) {
            println!("launch command: {l}");
        }
    }
    if info.launch_failed {
        bail!(
            "{} is served, but its launch failed: {}",
            info.served_as,
            info.launched.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// `replication reverse NAME --replica HOST:PORT [--frequency S]`.
pub fn reverse(
    api: &Api,
    name: &str,
    replica: &str,
    frequency: u32,
    json: bool,
) -> anyhow::Result<()> {
    let st: ReplicationStatus = api.post(
        &format!("/v1/vms/{}/replication/reverse", path_segment(name)?),
        &proto::ReverseReplication {
            vm: name.to_string(),
            replica: replica.to_string(),
            frequency_secs: frequency,
            compression: proto::Compression::Zstd,
        },
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("{}: {:?}, replicating to {}", st.vm, st.state, st.peer);
    }
    Ok(())
}

/// `failover complete NAME`.
pub fn failover_complete(api: &Api, name: &str) -> anyhow::Result<()> {
    let path = format!("/v1/vms/{}/failover/complete", path_segment(name)?);
    let id = host::progress::failover_complete_id(name);
    let progress = output::Progress::start(format!("failover complete of {name}"));
    let vm: proto::VmInfo = with_progress(progress, progress_of(api, &id), || {
        api.post(&path, &serde_json::json!({}))
    })?;
    println!(
        "{}: failover complete; it runs on this host now, disks:",
        vm.name
    );
    for d in &vm.disks {
        println!("  disk {}: {}", d.index, d.nbd_uri);
    }
    Ok(())
}

/// `failover stop NAME [--test]`.
/// `replication remove NAME`.
pub fn replication_remove(api: &Api, name: &str) -> anyhow::Result<()> {
    let r: serde_json::Value = api.post(
        &format!("/v1/vms/{}/replication/remove", path_segment(name)?),
        &serde_json::json!({}),
    )?;
    println!("{}", r["message"].as_str().unwrap_or("replication removed"));
    Ok(())
}

pub fn failover_stop(api: &Api, name: &str, test: bool) -> anyhow::Result<()> {
    let r: serde_json::Value = api.post(
        &format!("/v1/vms/{}/failover/stop", path_segment(name)?),
        &proto::FailoverStop { test },
    )?;
    println!("{} stopped", r["stopped"].as_str().unwrap_or(name));
    Ok(())
}

pub fn points_list(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let points: Vec<PointInfo> = api.get(&format!("/v1/points/{}", path_segment(name)?))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&points)?);
    } else {
        output::print_points(&points);
    }
    Ok(())
}

pub fn points_export(
    api: &Api,
    name: &str,
    point: &str,
    disk: u32,
    to: &Path,
) -> anyhow::Result<()> {
    let to = absolute(to)?;
    let progress_id = format!(
        "export-{}-{}",
        std::process::id(),
        proto::time::now_unix_ns()
    );
    let req = ExportPoint {
        vm: name.to_string(),
        point: point.to_string(),
        disk,
        to: to.display().to_string(),
        progress_id: Some(progress_id.clone()),
    };
    let path = format!("/v1/points/{}/export", path_segment(name)?);
    let progress = output::Progress::start(format!("export of {name} disk {disk}"));
    let p: PointInfo = with_progress(progress, progress_of(api, &progress_id), || {
        api.post(&path, &req)
    })?;
    println!(
        "exported {name} point {} ({}) disk {disk} to {}",
        p.id,
        p.created_at,
        to.display()
    );
    Ok(())
}

pub fn backup(api: &Api, mut req: proto::BackupPoint, json: bool) -> anyhow::Result<()> {
    let to = absolute(Path::new(&req.to))?;
    req.to = to.display().to_string();
    let progress_id = format!(
        "backup-{}-{}",
        std::process::id(),
        proto::time::now_unix_ns()
    );
    req.progress_id = Some(progress_id.clone());
    let path = format!("/v1/backup/{}", path_segment(&req.vm)?);
    // With --json stdout is the document alone: no progress lines.
    let b: host::backup::Backup = if json {
        api.post(&path, &req)?
    } else {
        let progress = output::Progress::start(format!("backup of {}", req.vm));
        with_progress(progress, progress_of(api, &progress_id), || {
            api.post(&path, &req)
        })?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let kind = match &b.incremental_from {
        Some(f) => format!("incremental from point {} ({})", f.point, f.backup),
        None => "full".to_string(),
    };
    println!(
        "backed up {} point {} (cut {}, {}-consistent), {kind}, to {}",
        b.vm,
        b.point,
        b.cut_time,
        b.consistency,
        to.display()
    );
    for d in &b.disks {
        println!(
            "  disk {}: {} ({}, {} bytes, {} copied) blake3 {}",
            d.index,
            d.file,
            d.format.as_str(),
            d.virtual_size,
            d.copied_bytes,
            d.blake3
        );
    }
    Ok(())
}

/// `backup verify DIR`: local (a backup is checked where it was copied to, no daemon).
pub fn backup_verify(dir: &Path) -> anyhow::Result<()> {
    let (b, verdicts) = host::backup::verify(dir)?;
    let mut bad = Vec::new();
    for v in &verdicts {
        match &v.problem {
            None => println!("disk {} ({}): OK", v.index, v.file),
            Some(p) => {
                println!("disk {} ({}): FAILED: {p}", v.index, v.file);
                bad.push(format!("disk {} ({}): {p}", v.index, v.file));
            }
        }
    }
    if !bad.is_empty() {
        anyhow::bail!(
            "backup {} of {} point {} does not verify: {}",
            dir.display(),
            b.vm,
            b.point,
            bad.join("; ")
        );
    }
    println!(
        "backup of {} point {} ({}): OK",
        b.vm,
        b.point,
        dir.display()
    );
    Ok(())
}

/// How often a long call's progress is read while it runs.
const PROGRESS_POLL: Duration = Duration::from_millis(500);

/// Samples `(done, total)` of the operation the daemon reports under `id`.
fn progress_of<'a>(api: &'a Api, id: &str) -> impl FnMut() -> Option<(u64, u64)> + 'a {
    let path = format!("/v1/progress/{id}");
    move || {
        // Not there yet, or already read: nothing to show this time.
        api.get::<proto::Progress>(&path)
            .ok()
            .map(|p| (p.done_bytes, p.total_bytes))
    }
}

/// Runs `call` (a long API call) on its own thread and shows on `progress` what `sample`
/// says (bytes done of total) until it returns, then once more for the final line.
fn with_progress<R: Send>(
    mut progress: output::Progress,
    mut sample: impl FnMut() -> Option<(u64, u64)>,
    call: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    progress.begin();
    let result = std::thread::scope(|scope| {
        let worker = scope.spawn(call);
        while !worker.is_finished() {
            if let Some((done, total)) = sample() {
                progress.set(done, total);
            }
            let until = std::time::Instant::now() + PROGRESS_POLL;
            while !worker.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        worker
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the API call panicked")))
    });
    match &result {
        Ok(_) => {
            if let Some((done, total)) = sample() {
                progress.set_quietly(done, total);
            }
            progress.finish()
        }
        Err(_) => progress.abandon(),
    }
    result
}

pub fn points_serve(
    api: &Api,
    name: &str,
    point: &str,
    disk: Option<u32>,
    for_secs: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let for_secs = for_secs
        .map(parse_duration_secs)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--for: {e}"))?;
    let req = ServePoint {
        vm: name.to_string(),
        point: point.to_string(),
        disk,
        for_secs,
    };
    let s: ServedPoint = api.post(&format!("/v1/points/{}/serve", path_segment(name)?), &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        output::print_served(&s);
    }
    Ok(())
}

pub fn points_unserve(api: &Api, name: &str, point: Option<u64>) -> anyhow::Result<()> {
    let req = UnservePoint {
        vm: name.to_string(),
        point,
    };
    let done: Vec<u64> = api.post(&format!("/v1/points/{}/unserve", path_segment(name)?), &req)?;
    for id in done {
        println!("{name} point {id} no longer served");
    }
    Ok(())
}

pub fn points_served(api: &Api, name: &str, json: bool) -> anyhow::Result<()> {
    let served: Vec<ServedPoint> =
        api.get(&format!("/v1/points/{}/served", path_segment(name)?))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&served)?);
    } else {
        for s in &served {
            output::print_served(s);
        }
    }
    Ok(())
}

/// Parses a duration for `--for`: a number of seconds with an optional unit `s`, `m`, `h` or
/// `d` (`90s`, `30m`, `4h`, `2d`; a bare number is seconds). The daemon bounds the value.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1u64),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86400),
        _ => (t, 1),
    };
    let bad = || format!("invalid duration {s:?}: use a number with s, m, h or d, e.g. 30m");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = n.checked_mul(mult).ok_or_else(bad)?;
    if secs == 0 {
        return Err(format!(
            "invalid duration {s:?}: it must be at least 1 second"
        ));
    }
    Ok(secs)
}

/// Parses `1G`, `512M`, `64K`, `1T` or a byte count (binary units; `iB`/`B` suffixes allowed).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("invalid size {s:?}: use a number with K, M, G or T, e.g. 8G")
    })?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))?;
    if bytes == 0 || bytes % 4096 != 0 {
        bail!("invalid size {s:?}: a disk must be a non-zero multiple of 4 KiB");
    }
    Ok(bytes)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("reading the current directory")?
        .join(p))
}

/// VM names travel in URL paths; they are validated by the daemon, but refuse here what
/// could change the path's meaning.
fn path_segment(name: &str) -> anyhow::Result<&str> {
    if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) {
        bail!("invalid VM name {name:?}: use letters, digits, '.', '_' and '-'");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1000").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations_parse_and_bad_ones_are_one_line_errors() {
        assert_eq!(parse_history_window_secs("30m").unwrap(), 1800);
        assert_eq!(parse_history_window_secs("4h").unwrap(), 14_400);
        assert_eq!(parse_history_window_secs("1h30m").unwrap(), 5400);
        assert_eq!(parse_history_window_secs("90").unwrap(), 90);
        for bad in ["", "m", "4x", "30m5", "-1h", "99999999999999999999h"] {
            let e = parse_history_window_secs(bad).unwrap_err().to_string();
            assert!(
                !e.contains('\n') && e.contains("--keep-every-point-for"),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("4h"), Ok(14400));
        assert_eq!(parse_duration_secs("2d"), Ok(172800));
        assert_eq!(parse_duration_secs("5"), Ok(5));
        assert!(parse_duration_secs("0s").is_err());
        assert!(parse_duration_secs("soon").is_err());
        assert!(parse_duration_secs("99999999999999999999d").is_err());
    }
}
