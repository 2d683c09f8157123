//! Drives the codec's [`Negotiator`] over a socket under one deadline for the whole
//! handshake, so a client that stalls or trickles bytes is dropped after the configured
//! time. This module owns handshake I/O only; protocol decisions stay in the codec.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use thiserror::Error;

use super::stream::Stream;
use crate::backend::ExportRegistry;
use crate::codec::error::ProtocolError;
use crate::codec::negotiate::{greeting, Negotiator, Session, Step, CLIENT_FLAGS_LEN};
use crate::codec::option::{parse_option_header, OPTION_HEADER_LEN};

/// Why a connection ended before or during transmission.
#[derive(Debug, Error)]
pub(crate) enum ConnError {
    #[error("handshake not finished within the deadline")]
    HandshakeTimeout,
    #[error("client closed the connection")]
    Eof,
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Runs the handshake. `Ok(None)` when it ended without an export (NBD_OPT_ABORT, unknown
/// NBD_OPT_EXPORT_NAME, export removed meanwhile): a normal end, not an error. The chosen
/// export is recorded in `chosen` before the client is told it may transmit.
pub(crate) fn handshake(
    stream: &mut Stream,
    registry: &dyn ExportRegistry,
    deadline: Instant,
    chosen: &Mutex<Option<String>>,
) -> Result<Option<Session>, ConnError> {
    write_by(stream, &greeting(), deadline)?;
    let mut flags = [0u8; CLIENT_FLAGS_LEN];
    read_by(stream, &mut flags, deadline)?;
    let mut negotiator = Negotiator::new(flags)?;
    let mut payload = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        read_by(stream, &mut header, deadline)?;
        out.clear();
        let step = match parse_option_header(&header) {
            Ok(h) => {
                // Bounded by OPTION_PAYLOAD_BYTES_MAX in parse_option_header.
                payload.resize(h.len_bytes as usize, 0);
                read_by(stream, &mut payload, deadline)?;
                negotiator.on_option(h, &payload, registry, &mut out)
            }
            Err(ProtocolError::OversizedOption {
                code,
                len_bytes,
                max,
            }) => {
                negotiator.on_oversized_option(code, &mut out);
                write_by(stream, &out, deadline)?;
                return Err(ProtocolError::OversizedOption {
                    code,
                    len_bytes,
                    max,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Step::Transmit(session) = &step {
            *chosen.lock() = Some(session.export_name.clone());
            // Re-check after recording: `close_export_connections` removes the export from
            // the registry, then closes recorded connections. Either it saw our record, or we
            // see its removal here; no client slips through to a removed export.
            let still = registry.lookup(&session.export_name);
            if !still.is_some_and(|b| Arc::ptr_eq(&b, &session.backend)) {
                return Ok(None);
            }
        }
        write_by(stream, &out, deadline)?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(session) => {
                stream.set_read_timeout(None)?;
                stream.set_write_timeout(None)?;
                return Ok(Some(session));
            }
        }
    }
}

fn remaining(deadline: Instant) -> Result<std::time::Duration, ConnError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ConnError::HandshakeTimeout)
    } else {
        Ok(left)
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `read_exact` where every system call waits at most until `deadline`.
fn read_by(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> Result<(), ConnError> {
    let mut done = 0;
    while done < buf.len() {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(ConnError::Eof),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(ConnError::HandshakeTimeout),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `write_all` bounded by `deadline` (a client that does not read our replies is stalled too).
fn write_by(stream: &mut Stream, buf: &[u8], deadline: Instant) -> Result<(), ConnError> {
    let mut done = 0;
    while done < buf.len() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(ConnError::Eof),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Err(ConnError::HandshakeTimeout),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
