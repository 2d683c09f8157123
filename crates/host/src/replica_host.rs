//! The replica side of replication: the peer routes that accept hellos and deltas from
//! trusted, allowed primaries and commit them into the replica store. A delta becomes a
//! recovery point only when the store has made it durable (promise 2); anything malformed,
//! foreign or out of sequence is refused with a named reason and changes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use proto::peer::{DeltaReply, Hello, HelloReply, PartialReply, PeerError};
use proto::{Seq, VmName};
use replica::{Incoming as Receiver, ReplicaError, ReplicaVm};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use transport::{BoxBody, PeerInfo};

use crate::catalog::ReplicaOwner;
use crate::events;
use crate::primary::delta_key;
use crate::Shared;

/// Largest hello body; it lists at most a few disks.
const HELLO_MAX_BYTES: usize = 64 << 10;
/// A resync hash request: at most `HASH_CHUNKS_MAX` offsets of up to 20 digits each, plus the
/// key and the fields.
const HASH_REQUEST_MAX_BYTES: usize = proto::peer::HASH_CHUNKS_MAX * 21 + 1024;
/// Recovery points kept per replica VM that has no recovery-history policy (set by `replication
/// enable/set` and carried in the hello); older deltas are folded into the base images.
pub const RETAIN_POINTS: usize = 64;
/// How often retention runs on its own, besides after every commit: a replica whose commits
/// fail (disk full, out of descriptors) still folds and frees space, so it recovers by
/// itself. The same pass opens replica VMs that could not be opened yet (transient failures).
pub const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long an interrupted upload is kept for a resume (docs/formats/peer-protocol.md): the
/// primary retries within seconds (its backoff is capped at 10 s and it gives up after 8
/// attempts without progress); past this, the receiver's partial file and writer threads are
/// given back.
const PARTIAL_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a resume waits for the upload it cuts off to stop and be kept: that upload only
/// has to finish its batch in progress (at most `WRITE_BATCH_BYTES`).
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
        seq: Seq,
        cut_off: Arc<Notify>,
        ended: watch::Receiver<()>,
    },
    /// Upload `id` of `seq` broke in the transport; its receiver waits for a resume.
    Kept {
        id: u64,
        seq: Seq,
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
    fn start(&self, vm: &str, seq: Seq) -> (Registration, Option<Box<Receiver>>) {
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
    async fn settle(&self, vm: &str, seq: Seq) {
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
    fn kept(&self, vm: &str, seq: Seq) -> Option<([u8; 32], u64)> {
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
        seq: Seq,
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
        seq: Seq,
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
                    tracing::info!(%vm, %seq, "interrupted upload not resumed in time: dropped");
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
    let ca_fingerprint = peer.ca.clone().ok_or_else(|| {
        refuse(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!("peer {name:?}: its CA is no longer trusted as a primary here"),
        )
    })?;
    let caller = ReplicaOwner {
        version: ReplicaOwner::VERSION,
        peer_name: name.clone(),
        ca_fingerprint,
    };
    // Every route names a replica VM: its name is validated once, here.
    let vm_name = match parts.as_slice() {
        ["v1", "replicas", vm, ..] => VmName::parse(vm)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?,
        _ => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {path}"),
            ))
        }
    };
    let vm = &vm_name;
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, ["v1", "replicas", _, "hello"]) => {
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
            crate::Shared::check_hello_failover_network(hello.failover_network.as_deref())
                .map_err(|why| refuse(StatusCode::BAD_REQUEST, "bad_request", why))?;
            if let Some(f) = hello.frequency_secs {
                // Health only (missed cycles): an odd value is ignored, never refused.
                shared.health.set_frequency(vm, f);
            }
            let disks: Vec<delta::DiskEntry> = hello
                .disks
                .iter()
                .map(|d| delta::DiskEntry {
                    index: d.index,
                    size_bytes: d.size_bytes,
                })
                .collect();
            // A VM already bound to another identity is refused before the store is touched;
            // an unbound one (new, or created before owners were recorded) is bound below,
            // once the store has accepted the hello (for an existing VM that proves the
            // caller knows its key).
            let owner = check_owner(shared, vm, &caller, true)?;
            if let Some(why) = shared.replica_refuses(vm) {
                return Err(refuse(StatusCode::CONFLICT, "failed_over", why));
            }
            // A reverse hello: this host, prepared for a planned failover, takes the VM back
            // as its replica, its own disks the base.
            let mut reverse_answer = None;
            if let Some(rev) = hello.reverse {
                reverse_answer = shared
                    .accept_reverse(&hello, rev, delta_key(&hello.replication_id))
                    .await
                    .map_err(|e| {
                        let code = match crate::error::kind_of(&e) {
                            Some(crate::error::ErrorKind::Invalid) => "bad_request",
                            Some(crate::error::ErrorKind::Conflict) => "conflict",
                            _ => "store_error",
                        };
                        let status = match code {
                            "bad_request" => StatusCode::BAD_REQUEST,
                            "conflict" => StatusCode::CONFLICT,
                            _ => StatusCode::INTERNAL_SERVER_ERROR,
                        };
                        refuse(status, code, crate::errfmt::one_line(&e))
                    })?;
            }
            // An existing copy on this host becomes the replica VM's point 1 (`replication
            // start --use-existing`).
            if let Some(paths) = &hello.use_existing {
                shared
                    .accept_existing(&hello, paths, delta_key(&hello.replication_id))
                    .await
                    .map_err(|e| {
                        let (status, code) = match crate::error::kind_of(&e) {
                            Some(crate::error::ErrorKind::Invalid) => {
                                (StatusCode::BAD_REQUEST, "bad_request")
                            }
                            Some(crate::error::ErrorKind::Conflict) => {
                                (StatusCode::CONFLICT, "conflict")
                            }
                            _ => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
                        };
                        refuse(status, code, crate::errfmt::one_line(&e))
                    })?;
            }
            // The VM was failed over to this host and reversed (this host is the primary of
            // a newer generation): the caller is the old primary, and must stop.
            if let Some(why) = shared.failed_over_here(vm, hello.generation) {
                return Err(refuse(StatusCode::CONFLICT, "failed_over", why));
            }
            // One relationship per VM on a host: not a replica of a VM it replicates.
            if shared.role_of(vm) == Some(relationship::Role::Primary) {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("{vm} is replicated from this host ({}); it cannot also be a replica of it here", shared.host_name),
                ));
            }
            let store2 = store.clone();
            let vm_name = vm.clone();
            let key = delta_key(&hello.replication_id);
            let generation = hello.generation;
            let rvm = tokio::task::spawn_blocking(move || {
                store2.create_vm(&vm_name, generation, &disks, key)
            })
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            .map_err(hello_refusal)?;
            if let Some(h) = &hello.history {
                // Recorded in the VM's manifest; retention applies it from its next pass.
                let policy = crate::shared::history_to_store(h);
                let rvm2 = rvm.clone();
                tokio::task::spawn_blocking(move || rvm2.set_history(policy))
                    .await
                    .map_err(|e| {
                        refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    })?
                    .map_err(hello_refusal)?;
                shared.retention_wake.notify_one();
            }
            if owner.is_none() {
                // A catalog commit: off the runtime's workers.
                tokio::task::block_in_place(|| shared.set_replica_owner(vm, &caller)).map_err(
                    |e| {
                        refuse(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "store_error",
                            e.to_string(),
                        )
                    },
                )?;
            }
            shared.note_replica_primary(vm, &hello.primary_host);
            // The primary's failover network settings (a catalog commit when they changed).
            tokio::task::block_in_place(|| {
                shared.note_primary_failover_network(vm, hello.failover_network.as_deref())
            })
            .map_err(|e| {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    host_one_line(&e),
                )
            })?;
            // The replica's view of the relationship: the state the primary reports.
            let event = relationship::Event::HelloReceived {
                primary_state: hello.state,
                generation: hello.generation,
                latest_seq: rvm.latest_seq(),
            };
            let damage = rvm.damage().map(|reason| relationship::Event::Diverged {
                reason: format!("the replica's copy is damaged: {reason}"),
            });
            tokio::task::block_in_place(|| {
                shared.replica_event(vm, hello.generation, event)?;
                // The replica's own finding, recorded as its state until a Full point repairs it.
                match damage {
                    Some(d) => shared.replica_event(vm, hello.generation, d),
                    None => Ok(()),
                }
            })
            .map_err(|e| {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    host_one_line(&e),
                )
            })?;
            let mut reply = hello_reply(&rvm);
            reply.reverse = reverse_answer;
            Ok(serde_json::to_vec(&reply).unwrap_or_default())
        }
        (Method::POST, ["v1", "replicas", _, "resync", "hashes"]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            check_owner(shared, vm, &caller, false)?;
            if let Some(why) = shared.replica_refuses(vm) {
                return Err(refuse(StatusCode::CONFLICT, "failed_over", why));
            }
            let bytes = http_body_util::Limited::new(req.into_body(), HASH_REQUEST_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("reading a hash request: {e}"),
                    )
                })?
                .to_bytes();
            let hreq: proto::peer::HashRequest = serde_json::from_slice(&bytes).map_err(|e| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("invalid hash request: {e}"),
                )
            })?;
            // A copy marked damaged may still be readable (disks adopted as a base are marked
            // so until their first Full point): the compare reads it, and only damage met while
            // reading refuses it (`damaged`, below), when the primary sends every block.
            let latest = rvm.latest_seq();
            if hreq.seq != latest {
                let mut r = refuse(
                    StatusCode::CONFLICT,
                    "out_of_sequence",
                    format!(
                        "hashes of point {} asked, but the newest point of {vm} here is {latest}",
                        hreq.seq
                    ),
                );
                r.err.expected_seq = Some(latest.next());
                return Err(r);
            }
            let size = rvm
                .disks()
                .iter()
                .find(|d| d.index == hreq.disk)
                .map(|d| d.size_bytes)
                .ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("{vm} has no disk {}", hreq.disk),
                    )
                })?;
            let key = crate::resync::check_request(&hreq, size)
                .map_err(|why| refuse(StatusCode::BAD_REQUEST, "bad_request", why))?;
            rvm.note_compare(hreq.seq.get());
            let rvm2 = rvm.clone();
            let (seq, disk, chunk_bytes) = (hreq.seq, hreq.disk, hreq.chunk_bytes);
            let (shared2, vm_name) = (shared.clone(), vm.to_string());
            let hashes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
                let view = rvm2.view(seq, disk)?;
                // The 1 MiB pass keeps its trees for the refinements that follow it.
                let hashes = if chunk_bytes == crate::resync::COMPARE_CHUNK_BYTES {
                    let trees = crate::resync::hash_trees(&view, &key, chunk_bytes, &hreq.offsets)?;
                    let hashes: Vec<_> = trees.iter().map(|t| t.hash).collect();
                    let cache =
                        crate::resync::TreeCache::new(key, seq.get(), disk, &hreq.offsets, trees);
                    let mut all = shared2.resync_trees.lock();
                    let kept = all.entry(vm_name).or_default();
                    // A new compare (another key) starts the list again.
                    kept.retain(|c| c.key_is(&key));
                    if kept.len() >= crate::resync::REPLICA_TREE_CACHES {
                        kept.remove(0);
                    }
                    kept.push(Arc::new(cache));
                    hashes
                } else {
                    let kept = shared2
                        .resync_trees
                        .lock()
                        .get(&vm_name)
                        .cloned()
                        .unwrap_or_default();
                    let caches: Vec<&crate::resync::TreeCache> =
                        kept.iter().map(|c| c.as_ref()).collect();
                    crate::resync::hash_cached(
                        &view,
                        &caches,
                        &key,
                        (seq.get(), disk),
                        chunk_bytes,
                        &hreq.offsets,
                    )?
                };
                Ok(hashes.into_iter().map(|h| h.to_wire()).collect())
            })
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            .map_err(|e| {
                // Damage found while reading: the primary sends every block instead.
                let damaged = e
                    .downcast_ref::<replica::ReplicaError>()
                    .is_some_and(|r| matches!(r, replica::ReplicaError::Damaged(_)));
                if damaged {
                    refuse(StatusCode::CONFLICT, "damaged", host_one_line(&e))
                } else {
                    refuse(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "store_error",
                        host_one_line(&e),
                    )
                }
            })?;
            let reply = proto::peer::HashReply { seq, disk, hashes };
            Ok(serde_json::to_vec(&reply).unwrap_or_default())
        }
        (Method::GET, ["v1", "replicas", _, "state"]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            check_owner(shared, vm, &caller, false)?;
            Ok(serde_json::to_vec(&hello_reply(&rvm)).unwrap_or_default())
        }
        (Method::GET, ["v1", "replicas", _, "deltas", seq, "partial"]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            check_owner(shared, vm, &caller, false)?;
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
                r.err.expected_seq = Some(rvm.latest_seq().next());
                r
            })?;
            let reply = PartialReply {
                seq,
                header_checksum: hex(&checksum),
                received_bytes,
            };
            Ok(serde_json::to_vec(&reply).unwrap_or_default())
        }
        (Method::PUT, ["v1", "replicas", _, "deltas", seq]) => {
            let rvm = store.vm(vm).ok_or_else(|| missing(&store, vm))?;
            check_owner(shared, vm, &caller, false)?;
            if let Some(why) = shared.replica_refuses(vm) {
                return Err(refuse(StatusCode::CONFLICT, "failed_over", why));
            }
            let seq = parse_seq(seq)?;
            let resume = resume_headers(&req)?;
            // A commit may fold (index memory): served points are pinned before (blocking: the
            // first time after a start it may write the catalog).
            let (s, r) = (shared.clone(), rvm.clone());
            let pinned = tokio::task::spawn_blocking(move || s.ensure_pins(&r)).await;
            if !matches!(pinned, Ok(true)) {
                tracing::error!(%vm, "pinning served points failed: {pinned:?}");
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_busy",
                    "the replica could not pin its served points; try again",
                ));
            }
            // Its own task: hyper drops this handler when the stream or connection is reset,
            // and an interrupted upload must still be kept for a resume (or discarded) whole.
            let upload = receive(
                shared.clone(),
                rvm.clone(),
                seq,
                req.into_body(),
                resume,
                name.clone(),
            );
            let point = match tokio::spawn(upload)
                .await
                .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            {
                Ok(point) => point,
                Err(refused) => {
                    // The replica's own finding: recorded (and logged, event 2004) here as at
                    // a hello, not only by the primary.
                    if let Some(d) = rvm.damage().filter(|_| refused.err.code == "damaged") {
                        let event = relationship::Event::Diverged {
                            reason: format!(
                                "the replica's copy is {}: {d}",
                                relationship::condition::DAMAGED
                            ),
                        };
                        let generation = rvm.generation();
                        if let Err(e) = tokio::task::block_in_place(|| {
                            shared.replica_event(vm, generation, event)
                        }) {
                            tracing::error!(%vm, "recording the replica's damage: {e:#}");
                        }
                    }
                    return Err(refused);
                }
            };
            // Retention runs in its own task (woken here), never in the request's path.
            shared.retention_wake.notify_one();
            shared
                .health
                .note_commit(vm, shared.monitoring_interval_secs());
            shared.metrics.point_committed(
                vm,
                std::time::Duration::from_nanos(
                    proto::time::history_now_ns().saturating_sub(point.cut_time_unix_ns),
                ),
            );
            let kind = match rvm
                .points()
                .iter()
                .find(|p| p.seq == point.seq)
                .map(|p| p.kind)
            {
                Some(delta::DeltaKind::Full) => relationship::CycleKind::Full,
                Some(delta::DeltaKind::Initial) => relationship::CycleKind::Initial,
                _ => relationship::CycleKind::Incremental,
            };
            let event = relationship::Event::DeltaCommitted {
                seq: point.seq,
                kind,
                cut_unix_ns: point.cut_time_unix_ns,
            };
            let generation = rvm.generation();
            if let Err(e) =
                tokio::task::block_in_place(|| shared.replica_event(vm, generation, event))
            {
                // The point is committed; only the replica's view of the state lags.
                tracing::error!(%vm, "recording the committed point: {e:#}");
            }
            if point.seq > proto::Seq(1) {
                tokio::task::block_in_place(|| shared.forget_reverse_answer(vm));
            }
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

/// Applies `rvm`'s recovery-history policy at the history clock's now, or keeps the newest
/// points by count without one (`RETAIN_POINTS`, or `serve --retain-points`), never past a
/// served point (pinned first: after a restart its pin is taken again here) (blocking).
fn retain(shared: &Shared, rvm: &ReplicaVm) {
    if !shared.ensure_pins(rvm) {
        // A served point is not pinned again yet: folding now could take it away.
        return;
    }
    if let Err(e) = rvm.apply_history(proto::time::history_now_ns(), shared.retain_points) {
        tracing::error!(vm = %rvm.vm_id(), "retention failed: {e}");
    }
}

/// The retention task: one per daemon, woken after every commit (and every hello that brings
/// a policy) and on its own every [`RETENTION_INTERVAL`]; each pass runs on a blocking thread,
/// never in a peer request's path, and also retries opening replica VMs still pending.
pub fn spawn_retention(shared: Arc<Shared>) {
    if proto::time::test_clock_in_effect() {
        tracing::warn!(
            "{} is set: the recovery history runs on a compressed test clock",
            proto::time::TEST_CLOCK_ENV
        );
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the store was just opened
        loop {
            let periodic = tokio::select! {
                _ = tick.tick() => true,
                _ = shared.retention_wake.notified() => false,
            };
            if periodic {
                shared.retry_replica_store();
            }
            let Some((store, _)) = shared.replica_store() else {
                continue;
            };
            let s = shared.clone();
            let pass = tokio::task::spawn_blocking(move || {
                if periodic {
                    store.open_pending();
                }
                for rvm in store.vms() {
                    retain(&s, &rvm);
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
fn missing(store: &replica::ReplicaStore, vm: &VmName) -> Refusal {
    if store.is_pending(vm) {
        return replica_refusal(ReplicaError::Verifying {
            vm_id: vm.to_string(),
        });
    }
    unknown(vm)
}

/// Refuses `caller` (403 `not_owner`) unless it is the identity bound to replica VM `vm`.
/// An unbound VM is allowed only for a hello (`may_bind`), which binds it; state and deltas
/// of an unbound VM answer `unknown_vm`, so the primary says hello first.
fn check_owner(
    shared: &Shared,
    vm: &str,
    caller: &ReplicaOwner,
    may_bind: bool,
) -> Result<Option<ReplicaOwner>, Refusal> {
    let owner = shared.replica_owner(vm).map_err(|e| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        )
    })?;
    match &owner {
        Some(o) if o.peer_name == caller.peer_name && o.ca_fingerprint == caller.ca_fingerprint => {
        }
        Some(o) => {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not_owner",
                format!(
                    "the replica of {vm} here belongs to peer {:?} (CA {}…); {:?} may not use it",
                    o.peer_name,
                    &o.ca_fingerprint[..16.min(o.ca_fingerprint.len())],
                    caller.peer_name
                ),
            ))
        }
        None if may_bind => {}
        None => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "unknown_vm",
                format!(
                "the replica of {vm} has no owner recorded yet; the primary must say hello first"
            ),
            ))
        }
    }
    Ok(owner)
}

fn parse_seq(seq: &str) -> Result<Seq, Refusal> {
    seq.parse().map(Seq).map_err(|_| {
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

fn host_one_line(e: &anyhow::Error) -> String {
    crate::errfmt::one_line(e)
}

fn hello_reply(rvm: &ReplicaVm) -> HelloReply {
    HelloReply {
        vm: rvm.vm_id().to_string(),
        latest_seq: rvm.latest_seq(),
        latest_cut_unix_ns: rvm.latest_cut_unix_ns(),
        generation: rvm.generation(),
        damage: rvm.damage(),
        reverse: None,
    }
}

/// Uploads of one VM in progress at once: its points are sequential, so a second one can only
/// be a retry racing the first (it gets a transient `busy` and comes back).
const UPLOADS_PER_VM_MAX: usize = 1;
/// Uploads in progress at once from one peer (by certificate name): bounds what one primary
/// can take of this host's blocking threads and memory, however many VMs it replicates here.
const UPLOADS_PER_PEER_MAX: usize = 8;
/// An upload that brings no byte for this long is dropped (nothing is committed).
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an upload waits for its slot before it is refused `busy`.
const ADMISSION_WAIT: Duration = Duration::from_secs(5);
/// Received bytes handed to the store per blocking call. The network task goes on reading
/// the next batch while the store decodes and verifies this one; no blocking thread waits
/// for the network.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// Admission of uploads: at most [`UPLOADS_PER_VM_MAX`] per VM and [`UPLOADS_PER_PEER_MAX`]
/// per peer.
#[derive(Default)]
pub struct UploadLimits {
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_peer: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl UploadLimits {
    /// Takes a slot for an upload of `vm` from `peer`, waiting up to [`ADMISSION_WAIT`] (a
    /// resumed upload may arrive while the one it continues is still winding down).
    async fn admit(
        &self,
        vm: &str,
        peer: &str,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Refusal> {
        let sem = |map: &Mutex<HashMap<String, Arc<Semaphore>>>, key: &str, n: usize| {
            map.lock()
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(n)))
                .clone()
        };
        let busy = |what: String| refuse(StatusCode::SERVICE_UNAVAILABLE, "busy", what);
        let take = |sem: Arc<Semaphore>| async move {
            match tokio::time::timeout(ADMISSION_WAIT, sem.acquire_owned()).await {
                Ok(Ok(permit)) => Some(permit),
                _ => None,
            }
        };
        let vm_permit = take(sem(&self.per_vm, vm, UPLOADS_PER_VM_MAX))
            .await
            .ok_or_else(|| busy(format!("an upload for {vm} is already in progress; retry")))?;
        let peer_permit = take(sem(&self.per_peer, peer, UPLOADS_PER_PEER_MAX))
            .await
            .ok_or_else(|| {
                busy(format!(
                    "{peer} already has {UPLOADS_PER_PEER_MAX} uploads in progress; retry"
                ))
            })?;
        Ok((vm_permit, peer_permit))
    }
}

/// Streams an upload into the store and commits it. The network is read on the runtime; the
/// store's work (decode, verify, write) runs in blocking calls of at most
/// [`WRITE_BATCH_BYTES`], one at a time, overlapping the next batch's arrival: no blocking
/// thread ever waits for the network. `resume`: the upload continues a kept interrupted one
/// from that offset (its header checksum must match). An upload whose transport breaks, that
/// stalls for [`UPLOAD_IDLE_TIMEOUT`] or that a resume cuts off is kept for a resume (see
/// [`Partials`]).
async fn receive(
    shared: Arc<Shared>,
    rvm: Arc<ReplicaVm>,
    seq: Seq,
    mut body: Incoming,
    resume: Option<(u64, [u8; 32])>,
    peer: String,
) -> Result<DeltaReply, Refusal> {
    let expected = rvm.latest_seq().next();
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
    if resume.is_some() {
        // The primary resumes only after its own request failed: cut off the upload it
        // continues even if this side has not noticed the broken connection yet.
        partials.settle(&vm, seq).await;
    }
    let _permits = shared.uploads.admit(&vm, &peer).await?;
    let internal = |e: tokio::task::JoinError| {
        refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    };
    let (reg, kept, superseded) = match resume {
        None => {
            let (reg, superseded) = partials.start(&vm, seq);
            (reg, None, superseded)
        }
        Some((from, checksum)) => {
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
            tracing::info!(%vm, %seq, from, "resuming an interrupted upload");
            (reg, Some(kept), None)
        }
    };
    let Registration { id, cut_off, ended } = reg;
    let rvm2 = rvm.clone();
    let started = tokio::task::spawn_blocking(move || -> Result<Box<Receiver>, ReplicaError> {
        if let Some(mut old) = superseded {
            old.discard_kept();
        }
        match kept {
            Some(k) => Ok(k),
            None => {
                // A new upload from byte 0: no kept prefix of this VM can be resumed any more.
                rvm2.discard_kept_prefixes();
                Ok(Box::new(rvm2.begin_receive()?))
            }
        }
    })
    .await
    .map_err(internal)?;
    let incoming = match started {
        Ok(inc) => inc,
        Err(e) => {
            partials.finish(&vm, id);
            return Err(replica_refusal(e));
        }
    };

    type Write = tokio::task::JoinHandle<(Box<Receiver>, bool)>;
    let write = |mut incoming: Box<Receiver>, batch: Vec<Bytes>| -> Write {
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            // On failure the store keeps the named reason; commit reports it.
            let ok = batch.iter().all(|c| incoming.write_all(c).is_ok());
            (incoming, ok)
        })
    };
    let mut idle: Option<Box<Receiver>> = Some(incoming);
    let mut writing: Option<Write> = None;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_bytes = 0;
    let mut interrupted: Option<String> = None;
    let mut store_failed = false;
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, body.frame()) => f,
            _ = cut_off.notified() => {
                interrupted = Some("cut off: the primary resumes it on another request".into());
                break;
            }
        };
        let frame = match frame {
            Err(_) => {
                interrupted = Some(format!(
                    "stalled: no byte for {} s",
                    UPLOAD_IDLE_TIMEOUT.as_secs()
                ));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                interrupted = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        batch_bytes += data.len();
        batch.push(data);
        if batch_bytes >= WRITE_BATCH_BYTES {
            let (inc, ok) = settle_write(idle.take(), writing.take()).await?;
            if !ok {
                idle = Some(inc);
                store_failed = true;
                break;
            }
            writing = Some(write(inc, std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
    }
    let (mut incoming, ok) = settle_write(idle.take(), writing.take()).await?;
    store_failed |= !ok;
    let clean_end = interrupted.is_none();
    tracing::debug!(%vm, %seq, ?interrupted, store_failed, pending = batch_bytes, "upload body ended");
    let finished = tokio::task::spawn_blocking(move || -> Result<DeltaReply, ReplicaError> {
        use std::io::Write;
        // Dropped when this upload has stopped: tells `settle` it may look for it.
        let _ended = ended;
        if !store_failed {
            for c in &batch {
                if incoming.write_all(c).is_err() {
                    break;
                }
            }
        }
        if !clean_end && !incoming.is_failed() {
            if let Some(checksum) = incoming.header_checksum() {
                let received = incoming.received_bytes();
                // Durably too, so that a restart of this daemon does not lose it (journal
                // mode; a first point is kept in memory only).
                if let Err(e) = incoming.persist_prefix() {
                    tracing::warn!(%vm, %seq, "cannot keep the interrupted upload on disk: {e}");
                }
                match partials.keep(&vm, id, seq, checksum, incoming) {
                    None => {
                        tracing::info!(%vm, %seq, received, "upload interrupted: kept for a resume")
                    }
                    Some(mut superseded) => superseded.discard_kept(),
                }
                return Err(ReplicaError::ReceiveFailed(
                    "upload interrupted (kept for a resume)".into(),
                ));
            }
        }
        partials.finish(&vm, id);
        if !clean_end {
            // Nothing worth keeping (no header yet): dropping it discards the upload.
            drop(incoming);
            return Err(ReplicaError::ReceiveFailed("upload interrupted".into()));
        }
        let point = rvm.commit(*incoming);
        // The upload's buffers are free now: give them back (see `heap`).
        crate::heap::give_back();
        let point = point?;
        Ok(DeltaReply {
            seq: point.seq,
            cut_time_unix_ns: point.cut_time_unix_ns,
            stored_bytes: point.stored_bytes,
        })
    })
    .await
    .map_err(internal)?;
    if let Some(why) = interrupted {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "upload_interrupted",
            format!("upload interrupted: {why}"),
        ));
    }
    finished.map_err(replica_refusal)
}

/// The upload back from whichever side holds it: idle, or the blocking write in progress
/// (awaited), with whether that write succeeded.
async fn settle_write(
    idle: Option<Box<Receiver>>,
    writing: Option<tokio::task::JoinHandle<(Box<Receiver>, bool)>>,
) -> Result<(Box<Receiver>, bool), Refusal> {
    match (idle, writing) {
        (Some(inc), _) => Ok((inc, true)),
        (None, Some(w)) => w
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
        (None, None) => Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the upload was lost between writes",
        )),
    }
}

/// A refused hello: a conflict only when the VM exists with another identity; the store's
/// own failures (EMFILE, ENOSPC, EIO) are transient and never a 409.
fn hello_refusal(e: ReplicaError) -> Refusal {
    if matches!(e, ReplicaError::Verifying { .. }) || e.is_transient() {
        return replica_refusal(e);
    }
    let msg = e.to_string();
    match e {
        ReplicaError::AlreadyExists { .. } | ReplicaError::GenerationRegression { .. } => {
            refuse(StatusCode::CONFLICT, "conflict", msg)
        }
        ReplicaError::InvalidDisks(_) | ReplicaError::InvalidHistory(_) => {
            refuse(StatusCode::BAD_REQUEST, "bad_request", msg)
        }
        _ => refuse(StatusCode::SERVICE_UNAVAILABLE, "store_error", msg),
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
            r.err.expected_seq = Some(Seq(expected));
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
    fn store_failure_at_hello_is_transient_not_a_conflict() {
        let io = ReplicaError::Io {
            op: "open",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        let r = super::hello_refusal(io);
        assert_eq!(
            (r.status, r.err.code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store_busy")
        );
        let full = ReplicaError::Io {
            op: "create",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let r = super::hello_refusal(full);
        assert_eq!(
            (r.status, r.err.code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store_error")
        );
        let r = super::hello_refusal(ReplicaError::AlreadyExists {
            vm_id: "w".into(),
            why: "with generation 2 (the request has 1)".into(),
        });
        assert_eq!(r.status, StatusCode::CONFLICT);
    }

    /// A hello whose recovery history is out of range (a primary with other bounds) is the
    /// caller's mistake, not the store's: 400, and the store records nothing.
    #[test]
    fn out_of_range_history_in_a_hello_is_a_bad_request() {
        let policy = replica::HistoryPolicy {
            recovery_history: 99,
            app_consistent_every_hours: None,
            keep_every_point_for_secs: 0,
        };
        let e = policy.validate().map_err(ReplicaError::InvalidHistory);
        let r = super::hello_refusal(e.unwrap_err());
        assert_eq!(
            (r.status, r.err.code.as_str()),
            (StatusCode::BAD_REQUEST, "bad_request")
        );
    }

    #[tokio::test]
    async fn uploads_are_bounded_per_vm_and_per_peer() {
        let limits = super::UploadLimits::default();
        let first = limits.admit("web", "p1").await.ok().unwrap();
        // A second upload of the same VM waits for the first, then is refused `busy`.
        let r = limits.admit("web", "p1").await.err().unwrap();
        assert_eq!(
            (r.status, r.err.code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "busy")
        );
        drop(first);
        // One peer: 8 VMs at once, not 9; another peer is not affected.
        let mut held = Vec::new();
        for i in 0..8 {
            held.push(limits.admit(&format!("vm{i}"), "p1").await.ok().unwrap());
        }
        let r = limits.admit("vm8", "p1").await.err().unwrap();
        assert!(
            r.err.error.contains("uploads in progress"),
            "{}",
            r.err.error
        );
        assert!(limits.admit("vm8", "p2").await.is_ok());
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
