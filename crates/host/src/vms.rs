//! VMs on this host: their raw disk images, the trackers in their write path, and the NBD
//! export registry that serves them. Owns the disk files of every VM; the replication engine
//! only reaches disks through the tracker's cuts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tracker::{CutGate, DiskOptions, OpenState, TrackedDisk};

use crate::catalog::{DiskRecord, VmRecord};
use crate::error::bad_request;

/// Longest VM name accepted; names appear in paths, export names and URIs.
pub use proto::VM_NAME_MAX;
/// The one limit on disks per VM (`proto::DISKS_PER_VM_MAX`), as a length.
pub const DISKS_PER_VM_MAX: usize = proto::DISKS_PER_VM_MAX as usize;
/// Largest disk: 64 TiB. The tracker keeps four 4 KiB-granular bitmaps per disk in memory
/// (2 MiB per TiB each), so this bounds them at 512 MiB per disk; beyond it an allocation
/// failure would abort the daemon instead of refusing the request.
pub const DISK_SIZE_MAX: u64 = 64 << 40;

/// Checks the disk sizes of a new VM (the CLI checks too; the API never trusts it).
pub fn validate_sizes(sizes: &[u64]) -> anyhow::Result<()> {
    if sizes.is_empty() || sizes.len() > DISKS_PER_VM_MAX {
        return Err(bad_request(format!(
            "a VM has 1 to {DISKS_PER_VM_MAX} disks, got {}",
            sizes.len()
        )));
    }
    for (i, &size) in sizes.iter().enumerate() {
        if size == 0 || size % 4096 != 0 || size > DISK_SIZE_MAX {
            return Err(bad_request(format!(
                "disk {i}: size {size} must be a non-zero multiple of 4 KiB, at most {} TiB",
                DISK_SIZE_MAX >> 40
            )));
        }
    }
    Ok(())
}

/// A VM and its opened disks.
pub struct Vm {
    pub name: proto::VmName,
    pub gate: Arc<CutGate>,
    pub disks: Vec<Arc<TrackedDisk>>,
    /// What each disk's tracker found at open; drives "never silent" at startup.
    pub open_states: Vec<OpenState>,
}

/// Export names are `<vm>-<disk index>`: unambiguous because the index is all digits and is
/// split off at the last '-'.
pub fn export_name(vm: &str, index: u32) -> String {
    format!("{vm}-{index}")
}

/// Longest qemu node name (qemu keeps them in 32 bytes with the NUL).
const QEMU_NODE_NAME_MAX: usize = 31;

/// The qemu node name of disk `index` of `vm`: starts with a letter and fits qemu's limit
/// (VM names are ASCII, so cutting bytes is safe).
pub fn qemu_node_name(vm: &str, index: u32) -> String {
    let mut n = format!("disk{index}-{vm}");
    n.truncate(QEMU_NODE_NAME_MAX);
    n
}

/// A qemu `-blockdev` argument that attaches export `export` of the daemon's NBD socket as node
/// `node` and rides through a daemon restart: requests wait up to `reconnect_delay_secs` for
/// the daemon to come back instead of failing.
pub fn qemu_blockdev(export: &str, node: &str, socket: &str, reconnect_delay_secs: u32) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={socket},export={export},node-name={node},reconnect-delay={reconnect_delay_secs}"
    )
}

/// The libvirt `<disk type='network'>` element for the same attachment (`vd` + letter of the
/// disk index as the guest device).
pub fn libvirt_disk_xml(
    export: &str,
    socket: &str,
    index: u32,
    reconnect_delay_secs: u32,
) -> String {
    let dev = format!("vd{}", (b'a' + (index % 26) as u8) as char);
    format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/><source protocol='nbd' name='{export}'><host transport='unix' socket='{socket}'/><reconnect delay='{reconnect_delay_secs}'/></source><target dev='{dev}' bus='virtio'/></disk>"
    )
}

/// Checks a VM name (the one rule, `proto::VmName`); a refusal is the user's mistake.
pub fn validate_vm_name(name: &str) -> anyhow::Result<()> {
    proto::VmName::parse(name).map_err(|e| bad_request(e.to_string()))?;
    Ok(())
}

/// The validated name of a VM being created, imported or opened from the catalog.
fn parse_name(name: &str) -> anyhow::Result<proto::VmName> {
    proto::VmName::parse(name).map_err(|e| bad_request(e.to_string()))
}

pub fn vm_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("vms").join(name)
}

/// Creates the disk files of a new VM (sparse) and returns its record.
pub fn create_disks(
    data_dir: &Path,
    name: &str,
    sizes: &[u64],
    now_ns: u64,
    options: &DiskOptions,
) -> anyhow::Result<(VmRecord, Vm)> {
    if sizes.is_empty() || sizes.len() > DISKS_PER_VM_MAX {
        return Err(bad_request(format!(
            "a VM has 1 to {DISKS_PER_VM_MAX} disks, got {}",
            sizes.len()
        )));
    }
    let dir = vm_dir(data_dir, name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let gate = CutGate::new();
    let mut records = Vec::new();
    let mut disks = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let rec = disk_record(&dir, i as u32, size);
        let disk = TrackedDisk::create_with(
            Path::new(&rec.file),
            size,
            Path::new(&rec.state_dir),
            gate.clone(),
            options,
        )
        .with_context(|| format!("creating disk {i} of {name}"))?;
        records.push(rec);
        disks.push(disk);
    }
    let open_states = vec![OpenState::FirstOpen; disks.len()];
    let record = new_record(name, now_ns, records);
    Ok((
        record,
        Vm {
            name: parse_name(name)?,
            gate,
            disks,
            open_states,
        },
    ))
}

/// Converts foreign images with `qemu-img convert` into raw sparse disks of a new VM.
pub fn import_disks(
    data_dir: &Path,
    name: &str,
    images: &[PathBuf],
    now_ns: u64,
    options: &DiskOptions,
) -> anyhow::Result<(VmRecord, Vm)> {
    if images.is_empty() || images.len() > DISKS_PER_VM_MAX {
        return Err(bad_request(format!(
            "a VM has 1 to {DISKS_PER_VM_MAX} disks, got {}",
            images.len()
        )));
    }
    let dir = vm_dir(data_dir, name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut sizes = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let size = crate::qemu_img::virtual_size(image)?;
        if size == 0 || size % 4096 != 0 || size > DISK_SIZE_MAX {
            return Err(crate::error::bad_request(format!(
                "{}: virtual size {size} is not a non-zero multiple of 4 KiB of at most {} TiB",
                image.display(),
                DISK_SIZE_MAX >> 40
            )));
        }
        let rec = disk_record(&dir, i as u32, size);
        crate::qemu_img::convert_to_raw(image, Path::new(&rec.file))?;
        sizes.push(size);
    }
    let records = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| disk_record(&dir, i as u32, size))
        .collect();
    let record = new_record(name, now_ns, records);
    let vm = open_vm(&record, options)?;
    Ok((record, vm))
}

/// Makes a VM of raw disks that `write` produces at the paths it is given (a failover's
/// disks, materialized when it completes), with fresh change tracking.
pub fn adopt_disks(
    data_dir: &Path,
    name: &str,
    sizes: &[u64],
    now_ns: u64,
    options: &DiskOptions,
    mut write: impl FnMut(u32, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<(VmRecord, Vm)> {
    let dir = vm_dir(data_dir, name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let records: Vec<DiskRecord> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| disk_record(&dir, i as u32, size))
        .collect();
    for r in &records {
        write(r.index, Path::new(&r.file))?;
    }
    let record = new_record(name, now_ns, records);
    let vm = open_vm(&record, options)?;
    Ok((record, vm))
}

fn new_record(name: &str, now_ns: u64, disks: Vec<DiskRecord>) -> VmRecord {
    VmRecord {
        version: crate::catalog::RECORD_VERSION,
        name: name.to_string(),
        created_unix_ns: now_ns,
        disks,
        guest: None,
    }
}

fn disk_record(dir: &Path, index: u32, size_bytes: u64) -> DiskRecord {
    DiskRecord {
        index,
        size_bytes,
        file: dir.join(format!("disk-{index}.raw")).display().to_string(),
        state_dir: dir
            .join(format!("disk-{index}.state"))
            .display()
            .to_string(),
    }
}

/// Opens the disks of a VM found in the catalog at daemon start.
pub fn open_vm(record: &VmRecord, options: &DiskOptions) -> anyhow::Result<Vm> {
    let gate = CutGate::new();
    let mut disks = Vec::new();
    let mut open_states = Vec::new();
    for d in &record.disks {
        let (disk, report) = TrackedDisk::open_with(
            Path::new(&d.file),
            Path::new(&d.state_dir),
            gate.clone(),
            options,
        )
        .with_context(|| format!("opening disk {} of {} ({})", d.index, record.name, d.file))?;
        if disk.size_bytes() != d.size_bytes {
            bail!(
                "disk {} of {} is {} bytes but the catalog says {}: the image was resized outside Understudy",
                d.index,
                record.name,
                disk.size_bytes(),
                d.size_bytes
            );
        }
        disks.push(disk);
        open_states.push(report.state);
    }
    Ok(Vm {
        name: parse_name(&record.name)?,
        gate,
        disks,
        open_states,
    })
}

/// Byte ranges `(offset, len)` as ranges of tracker blocks (`tracker::BLOCK_BYTES`), end
/// exclusive, each covering every block its bytes touch.
pub fn byte_ranges_to_blocks(ranges: &[(u64, u64)]) -> Vec<std::ops::Range<u64>> {
    let b = tracker::BLOCK_BYTES;
    ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(off, len)| off / b..(off.saturating_add(len)).div_ceil(b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_node_names_fit_qemu_for_the_longest_vm_names() {
        let long = "9".repeat(VM_NAME_MAX);
        let n = qemu_node_name(&long, 15);
        assert!(n.len() <= 31 && n.starts_with("disk15-"), "{n}");
        assert_eq!(qemu_node_name("web", 0), "disk0-web");
        let b = qemu_blockdev("web-0", "disk0-web", "/s.sock", 30);
        assert!(
            b.contains("node-name=disk0-web,") && b.ends_with("reconnect-delay=30"),
            "{b}"
        );
    }

    #[test]
    fn vm_names_are_validated() {
        for ok in ["web", "web-0", "db_1.prod", "A9"] {
            validate_vm_name(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(validate_vm_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
