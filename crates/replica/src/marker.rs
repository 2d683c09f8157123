//! `understudy-store.json`: the marker that makes a directory a replica store (format in
//! `docs/formats/replica-store.md`, "Store marker"). Written once when the storage is set up;
//! its absence means "not our store" — e.g. a storage mount that is missing — and opening is
//! refused instead of recreating an empty store on whatever file system is there.

use std::fs;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::manifest::hex;
use crate::{durable, ReplicaError};

pub(crate) const MARKER_FILE: &str = "understudy-store.json";
const FORMAT: &str = "understudy-replica-store-marker";
const VERSION: u32 = 1;
/// A marker is about 300 bytes; anything past this is not ours and is refused unparsed.
const MARKER_BYTES_MAX: u64 = 4096;
const MARKER_MODE: u32 = 0o600;

/// What the marker says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMarker {
    /// 128 random bits, hex: which store this is.
    pub store_id: String,
    /// The host that set the store up.
    pub host: String,
    pub created_unix_ns: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    blake3: String,
    marker: StoreMarker,
}

fn checksum(m: &StoreMarker) -> Result<String, serde_json::Error> {
    Ok(hex(blake3::hash(&serde_json::to_vec(m)?).as_bytes()))
}

/// Reads and verifies the marker of `dir`: `NoStoreMarker` when there is none.
pub(crate) fn load(dir: &Path) -> Result<StoreMarker, ReplicaError> {
    let path = dir.join(MARKER_FILE);
    let bad = |reason: String| ReplicaError::BadStoreMarker {
        path: path.clone(),
        reason,
    };
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReplicaError::NoStoreMarker {
                dir: dir.to_owned(),
            })
        }
        Err(e) => return Err(ReplicaError::io("stat", &path)(e)),
    };
    if meta.len() > MARKER_BYTES_MAX {
        return Err(bad(format!(
            "{} bytes, more than the {MARKER_BYTES_MAX} cap",
            meta.len()
        )));
    }
    let bytes = fs::read(&path).map_err(ReplicaError::io("read", &path))?;
    let env: Envelope =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a store marker: {e}")))?;
    if env.format != FORMAT {
        return Err(bad(format!("format {:?}", env.format)));
    }
    if env.version != VERSION {
        return Err(bad(format!("unsupported version {}", env.version)));
    }
    if checksum(&env.marker).map_err(|e| bad(e.to_string()))? != env.blake3 {
        return Err(bad("checksum mismatch".into()));
    }
    Ok(env.marker)
}

/// Writes a new marker for `dir` (durably), with a fresh random store id.
pub(crate) fn create(dir: &Path, host: &str) -> Result<StoreMarker, ReplicaError> {
    let mut id = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(ReplicaError::io("read", "/dev/urandom"))?;
    let marker = StoreMarker {
        store_id: hex(&id),
        host: host.to_owned(),
        created_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    };
    let path = dir.join(MARKER_FILE);
    let env = Envelope {
        format: FORMAT.into(),
        version: VERSION,
        blake3: checksum(&marker).map_err(|e| ReplicaError::BadStoreMarker {
            path: path.clone(),
            reason: e.to_string(),
        })?,
        marker: marker.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&env).map_err(|e| ReplicaError::BadStoreMarker {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    durable::write_atomic(&path, &bytes, MARKER_MODE)?;
    Ok(marker)
}
