//! Option haggling bytes: parsing the client's option header and payload into a validated
//! [`ClientOption`], and encoding option replies. Pure functions over byte slices; this module
//! must never do I/O nor look exports up (that is [`super::negotiate`]).

use thiserror::Error;

use super::error::ProtocolError;
use super::wire::*;
use crate::limits::{META_QUERIES_MAX, OPTION_PAYLOAD_BYTES_MAX, STRING_BYTES_MAX};

/// Length of an option header: magic (8), option code (4), payload length (4).
pub const OPTION_HEADER_LEN: usize = 16;

/// Length of an option reply header: magic (8), option (4), reply type (4), length (4).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A validated option header. `len_bytes` is within [`OPTION_PAYLOAD_BYTES_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len_bytes: u32,
}

/// Parses an option header. A bad magic means we lost track of the stream; an oversized
/// payload is not worth reading: both end the connection.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadOptionMagic(magic));
    }
    let code = be_u32(&buf[8..12]);
    let len_bytes = be_u32(&buf[12..16]);
    if len_bytes > OPTION_PAYLOAD_BYTES_MAX {
        return Err(ProtocolError::OversizedOption {
            code,
            len_bytes,
            max: OPTION_PAYLOAD_BYTES_MAX,
        });
    }
    Ok(OptionHeader { code, len_bytes })
}

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub name: String,
    /// NBD_INFO_* codes the client asked for (unknown ones are ignored later).
    pub info_requests: Vec<u16>,
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    pub export_name: String,
    pub queries: Vec<String>,
}

/// A client option with a well-formed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(ExportQuery),
    Go(ExportQuery),
    StructuredReply,
    ListMetaContext(MetaQuery),
    SetMetaContext(MetaQuery),
    /// An option we do not implement: answered NBD_REP_ERR_UNSUP.
    Unsupported(u32),
}

/// Why an option payload was rejected. Answered with NBD_REP_ERR_INVALID (or TOO_BIG), except
/// for NBD_OPT_EXPORT_NAME which has no error reply and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionError {
    #[error("option payload is truncated")]
    Truncated,
    #[error("option payload has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("string of {0} bytes is longer than {STRING_BYTES_MAX}")]
    StringTooLong(u32),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("{0} meta context queries, more than {META_QUERIES_MAX}")]
    TooManyQueries(u32),
}

/// Parses the payload of option `code`. Never panics, whatever the bytes.
pub fn parse_option(code: u32, payload: &[u8]) -> Result<ClientOption, OptionError> {
    match code {
        NBD_OPT_EXPORT_NAME => {
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            Ok(ClientOption::ExportName(parse_string(payload, len)?))
        }
        // The spec lets ABORT carry no data; tolerate stray bytes since we close anyway.
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST => expect_empty(payload).map(|()| ClientOption::List),
        NBD_OPT_STARTTLS => expect_empty(payload).map(|()| ClientOption::StartTls),
        NBD_OPT_STRUCTURED_REPLY => expect_empty(payload).map(|()| ClientOption::StructuredReply),
        NBD_OPT_INFO => parse_export_query(payload).map(ClientOption::Info),
        NBD_OPT_GO => parse_export_query(payload).map(ClientOption::Go),
        NBD_OPT_LIST_META_CONTEXT => parse_meta_query(payload).map(ClientOption::ListMetaContext),
        NBD_OPT_SET_META_CONTEXT => parse_meta_query(payload).map(ClientOption::SetMetaContext),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn expect_empty(payload: &[u8]) -> Result<(), OptionError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(OptionError::TrailingBytes(payload.len()))
    }
}

fn parse_export_query(payload: &[u8]) -> Result<ExportQuery, OptionError> {
    let mut cur = Cursor(payload);
    let name_len = cur.u32()?;
    let name = parse_string(cur.take(name_len)?, name_len)?;
    let count = cur.u16()?;
    let mut info_requests = Vec::with_capacity(usize::from(count).min(cur.0.len() / 2));
    for _ in 0..count {
        info_requests.push(cur.u16()?);
    }
    cur.finish()?;
    Ok(ExportQuery {
        name,
        info_requests,
    })
}

fn parse_meta_query(payload: &[u8]) -> Result<MetaQuery, OptionError> {
    let mut cur = Cursor(payload);
    let name_len = cur.u32()?;
    let export_name = parse_string(cur.take(name_len)?, name_len)?;
    let count = cur.u32()?;
    if count > META_QUERIES_MAX {
        return Err(OptionError::TooManyQueries(count));
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = cur.u32()?;
        queries.push(parse_string(cur.take(len)?, len)?);
    }
    cur.finish()?;
    Ok(MetaQuery {
        export_name,
        queries,
    })
}

/// A protocol string: UTF-8, no NUL, at most [`STRING_BYTES_MAX`] bytes.
fn parse_string(bytes: &[u8], len: u32) -> Result<String, OptionError> {
    if len > STRING_BYTES_MAX {
        return Err(OptionError::StringTooLong(len));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| OptionError::BadString)?;
    if s.contains('\0') {
        return Err(OptionError::BadString);
    }
    Ok(s.to_owned())
}

/// Big-endian reader over a payload whose every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, len: u32) -> Result<&'a [u8], OptionError> {
        let len = usize::try_from(len).map_err(|_| OptionError::Truncated)?;
        if len > self.0.len() {
            return Err(OptionError::Truncated);
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        Ok(be_u32(self.take(4)?))
    }

    fn finish(self) -> Result<(), OptionError> {
        expect_empty(self.0)
    }
}

/// Reads a big-endian u32 from the first four bytes; callers pass slices of exactly that size.
pub(crate) fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Reads a big-endian u64 from the first eight bytes; callers pass slices of that size.
pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Appends one option reply (header and `data`) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    // Option replies we build are at most a few KiB (names are bounded), so the cast is exact.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(code: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&code.to_be_bytes());
        b[12..16].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    #[test]
    fn header_rejects_bad_magic_and_absurd_length() {
        let mut bad = header(NBD_OPT_GO, 0);
        bad[0] ^= 1;
        assert!(matches!(
            parse_option_header(&bad),
            Err(ProtocolError::BadOptionMagic(_))
        ));
        assert!(matches!(
            parse_option_header(&header(NBD_OPT_GO, u32::MAX)),
            Err(ProtocolError::OversizedOption { .. })
        ));
        assert_eq!(
            parse_option_header(&header(NBD_OPT_GO, 10)),
            Ok(OptionHeader {
                code: NBD_OPT_GO,
                len_bytes: 10
            })
        );
    }

    #[test]
    fn go_round_trips() {
        let p = go_payload("disk-0", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        assert_eq!(
            parse_option(NBD_OPT_GO, &p),
            Ok(ClientOption::Go(ExportQuery {
                name: "disk-0".into(),
                info_requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]
            }))
        );
    }

    #[test]
    fn go_with_lying_lengths_is_invalid() {
        let mut p = go_payload("disk", &[1, 2]);
        p.push(0); // trailing byte
        assert_eq!(
            parse_option(NBD_OPT_GO, &p),
            Err(OptionError::TrailingBytes(1))
        );
        let p = go_payload("disk", &[1, 2]);
        assert_eq!(
            parse_option(NBD_OPT_GO, &p[..p.len() - 1]),
            Err(OptionError::Truncated)
        );
        let mut p = go_payload("disk", &[]);
        p[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_option(NBD_OPT_GO, &p), Err(OptionError::Truncated));
    }

    #[test]
    fn names_must_be_utf8_without_nul_and_bounded() {
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, b"a\0b"),
            Err(OptionError::BadString)
        );
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, &[0xff, 0xfe]),
            Err(OptionError::BadString)
        );
        let long = vec![b'a'; STRING_BYTES_MAX as usize + 1];
        assert!(matches!(
            parse_option(NBD_OPT_EXPORT_NAME, &long),
            Err(OptionError::StringTooLong(_))
        ));
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, b""),
            Ok(ClientOption::ExportName(String::new()))
        );
    }

    #[test]
    fn meta_round_trips_and_bounds_queries() {
        let p = meta_payload("d", &["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            parse_option(NBD_OPT_SET_META_CONTEXT, &p),
            Ok(ClientOption::SetMetaContext(MetaQuery {
                export_name: "d".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            }))
        );
        let mut p = meta_payload("d", &[]);
        let n = p.len();
        p[n - 4..].copy_from_slice(&(META_QUERIES_MAX + 1).to_be_bytes());
        assert!(matches!(
            parse_option(NBD_OPT_LIST_META_CONTEXT, &p),
            Err(OptionError::TooManyQueries(_))
        ));
    }

    #[test]
    fn empty_options_reject_payload_and_unknown_pass_through() {
        assert_eq!(
            parse_option(NBD_OPT_LIST, b"x"),
            Err(OptionError::TrailingBytes(1))
        );
        assert_eq!(
            parse_option(NBD_OPT_STRUCTURED_REPLY, b""),
            Ok(ClientOption::StructuredReply)
        );
        assert_eq!(
            parse_option(11, b"whatever"),
            Ok(ClientOption::Unsupported(11))
        );
    }

    proptest! {
        #[test]
        fn option_parser_never_panics(code in 0u32..16, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_option(code, &payload);
        }

        #[test]
        fn option_header_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
            let _ = parse_option_header(&bytes);
        }

        #[test]
        fn go_round_trips_any_name(name in "[^\u{0}]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let p = go_payload(&name, &infos);
            prop_assert_eq!(
                parse_option(NBD_OPT_GO, &p),
                Ok(ClientOption::Go(ExportQuery { name, info_requests: infos }))
            );
        }
    }
}
