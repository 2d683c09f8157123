//! Initial replication from an existing copy (`replication start NAME --use-existing PATH...`),
//! the replica host's half: raw images already on this host become point 1 of a new replica VM
//! (`ReplicaStore::adopt_vm`, as a reverse after an unplanned failover does), marked damaged
//! until the primary's first cycle, a resynchronization, compared them and sent the blocks
//! that differ. See `peer-protocol.md`, "An existing copy in the hello".

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use proto::peer::Hello;
use relationship::{Relationship, Role, State, EXISTING_COPY_SEQ, INITIAL_FROM_EXISTING_REASON};

use super::{Relation, Shared};
use crate::catalog::RelationshipDoc;
use crate::error::{bad_request, conflict};

/// The directory, inside the replica server's storage directory, that existing copies must
/// be in: the replica host adopts (hard-links, then writes into) only files its admin put
/// there, so a primary can never name another file of the host (another VM's replica, a
/// system file). A name no VM can have, so the store never takes it for a VM.
pub const EXISTING_COPIES_DIR: &str = "+existing";

/// The damage an adopted existing copy carries until the primary's compare arrives: the
/// replica then takes only a `Full` delta.
pub const EXISTING_COPY_DAMAGE: &str = "an existing copy, not yet compared with the primary";

impl Shared {
    /// Adopts the hello's `use_existing` images as point 1 of the replica VM. Refused (one
    /// line, nothing changed) unless there is one raw regular file of its disk's size per disk
    /// and the replica VM holds no point. A retry of an adoption already done is answered the
    /// same.
    pub async fn accept_existing(
        self: &Arc<Self>,
        hello: &Hello,
        paths: &[String],
        key: [u8; 32],
    ) -> anyhow::Result<()> {
        let vm = hello.vm.clone();
        if self.role_of(&vm) == Some(Role::Primary) {
            return Err(conflict(format!(
                "{vm} is replicated from this host ({}); it cannot also be a replica of it here",
                self.host_name
            )));
        }
        let (store, cfg) = self.replica_store().ok_or_else(|| {
            conflict(format!(
                "{} is not a replica server; run `understudy replica-server enable` there",
                self.host_name
            ))
        })?;
        let root = Path::new(&cfg.storage).join(EXISTING_COPIES_DIR);
        if let Some(rvm) = store.vm(&vm) {
            let latest = rvm.latest_seq();
            let retry = latest == EXISTING_COPY_SEQ
                && rvm.generation() == hello.generation
                && rvm.damage().as_deref() == Some(EXISTING_COPY_DAMAGE);
            if retry {
                return Ok(());
            }
            if latest.get() > 0 {
                return Err(conflict(format!(
                    "the replica of {vm} on {} already holds point {latest}: an existing copy can only start a replica that has no point",
                    self.host_name
                )));
            }
        }
        if paths.len() != hello.disks.len() {
            return Err(bad_request(format!(
                "{vm} replicates {} disk(s) but {} existing image(s) were given: give one per disk, in disk order",
                hello.disks.len(),
                paths.len()
            )));
        }
        let mut images = Vec::with_capacity(paths.len());
        for (d, p) in hello.disks.iter().zip(paths) {
            let path = PathBuf::from(p);
            let checked =
                tokio::task::block_in_place(|| check_existing(&root, &path, d.size_bytes));
            let path = checked.map_err(|why| {
                bad_request(format!(
                    "existing image for disk {} of {vm}: {why}",
                    d.index
                ))
            })?;
            images.push((d.index, path));
        }
        let disks: Vec<delta::DiskEntry> = hello
            .disks
            .iter()
            .map(|d| delta::DiskEntry {
                index: d.index,
                size_bytes: d.size_bytes,
            })
            .collect();
        let base = replica::AdoptedBase {
            seq: EXISTING_COPY_SEQ,
            cut_time_unix_ns: proto::time::now_unix_ns(),
            damage: Some(EXISTING_COPY_DAMAGE.into()),
        };
        let generation = hello.generation;
        let s = self.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _no_other_event = s.replica_events.lock();
            // The empty replica VM an earlier hello made (`replication enable`) gives way.
            if store.vm(&vm).is_some() {
                store
                    .remove_vm(&vm)
                    .with_context(|| format!("removing the empty replica VM {vm}"))?;
            }
            store
                .adopt_vm(&vm, generation, &disks, key, &images, base.clone())
                .with_context(|| format!("adopting the existing images of {vm}"))?;
            let mut rel = Relationship::new(vm.clone(), Role::Replica, generation);
            rel.state = State::Resynchronizing {
                reason: Some(INITIAL_FROM_EXISTING_REASON.into()),
            };
            rel.progress.last_seq = EXISTING_COPY_SEQ;
            rel.progress.last_cut_unix_ns = Some(base.cut_time_unix_ns);
            s.save_relationship(&vm, &RelationshipDoc::new(&rel, None))?;
            s.relationships
                .lock()
                .insert(vm.to_string(), Relation::Replica(rel));
            Ok(())
        })
        .await
        .context("the adopt task")??;
        self.events.emit(
            crate::events::INITIAL_FROM_EXISTING,
            Some(&hello.vm),
            "info",
            &format!(
                "{} adopted {} existing image(s) as point 1 of {}; the primary compares them and sends only the blocks that differ",
                self.host_name,
                paths.len(),
                hello.vm
            ),
        );
        Ok(())
    }
}

/// The existing copy of a disk of `size` bytes at `path` (canonical), or why it cannot be:
/// an absolute path to a regular file (not a symlink) inside `root`
/// ([`EXISTING_COPIES_DIR`]), raw, of exactly that size.
fn check_existing(root: &Path, path: &Path, size: u64) -> Result<PathBuf, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown} is not an absolute path"));
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let inside = match (root.canonicalize(), path.canonicalize()) {
        (Ok(r), Ok(p)) if p.starts_with(&r) => Some(p),
        _ => None,
    };
    let Some(canonical) = inside else {
        return Err(format!(
            "{shown} is not in {}: this replica host adopts only copies its admin put there (move or copy it there, e.g. `cp --sparse=always`)",
            root.display()
        ));
    };
    let format = crate::qemu_img::format(path).map_err(|e| crate::errfmt::one_line(&e))?;
    if format != "raw" {
        return Err(format!(
            "{shown} is a {format} image; convert it with `qemu-img convert -O raw {shown} IMAGE.raw` and give that"
        ));
    }
    if meta.len() != size {
        return Err(format!(
            "size mismatch: {shown} is {} bytes but the primary's disk is {size} bytes",
            meta.len()
        ));
    }
    Ok(canonical)
}

impl Shared {
    /// `replication import-media NAME --from DIR` on the replica host
    /// (`docs/formats/initial-media.md`): verifies the media completely through the upload's
    /// receiver and commits it as point 1 of the (empty) replica VM. Refused in one line,
    /// nothing changed, when anything does not check.
    pub async fn import_media(
        self: &Arc<Self>,
        vm: &str,
        from: &str,
    ) -> anyhow::Result<proto::peer::DeltaReply> {
        let dir = PathBuf::from(from);
        if !dir.is_absolute() {
            return Err(bad_request(format!(
                "media directory {from} must be an absolute path"
            )));
        }
        let (store, _) = self.replica_store().ok_or_else(|| {
            conflict(format!(
                "{} is not a replica server; run `understudy replica-server enable` here first",
                self.host_name
            ))
        })?;
        let name = proto::VmName::parse(vm).map_err(|e| bad_request(e.to_string()))?;
        let rvm = store.vm(&name).ok_or_else(|| {
            crate::error::not_found(format!(
                "no replica of {vm} on this host: run `understudy replication enable {vm} --replica THIS_HOST:PORT` on the primary first (its hello creates it)"
            ))
        })?;
        if let Some(why) = self.replica_refuses(&name) {
            return Err(conflict(why));
        }
        let vm_s = vm.to_string();
        let rvm2 = rvm.clone();
        let point = tokio::task::spawn_blocking(move || {
            let (manifest, delta) = crate::media::read_manifest(&dir, &vm_s)?;
            let point = crate::media::import_media(&rvm2, &manifest, &delta)?;
            crate::heap::give_back();
            Ok::<_, anyhow::Error>(point)
        })
        .await
        .context("the import task")??;
        let event = relationship::Event::DeltaCommitted {
            seq: point.seq,
            kind: relationship::CycleKind::Initial,
            cut_unix_ns: point.cut_time_unix_ns,
        };
        let generation = rvm.generation();
        if let Err(e) = tokio::task::block_in_place(|| self.replica_event(&name, generation, event))
        {
            // The point is committed; only the replica's view of the state lags.
            tracing::error!(%vm, "recording the imported point: {e:#}");
        }
        self.events.emit(
            crate::events::POINT_COMMITTED,
            Some(&name),
            "info",
            &format!(
                "point {} imported from media {from} ({} bytes stored)",
                point.seq, point.stored_bytes
            ),
        );
        Ok(proto::peer::DeltaReply {
            seq: point.seq,
            cut_time_unix_ns: point.cut_time_unix_ns,
            stored_bytes: point.stored_bytes,
        })
    }
}
