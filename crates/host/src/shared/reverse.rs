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
use proto::peer::{Hello, ReverseOf};
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
        };
        self.catalog
            .put(&pending_key, &settings)
            .context("recording the reverse in progress")?;
        let mut rel = Relationship::new(vm.name.clone(), Role::Primary, generation);
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
        if reply.generation != generation || reply.latest_seq != REVERSED_BASE_SEQ {
            return Err(conflict(format!(
                "{} answered the reverse of {} with point {} of generation {} (expected point {REVERSED_BASE_SEQ} of generation {generation}): it is not the host this VM was failed over from",
                req.replica, req.vm, reply.latest_seq, reply.generation
            )));
        }
        settings.replica_name = peer.connected_name().await;
        Ok(PreparedReverse {
            vm: req.vm,
            settings,
            rel,
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
            &format!(
                "replication reversed: {} is the primary, {} the replica (no initial replication)",
                self.host_name, p.settings.replica
            ),
        );
        Ok(repl.status())
    }

    /// The old primary's half, at a reverse hello: if VM `vm` is prepared for a planned
    /// failover at the point the hello names, its disks become the base of a new replica VM
    /// (the hello's generation and key) and this host its replica. Runs again harmlessly: once
    /// this host is the replica, the ordinary hello path answers.
    pub async fn accept_reverse(
        self: &Arc<Self>,
        hello: &Hello,
        rev: ReverseOf,
        key: [u8; 32],
    ) -> anyhow::Result<()> {
        let vm_name = hello.vm.clone();
        let Some(repl) = self.primary_of(&vm_name) else {
            // Already the replica (a retried reverse), or nothing to adopt: the ordinary path.
            return Ok(());
        };
        let rel = repl.relationship();
        match rel.state {
            State::PreparedForFailover { seq }
                if seq == rev.seq && rel.progress.generation == rev.generation => {}
            _ => {
                return Err(conflict(format!(
                    "{vm_name} on {} is {:?} at point {} of generation {}, not prepared for a failover at point {} of generation {}: reversing without a resynchronization needs `understudy failover prepare {vm_name}` here first",
                    self.host_name,
                    rel.state.name(),
                    rel.progress.last_seq,
                    rel.progress.generation,
                    rev.seq,
                    rev.generation
                )))
            }
        }
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
        // The old relationship's task stops first: nothing ships from here any more.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            repl.command(crate::primary::Cmd::Shutdown),
        )
        .await;
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
        };
        let s = self.clone();
        let name = vm_name.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _no_other_event = s.replica_events.lock();
            store
                .adopt_vm(&name, generation, &disks, key, &images, base)
                .with_context(|| format!("adopting the disks of {name} as its replica"))?;
            // The replica's relationship replaces the old primary's, then the old VM goes.
            let mut replica_rel = Relationship::new(name.clone(), Role::Replica, generation);
            replica_rel.state = State::Replicating;
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
            &format!(
                "{vm_name} is now the replica of {} (its own disks are the base: no initial replication)",
                hello.primary_host
            ),
        );
        Ok(())
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
