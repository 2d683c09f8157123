//! Decoding DATA payloads with a reused zstd context. `delta::decode_payload` creates a fresh
//! decompression context per frame (`ZSTD_createDCtx`, 1.6 % of all CPU in the T1 profile);
//! here one context lives per incoming delta ([`PayloadDecoder`]) and one per reading thread
//! ([`decode_owned`]). Same checks and errors as `delta::decode_payload`: the declared length is
//! capped at one frame before anything is allocated, and the payload must decode to exactly
//! that length.

use std::cell::RefCell;

use delta::{Compression, DeltaError, FrameInfo, FRAME_DATA_BYTES_MAX};

type Dctx = zstd::bulk::Decompressor<'static>;

fn decompress_error(e: impl ToString) -> DeltaError {
    DeltaError::Decompress(e.to_string())
}

/// Checks the declared length of a DATA frame.
fn declared_len(info: &FrameInfo) -> Result<usize, DeltaError> {
    if info.len > FRAME_DATA_BYTES_MAX {
        return Err(DeltaError::Decompress(format!(
            "declared length {} exceeds the 1 MiB frame cap",
            info.len
        )));
    }
    Ok(info.len as usize)
}

/// Decompresses `stored` into `out` (cleared first; its capacity is reused) and checks that it
/// produced exactly `want` bytes.
fn zstd_into(
    dctx: &mut Option<Dctx>,
    stored: &[u8],
    want: usize,
    out: &mut Vec<u8>,
) -> Result<(), DeltaError> {
    let dctx = match dctx {
        Some(d) => d,
        None => dctx.insert(Dctx::new().map_err(decompress_error)?),
    };
    out.clear();
    out.reserve(want);
    // Writes at most `out.capacity()` bytes (≤ 1 MiB plus allocator slack); more is an error.
    let n = dctx
        .decompress_to_buffer(stored, out)
        .map_err(decompress_error)?;
    if n != want {
        return Err(DeltaError::Decompress(format!(
            "zstd payload decompressed to {n} bytes, declared {want}"
        )));
    }
    Ok(())
}

/// A payload decoder owning one zstd context and one output buffer, for one delta.
#[derive(Default)]
pub(crate) struct PayloadDecoder {
    dctx: Option<Dctx>,
    buf: Vec<u8>,
}

impl PayloadDecoder {
    /// The frame's bytes on the disk: `stored` itself when raw, else decompressed into the
    /// decoder's buffer.
    pub fn decode<'a>(
        &'a mut self,
        stored: &'a [u8],
        info: &FrameInfo,
    ) -> Result<&'a [u8], DeltaError> {
        let want = declared_len(info)?;
        match info.codec {
            Compression::None => {
                if stored.len() != want {
                    return Err(DeltaError::Decompress(format!(
                        "raw payload is {} bytes, declared {want}",
                        stored.len()
                    )));
                }
                Ok(stored)
            }
            Compression::Zstd => {
                zstd_into(&mut self.dctx, stored, want, &mut self.buf)?;
                Ok(&self.buf)
            }
        }
    }
}

thread_local! {
    /// One zstd context per thread that reads points (NBD workers, export).
    static READ_DCTX: RefCell<Option<Dctx>> = const { RefCell::new(None) };
}

/// The frame's bytes on the disk as a new vector, decompressed with this thread's context.
pub(crate) fn decode_owned(stored: &[u8], info: &FrameInfo) -> Result<Vec<u8>, DeltaError> {
    let want = declared_len(info)?;
    match info.codec {
        Compression::None => {
            if stored.len() != want {
                return Err(DeltaError::Decompress(format!(
                    "raw payload is {} bytes, declared {want}",
                    stored.len()
                )));
            }
            Ok(stored.to_vec())
        }
        Compression::Zstd => READ_DCTX.with(|d| {
            let mut out = Vec::with_capacity(want);
            zstd_into(&mut d.borrow_mut(), stored, want, &mut out)?;
            Ok(out)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta::FrameKind;

    fn info(codec: Compression, len: u64, stored_len: u32) -> FrameInfo {
        FrameInfo {
            kind: FrameKind::Data,
            disk: 0,
            offset: 0,
            len,
            codec,
            stored_len,
            frame_pos: 0,
        }
    }

    #[test]
    fn matches_delta_decode_payload_and_refuses_wrong_lengths() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        let z = zstd::bulk::compress(&data, 1).unwrap();
        let i = info(Compression::Zstd, data.len() as u64, z.len() as u32);
        let mut d = PayloadDecoder::default();
        for _ in 0..3 {
            assert_eq!(d.decode(&z, &i).unwrap(), &data[..]);
            assert_eq!(decode_owned(&z, &i).unwrap(), data);
        }
        assert_eq!(
            delta::decode_payload(&z, Compression::Zstd, data.len() as u64).unwrap(),
            data
        );
        // Declared shorter or longer than the content: refused, like decode_payload.
        for len in [data.len() as u64 - 4096, data.len() as u64 + 4096] {
            let bad = info(Compression::Zstd, len, z.len() as u32);
            assert!(d.decode(&z, &bad).is_err());
            assert!(decode_owned(&z, &bad).is_err());
        }
        let too_big = info(Compression::Zstd, FRAME_DATA_BYTES_MAX + 4096, 10);
        assert!(d.decode(&z, &too_big).is_err());
        assert!(d.decode(&z[..z.len() / 2], &i).is_err());
        let raw = info(Compression::None, 8192, 8192);
        assert!(d.decode(&data[..4096], &raw).is_err());
        assert_eq!(d.decode(&data[..8192], &raw).unwrap(), &data[..8192]);
    }
}
