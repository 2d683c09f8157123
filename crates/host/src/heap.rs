//! How the daemon uses glibc's heap: keep freed buffers while data flows, give them back when a
//! cycle ends.
//!
//! The data path allocates buffers of 256 KiB to 1 MiB on one thread and frees them on
//! another: the shipper's body chunks (freed by the runtime thread that sent them), HTTP/2
//! receive buffers (freed by the replica's apply thread), per-frame scratch. With glibc's
//! defaults, every such buffer above the adaptive mmap threshold is a fresh `mmap`, and
//! every free that leaves more than 128 KiB at the top of an arena shrinks it; both return
//! pages to the kernel, and touching them again costs a page fault and a zeroed page. On a
//! ballooned VM that is the most expensive thing the data path does: in T6 (initial
//! replication) the daemons spent ~7 % of their CPU in page faults and `clear_page`, and the
//! interleaved A/B in `docs/PERFORMANCE.md` ("Heap policy") measured 15–20 % less wall time
//! with the policy below.
//!
//! So [`configure`] keeps buffers below [`MMAP_THRESHOLD_BYTES`] in the arenas and lets an
//! arena hold up to [`TRIM_THRESHOLD_BYTES`] of free memory; and [`give_back`], called when a
//! cycle ends (primary) or an upload ends (replica), returns whatever is free, so an idle
//! daemon's RSS stays what it was (T11).

/// Allocations at least this large get their own mapping (glibc's default is adaptive, from
/// 128 KiB up to 32 MiB; a fixed value stops mapping the data path's ≤ 1 MiB buffers).
pub const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;
/// Free memory an arena may keep at its top before `free` returns it to the kernel.
pub const TRIM_THRESHOLD_BYTES: i32 = 64 << 20;

/// Sets the policy. Call once, before the runtime starts its threads (arenas made later use
/// it as well; the values are process-wide).
pub fn configure() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; it has no memory-safety
    // preconditions. A refusal (return 0) leaves glibc's defaults, which are correct, slower.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 0
            || libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 0
        {
            tracing::warn!("glibc refused the heap settings; keeping its defaults");
        }
    }
}

/// Returns free heap memory of every arena to the kernel. Cheap next to a replication cycle
/// (it walks the free lists once); call it when a burst of buffers has ended.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it takes each arena's lock like malloc.
    unsafe {
        libc::malloc_trim(0);
    }
}
