//! Decoding DATA payloads with reused zstd contexts (`delta::PayloadDecoder`): one per
//! incoming delta ([`PayloadDecoder`], which also hands raw payloads back without a copy) and
//! one per reading thread ([`decode_owned`]). Checks and errors are `delta`'s: the declared
//! length is capped at one frame before anything is allocated, and the payload must decode to
//! exactly that length.

use std::cell::RefCell;

use delta::{Compression, DeltaError, FrameInfo};

/// A payload decoder for one delta: a zstd context and an output buffer, both reused.
#[derive(Default)]
pub(crate) struct PayloadDecoder {
    inner: delta::PayloadDecoder,
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
        if info.codec == Compression::None && stored.len() as u64 == info.len {
            return Ok(stored);
        }
        self.inner
            .decode_into(stored, info.codec, info.len, &mut self.buf)?;
        Ok(&self.buf)
    }
}

thread_local! {
    /// One zstd context per thread that reads points (NBD workers, export).
    static READ: RefCell<delta::PayloadDecoder> = RefCell::new(delta::PayloadDecoder::new());
}

/// The frame's bytes on the disk as a new vector, decompressed with this thread's context.
pub(crate) fn decode_owned(stored: &[u8], info: &FrameInfo) -> Result<Vec<u8>, DeltaError> {
    READ.with(|d| d.borrow_mut().decode(stored, info.codec, info.len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use delta::{FrameKind, FRAME_DATA_BYTES_MAX};

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
