//! The host's typed errors. The host says *what kind* of refusal an error is; only the API
//! layer (in the binary) turns a kind into an HTTP status. An error that carries no
//! [`HostError`] is unexpected (a bug or a broken system) and the API answers it 500.

/// What kind of refusal an error is, independent of any transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request names something that does not exist (VM, point, route).
    NotFound,
    /// The request conflicts with the current state (already exists, wrong state, in use).
    Conflict,
    /// The request itself is invalid (bad name, out-of-range value, malformed body).
    Invalid,
    /// Cannot be done right now; the same request may succeed later (busy, peer unreachable,
    /// deadline). The CLI exits 75 (EX_TEMPFAIL).
    Transient,
}

/// A refusal with its kind, carried through `anyhow` so context can be added on the way up.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HostError {
    pub kind: ErrorKind,
    pub message: String,
}

fn err(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
    HostError {
        kind,
        message: message.into(),
    }
    .into()
}

pub fn transient(message: impl Into<String>) -> anyhow::Error {
    err(ErrorKind::Transient, message)
}
pub fn not_found(message: impl Into<String>) -> anyhow::Error {
    err(ErrorKind::NotFound, message)
}
pub fn conflict(message: impl Into<String>) -> anyhow::Error {
    err(ErrorKind::Conflict, message)
}
pub fn bad_request(message: impl Into<String>) -> anyhow::Error {
    err(ErrorKind::Invalid, message)
}

/// The kind of `e`: the first [`HostError`] in its chain, `None` when it is unexpected.
pub fn kind_of(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<HostError>())
        .map(|h| h.kind)
}
