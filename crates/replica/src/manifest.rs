//! `store.json`: the persisted per-VM manifest (format, checksum, fields) — see
//! `docs/formats/replica-store.md`. Persisted structs live here and only here; the rest of the
//! crate works on in-memory types converted at the edge.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{durable, ReplicaError};

pub(crate) const MANIFEST_FILE: &str = "store.json";
const FORMAT: &str = "understudy-replica-store";
/// Written; 1 is still read (no merge files, no `history`: see the format doc).
const VERSION: u32 = 2;
const VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=VERSION;
/// A manifest with 256 disks and a long damage message is a few KiB; anything past this is not
/// ours and is refused before parsing.
pub(crate) const MANIFEST_BYTES_MAX: u64 = 64 * 1024;
/// The manifest holds the VM's delta key: owner read/write only.
const MANIFEST_MODE: u32 = 0o600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiskRecord {
    pub index: u32,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PointRecord {
    pub seq: u64,
    pub cut_time_unix_ns: u64,
    pub kind: String,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub stored_bytes: u64,
    /// The cut was taken with the guest frozen (delta header flag `APP_CONSISTENT`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub app_consistent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// Validated when the manifest is read (`VmName` deserializes through `VmName::parse`).
    pub vm_id: proto::VmName,
    pub generation: u64,
    /// The delta key, 64 lowercase hex digits.
    pub key: String,
    pub disks: Vec<DiskRecord>,
    pub base_point: Option<PointRecord>,
    pub base_seq: u64,
    pub folding: Option<u64>,
    pub damage: Option<String>,
    /// The recovery-history policy last sent by the primary. Skipped when absent, so that a
    /// version-1 manifest encodes to the same bytes and its checksum verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::HistoryPolicy>,
    /// Journal deltas retired as recovery points and kept only as layers until a merge or a
    /// fold absorbs them. Skipped when empty (version-1 manifests have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    blake3: String,
    manifest: Manifest,
}

fn checksum(m: &Manifest) -> Result<String, serde_json::Error> {
    Ok(hex(blake3::hash(&serde_json::to_vec(m)?).as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn key_from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

impl Manifest {
    /// Reads and verifies `<dir>/store.json`.
    pub fn load(dir: &Path) -> Result<Manifest, ReplicaError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |reason: String| ReplicaError::Manifest {
            path: path.clone(),
            reason,
        };
        let len = fs::metadata(&path)
            .map_err(ReplicaError::io("stat", &path))?
            .len();
        if len > MANIFEST_BYTES_MAX {
            return Err(bad(format!(
                "{len} bytes, more than the {MANIFEST_BYTES_MAX} cap"
            )));
        }
        let bytes = fs::read(&path).map_err(ReplicaError::io("read", &path))?;
        let env: Envelope =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        if env.format != FORMAT {
            return Err(bad(format!("format {:?}", env.format)));
        }
        if !VERSIONS_READ.contains(&env.version) {
            return Err(bad(format!("unsupported version {}", env.version)));
        }
        let want = checksum(&env.manifest).map_err(|e| bad(e.to_string()))?;
        if want != env.blake3 {
            return Err(bad("checksum mismatch".into()));
        }
        if key_from_hex(&env.manifest.key).is_none() {
            return Err(bad("key is not 64 hex digits".into()));
        }
        Ok(env.manifest)
    }

    /// Replaces `<dir>/store.json` atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<(), ReplicaError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |e: serde_json::Error| ReplicaError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        };
        let env = Envelope {
            format: FORMAT.into(),
            version: VERSION,
            blake3: checksum(self).map_err(bad)?,
            manifest: self.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&env).map_err(bad)?;
        bytes.push(b'\n');
        durable::write_atomic(&path, &bytes, MANIFEST_MODE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            vm_id: proto::VmName::parse("web-0").unwrap(),
            generation: 2,
            key: hex(&[0xab; 32]),
            disks: vec![DiskRecord {
                index: 0,
                size_bytes: 4096,
            }],
            base_point: None,
            base_seq: 0,
            folding: None,
            damage: None,
            history: None,
            hidden: Vec::new(),
        }
    }

    /// A version-1 manifest (written before `history` existed) still opens.
    #[test]
    fn a_version_1_manifest_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.store(dir.path()).unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"version\": 2", "\"version\": 1");
        fs::write(&path, text).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let mut with = m.clone();
        with.history = Some(crate::HistoryPolicy {
            recovery_history: 3,
            app_consistent_every_hours: None,
            keep_every_point_for_secs: 60,
        });
        with.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), with);
    }

    #[test]
    fn round_trip_and_checksum_detects_edits() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let path = dir.path().join(MANIFEST_FILE);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"generation\": 2", "\"generation\": 3");
        fs::write(&path, text).unwrap();
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn key_hex_round_trips() {
        let key = [0x5a; 32];
        assert_eq!(key_from_hex(&hex(&key)), Some(key));
        assert_eq!(key_from_hex("zz"), None);
    }
}
