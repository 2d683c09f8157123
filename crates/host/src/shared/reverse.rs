//! Reverse replication (`replication reverse NAME --replica OLD_PRIMARY:PORT`), after a planned
//! failover: the host a VM was failed over to (its relationship `FailedOver`) becomes the
//! primary of a new relationship (generation + 1) whose replica is the old primary. The old
//! primary, prepared for that failover at the very point the new primary started from, adopts
//! its own disks as the replica's base (`ReplicaStore::adopt_vm`): no initial replication, only
//! what the VM wrote since the failover crosses the network.
//!
//! Both halves are idempotent, so a reverse whose answer was lost is simply run again: the new
//! relationship's id is recorded (`reverse/<vm>`) before the hello and reused by a retry.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use proto::peer::{DiskRanges, Hello, ReverseAnswer, ReverseOf, REVERSE_RANGES_MAX};
use proto::{Generation, ReplicationStatus, Seq};
use relationship::{Relationship, Role, State};

use super::{Relation, Shared};
use crate::catalog::{RelationshipDoc, ReplicationRecord};
use crate::error::{bad_request, conflict, not_found};
use crate::events;
use crate::primary::{self, Replication};

/// A reverse whose old primary accepted it, waiting for the command owner to commit it.
pub struct PreparedReverse {
    vm: String,
    settings: ReplicationRecord,
    rel: Relationship,
    /// What the new primary marks dirty before the relationship is recorded.
    marks: Marks,
    /// Says what the reverse sends, when it is more than what the VM wrote.
    note: Option<String>,
}

/// Blocks of the new primary's disks to send besides what the VM wrote since the failover.
enum Marks {
    /// Planned: the old primary holds the point exactly.
    Nothing,
    /// Unplanned: what the old primary had not shipped (by disk position).
    Ranges(Vec<DiskRanges>),
    /// Unplanned, the old primary's tracking cannot say: every block.
    All,
    /// The old primary has no copy: an initial replication (every allocated block).
    Allocated,
}

/// The first point of a reversed relationship: the failover's point, which both hosts hold.
const REVERSED_BASE_SEQ: Seq = Seq(1);

impl Shared {
    /// `replication reverse`: checks, says the reverse hello to the old primary (which must
    /// accept it now), then hands it to the command owner ([`Shared::install_reverse`]).
    pub async fn reverse_replication(
        self: &Arc<Self>,
        req: proto::ReverseReplication,
    ) -> anyhow::Result<ReplicationStatus> {
        let prepared = self.prepare_reverse(req).await?;
        self.owner()
            .call(|reply| crate::owner::HostCommand::InstallReverse(Box::new(prepared), reply))
            .await
    }

    async fn prepare_reverse(
        self: &Arc<Self>,
        req: proto::ReverseReplication,
    ) -> anyhow::Result<PreparedReverse> {
        super::check_frequency(req.frequency_secs)?;
        let old = match self.relationships.lock().get(&req.vm) {
            Some(Relation::FailedOver(r)) => r.clone(),
            Some(_) => {
                return Err(conflict(format!(
                    "{} was not failed over to this host: only a VM in FailedOver (after `failover complete`) can be reversed",
                    req.vm
                )))
            }
            None => {
                return Err(not_found(format!(
                    "no VM named {} was failed over to this host",
                    req.vm
                )))
            }
        };
        let vm = self
            .vms
            .lock()
            .get(&req.vm)
            .map(|e| e.vm.clone())
            .ok_or_else(|| not_found(format!("no VM named {} on this host", req.vm)))?;
        let generation = Generation(old.progress.generation.get() + 1);
        // The new relationship's id (its delta key) is chosen once and kept until the reverse
        // is installed: a retry after a lost answer, or after this host was killed, must say
        // the same key the old primary already adopted its disks with.
        let pending_key = format!("reverse/{}", req.vm);
        let replication_id = match self.catalog.get::<ReplicationRecord>(&pending_key)? {
            Some(p) if p.replica == req.replica => p.replication_id,
            _ => super::random_id()?,
        };
        let mut settings = ReplicationRecord {
            replica: req.replica.clone(),
            frequency_secs: req.frequency_secs,
            compression: req.compression,
            disks: (0..vm.disks.len() as u32).collect(),
            replication_id,
            replica_name: None,
            history: None,
            auto_resynchronize: false,
            resynchronize_window: None,
            lag_warning_cycles: None,
        };
        self.catalog
            .put(&pending_key, &settings)
            .context("recording the reverse in progress")?;
        let mut rel = Relationship::new(vm.name.clone(), Role::Primary, generation);
        // Replicating unless the old primary's answer says otherwise (below).
        rel.state = State::Replicating;
        rel.progress.last_seq = REVERSED_BASE_SEQ;
        rel.progress.last_cut_unix_ns = old.progress.last_cut_unix_ns;
        let mut hello = primary::hello_of(self, &vm, &settings, &rel);
        hello.reverse = Some(ReverseOf {
            generation: old.progress.generation,
            seq: old.progress.last_seq,
        });
        let peer = transport::Peer::expecting(req.replica.clone(), self.tls.clone(), None)?;
        let reply = crate::peer_client::hello(&peer, &hello, &self.peer_timeouts)
            .await
            .with_context(|| {
                format!(
                    "the old primary {} did not take the reverse of {}",
                    req.replica, req.vm
                )
            })
            .map_err(crate::peer_client::typed)?;
        let unexpected = || {
            conflict(format!(
                "{} answered the reverse of {} with point {} of generation {} (expected point {REVERSED_BASE_SEQ} of generation {generation}): it is not the host this VM was failed over from",
                req.replica, req.vm, reply.latest_seq, reply.generation
            ))
        };
        if reply.generation != generation {
            return Err(unexpected());
        }
        let (marks, note) = match (reply.latest_seq, reply.reverse) {
            (REVERSED_BASE_SEQ, None) => (Marks::Nothing, None),
            (REVERSED_BASE_SEQ, Some(a)) if a.planned => (Marks::Nothing, None),
            (REVERSED_BASE_SEQ, Some(a)) => {
                let why = reverse_reason(&a);
                rel.state = State::Resynchronizing {
                    reason: Some(why.clone()),
                };
                let marks = match a.full_send {
                    Some(_) => Marks::All,
                    None => Marks::Ranges(a.differs),
                };
                (marks, Some(why))
            }
            (Seq(0), _) => {
                rel.state = State::InitialReplicationInProgress;
                rel.progress.last_seq = Seq(0);
                rel.progress.last_cut_unix_ns = None;
                (
                    Marks::Allocated,
                    Some(format!(
                        "{} holds no copy of {}: an initial replication sends every allocated block",
                        req.replica, req.vm
                    )),
                )
            }
            _ => return Err(unexpected()),
        };
        settings.replica_name = peer.connected_name().await;
        Ok(PreparedReverse {
            vm: req.vm,
            settings,
            rel,
            marks,
            note,
        })
    }

    /// The command owner's half: the VM (still FailedOver) becomes the primary of the new
    /// relationship; its writes since the failover are already marked dirty, so its first
    /// cycle ships exactly them.
    pub(crate) fn install_reverse(
        self: &Arc<Self>,
        p: PreparedReverse,
    ) -> anyhow::Result<ReplicationStatus> {
        let _no_replica_event = self.replica_events.lock();
        if !matches!(
            self.relationships.lock().get(&p.vm),
            Some(Relation::FailedOver(_))
        ) {
            return Err(conflict(format!(
                "{} is no longer FailedOver on this host",
                p.vm
            )));
        }
        let vm = self
            .vms
            .lock()
            .get(&p.vm)
            .map(|e| e.vm.clone())
            .ok_or_else(|| not_found(format!("no VM named {} on this host", p.vm)))?;
        // The blocks to send are marked (durably) before the relationship is recorded: a
        // crash in between is finished by running the reverse again, which marks them again.
        for (i, d) in vm.disks.iter().enumerate() {
            let marked = match &p.marks {
                Marks::Nothing => Ok(()),
                Marks::All => d.mark_all_dirty(),
                Marks::Allocated => d.mark_allocated_dirty().map(|_| ()),
                Marks::Ranges(r) => {
                    let ranges: Vec<(u64, u64)> = r
                        .iter()
                        .filter(|dr| dr.index == i as u32)
                        .flat_map(|dr| dr.ranges.iter().map(|x| (x[0], x[1])))
                        .collect();
                    d.mark_dirty_blocks(&crate::vms::byte_ranges_to_blocks(&ranges))
                }
            };
            marked.with_context(|| {
                format!("marking what the reverse of {} must send on disk {i}", p.vm)
            })?;
        }
        self.save_relationship(
            &p.vm,
            &RelationshipDoc::new(&p.rel, Some(p.settings.clone())),
        )?;
        let _ = self.catalog.delete(&format!("reverse/{}", p.vm));
        let repl = Replication::spawn(
            self.clone(),
            vm,
            p.settings.clone(),
            p.rel,
            None,
            Vec::new(),
        );
        self.relationships
            .lock()
            .insert(p.vm.clone(), Relation::Primary(repl.clone()));
        self.events.emit(
            events::REPLICATION_REVERSED,
            Some(&p.vm),
            "info",
            &match &p.note {
                None => format!(
                    "replication reversed: {} is the primary, {} the replica (no initial replication)",
                    self.host_name, p.settings.replica
                ),
                Some(note) => format!(
                    "replication reversed: {} is the primary, {} the replica; {note}",
                    self.host_name, p.settings.replica
                ),
            },
        );
        Ok(repl.status())
    }

    /// The old primary's half, at a reverse hello (`peer-protocol.md`, "Reverse replication
    /// in the hello"). Planned (prepared for that failover at that point): its disks hold the
    /// point and become the base of a new replica VM. Unplanned (the same generation in any
    /// other state): the VM is fenced, its unshipped blocks are the answer (or a full send
    /// when its tracking cannot say), and its disks become the base, marked damaged until the
    /// new primary's `Full` point of those blocks arrives. Runs again harmlessly: once this
    /// host is the replica, the recorded answer is given again and the ordinary hello path
    /// answers.
    pub async fn accept_reverse(
        self: &Arc<Self>,
        hello: &Hello,
        rev: ReverseOf,
        key: [u8; 32],
    ) -> anyhow::Result<Option<ReverseAnswer>> {
        let vm_name = hello.vm.clone();
        let Some(repl) = self.primary_of(&vm_name) else {
            // Already the replica (a retried reverse): the answer given then. No VM here at
            // all: the ordinary path makes an empty replica VM (an initial replication).
            return Ok(self
                .catalog
                .get::<ReversedRecord>(&ReversedRecord::key(&vm_name))?
                .filter(|r| r.generation == hello.generation)
                .map(|r| r.answer));
        };
        let rel = repl.relationship();
        if rel.progress.generation != rev.generation {
            return Err(conflict(format!(
                "{vm_name} on {} is replicated in generation {}, not generation {} the reverse turns around: it is another relationship",
                self.host_name, rel.progress.generation, rev.generation
            )));
        }
        // Prepared at that point, and nothing found wrong since: the disks hold the point.
        let planned =
            matches!(rel.state, State::PreparedForFailover { seq, resync: None } if seq == rev.seq);
        let sizes: Vec<(u32, u64)> = repl
            .vm
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u32, d.size_bytes()))
            .collect();
        let asked: Vec<(u32, u64)> = hello
            .disks
            .iter()
            .map(|d| (d.index, d.size_bytes))
            .collect();
        if sizes != asked {
            return Err(bad_request(format!(
                "{vm_name}: the reverse names disks {asked:?} but this host's VM has {sizes:?}"
            )));
        }
        let (store, _) = self.replica_store().ok_or_else(|| {
            conflict(format!(
                "{} is not a replica server; run `understudy replica-server enable` here to take {vm_name} back",
                self.host_name
            ))
        })?;
        if !planned {
            // Nothing may write the disks from now on: refused (nothing changed) while a
            // guest still uses them.
            self.fence_vm(&repl.vm)?;
        }
        // The old relationship's task stops first: nothing ships from here any more, and a
        // cut in flight gives its blocks back to the dirty map.
        let stopped = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            repl.command(crate::primary::Cmd::Shutdown),
        )
        .await;
        if !matches!(stopped, Ok(Ok(_))) && !planned {
            self.unfence_vm(&repl.vm);
            return Err(crate::error::transient(format!(
                "the replication task of {vm_name} did not stop; retry the reverse"
            )));
        }
        let answer = if planned {
            ReverseAnswer {
                planned: true,
                differs: Vec::new(),
                full_send: None,
            }
        } else {
            unplanned_answer(&repl.vm, &rel.state)
        };
        let images: Vec<(u32, PathBuf)> = repl
            .vm
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u32, d.image_path().to_path_buf()))
            .collect();
        let disks: Vec<delta::DiskEntry> = sizes
            .iter()
            .map(|&(index, size_bytes)| delta::DiskEntry { index, size_bytes })
            .collect();
        let generation = hello.generation;
        let base = replica::AdoptedBase {
            seq: REVERSED_BASE_SEQ,
            cut_time_unix_ns: rel.progress.last_cut_unix_ns.unwrap_or(0),
            damage: (!planned).then(|| {
                format!(
                    "the old primary's disks were adopted after an unplanned failover to point {} of generation {}; they match the new primary only once its first point arrives",
                    rev.seq, rev.generation
                )
            }),
        };
        let s = self.clone();
        let name = vm_name.clone();
        let record = ReversedRecord {
            generation,
            answer: answer.clone(),
        };
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _no_other_event = s.replica_events.lock();
            // The answer first: a retry after a crash from here on finds it.
            s.catalog
                .put(&ReversedRecord::key(&name), &record)
                .context("recording the reverse answer")?;
            store
                .adopt_vm(&name, generation, &disks, key, &images, base.clone())
                .with_context(|| format!("adopting the disks of {name} as its replica"))?;
            // The replica's relationship replaces the old primary's, then the old VM goes.
            let mut replica_rel = Relationship::new(name.clone(), Role::Replica, generation);
            replica_rel.state = if planned {
                State::Replicating
            } else {
                State::Resynchronizing {
                    reason: Some(reverse_reason(&record.answer)),
                }
            };
            replica_rel.progress.last_seq = REVERSED_BASE_SEQ;
            replica_rel.progress.last_cut_unix_ns = Some(base.cut_time_unix_ns);
            s.save_relationship(&name, &RelationshipDoc::new(&replica_rel, None))?;
            s.relationships
                .lock()
                .insert(name.to_string(), Relation::Replica(replica_rel));
            s.forget_vm(&name)?;
            Ok(())
        })
        .await
        .context("the adopt task")??;
        drop(repl);
        self.events.emit(
            events::REPLICATION_REVERSED,
            Some(&vm_name),
            "info",
            &if planned {
                format!(
                    "{vm_name} is now the replica of {} (its own disks are the base: no initial replication)",
                    hello.primary_host
                )
            } else {
                format!(
                    "{vm_name} is now the replica of {} after an unplanned failover: {}",
                    hello.primary_host,
                    reverse_reason(&answer)
                )
            },
        );
        Ok(Some(answer))
    }

    /// The first point of a reversed relationship committed here: the answer kept for a
    /// retried reverse is not needed any more.
    pub(crate) fn forget_reverse_answer(&self, vm: &str) {
        let key = ReversedRecord::key(vm);
        if matches!(self.catalog.get::<ReversedRecord>(&key), Ok(Some(_))) {
            let _ = self.catalog.delete(&key);
        }
    }

    /// `replication remove NAME` (the command owner's): this host stops replicating the VM,
    /// whatever the state, and serves its disks (a fence is lifted: the admin's way to force
    /// a VM failed over elsewhere back into service here). The replica keeps its copy.
    pub(crate) async fn remove_replication(self: &Arc<Self>, vm: &str) -> anyhow::Result<String> {
        let relation = self.relationships.lock().get(vm).map(|r| match r {
            Relation::Primary(repl) => Ok(Some(repl.clone())),
            Relation::FailedOver(_) => Ok(None),
            Relation::Replica(_) => Err(()),
        });
        let repl = match relation {
            None => {
                return Err(not_found(format!(
                    "{vm} is not replicated from this host"
                )))
            }
            Some(Err(())) => {
                return Err(conflict(format!(
                    "{vm} is a replica on this host; run `understudy replication remove {vm}` on its primary"
                )))
            }
            Some(Ok(repl)) => repl,
        };
        if let Some(repl) = &repl {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                repl.command(crate::primary::Cmd::Shutdown),
            )
            .await
            .map_err(|_| {
                crate::error::transient(format!("the replication task of {vm} did not stop; retry"))
            })??;
        }
        let s = self.clone();
        let name = vm.to_string();
        tokio::task::spawn_blocking(move || {
            let _no_replica_event = s.replica_events.lock();
            s.catalog.delete(&RelationshipDoc::key(&name))
        })
        .await
        .context("the remove task")??;
        self.relationships.lock().remove(vm);
        let was_fenced = repl
            .as_ref()
            .is_some_and(|r| r.vm.disks.iter().any(|d| d.is_fenced()));
        if let Some(repl) = &repl {
            self.unfence_vm(&repl.vm);
        }
        let message = if was_fenced {
            format!("replication of {vm} removed; its disks are served again (the fence is lifted), and the replica keeps its copy")
        } else {
            format!("replication of {vm} removed; the replica keeps its copy")
        };
        self.events
            .emit(events::REPLICATION_REMOVED, Some(vm), "warning", &message);
        Ok(message)
    }

    /// Removes a primary VM whose disks were handed to the replica store: its record, its
    /// entry, and its directory (the store holds its own links to the images).
    pub(super) fn forget_vm(&self, vm: &str) -> anyhow::Result<()> {
        self.catalog.delete(&format!("vm/{vm}"))?;
        let entry = self.vms.lock().remove(vm);
        drop(entry);
        let dir = crate::vms::vm_dir(&self.data_dir, vm);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
}

/// The answer kept on the old primary after it accepted a reverse (`reversed/<vm>`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ReversedRecord {
    generation: Generation,
    answer: ReverseAnswer,
}

impl ReversedRecord {
    fn key(vm: &str) -> String {
        format!("reversed/{vm}")
    }
}

/// What the old primary's disks hold against the new primary, after an unplanned failover:
/// the blocks its tracking had not shipped, or a full send when its tracking cannot say.
fn unplanned_answer(vm: &crate::vms::Vm, state: &State) -> ReverseAnswer {
    let full = |why: String| ReverseAnswer {
        planned: false,
        differs: Vec::new(),
        full_send: Some(why),
    };
    match state {
        State::ResynchronizationRequired { reason } => {
            return full(format!("this host required a resynchronization ({reason})"))
        }
        // A resynchronization's cut is covered by its cursor, not by the tracker (`resync.md`,
        // "The cursor"): the tracker alone cannot say what differs.
        State::WaitingForStartResynchronize { .. }
        | State::Resynchronizing { .. }
        | State::Suspended {
            resume_to: relationship::Resumable::Resynchronizing,
        }
        | State::FencedAfterFailover {
            resume_to: relationship::Resumable::Resynchronizing,
            ..
        } => return full("a resynchronization was pending on this host".into()),
        State::FencedAfterFailover {
            resync: Some(reason),
            ..
        }
        | State::PreparedForFailover {
            resync: Some(reason),
            ..
        } => return full(format!("this host required a resynchronization ({reason})")),
        _ => {}
    }
    let mut differs = Vec::new();
    let mut count = 0;
    for (i, d) in vm.disks.iter().enumerate() {
        if let Some(e) = d.storage_error() {
            return full(format!("the storage of disk {i} failed ({e})"));
        }
        if d.tracking_degraded() {
            return full(format!("the change tracking of disk {i} is degraded"));
        }
        let ranges: Vec<[u64; 2]> = d
            .unshipped_ranges()
            .into_iter()
            .map(|(o, l)| [o, l])
            .collect();
        count += ranges.len();
        if count > REVERSE_RANGES_MAX {
            return full(format!(
                "more than {REVERSE_RANGES_MAX} separate ranges were not shipped"
            ));
        }
        differs.push(DiskRanges {
            index: i as u32,
            ranges,
        });
    }
    ReverseAnswer {
        planned: false,
        differs,
        full_send: None,
    }
}

/// One line saying what a reverse after an unplanned failover sends.
pub(crate) fn reverse_reason(a: &ReverseAnswer) -> String {
    match &a.full_send {
        Some(why) => format!(
            "a reverse after an unplanned failover compares every block and sends those that differ: {why}"
        ),
        None => {
            let bytes: u64 = a
                .differs
                .iter()
                .flat_map(|d| d.ranges.iter().map(|r| r[1]))
                .sum();
            format!(
                "a reverse after an unplanned failover sends only the blocks that can differ ({} MiB not shipped by the old primary, plus what the new primary changed since the failover's point)",
                bytes.div_ceil(1 << 20)
            )
        }
    }
}
