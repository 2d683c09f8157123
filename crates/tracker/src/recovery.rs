//! Reading the state directory at open and deciding what it proves: first open, clean stop
//! (bitmap restored), unclean stop (activity log replayed), lost tracking, or an image changed
//! behind our back.
//!
//! Owns only that decision. It never writes or removes a file (the caller rewrites the state
//! afterwards) and never returns an error for bad bytes: corruption is a finding
//! (`TrackingLost`), only failing I/O is an error.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crate::activity::{AL_NAME, CLEAN_NAME};
use crate::error::TrackerError;
use crate::formats::{self, Fingerprint, EXTENT_BYTES};
use crate::{OpenState, BLOCK_BYTES};

pub(crate) const BITMAP_NAME: &str = "bitmap";
/// The clean marker has a fixed size; anything much larger is not worth reading.
const CLEAN_BYTES_CAP: u64 = 4096;

/// What the state directory lets the tracker restore.
pub(crate) enum Restored {
    Nothing,
    /// Bitmap words from a clean stop.
    Words(Vec<u64>),
    /// Hot extents from an unclean stop: every block in them is dirty.
    Extents(Vec<u64>),
}

/// Reads `dir/name` when it exists and is at most `cap` bytes; `Ok(Err(reason))` when larger.
fn read_capped(
    dir: &Path,
    name: &str,
    cap: u64,
) -> Result<Option<Result<Vec<u8>, String>>, TrackerError> {
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrackerError::io("open state file", path, e)),
    };
    let mut bytes = Vec::new();
    let n = file
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| TrackerError::io("read state file", &path, e))?;
    if n as u64 > cap {
        return Ok(Some(Err(format!(
            "{name} is larger than its cap of {cap} bytes"
        ))));
    }
    Ok(Some(Ok(bytes)))
}

fn lost(reason: impl Into<String>) -> (OpenState, Restored) {
    (
        OpenState::TrackingLost {
            reason: reason.into(),
        },
        Restored::Nothing,
    )
}

fn modified(reason: impl Into<String>) -> (OpenState, Restored) {
    modified_as(reason, false)
}

fn modified_as(reason: impl Into<String>, replaced: bool) -> (OpenState, Restored) {
    (
        OpenState::ModifiedOutside {
            reason: reason.into(),
            replaced,
        },
        Restored::Nothing,
    )
}

/// Decides the open state of a disk of `size_bytes` whose image now has fingerprint `now`.
/// `had_tracker`: a tracker opened this directory before (its lock file exists), so no state
/// files at all means they were lost (a degraded activity log is deleted), not a first open.
pub(crate) fn load(
    dir: &Path,
    size_bytes: u64,
    now: &Fingerprint,
    had_tracker: bool,
) -> Result<(OpenState, Restored), TrackerError> {
    let nblocks = size_bytes.div_ceil(BLOCK_BYTES);
    let bitmap_cap = 48 + 8 * formats::bitmap_words(nblocks) + 32;
    let clean = read_capped(dir, CLEAN_NAME, CLEAN_BYTES_CAP)?;
    let bitmap = read_capped(dir, BITMAP_NAME, bitmap_cap)?;
    let log = read_capped(dir, AL_NAME, formats::al_file_bytes_max(size_bytes))?;

    if let Some(clean) = clean {
        let marker = match clean.and_then(|b| formats::decode_clean(&b).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(reason) => return Ok(lost(format!("clean-stop marker unusable: {reason}"))),
        };
        if let Some((diff, replaced)) = marker.fingerprint.diff(now) {
            return Ok(modified_as(diff, replaced));
        }
        let bytes = match bitmap {
            None => {
                return Ok(lost(
                    "clean-stop marker present but the bitmap file is missing",
                ))
            }
            Some(Err(reason)) => return Ok(lost(reason)),
            Some(Ok(b)) => b,
        };
        if blake3::hash(&bytes).as_bytes() != &marker.bitmap_hash {
            return Ok(lost("bitmap file does not match the clean-stop marker"));
        }
        return Ok(match formats::decode_bitmap(&bytes, BLOCK_BYTES) {
            Err(e) => lost(e.to_string()),
            Ok(c) if c.disk_size_bytes != size_bytes => modified(format!(
                "bitmap was written for {} bytes, image has {size_bytes}",
                c.disk_size_bytes
            )),
            Ok(c) => (OpenState::Clean, Restored::Words(c.words)),
        });
    }

    let bytes = match log {
        None if bitmap.is_none() && had_tracker => return Ok(lost(
            "unclean stop and the activity log is missing (dropped after an I/O error, or removed)",
        )),
        None if bitmap.is_none() => return Ok((OpenState::FirstOpen, Restored::Nothing)),
        None => return Ok(lost("unclean stop and the activity log is missing")),
        Some(Err(reason)) => return Ok(lost(format!("unclean stop and {reason}"))),
        Some(Ok(b)) => b,
    };
    let contents = match formats::decode_al(&bytes) {
        Ok(c) => c,
        Err(e) => return Ok(lost(format!("unclean stop and {e}"))),
    };
    if contents.disk_size_bytes != size_bytes {
        return Ok(modified(format!(
            "image size changed from {} to {size_bytes} bytes while stopped",
            contents.disk_size_bytes
        )));
    }
    if contents.torn_tail_bytes > 0 {
        tracing::info!(dir = %dir.display(), bytes = contents.torn_tail_bytes,
            "ignored the torn tail of the activity log");
    }
    let hot_extents = contents.extents.len() as u64;
    let hot_bytes = contents
        .extents
        .iter()
        .map(|e| EXTENT_BYTES.min(size_bytes.saturating_sub(e * EXTENT_BYTES)))
        .sum();
    Ok((
        OpenState::RecoveredFromActivityLog {
            hot_extents,
            hot_bytes,
        },
        Restored::Extents(contents.extents),
    ))
}
