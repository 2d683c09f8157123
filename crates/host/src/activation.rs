//! systemd socket activation of the NBD socket (`sd_listen_fds(3)`): when the daemon is
//! started with `LISTEN_PID` = its pid and `LISTEN_FDS` ≥ 1, the first passed descriptor
//! (fd 3) is a listening Unix socket that systemd owns. Guests that connect while the daemon
//! restarts wait in that socket's backlog instead of being refused, so a restart (crash or
//! upgrade) costs them a pause, never an error. Without activation the daemon binds
//! `<data-dir>/nbd.sock` itself.
//!
//! This module only inspects the environment and the descriptor; it never closes or moves
//! descriptors it was not given.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{bail, Context};

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Whether descriptors were passed to this very process.
fn passed() -> bool {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    for_us && count >= 1
}

/// Checks that fd 3 is a listening Unix stream socket; returns its path.
fn inherited_path() -> anyhow::Result<PathBuf> {
    // SAFETY: a sockaddr_un we own, its size passed; getsockname/getsockopt only write into it.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(
            LISTEN_FDS_START,
            &mut addr as *mut _ as *mut libc::sockaddr,
            &mut len,
        ) != 0
        {
            bail!(
                "LISTEN_FDS is set but fd 3 is not a socket: {}",
                std::io::Error::last_os_error()
            );
        }
        if addr.sun_family as i32 != libc::AF_UNIX {
            bail!("the socket passed by systemd (fd 3) is not a Unix socket; point ListenStream= at a path");
        }
        let mut listening: libc::c_int = 0;
        let mut olen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            LISTEN_FDS_START,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut listening as *mut _ as *mut libc::c_void,
            &mut olen,
        ) != 0
            || listening == 0
        {
            bail!("the socket passed by systemd (fd 3) is not listening");
        }
        let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
        let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        if bytes.is_empty() {
            bail!("the socket passed by systemd (fd 3) has no path");
        }
        let os: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
        Ok(PathBuf::from(os))
    }
}

/// The path of the NBD socket systemd passed, if any.
pub fn nbd_socket_path() -> anyhow::Result<Option<PathBuf>> {
    if !passed() {
        return Ok(None);
    }
    inherited_path().map(Some)
}

/// The NBD listener systemd passed, if any (taken once, at start).
pub fn nbd_listener() -> anyhow::Result<Option<UnixListener>> {
    if !passed() {
        return Ok(None);
    }
    inherited_path().context("socket activation")?;
    // Children (qemu-img) must not inherit it.
    // SAFETY: fcntl on a descriptor systemd passed to this process.
    unsafe {
        libc::fcntl(LISTEN_FDS_START, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: fd 3 was passed to this process by its starter for this purpose and checked
    // above to be a listening Unix socket; nothing else in the process owns it.
    Ok(Some(unsafe { UnixListener::from_raw_fd(LISTEN_FDS_START) }))
}
