//! Understudy's small system-call helpers, each written once: `SEEK_DATA`/`SEEK_HOLE`
//! ([`seek_data`], [`seek_hole`]), `fallocate` hole punching and zeroing ([`punch_hole`],
//! [`zero_range`], [`zero_range_in_place`], [`write_zeros`]), the read-ahead hint
//! ([`will_need`]), the `flock` that keeps two processes off one directory
//! ([`try_lock_exclusive`]), and durable file replacement ([`replace_file`],
//! [`write_synced`], [`rename_durable`], [`fsync_dir`]).
//!
//! Rules every helper here keeps: it returns `io::Result` with the kernel's error untouched
//! (callers match on `raw_os_error()`: `EMFILE`/`ENFILE` are transient, `ENOSPC` is a full
//! disk, `EOPNOTSUPP` a file system without the feature); it never panics; it retries
//! `EINTR` itself; every `unsafe` block says why it is sound. It makes no policy decision: what
//! an unsupported operation or a transient error means is the caller's business, except where
//! a function's name says otherwise ([`zero_range`] falls back to writing zeros).
//!
//! Linux only (the project's only target).

mod durable;
mod lock;
mod seek;
mod space;

pub use durable::{fsync_dir, parent_dir, rename_durable, replace_file, write_synced, FileMode};
pub use lock::try_lock_exclusive;
pub use seek::{seek_data, seek_hole};
pub use space::{
    is_unsupported, punch_hole, will_need, write_zeros, zero_range, zero_range_in_place,
};

use std::io;

/// A byte offset or length as the kernel's `off_t`; `EINVAL` when it does not fit (above
/// `i64::MAX`), as the kernel itself would answer for a negative offset.
fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Runs a system call wrapper until it stops failing with `EINTR`.
fn retry_eintr<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
