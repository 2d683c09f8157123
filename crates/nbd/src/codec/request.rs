//! Transmission requests: parsing the 28-byte header and deciding, against the negotiated
//! session, whether a request is executed, answered with an NBD error (connection kept), or
//! ends the connection. Every offset and length is checked here, before any backend sees
//! it. Pure functions; this module must never do I/O.

use super::error::{NbdErrno, ProtocolError};
use super::option::{be_u32, be_u64};
use super::wire::*;
use crate::limits::REQUEST_PAYLOAD_BYTES_MAX;

/// Length of a (compact) request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A request header with a correct magic, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub len_bytes: u32,
}

/// Parses a request header. A bad magic means the stream is out of sync: close.
pub fn parse_request_header(
    buf: &[u8; REQUEST_HEADER_LEN],
) -> Result<RequestHeader, ProtocolError> {
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        command: u16::from_be_bytes([buf[6], buf[7]]),
        handle: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        len_bytes: be_u32(&buf[24..28]),
    })
}

/// What the request validator needs to know about the negotiated session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportView {
    pub size_bytes: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

/// A validated command. For every variant with a range, `offset + len_bytes <= size_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    /// `len_bytes` of payload follow the header (at most [`REQUEST_PAYLOAD_BYTES_MAX`]).
    Write {
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        fua: bool,
    },
    Cache,
    WriteZeroes {
        may_trim: bool,
        fua: bool,
        fast: bool,
    },
    BlockStatus {
        req_one: bool,
    },
}

/// A request the server executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub handle: u64,
    pub offset: u64,
    pub len_bytes: u32,
    pub command: Command,
}

/// A request answered with an error while the connection continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub handle: u64,
    pub error: NbdErrno,
    /// Write payload that follows the header and must be read and discarded before the next
    /// header.
    pub payload_bytes: u32,
    /// The reply must be a structured error chunk (NBD_CMD_READ once structured replies are
    /// negotiated: the spec forbids a simple reply there).
    pub structured: bool,
}

/// The validator's verdict on a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Execute(Request),
    Reject(Rejection),
    Close(ProtocolError),
}

/// Flags we understand on any command. NBD_CMD_FLAG_DF is absent on purpose: we do not
/// advertise NBD_FLAG_SEND_DF.
const FLAGS_KNOWN: u16 =
    NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

/// Validates a header against the session. Order of checks: flags, permissions, lengths,
/// range, so the most specific error wins as the spec suggests.
pub fn decide(h: &RequestHeader, export: &ExportView) -> Decision {
    let structured = export.structured_replies && h.command == NBD_CMD_READ;
    let payload_bytes = if h.command == NBD_CMD_WRITE {
        h.len_bytes
    } else {
        0
    };
    if h.command == NBD_CMD_WRITE && h.len_bytes > REQUEST_PAYLOAD_BYTES_MAX {
        // We cannot buffer it and skipping up to 4 GiB of a hostile stream is not worth it.
        return Decision::Close(ProtocolError::OversizedWrite {
            len_bytes: h.len_bytes,
            max: REQUEST_PAYLOAD_BYTES_MAX,
        });
    }
    let reject = |error| {
        Decision::Reject(Rejection {
            handle: h.handle,
            error,
            payload_bytes,
            structured,
        })
    };
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised (spec); the other
    // flags only where documented.
    let allowed = NBD_CMD_FLAG_FUA
        | match h.command {
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if h.flags & !FLAGS_KNOWN != 0 || h.flags & !allowed != 0 {
        return reject(NbdErrno::Inval);
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    let writes = matches!(
        h.command,
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES
    );
    if writes && export.read_only {
        return reject(NbdErrno::Perm);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.len_bytes))
        .is_some_and(|end| end <= export.size_bytes);
    // Writes past the end are "no space" (spec); every other out-of-range request is EINVAL.
    let range_error = if matches!(h.command, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) {
        NbdErrno::NoSpc
    } else {
        NbdErrno::Inval
    };
    let command = match h.command {
        NBD_CMD_READ => {
            if h.len_bytes > REQUEST_PAYLOAD_BYTES_MAX {
                return reject(NbdErrno::Inval);
            }
            Command::Read
        }
        NBD_CMD_WRITE => Command::Write { fua },
        NBD_CMD_DISC => Command::Disconnect,
        NBD_CMD_FLUSH => Command::Flush,
        NBD_CMD_TRIM => Command::Trim { fua },
        NBD_CMD_CACHE => Command::Cache,
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            may_trim: h.flags & NBD_CMD_FLAG_NO_HOLE == 0,
            fua,
            fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        NBD_CMD_BLOCK_STATUS => {
            // Only meaningful with a selected context, and a zero-length query has no answer.
            if !export.structured_replies || !export.base_allocation || h.len_bytes == 0 {
                return reject(NbdErrno::Inval);
            }
            Command::BlockStatus {
                req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return reject(NbdErrno::Inval),
    };
    // FLUSH and DISC carry no range (clients send zeros; we ignore whatever they send).
    if !matches!(command, Command::Flush | Command::Disconnect) && !in_range {
        return reject(range_error);
    }
    Decision::Execute(Request {
        handle: h.handle,
        offset: h.offset,
        len_bytes: h.len_bytes,
        command,
    })
}

/// Parses and validates the first [`REQUEST_HEADER_LEN`] bytes of `buf` (the fuzzing entry
/// point). `None` when `buf` is too short to hold a header.
pub fn parse_request(buf: &[u8], export: &ExportView) -> Option<Decision> {
    let header: &[u8; REQUEST_HEADER_LEN] = buf.get(..REQUEST_HEADER_LEN)?.try_into().ok()?;
    Some(match parse_request_header(header) {
        Ok(h) => decide(&h, export),
        Err(err) => Decision::Close(err),
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
