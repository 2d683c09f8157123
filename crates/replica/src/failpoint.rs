//! Failure injection for crash tests: `failpoint::hit("name")?` returns an error when a test on
//! the same thread armed that name. Compiled to a no-op outside `cfg(test)`; it must never
//! change behaviour in a release build.

use crate::ReplicaError;

#[cfg(test)]
thread_local! {
    static ARMED: std::cell::RefCell<Option<&'static str>> = const { std::cell::RefCell::new(None) };
}

/// Arms `name` on this thread (tests only); the next `hit(name)` fails once.
#[cfg(test)]
pub(crate) fn arm(name: &'static str) {
    ARMED.with(|a| *a.borrow_mut() = Some(name));
}

#[cfg(test)]
pub(crate) fn hit(name: &'static str) -> Result<(), ReplicaError> {
    let fire = ARMED.with(|a| {
        let mut a = a.borrow_mut();
        if *a == Some(name) {
            *a = None;
            true
        } else {
            false
        }
    });
    if fire {
        Err(ReplicaError::Injected(name))
    } else {
        Ok(())
    }
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) -> Result<(), ReplicaError> {
    Ok(())
}

/// Like [`hit`], for a system call: an armed `name` fails once with OS error `errno` (e.g.
/// EMFILE, to stand for running out of descriptors).
#[cfg(test)]
pub(crate) fn hit_os(name: &'static str, errno: i32) -> std::io::Result<()> {
    hit(name).map_err(|_| std::io::Error::from_raw_os_error(errno))
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn hit_os(_name: &'static str, _errno: i32) -> std::io::Result<()> {
    Ok(())
}
