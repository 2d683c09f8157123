//! [`ReplicaStore`]: the storage directory holding one directory per replicated VM. Owns VM
//! creation (built under a dot-name, then renamed into place, so a crash never leaves a
//! half-created VM) and removal (renamed away first, then deleted), and opening every VM found.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use delta::{DeltaKind, DiskEntry};
use parking_lot::{Mutex, RwLock};
use proto::{Generation, Seq, VmName};

use crate::adopt::{self, AdoptedBase};
use crate::budget::{IndexBudget, INDEX_FRAMES_MAX};
use crate::fds::JournalFds;
use crate::manifest::{hex, DiskRecord, Manifest, PointRecord};
use crate::marker::{self, StoreMarker};
use crate::vm::{base_path, open_vm, ReplicaVm, BASE_DIR, INCOMING_DIR, JOURNAL_DIR};
use crate::{durable, failpoint, ReplicaError};

const CREATING_SUFFIX: &str = ".creating";
const REMOVING_SUFFIX: &str = ".removing";
/// Directories of the store: owner only (they hold the guests' data and the delta keys).
pub(crate) const DIR_MODE: u32 = 0o700;
/// Base images and journal files: owner read/write only.
pub(crate) const FILE_MODE: u32 = 0o600;

/// All replicated VMs of this host's storage directory.
pub struct ReplicaStore {
    dir: PathBuf,
    marker: StoreMarker,
    vms: RwLock<BTreeMap<VmName, Arc<ReplicaVm>>>,
    /// VM directories that could not be opened, with the reason.
    broken: RwLock<BTreeMap<VmName, String>>,
    /// VM directories not opened yet (their journal is verified by
    /// [`ReplicaStore::open_pending`]), with the transient reason of the last failed attempt.
    pending: RwLock<BTreeMap<VmName, Option<String>>>,
    /// Serializes create/remove.
    admin: Mutex<()>,
    /// Open journal files of every VM (bounded).
    fds: Arc<JournalFds>,
    /// Indexed frames of every VM (bounded).
    budget: Arc<IndexBudget>,
}
/// The disk table rule of the delta format (`delta::validate_disks`), which is the primary's:
/// one rule for what a VM's disks may be, on the wire and in the store.
fn validate_disks(disks: &[DiskEntry]) -> Result<(), ReplicaError> {
    delta::validate_disks(disks).map_err(|e| match e {
        delta::DeltaError::BadHeader(why) => ReplicaError::InvalidDisks(why),
        _ => ReplicaError::InvalidDisks("invalid disk table"),
    })
}

fn sorted(disks: &[DiskEntry]) -> Vec<DiskEntry> {
    let mut d = disks.to_vec();
    d.sort_by_key(|d| d.index);
    d
}

/// The manifest of a new VM without any point.
fn new_manifest(
    vm_id: &VmName,
    generation: Generation,
    disks: &[DiskEntry],
    key: [u8; 32],
) -> Manifest {
    Manifest {
        vm_id: vm_id.clone(),
        generation: generation.get(),
        key: hex(&key),
        disks: disks
            .iter()
            .map(|d| DiskRecord {
                index: d.index,
                size_bytes: d.size_bytes,
            })
            .collect(),
        base_point: None,
        base_seq: 0,
        folding: None,
        damage: None,
        history: None,
        hidden: Vec::new(),
    }
}

/// fsyncs a `.creating` directory and its subdirectories, so that every entry made in them is
/// durable before the rename that puts the VM in place.
fn fsync_creating(tmp: &Path) -> Result<(), ReplicaError> {
    for sub in [BASE_DIR, JOURNAL_DIR, INCOMING_DIR] {
        durable::fsync_dir(&tmp.join(sub))?;
    }
    durable::fsync_dir(tmp)
}

impl ReplicaStore {
    /// Sets up `storage_dir` as a replica store: creates it (0700) if missing and writes its
    /// marker (see "Store marker" in the format doc) unless it has a valid one. Returns the
    /// marker. The daemon calls this only when told to (`replica-server enable --storage`).
    pub fn init_storage(storage_dir: &Path, host: &str) -> Result<StoreMarker, ReplicaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(storage_dir)
            .map_err(ReplicaError::io("create directory", storage_dir))?;
        match marker::load(storage_dir) {
            Ok(m) => Ok(m),
            Err(ReplicaError::NoStoreMarker { .. }) => {
                let m = marker::create(storage_dir, host)?;
                tracing::info!(storage = %storage_dir.display(), store_id = %m.store_id, "replica store set up");
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `dir` holds replica VM directories (a store from before markers existed).
    pub fn holds_replica_vms(dir: &Path) -> bool {
        fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.path().join(crate::manifest::MANIFEST_FILE).is_file())
        })
    }

    /// Sets up `storage_dir` if needed ([`ReplicaStore::init_storage`]) and recovers every VM
    /// in it (for tools and tests; the daemon uses `init_storage` once, then
    /// `open_deferred`). A VM that cannot be opened is listed by [`ReplicaStore::broken`];
    /// the others open normally. A VM that failed for a transient reason (out of descriptors
    /// or memory) stays pending ([`ReplicaStore::pending`]) and opens at a later
    /// [`ReplicaStore::open_pending`].
    pub fn open(storage_dir: &Path) -> Result<Self, ReplicaError> {
        Self::init_storage(storage_dir, "")?;
        let store = Self::open_deferred(storage_dir)?;
        store.open_pending();
        Ok(store)
    }

    /// Lists an existing store without opening any VM (cheap: no journal is read). Every VM
    /// found is pending until [`ReplicaStore::open_pending`] verifies and opens it. Refuses,
    /// creating nothing, a missing directory (`StorageMissing`: an unmounted file system) and
    /// one without a valid store marker (`NoStoreMarker`, `BadStoreMarker`).
    pub fn open_deferred(storage_dir: &Path) -> Result<Self, ReplicaError> {
        match fs::metadata(storage_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReplicaError::StorageMissing {
                    dir: storage_dir.to_owned(),
                })
            }
            Err(e) => return Err(ReplicaError::io("stat", storage_dir)(e)),
            Ok(m) if !m.is_dir() => {
                return Err(ReplicaError::io("open", storage_dir)(
                    std::io::Error::from_raw_os_error(libc::ENOTDIR),
                ))
            }
            Ok(_) => {}
        }
        let marker = marker::load(storage_dir)?;
        let mut pending = BTreeMap::new();
        let entries = fs::read_dir(storage_dir).map_err(ReplicaError::io("list", storage_dir))?;
        for entry in entries {
            let entry = entry.map_err(ReplicaError::io("list", storage_dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            if name.starts_with('.') {
                if name.ends_with(CREATING_SUFFIX) || name.ends_with(REMOVING_SUFFIX) {
                    durable::remove_dir_all(&path)?;
                }
                continue;
            }
            // A directory whose name no VM can have is not ours (VM directories are created
            // only under a valid `VmName`).
            let Ok(name) = VmName::parse(&name) else {
                continue;
            };
            if !path.is_dir() {
                continue;
            }
            pending.insert(name, None);
        }
        Ok(ReplicaStore {
            dir: storage_dir.to_owned(),
            marker,
            vms: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            pending: RwLock::new(pending),
            admin: Mutex::new(()),
            fds: Arc::new(JournalFds::new(crate::fds::default_capacity())),
            budget: Arc::new(IndexBudget::new(INDEX_FRAMES_MAX)),
        })
    }

    /// Frames indexed in memory now (all VMs), and the bound ([`INDEX_FRAMES_MAX`]).
    pub fn index_frames(&self) -> (u64, u64) {
        (self.budget.indexed(), self.budget.max())
    }

    /// Changes the bound on indexed frames (tests; tuning).
    pub fn set_index_frames_max(&self, max: u64) {
        self.budget.set_max(max);
    }

    /// While the index is past three quarters of its bound, folds the oldest point of the VM
    /// holding the most frames (never its last point; a point an open view reads stops it).
    /// Run with retention, so a VM refused `IndexFull` finds room at its next attempt.
    pub fn relieve_index_pressure(&self) -> Result<(), ReplicaError> {
        let high = self.budget.max() / 4 * 3;
        while self.budget.indexed() > high {
            let Some(vm) = self
                .vms()
                .into_iter()
                .filter(|v| v.points().len() > 1)
                .max_by_key(|v| v.inner.indexed_frames())
            else {
                return Ok(());
            };
            let before = self.budget.indexed();
            vm.retain(vm.points().len() - 1)?;
            if self.budget.indexed() >= before {
                return Ok(()); // the oldest point is being read; later
            }
            tracing::info!(vm = %vm.vm_id(), "folded the oldest point early: the store's index is past 3/4 of its bound");
        }
        Ok(())
    }

    /// The store's marker (which store this is).
    pub fn marker(&self) -> &StoreMarker {
        &self.marker
    }

    /// Opens every pending VM (recovery and full verification of its journal), one at a time.
    /// A VM opens, or is broken with the reason, or stays pending when the failure was
    /// transient. Returns how many VMs are still pending.
    pub fn open_pending(&self) -> usize {
        let names: Vec<VmName> = self.pending.read().keys().cloned().collect();
        for name in names {
            let opened = open_vm(
                &self.dir.join(name.as_str()),
                self.fds.clone(),
                self.budget.clone(),
            );
            // Create/remove may have run meanwhile: only a still-pending VM is decided here.
            let _a = self.admin.lock();
            let mut pending = self.pending.write();
            if !pending.contains_key(&name) {
                continue;
            }
            match opened {
                Ok(vm) if *vm.vm_id() == name => {
                    if let Some(d) = vm.damage() {
                        tracing::error!(vm = %name, damage = %d, "replica damaged: resynchronization required");
                    }
                    pending.remove(&name);
                    self.vms.write().insert(name, Arc::new(vm));
                }
                Ok(vm) => {
                    pending.remove(&name);
                    self.broken
                        .write()
                        .insert(name, format!("directory holds VM {:?}", vm.vm_id()));
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(vm = %name, error = %e, "cannot open replica VM yet (transient); will retry");
                    pending.insert(name, Some(e.to_string()));
                }
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "cannot open replica VM");
                    pending.remove(&name);
                    self.broken.write().insert(name, e.to_string());
                }
            }
        }
        self.pending.read().len()
    }

    /// VMs not opened yet, with the transient reason of their last failed attempt.
    pub fn pending(&self) -> Vec<(VmName, Option<String>)> {
        self.pending
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether `vm_id` is waiting to be opened (verified).
    pub fn is_pending(&self, vm_id: &VmName) -> bool {
        self.pending.read().contains_key(vm_id)
    }

    /// Journal files the store holds open now, and the most it ever holds.
    pub fn journal_fds(&self) -> (usize, usize) {
        (self.fds.open_count(), self.fds.capacity())
    }

    /// Creates the replica of a VM: empty (all-zero, sparse) base images and no point yet.
    /// Idempotent when the VM exists with the same generation, disks and key.
    pub fn create_vm(
        &self,
        vm_id: &VmName,
        generation: Generation,
        disks: &[DiskEntry],
        key: [u8; 32],
    ) -> Result<Arc<ReplicaVm>, ReplicaError> {
        validate_disks(disks)?;
        let _a = self.admin.lock();
        if let Some(vm) =
            self.existing(vm_id, |vm| identity_differs(vm, generation, disks, &key))?
        {
            return Ok(vm);
        }
        let dir = self.dir.join(vm_id.as_str());
        let tmp = self.creating_path(vm_id);
        self.start_creating(&tmp)?;
        for d in disks {
            let path = base_path(&tmp, d.index);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path)
                .map_err(ReplicaError::io("create base image", &path))?;
            f.set_len(d.size_bytes)
                .map_err(ReplicaError::io("resize base image", &path))?;
            durable::fsync_file(&f, &path)?;
        }
        new_manifest(vm_id, generation, disks, key).store(&tmp)?;
        fsync_creating(&tmp)?;
        durable::rename(&tmp, &dir)?;
        let vm = Arc::new(open_vm(&dir, self.fds.clone(), self.budget.clone())?);
        self.vms.write().insert(vm_id.clone(), vm.clone());
        tracing::info!(vm = %vm_id, %generation, disks = disks.len(), "replica VM created");
        Ok(vm)
    }

    /// Creates the replica of a VM whose base images are the given raw disk images, already at
    /// point `base.seq` (reverse replication after a planned failover: the old primary's own
    /// disks hold the point the new primary started from). The VM then has exactly that point,
    /// and the first delta it takes is an ordinary `base.seq + 1` on parent `base.seq`: no
    /// initial replication. See "Adopting a VM (reverse replication)" in the format doc.
    ///
    /// `images` names one raw image per disk (`(disk index, path)`), each a regular file of
    /// exactly its disk's size that nothing writes any more. **The caller hands them over**:
    /// on the store's file system a base image is a hard link to the caller's file (the same
    /// inode; its mode becomes 0600), elsewhere a sparse copy. After `Ok` the caller removes
    /// its own names of the images and never writes them again; after an error they are
    /// intact (also after a crash at any step).
    ///
    /// Refused with nothing changed: an invalid disk table, `base.seq` 0, an image missing,
    /// extra, doubled, not a regular file or of another size than its disk (`Adopt`), a VM of
    /// that name that is pending (`Verifying`), broken or different (`AlreadyExists`). A VM
    /// of that name with the same generation, disks and key whose base holds `base.seq` (with
    /// the same cut time while listed) is returned as is: a retry after a lost answer.
    pub fn adopt_vm(
        &self,
        vm_id: &VmName,
        generation: Generation,
        disks: &[DiskEntry],
        key: [u8; 32],
        images: &[(u32, PathBuf)],
        base: AdoptedBase,
    ) -> Result<Arc<ReplicaVm>, ReplicaError> {
        validate_disks(disks)?;
        if base.seq == Seq(0) {
            return Err(ReplicaError::Adopt {
                vm_id: vm_id.to_string(),
                reason: "images cannot hold point 0 (no point): adopt needs the point they hold"
                    .into(),
            });
        }
        let _a = self.admin.lock();
        if let Some(vm) = self.existing(vm_id, |vm| {
            identity_differs(vm, generation, disks, &key).or_else(|| {
                let st = vm.inner.state.read();
                let same = st.base_seq == base.seq.get()
                    && st
                        .base_point
                        .map_or(true, |p| p.cut_time_unix_ns == base.cut_time_unix_ns);
                (!same).then(|| {
                    format!(
                        "with base point {} (the request adopts point {})",
                        st.base_seq,
                        base.seq.get()
                    )
                })
            })
        })? {
            tracing::info!(vm = %vm_id, seq = base.seq.get(), "replica VM already adopted (a retry)");
            return Ok(vm);
        }
        let images = adopt::check_images(vm_id, disks, images)?;
        let dir = self.dir.join(vm_id.as_str());
        let tmp = self.creating_path(vm_id);
        let built = self.build_adopted(vm_id, generation, disks, key, &images, base.clone(), &tmp);
        let committed = built.and_then(|placed| {
            durable::rename(&tmp, &dir)?;
            Ok(placed)
        });
        let placed = match committed {
            Ok(placed) => placed,
            Err(e) => {
                // An injected failure stands for a crash: nothing runs after it (open removes
                // the leftover). Otherwise a partial copy must not hold space until a restart.
                if !dir.exists() && !matches!(e, ReplicaError::Injected(_)) {
                    if let Err(c) = durable::remove_dir_all(&tmp) {
                        tracing::warn!(vm = %vm_id, error = %c, "cannot remove a failed adoption's directory (open removes it)");
                    }
                }
                if dir.exists() {
                    // Renamed into place: the VM exists on disk; open it later.
                    self.pending
                        .write()
                        .insert(vm_id.clone(), Some(e.to_string()));
                }
                return Err(e);
            }
        };
        let opened = failpoint::hit("adopt.after_rename")
            .and_then(|()| open_vm(&dir, self.fds.clone(), self.budget.clone()));
        let vm = match opened {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                self.pending
                    .write()
                    .insert(vm_id.clone(), Some(e.to_string()));
                return Err(e);
            }
        };
        self.vms.write().insert(vm_id.clone(), vm.clone());
        let linked = placed
            .iter()
            .filter(|p| **p == adopt::Placed::Linked)
            .count();
        tracing::info!(vm = %vm_id, %generation, seq = base.seq.get(), disks = disks.len(), linked, copied = disks.len() - linked, "replica VM adopted from disk images (no initial replication)");
        Ok(vm)
    }

    /// Steps 1-4 of an adoption (format doc): the VM complete in its `.creating` directory.
    #[allow(clippy::too_many_arguments)]
    fn build_adopted(
        &self,
        vm_id: &VmName,
        generation: Generation,
        disks: &[DiskEntry],
        key: [u8; 32],
        images: &[(DiskEntry, PathBuf)],
        base: AdoptedBase,
        tmp: &Path,
    ) -> Result<Vec<adopt::Placed>, ReplicaError> {
        self.start_creating(tmp)?;
        let mut placed = Vec::with_capacity(images.len());
        for (d, image) in images {
            placed.push(adopt::place_image(
                vm_id,
                d,
                image,
                &base_path(tmp, d.index),
            )?);
            failpoint::hit("adopt.after_image")?;
        }
        let mut manifest = new_manifest(vm_id, generation, disks, key);
        manifest.base_seq = base.seq.get();
        manifest.base_point = Some(PointRecord {
            seq: base.seq.get(),
            cut_time_unix_ns: base.cut_time_unix_ns,
            // The point kinds are the delta kinds; see "Point kind" in the format doc.
            kind: DeltaKind::Initial.as_str().into(),
            data_bytes: 0,
            zero_bytes: 0,
            stored_bytes: 0,
            app_consistent: false,
        });
        manifest.damage = base.damage.clone();
        manifest.store(tmp)?;
        fsync_creating(tmp)?;
        failpoint::hit("adopt.before_rename")?;
        Ok(placed)
    }

    /// The VM of that name when it exists and `same` says the request is a retry of the one
    /// that made it; `AlreadyExists` when it differs (or is broken, or a directory of that
    /// name exists), `Verifying` while it is pending; `None` when no such VM is there.
    fn existing(
        &self,
        vm_id: &VmName,
        differs: impl FnOnce(&ReplicaVm) -> Option<String>,
    ) -> Result<Option<Arc<ReplicaVm>>, ReplicaError> {
        let exists = |why: &str| ReplicaError::AlreadyExists {
            vm_id: vm_id.to_string(),
            why: why.to_string(),
        };
        if let Some(vm) = self.vm(vm_id) {
            return match differs(&vm) {
                None => Ok(Some(vm)),
                Some(why) => Err(exists(&why)),
            };
        }
        if self.pending.read().contains_key(vm_id) {
            return Err(ReplicaError::Verifying {
                vm_id: vm_id.to_string(),
            });
        }
        if self.broken.read().contains_key(vm_id) {
            return Err(exists(
                "here but cannot be opened (see `replica-server status`)",
            ));
        }
        if self.dir.join(vm_id.as_str()).exists() {
            return Err(exists("as a directory in the replica storage"));
        }
        Ok(None)
    }

    /// Where a VM is built before it is renamed into place (deleted at open).
    fn creating_path(&self, vm_id: &VmName) -> PathBuf {
        self.dir.join(format!(".{vm_id}{CREATING_SUFFIX}"))
    }

    /// Makes `tmp` a fresh `.<vm>.creating` directory with its subdirectories (a leftover one
    /// is removed first).
    fn start_creating(&self, tmp: &Path) -> Result<(), ReplicaError> {
        durable::remove_dir_all(tmp)?;
        durable::create_dir(tmp)?;
        for sub in [BASE_DIR, JOURNAL_DIR, INCOMING_DIR] {
            durable::create_dir(&tmp.join(sub))?;
        }
        Ok(())
    }

    pub fn vm(&self, vm_id: &VmName) -> Option<Arc<ReplicaVm>> {
        self.vms.read().get(vm_id).cloned()
    }

    pub fn vms(&self) -> Vec<Arc<ReplicaVm>> {
        self.vms.read().values().cloned().collect()
    }

    /// VM directories that could not be opened, with the reason (never silently skipped).
    pub fn broken(&self) -> Vec<(VmName, String)> {
        self.broken
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Deletes a VM's replica and all its points (also a broken or pending one). Reads of open
    /// views fail from then on (`Removed`).
    pub fn remove_vm(&self, vm_id: &VmName) -> Result<(), ReplicaError> {
        let _a = self.admin.lock();
        let vm = self.vms.write().remove(vm_id);
        let was_broken = self.broken.write().remove(vm_id).is_some();
        let was_pending = self.pending.write().remove(vm_id).is_some();
        if vm.is_none() && !was_broken && !was_pending {
            return Err(ReplicaError::NotFound {
                vm_id: vm_id.to_string(),
            });
        }
        if let Some(vm) = &vm {
            let _m = vm.inner.mutate.lock();
            let mut st = vm.inner.state.write();
            st.removed = true;
            // Its index goes now (open views of it fail `Removed` from here on).
            let frames: u64 = st.journal.values().map(|e| e.frames).sum();
            st.journal.clear();
            self.budget.release(frames);
        }
        let dir = self.dir.join(vm_id.as_str());
        let gone = self.dir.join(format!(".{vm_id}{REMOVING_SUFFIX}"));
        durable::remove_dir_all(&gone)?;
        durable::rename(&dir, &gone)?;
        self.fds.forget_under(&dir);
        durable::remove_dir_all(&gone)?;
        tracing::info!(vm = %vm_id, "replica VM removed");
        Ok(())
    }
}

/// How a VM of the store differs from the identity a request names (generation, disk table,
/// relationship key), in words with the sizes; `None` when it is the same.
fn identity_differs(
    vm: &ReplicaVm,
    generation: Generation,
    disks: &[DiskEntry],
    key: &[u8; 32],
) -> Option<String> {
    if vm.generation() != generation {
        return Some(format!(
            "with generation {} (the request has {})",
            vm.generation(),
            generation
        ));
    }
    let (here, asked) = (sorted(&vm.disks()), sorted(disks));
    if here != asked {
        for d in &asked {
            if let Some(h) = here.iter().find(|h| h.index == d.index) {
                if h.size_bytes != d.size_bytes {
                    return Some(format!(
                        "with disk {} of {} bytes, but the request's disk {} is {} bytes",
                        d.index, h.size_bytes, d.index, d.size_bytes
                    ));
                }
            }
        }
        let list = |v: &[DiskEntry]| {
            v.iter()
                .map(|d| format!("{}:{}", d.index, d.size_bytes))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Some(format!(
            "with disks [{}] (index:bytes), but the request has [{}]",
            list(&here),
            list(&asked)
        ));
    }
    if &vm.inner.key != key {
        return Some("for another replication relationship (another key)".into());
    }
    None
}
