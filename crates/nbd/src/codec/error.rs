//! Error types of the codec: the NBD error values sent in replies, and the protocol
//! violations that end a connection. This module maps errors; it must never decide policy.

use std::io;

use thiserror::Error;

/// An error value of the NBD protocol, as sent in a reply's error field. The spec restricts
/// the values to this set; everything else a backend reports becomes [`NbdErrno::Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdErrno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a backend's I/O error to the closest NBD error, as the spec asks (EDQUOT and
    /// EFBIG become ENOSPC, EROFS becomes EPERM).
    pub fn from_io(err: &io::Error) -> NbdErrno {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdErrno::Perm,
            Some(libc::ENOMEM) => NbdErrno::NoMem,
            Some(libc::EINVAL) => NbdErrno::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdErrno::NoSpc,
            Some(libc::EOVERFLOW) => NbdErrno::Overflow,
            Some(libc::EOPNOTSUPP) => NbdErrno::NotSup,
            Some(libc::ESHUTDOWN) => NbdErrno::Shutdown,
            Some(_) => NbdErrno::Io,
            None => match err.kind() {
                io::ErrorKind::PermissionDenied => NbdErrno::Perm,
                io::ErrorKind::InvalidInput => NbdErrno::Inval,
                io::ErrorKind::OutOfMemory => NbdErrno::NoMem,
                io::ErrorKind::Unsupported => NbdErrno::NotSup,
                _ => NbdErrno::Io,
            },
        }
    }
}

/// A violation after which the byte stream cannot be trusted any more: the connection is
/// closed (other connections are unaffected).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option header has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {code} announces {len_bytes} bytes of payload, more than the {max} allowed")]
    OversizedOption { code: u32, len_bytes: u32, max: u32 },
    #[error("request header has bad magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("write request announces {len_bytes} bytes of payload, more than the {max} allowed")]
    OversizedWrite { len_bytes: u32, max: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_the_spec_values() {
        let cases = [
            (libc::EDQUOT, NbdErrno::NoSpc),
            (libc::EFBIG, NbdErrno::NoSpc),
            (libc::EROFS, NbdErrno::Perm),
            (libc::EOPNOTSUPP, NbdErrno::NotSup),
            (libc::EBADF, NbdErrno::Io),
        ];
        for (raw, want) in cases {
            assert_eq!(
                NbdErrno::from_io(&io::Error::from_raw_os_error(raw)),
                want,
                "errno {raw}"
            );
        }
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "short");
        assert_eq!(NbdErrno::from_io(&eof), NbdErrno::Io);
    }
}
