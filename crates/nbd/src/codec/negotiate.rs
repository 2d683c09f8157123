//! The fixed-newstyle handshake as a state machine without I/O: the caller feeds it the
//! client's flags and options, it appends the reply bytes to a buffer and says whether to
//! continue, close, or enter transmission with a [`Session`]. It looks exports up in the
//! [`ExportRegistry`] but must never read or write a socket nor touch export data.

use std::sync::Arc;

use super::error::ProtocolError;
use super::option::{
    encode_option_reply, parse_option, ClientOption, ExportQuery, MetaQuery, OptionError,
    OptionHeader,
};
use super::wire::*;
use crate::backend::{BlockBackend, ExportRegistry};
use crate::limits::{
    BLOCK_SIZE_MIN_BYTES, BLOCK_SIZE_PREFERRED_BYTES, META_CONTEXTS_LISTED_MAX,
    META_CONTEXTS_SELECTED_MAX, REQUEST_PAYLOAD_BYTES_MAX, STRING_BYTES_MAX,
};

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;

/// Length of the client flags that answer the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;

/// Zero padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.
const EXPORT_NAME_PADDING: usize = 124;

/// The first bytes the server sends.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Transmission flags for an export: everything we implement, plus READ_ONLY when the
/// backend refuses writes. CAN_MULTI_CONN holds because [`BlockBackend::flush`] must cover
/// writes completed on any connection.
pub fn transmission_flags(backend: &dyn BlockBackend) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_CAN_MULTI_CONN
        | NBD_FLAG_SEND_CACHE;
    if backend.read_only() {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

/// What the caller does after an option.
pub enum Step {
    /// Send the replies, read the next option.
    Continue,
    /// Send the replies, then close the connection.
    Close,
    /// Send the replies, then serve requests for this session.
    Transmit(Session),
}

/// The outcome of a successful handshake.
#[derive(Clone)]
pub struct Session {
    pub export_name: String,
    pub backend: Arc<dyn BlockBackend>,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// Other metadata contexts selected for this export (the backend's), with their ids.
    pub contexts: Vec<(u32, String)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("export_name", &self.export_name)
            .field("size_bytes", &self.size_bytes)
            .field("transmission_flags", &self.transmission_flags)
            .field("structured_replies", &self.structured_replies)
            .field("base_allocation", &self.base_allocation)
            .finish()
    }
}

/// Handshake state between the client flags and the end of option haggling.
#[derive(Debug, Default)]
pub struct Negotiator {
    no_zeroes: bool,
    structured_replies: bool,
    /// Export named in the last successful NBD_OPT_SET_META_CONTEXT that selected
    /// `base:allocation` or another context.
    meta_export: Option<String>,
    /// Whether that SET selected `base:allocation`.
    meta_base: bool,
    /// The backend's contexts that SET selected, with their ids (from 2).
    meta_contexts: Vec<(u32, String)>,
}

impl Negotiator {
    /// Starts a handshake from the client's 4-byte flags; unknown bits end the connection, as
    /// the spec requires.
    pub fn new(client_flags: [u8; CLIENT_FLAGS_LEN]) -> Result<Negotiator, ProtocolError> {
        let flags = u32::from_be_bytes(client_flags);
        let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return Err(ProtocolError::UnknownClientFlags(flags));
        }
        Ok(Negotiator {
            no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
            ..Negotiator::default()
        })
    }

    /// Answers an option whose announced payload is too big to read: NBD_REP_ERR_TOO_BIG, then
    /// close, because the unread bytes would desynchronise the stream.
    pub fn on_oversized_option(&mut self, code: u32, out: &mut Vec<u8>) -> Step {
        encode_option_reply(out, code, NBD_REP_ERR_TOO_BIG, b"option payload too large");
        Step::Close
    }

    /// Handles one option; `payload` is exactly `header.len_bytes` long.
    pub fn on_option(
        &mut self,
        header: OptionHeader,
        payload: &[u8],
        registry: &dyn ExportRegistry,
        out: &mut Vec<u8>,
    ) -> Step {
        let code = header.code;
        let option = match parse_option(code, payload) {
            Ok(option) => option,
            // EXPORT_NAME has no way to report an error: the spec says close.
            Err(_) if code == NBD_OPT_EXPORT_NAME => return Step::Close,
            Err(err @ OptionError::TooManyQueries(_)) => {
                encode_option_reply(out, code, NBD_REP_ERR_TOO_BIG, err.to_string().as_bytes());
                return Step::Continue;
            }
            Err(err) => {
                encode_option_reply(out, code, NBD_REP_ERR_INVALID, err.to_string().as_bytes());
                return Step::Continue;
            }
        };
        match option {
            ClientOption::ExportName(name) => self.export_name(&name, registry, out),
            ClientOption::Abort => {
                encode_option_reply(out, code, NBD_REP_ACK, &[]);
                Step::Close
            }
            ClientOption::List => {
                for (name, description) in registry.list() {
                    if name.len() > STRING_BYTES_MAX as usize {
                        continue;
                    }
                    let mut data = Vec::with_capacity(4 + name.len() + description.len());
                    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    data.extend_from_slice(name.as_bytes());
                    data.extend_from_slice(truncate(&description).as_bytes());
                    encode_option_reply(out, code, NBD_REP_SERVER, &data);
                }
                encode_option_reply(out, code, NBD_REP_ACK, &[]);
                Step::Continue
            }
            // TLS is for the network plane; the NBD socket is local. ERR_UNSUP lets clients
            // configured with tls=allow carry on in plaintext.
            ClientOption::StartTls => {
                encode_option_reply(out, code, NBD_REP_ERR_UNSUP, b"TLS is not offered");
                Step::Continue
            }
            ClientOption::Info(query) => self.info_or_go(code, query, false, registry, out),
            ClientOption::Go(query) => self.info_or_go(code, query, true, registry, out),
            ClientOption::StructuredReply => {
                self.structured_replies = true;
                encode_option_reply(out, code, NBD_REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::ListMetaContext(query) => {
                self.meta_context(code, query, false, registry, out)
            }
            ClientOption::SetMetaContext(query) => {
                self.meta_context(code, query, true, registry, out)
            }
            ClientOption::Unsupported(_) => {
                encode_option_reply(out, code, NBD_REP_ERR_UNSUP, &[]);
                Step::Continue
            }
        }
    }

    fn session(&self, name: String, backend: Arc<dyn BlockBackend>) -> Session {
        let selected =
            self.structured_replies && self.meta_export.as_deref() == Some(name.as_str());
        let base_allocation = selected && self.meta_base;
        let contexts = if selected {
            self.meta_contexts.clone()
        } else {
            Vec::new()
        };
        Session {
            contexts,
            size_bytes: backend.size_bytes(),
            transmission_flags: transmission_flags(backend.as_ref()),
            export_name: name,
            backend,
            structured_replies: self.structured_replies,
            base_allocation,
        }
    }

    fn export_name(&self, name: &str, registry: &dyn ExportRegistry, out: &mut Vec<u8>) -> Step {
        let Some(backend) = registry.lookup(name) else {
            return Step::Close;
        };
        let session = self.session(name.to_owned(), backend);
        out.extend_from_slice(&session.size_bytes.to_be_bytes());
        out.extend_from_slice(&session.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
        }
        Step::Transmit(session)
    }

    fn info_or_go(
        &mut self,
        code: u32,
        query: ExportQuery,
        go: bool,
        registry: &dyn ExportRegistry,
        out: &mut Vec<u8>,
    ) -> Step {
        let Some(backend) = registry.lookup(&query.name) else {
            encode_option_reply(out, code, NBD_REP_ERR_UNKNOWN, b"no such export");
            return Step::Continue;
        };
        let session = self.session(query.name, backend);
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&session.size_bytes.to_be_bytes());
        info.extend_from_slice(&session.transmission_flags.to_be_bytes());
        encode_option_reply(out, code, NBD_REP_INFO, &info);
        // Each known request is answered once however often the client repeats it; the bitmask
        // keeps this linear in a hostile list of 32 Ki requests.
        let mut answered = 0u8;
        for &request in &query.info_requests {
            if request > NBD_INFO_BLOCK_SIZE || answered & (1 << request) != 0 {
                continue;
            }
            answered |= 1 << request;
            info.clear();
            info.extend_from_slice(&request.to_be_bytes());
            match request {
                NBD_INFO_NAME => info.extend_from_slice(session.export_name.as_bytes()),
                NBD_INFO_DESCRIPTION => {
                    let description = registry
                        .list()
                        .into_iter()
                        .find(|(name, _)| *name == session.export_name)
                        .map(|(_, d)| d)
                        .unwrap_or_default();
                    if description.is_empty() {
                        continue;
                    }
                    info.extend_from_slice(truncate(&description).as_bytes());
                }
                NBD_INFO_BLOCK_SIZE => {
                    info.extend_from_slice(&BLOCK_SIZE_MIN_BYTES.to_be_bytes());
                    info.extend_from_slice(&BLOCK_SIZE_PREFERRED_BYTES.to_be_bytes());
                    info.extend_from_slice(&REQUEST_PAYLOAD_BYTES_MAX.to_be_bytes());
                }
                // NBD_INFO_EXPORT was sent already; unknown requests are ignored (spec).
                _ => continue,
            }
            encode_option_reply(out, code, NBD_REP_INFO, &info);
        }
        encode_option_reply(out, code, NBD_REP_ACK, &[]);
        if go {
            Step::Transmit(session)
        } else {
            Step::Continue
        }
    }

    fn meta_context(
        &mut self,
        code: u32,
        query: MetaQuery,
        set: bool,
        registry: &dyn ExportRegistry,
        out: &mut Vec<u8>,
    ) -> Step {
        if set {
            // SET replaces the previous selection even when it fails (spec).
            self.meta_export = None;
            self.meta_base = false;
            self.meta_contexts.clear();
            if !self.structured_replies {
                encode_option_reply(out, code, NBD_REP_ERR_INVALID, b"structured replies first");
                return Step::Continue;
            }
        }
        let Some(backend) = registry.lookup(&query.export_name) else {
            encode_option_reply(out, code, NBD_REP_ERR_UNKNOWN, b"no such export");
            return Step::Continue;
        };
        // The backend's own contexts: exact names for SET; for LIST, a query ending in ':'
        // (namespace or leaf-name prefix, e.g. "qemu:" or "qemu:dirty-bitmap:") or an exact
        // name, and everything for no query.
        let mut extra: Vec<String> = Vec::new();
        if !set && query.queries.is_empty() {
            extra = backend.meta_contexts("");
        }
        for q in &query.queries {
            if q == BASE_ALLOCATION || q == "base:" {
                continue;
            }
            if !set && q.ends_with(':') {
                extra.extend(backend.meta_contexts(q));
            } else if backend.has_meta_context(q) {
                extra.push(q.clone());
            }
        }
        let mut seen = std::collections::HashSet::new();
        extra.retain(|c| c.len() <= STRING_BYTES_MAX as usize && seen.insert(c.clone()));
        extra.truncate(if set {
            META_CONTEXTS_SELECTED_MAX
        } else {
            META_CONTEXTS_LISTED_MAX
        });
        for (i, name) in extra.iter().enumerate() {
            // LIST replies carry id 0; SET ids follow base:allocation's.
            let id = if set {
                BASE_ALLOCATION_ID + 1 + i as u32
            } else {
                0
            };
            let mut data = id.to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            encode_option_reply(out, code, NBD_REP_META_CONTEXT, &data);
            if set {
                self.meta_contexts.push((id, name.clone()));
            }
        }
        if set && !extra.is_empty() {
            self.meta_export = Some(query.export_name.clone());
        }
        let matches = if set {
            query.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            // LIST with no query lists everything; "base:" is the namespace wildcard.
            query.queries.is_empty()
                || query
                    .queries
                    .iter()
                    .any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        if matches {
            // LIST replies carry id 0 (reserved); SET replies carry the id BLOCK_STATUS uses.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut data = id.to_be_bytes().to_vec();
            data.extend_from_slice(BASE_ALLOCATION.as_bytes());
            encode_option_reply(out, code, NBD_REP_META_CONTEXT, &data);
            if set {
                self.meta_export = Some(query.export_name);
                self.meta_base = true;
            }
        }
        encode_option_reply(out, code, NBD_REP_ACK, &[]);
        Step::Continue
    }
}

/// Cuts a server-provided string to the protocol's string bound on a char boundary.
fn truncate(s: &str) -> &str {
    let max = STRING_BYTES_MAX as usize;
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
