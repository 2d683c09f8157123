//! The replica side of replication: the peer routes that accept hellos and deltas from
//! trusted, allowed primaries and commit them into the replica store. A delta becomes a
//! recovery point only when the store has made it durable (promise 2); anything malformed,
//! foreign or out of sequence is refused with a named reason and changes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use proto::peer::{DeltaReply, Hello, HelloReply, PartialReply, PeerError};
use replica::{Incoming as Receiver, ReplicaError, ReplicaVm};
use tokio::sync::{watch, Notify};
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
/// How long an interrupted upload is kept for a resume (docs/formats/peer-protocol.md): the
/// primary retries within seconds (its backoff is capped at 10 s and it gives up after 8
/// attempts without progress); past this, the receiver's partial file and writer threads are
/// given back.
const PARTIAL_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a resume waits for the upload it cuts off to stop and be kept: that upload only
/// has to hand its queued chunks (at most `UPLOAD_QUEUE_CHUNKS`) to its writer thread.
const CUT_OFF_WAIT: Duration = Duration::from_secs(30);

/// Interrupted uploads kept for a resume, and the upload running now, per VM: at most one of
/// either (a primary ships one delta of a VM at a time). See "Resuming an interrupted upload"
/// in docs/formats/peer-protocol.md.
#[derive(Default)]
pub struct Partials {
    slots: parking_lot::Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
}

enum Slot {
    /// Upload `id` of `seq` is being received. `cut_off` stops it (as if its transport broke);
    /// `ended` closes when it has stopped and been kept or finished.
    Running {
        id: u64,
        seq: u64,
        cut_off: Arc<Notify>,
        ended: watch::Receiver<()>,
    },
    /// Upload `id` of `seq` broke in the transport; its receiver waits for a resume.
    Kept {
        id: u64,
        seq: u64,
        checksum: [u8; 32],
        incoming: Box<Receiver>,
    },
}

/// What an upload registered in [`Partials`] needs: its id, how it is cut off, and the sender
/// whose drop tells waiters that it ended.
struct Registration {
    id: u64,
    cut_off: Arc<Notify>,
    ended: watch::Sender<()>,
}

impl Partials {
    /// Registers a new upload of `seq` as the VM's running one. Whatever the VM had (a kept
    /// upload, another running one) is superseded: the kept receiver is returned to be
    /// dropped off the runtime; a running one will find it cannot be kept.
    fn start(&self, vm: &str, seq: u64) -> (Registration, Option<Box<Receiver>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cut_off = Arc::new(Notify::new());
        let (ended, ended_rx) = watch::channel(());
        let old = self.slots.lock().insert(
            vm.to_string(),
            Slot::Running {
                id,
                seq,
                cut_off: cut_off.clone(),
                ended: ended_rx,
            },
        );
        let kept = match old {
            Some(Slot::Kept { incoming, .. }) => Some(incoming),
            _ => None,
        };
        (Registration { id, cut_off, ended }, kept)
    }

    /// If an upload of `seq` is running for `vm`, cuts it off and waits (bounded) until it
    /// stopped and was kept. The primary asks for a resume only after its own upload failed,
    /// so that upload's connection is dead even when this side has not noticed yet.
    async fn settle(&self, vm: &str, seq: u64) {
        let waiting = match self.slots.lock().get(vm) {
            Some(Slot::Running {
                seq: s,
                cut_off,
                ended,
                ..
            }) if *s == seq => {
                cut_off.notify_one();
                Some(ended.clone())
            }
            _ => None,
        };
        if let Some(mut ended) = waiting {
            // Closed (sender dropped) when the upload ended; either answer means stop waiting.
            let _ = tokio::time::timeout(CUT_OFF_WAIT, ended.changed()).await;
        }
    }

    /// The kept upload of `seq`, if any: (header checksum, bytes received).
    fn kept(&self, vm: &str, seq: u64) -> Option<([u8; 32], u64)> {
        match self.slots.lock().get(vm) {
            Some(Slot::Kept {
                seq: s,
                checksum,
                incoming,
                ..
            }) if *s == seq => Some((*checksum, incoming.received_bytes())),
            _ => None,
        }
    }

    /// Takes the kept upload of `seq` to continue it, if it is the one named (header checksum
    /// and offset), registering the continuation as the running upload.
    fn resume(
        &self,
        vm: &str,
        seq: u64,
        checksum: &[u8; 32],
        from: u64,
    ) -> Option<(Registration, Box<Receiver>)> {
        let mut slots = self.slots.lock();
        let matches = matches!(slots.get(vm), Some(Slot::Kept { seq: s, checksum: c, incoming, .. })
            if *s == seq && c == checksum && incoming.received_bytes() == from);
        if !matches {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cut_off = Arc::new(Notify::new());
        let (ended, ended_rx) = watch::channel(());
        let old = slots.insert(
            vm.to_string(),
            Slot::Running {
                id,
                seq,
                cut_off: cut_off.clone(),
                ended: ended_rx,
            },
        );
        match old {
            Some(Slot::Kept { incoming, .. }) => {
                Some((Registration { id, cut_off, ended }, incoming))
            }
            _ => None,
        }
    }

    /// Keeps the receiver of interrupted upload `id` for a resume, if that upload is still
    /// the VM's running one; otherwise gives it back (to be dropped: it was superseded).
    fn keep(
        self: &Arc<Self>,
        vm: &str,
        id: u64,
        seq: u64,
        checksum: [u8; 32],
        incoming: Box<Receiver>,
    ) -> Option<Box<Receiver>> {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(vm), Some(Slot::Running { id: i, .. }) if *i == id) {
            return Some(incoming);
        }
        slots.insert(
            vm.to_string(),
            Slot::Kept {
                id,
                seq,
                checksum,
                incoming,
            },
        );
        drop(slots);
        // Expiry: the receiver holds a partial file and writer threads.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let partials = self.clone();
            let vm = vm.to_string();
            rt.spawn(async move {
                tokio::time::sleep(PARTIAL_TTL).await;
                let expired = {
                    let mut slots = partials.slots.lock();
                    match slots.get(&vm) {
                        Some(Slot::Kept { id: i, .. }) if *i == id => slots.remove(&vm),
                        _ => None,
                    }
                };
                if let Some(Slot::Kept { mut incoming, .. }) = expired {
                    tracing::info!(%vm, seq, "interrupted upload not resumed in time: dropped");
                    let _ = tokio::task::spawn_blocking(move || incoming.discard_kept()).await;
                }
            });
        }
        None
    }

    /// Upload `id` ended (committed or refused): it no longer occupies the VM's slot.
    fn finish(&self, vm: &str, id: u64) {
        let mut slots = self.slots.lock();
        if matches!(slots.get(vm), Some(Slot::Running { id: i, .. }) if *i == id) {
            slots.remove(vm);
        }
    }
}

/// Parses 64 hex digits.
fn parse_checksum(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
            .map_err(|e| refuse(StatusCode::CONFLICT, "conflict", e.to_string()))?;
            shared.note_replica_primary(vm, &hello.primary_host);
            Ok(serde_json::to_vec(&hello_reply(&rvm)).unwrap_or_default())
        }
        (Method::GET, ["v1", "replicas", vm, "state"]) => {
            let rvm = store.vm(vm).ok_or_else(|| unknown(vm))?;
            Ok(serde_json::to_vec(&hello_reply(&rvm)).unwrap_or_default())
        }
        (Method::GET, ["v1", "replicas", vm, "deltas", seq, "partial"]) => {
            let rvm = store.vm(vm).ok_or_else(|| unknown(vm))?;
            let seq = parse_seq(seq)?;
            shared.partials.settle(vm, seq).await;
            let kept = match shared.partials.kept(vm, seq) {
                Some(k) => Some(k),
                // Kept on disk by a daemon that restarted since.
                None => {
                    let rvm = rvm.clone();
                    tokio::task::spawn_blocking(move || rvm.kept_prefix(seq))
                        .await
                        .ok()
                        .flatten()
                }
            };
            let (checksum, received_bytes) = kept.ok_or_else(|| {
                let mut r = refuse(
                    StatusCode::NOT_FOUND,
                    "no_partial",
                    format!("no interrupted upload of point {seq} of {vm} is kept here"),
                );
                // Tells a primary whose answer was lost that the point was committed.
                r.err.expected_seq = Some(rvm.latest_seq() + 1);
                r
            })?;
            let reply = PartialReply {
                seq,
                header_checksum: hex(&checksum),
                received_bytes,
            };
            Ok(serde_json::to_vec(&reply).unwrap_or_default())
        }
        (Method::PUT, ["v1", "replicas", vm, "deltas", seq]) => {
            let rvm = store.vm(vm).ok_or_else(|| unknown(vm))?;
            let seq = parse_seq(seq)?;
            let resume = resume_headers(&req)?;
            let point = receive(shared, rvm.clone(), seq, req.into_body(), resume).await?;
            // Retention runs after the answer so it never adds to replication latency.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = rvm.retain(RETAIN_POINTS) {
                    tracing::error!(vm = %rvm.vm_id(), "retention failed: {e}");
                }
            });
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

fn parse_seq(seq: &str) -> Result<u64, Refusal> {
    seq.parse().map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "sequence must be a number",
        )
    })
}

/// The resume headers of a delta upload, if it is a resumed one: (offset, header checksum).
fn resume_headers(req: &Request<Incoming>) -> Result<Option<(u64, [u8; 32])>, Refusal> {
    let get = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap_or(""));
    match (
        get(proto::peer::RESUME_FROM_HEADER),
        get(proto::peer::HEADER_CHECKSUM_HEADER),
    ) {
        (None, None) => Ok(None),
        (Some(from), Some(sum)) => match (from.parse::<u64>(), parse_checksum(sum)) {
            (Ok(from), Some(sum)) => Ok(Some((from, sum))),
            _ => Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "invalid resume headers",
            )),
        },
        _ => Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a resumed upload needs both resume headers",
        )),
    }
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

/// Streams an upload into the store on a blocking thread and commits it. `resume`: the upload
/// continues a kept interrupted one from that offset (its header checksum must match). An
/// upload whose transport breaks is kept for a resume (see [`Partials`]).
async fn receive(
    shared: &Arc<Shared>,
    rvm: Arc<ReplicaVm>,
    seq: u64,
    mut body: Incoming,
    resume: Option<(u64, [u8; 32])>,
) -> Result<DeltaReply, Refusal> {
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
    let vm = rvm.vm_id().to_string();
    let partials = shared.partials.clone();
    let (reg, kept, superseded) = match resume {
        None => {
            let (reg, superseded) = partials.start(&vm, seq);
            (reg, None, superseded)
        }
        Some((from, checksum)) => {
            partials.settle(&vm, seq).await;
            let mismatch = || {
                refuse(
                    StatusCode::CONFLICT,
                    "resume_mismatch",
                    format!("no interrupted upload of point {seq} of {vm} at byte {from} with that header is kept here"),
                )
            };
            let (reg, kept) = match partials.resume(&vm, seq, &checksum, from) {
                Some(r) => r,
                None => {
                    // Kept on disk by a daemon that restarted since: verify it again.
                    let rvm2 = rvm.clone();
                    let adopted =
                        tokio::task::spawn_blocking(move || rvm2.adopt_kept(seq, &checksum))
                            .await
                            .ok()
                            .and_then(|r| r.ok())
                            .flatten()
                            .filter(|inc| inc.received_bytes() == from)
                            .ok_or_else(mismatch)?;
                    let (reg, superseded) = partials.start(&vm, seq);
                    if let Some(mut s) = superseded {
                        tokio::task::spawn_blocking(move || s.discard_kept());
                    }
                    (reg, Box::new(adopted))
                }
            };
            tracing::info!(%vm, seq, from, "resuming an interrupted upload");
            (reg, Some(kept), None)
        }
    };
    let Registration { id, cut_off, ended } = reg;
    // Set when the body ended cleanly; otherwise the transport broke (or the upload was cut
    // off) and the writer keeps the receiver for a resume.
    let clean_end = Arc::new(AtomicBool::new(false));
    let clean2 = clean_end.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(UPLOAD_QUEUE_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || -> Result<DeltaReply, ReplicaError> {
        use std::io::Write;
        // Dropped when this upload has stopped: tells `settle` it may look for it.
        let _ended = ended;
        if let Some(mut old) = superseded {
            old.discard_kept();
        }
        let mut incoming = match kept {
            Some(k) => k,
            None => {
                // A new upload from byte 0: no kept prefix of this VM can be resumed any more.
                rvm.discard_kept_prefixes();
                Box::new(rvm.begin_receive()?)
            }
        };
        while let Some(chunk) = rx.blocking_recv() {
            if incoming.write_all(&chunk).is_err() {
                // The store keeps the named reason; commit reports it and discards the upload.
                break;
            }
        }
        if !clean2.load(Ordering::Acquire) && !incoming.is_failed() {
            if let Some(checksum) = incoming.header_checksum() {
                let received = incoming.received_bytes();
                // Durably too, so that a restart of this daemon does not lose it (journal
                // mode; a first point is kept in memory only).
                if let Err(e) = incoming.persist_prefix() {
                    tracing::warn!(%vm, seq, "cannot keep the interrupted upload on disk: {e}");
                }
                match partials.keep(&vm, id, seq, checksum, incoming) {
                    None => {
                        tracing::info!(%vm, seq, received, "upload interrupted: kept for a resume")
                    }
                    Some(mut superseded) => superseded.discard_kept(),
                }
                return Err(ReplicaError::ReceiveFailed(
                    "upload interrupted (kept for a resume)".into(),
                ));
            }
        }
        partials.finish(&vm, id);
        let point = rvm.commit(*incoming);
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
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = cut_off.notified() => {
                network_error = Some("cut off: the primary resumes it on another request".to_string());
                break;
            }
        };
        match frame {
            None => {
                clean_end.store(true, Ordering::Release);
                break;
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    if tx.send(data).await.is_err() {
                        break; // the writer stopped: its error says why
                    }
                }
            }
            Some(Err(e)) => {
                network_error = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    if let Some(e) = network_error {
        // The writer keeps the receiver for a resume, or drops it (discarding the upload).
        let _ = writer.await;
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "upload_interrupted",
            format!("upload interrupted: {e}"),
        ));
    }
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
    match e {
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
    use super::{allowed, parse_checksum, replica_refusal, Partials};
    use hyper::StatusCode;
    use replica::ReplicaError;
    use std::io::Write;
    use std::sync::Arc;

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

    #[test]
    fn checksums_are_64_hex_digits() {
        let hex = "00ff".repeat(16);
        let sum = parse_checksum(&hex).unwrap();
        assert_eq!((sum[0], sum[1], sum[31]), (0, 255, 255));
        assert_eq!(super::hex(&sum), hex);
        for bad in ["", "00", &"0g".repeat(32), &"é".repeat(32), &"0".repeat(65)] {
            assert!(parse_checksum(bad).is_none(), "{bad:?}");
        }
    }

    /// A kept upload is continued only by a resume naming it exactly (seq, header checksum,
    /// offset); a fresh upload of the VM drops it.
    #[test]
    fn a_kept_upload_is_resumed_only_by_its_own_name_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica::ReplicaStore::open(dir.path()).unwrap();
        let key = [7u8; 32];
        let disks = vec![delta::DiskEntry {
            index: 0,
            size_bytes: 1 << 20,
        }];
        let vm = store.create_vm("v", 1, &disks, key).unwrap();
        let header = delta::DeltaHeader {
            vm_id: "v".into(),
            generation: 1,
            seq: 1,
            parent_seq: 0,
            cut_time_unix_ns: 5,
            kind: delta::DeltaKind::Initial,
            compression: delta::Compression::None,
            disks,
        };
        let mut w = delta::DeltaWriter::new(Vec::new(), &header, &key).unwrap();
        w.data(0, 0, &[3u8; 8192]).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let sum = header.checksum(&key).unwrap();

        let partials = Arc::new(Partials::default());
        let (reg, old) = partials.start("v", 1);
        assert!(old.is_none());
        let mut incoming = Box::new(vm.begin_receive().unwrap());
        incoming.write_all(&bytes[..200]).unwrap();
        assert_eq!(incoming.header_checksum(), Some(sum));
        assert!(partials.keep("v", reg.id, 1, sum, incoming).is_none());
        assert_eq!(partials.kept("v", 1), Some((sum, 200)));
        let mut other = sum;
        other[0] ^= 1;
        assert!(
            partials.resume("v", 1, &other, 200).is_none(),
            "other delta"
        );
        assert!(partials.resume("v", 1, &sum, 100).is_none(), "other offset");
        assert!(partials.resume("v", 2, &sum, 200).is_none(), "other seq");
        let (reg, mut incoming) = partials.resume("v", 1, &sum, 200).unwrap();
        assert!(partials.kept("v", 1).is_none(), "taken");
        incoming.write_all(&bytes[200..]).unwrap();
        partials.finish("v", reg.id);
        let point = vm.commit(*incoming).unwrap();
        assert_eq!(point.seq, 1);

        // Kept, then superseded by a fresh upload: dropped.
        let (reg, _) = partials.start("v", 2);
        let mut h2 = header.clone();
        (h2.seq, h2.parent_seq, h2.kind) = (2, 1, delta::DeltaKind::Incremental);
        let mut w = delta::DeltaWriter::new(Vec::new(), &h2, &key).unwrap();
        w.data(0, 0, &[4u8; 8192]).unwrap();
        let (bytes2, _) = w.finish().unwrap();
        let mut incoming = Box::new(vm.begin_receive().unwrap());
        incoming.write_all(&bytes2[..300]).unwrap();
        let sum2 = h2.checksum(&key).unwrap();
        assert!(partials.keep("v", reg.id, 2, sum2, incoming).is_none());
        let (_, superseded) = partials.start("v", 2);
        assert!(superseded.is_some());
        assert!(partials.kept("v", 2).is_none());
        // An upload that lost its slot is not kept.
        let incoming = Box::new(vm.begin_receive().unwrap());
        assert!(partials.keep("v", reg.id, 2, sum2, incoming).is_some());
    }
}
