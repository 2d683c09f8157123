//! [`DeltaReader`]: the pull-style decoder over any `Read`. Reads exactly what the
//! [`Decoder`](crate::Decoder) asks for, so memory stays at one frame, and checks that the
//! stream ends right after the footer.

use std::io::{self, Read};

use crate::decoder::{Decoder, Event};
use crate::frame::{FrameInfo, FrameKind, PayloadDecoder};
use crate::{DeltaError, DeltaHeader, DeltaSummary, FRAME_DATA_BYTES_MAX};

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub info: FrameInfo,
    pub body: FrameBody,
}

/// What a frame says about its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameBody {
    /// The range's bytes, decompressed (`info.len` bytes).
    Data(Vec<u8>),
    /// The range reads as zeros.
    Zero,
}

/// Streaming, validating delta reader.
pub struct DeltaReader<R: Read> {
    inner: R,
    dec: Decoder,
    header: DeltaHeader,
    buf: Vec<u8>,
    payloads: PayloadDecoder,
}

impl<R: Read> DeltaReader<R> {
    /// Reads and validates the header (magic, version, fields, keyed checksum).
    pub fn new(mut inner: R, key: &[u8; 32]) -> Result<Self, DeltaError> {
        let mut dec = Decoder::new(key);
        let mut buf = Vec::new();
        loop {
            match pull(&mut inner, &mut dec, &mut buf)? {
                Pulled::Header(header) => {
                    return Ok(DeltaReader {
                        inner,
                        dec,
                        header,
                        buf,
                        payloads: PayloadDecoder::new(),
                    })
                }
                Pulled::Nothing => continue,
                Pulled::Frame(_) | Pulled::End => return Err(DeltaError::Failed),
            }
        }
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// Stream position of the next byte to read.
    pub fn position(&self) -> u64 {
        self.dec.position()
    }

    /// The verified footer totals, once `next_frame` returned `None`.
    pub fn summary(&self) -> Option<&DeltaSummary> {
        self.dec.summary()
    }

    /// The next frame with its payload decompressed; `None` once the footer was verified and
    /// the stream has ended. A missing or invalid footer is an error, never `None`.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DeltaError> {
        let Some(info) = self.next_frame_info()? else {
            return Ok(None);
        };
        let body = match info.kind {
            FrameKind::Zero => FrameBody::Zero,
            FrameKind::Data => match self.payloads.decode(&self.buf, info.codec, info.len) {
                Ok(data) => FrameBody::Data(data),
                Err(e) => {
                    self.dec.poison();
                    return Err(e);
                }
            },
        };
        Ok(Some(Frame { info, body }))
    }

    /// Like [`DeltaReader::next_frame`] but without decompressing: checksums and structure are
    /// verified, the payload is skipped. For indexing a stored delta.
    pub fn next_frame_info(&mut self) -> Result<Option<FrameInfo>, DeltaError> {
        loop {
            match pull(&mut self.inner, &mut self.dec, &mut self.buf)? {
                Pulled::Frame(info) => return Ok(Some(info)),
                Pulled::End => return Ok(None),
                Pulled::Nothing => continue,
                Pulled::Header(_) => return Err(DeltaError::Failed),
            }
        }
    }

    /// Reads the whole remaining stream, verifying it, and returns its totals.
    pub fn verify_to_end(&mut self) -> Result<DeltaSummary, DeltaError> {
        while self.next_frame_info()?.is_some() {}
        self.dec.summary().copied().ok_or(DeltaError::Failed)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

enum Pulled {
    Nothing,
    Header(DeltaHeader),
    /// A frame; a DATA frame's stored payload is the whole buffer.
    Frame(FrameInfo),
    End,
}

/// One decoder step, reading exactly what it needs into `buf`.
fn pull<R: Read>(
    inner: &mut R,
    dec: &mut Decoder,
    buf: &mut Vec<u8>,
) -> Result<Pulled, DeltaError> {
    if dec.is_done() {
        return Ok(Pulled::End);
    }
    let need = dec.need();
    if need == 0 {
        return Err(DeltaError::Failed);
    }
    // The decoder validated every length before asking: need ≤ one frame payload or a bounded
    // header/footer, so this allocation is bounded.
    debug_assert!(need as u64 <= FRAME_DATA_BYTES_MAX + 4096);
    buf.resize(need, 0);
    if let Err(e) = inner.read_exact(buf) {
        dec.poison();
        return Err(match e.kind() {
            io::ErrorKind::UnexpectedEof => DeltaError::Truncated {
                pos: dec.position(),
            },
            _ => DeltaError::Io(e),
        });
    }
    match dec.step(buf)? {
        Event::More => Ok(Pulled::Nothing),
        Event::Header(h) => Ok(Pulled::Header(h)),
        Event::Frame(info, _) => Ok(Pulled::Frame(info)),
        Event::Footer(_) => {
            // The stream must end right after the footer.
            let mut one = [0u8; 1];
            loop {
                match inner.read(&mut one) {
                    Ok(0) => return Ok(Pulled::End),
                    Ok(_) => {
                        let pos = dec.position();
                        dec.poison();
                        return Err(DeltaError::TrailingBytes { pos });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        dec.poison();
                        return Err(DeltaError::Io(e));
                    }
                }
            }
        }
    }
}
