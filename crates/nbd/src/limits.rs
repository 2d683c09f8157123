//! Every bound the server applies to client-controlled sizes and to its own resources, each
//! with the reason for its value. This module owns numbers only and must never contain logic.

use std::time::Duration;

/// Largest payload of one NBD_CMD_WRITE or NBD_CMD_READ (32 MiB), advertised as the maximum
/// block size in NBD_INFO_BLOCK_SIZE. qemu and libnbd split larger I/O at this size, and it
/// caps the memory one request can pin on a worker thread. A write announcing more than this
/// cannot be skipped cheaply, so it closes the connection.
pub const REQUEST_PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Minimum block size advertised: 1, because pread/pwrite accept any alignment.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;

/// Preferred block size advertised: 4 KiB, the page and filesystem block size; smaller writes
/// cost a read-modify-write in the page cache and a 4 KiB dirty bit in the tracker.
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;

/// Largest option payload we read during the handshake (64 KiB). The biggest legitimate
/// option is NBD_OPT_GO or NBD_OPT_SET_META_CONTEXT with a 4 KiB name and a few queries;
/// anything larger is hostile or broken and gets NBD_REP_ERR_TOO_BIG, then the connection is
/// closed because the rest of the announced bytes are not worth reading.
pub const OPTION_PAYLOAD_BYTES_MAX: u32 = 64 * 1024;

/// Longest export name, description or query string: the spec says strings MUST be no longer
/// than 4096 bytes.
pub const STRING_BYTES_MAX: u32 = 4096;

/// Most meta-context queries accepted in one NBD_OPT_{LIST,SET}_META_CONTEXT. We know few
/// contexts; a client asking for more than this is answered NBD_REP_ERR_TOO_BIG.
pub const META_QUERIES_MAX: u32 = 128;
/// Most of a backend's own contexts selected at once by NBD_OPT_SET_META_CONTEXT: every
/// BLOCK_STATUS answers each selected context, so this bounds one request's work and reply.
pub const META_CONTEXTS_SELECTED_MAX: usize = 8;
/// Most of a backend's own contexts one NBD_OPT_LIST_META_CONTEXT reply lists (a replica
/// point offers one per older point; the history keeps far fewer than this in practice).
pub const META_CONTEXTS_LISTED_MAX: usize = 1024;

/// Most descriptors in one NBD_REPLY_TYPE_BLOCK_STATUS chunk (64 Ki = 512 KiB of reply). The
/// spec says a server SHOULD NOT send more than 2^20; fewer keeps a reply to a fragmented
/// file small, and the client simply asks again from where the answer stopped.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 64 * 1024;

/// Default time a client has to finish the whole handshake (greeting to NBD_OPT_GO). A client
/// that is slower is broken or hostile; its thread and connection slot are released.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Default bound on concurrent connections (handshaking or transmitting). Each costs a few
/// threads; 256 covers a host full of VMs with multi-conn clients.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;

/// Default worker threads per connection, which is also the bound on requests in flight per
/// connection (further requests wait in the socket buffer). On the 2-core reference box, 4
/// matched `nbdkit file` at 4 KiB QD32 random writes while 8 lost ~30% under CPU contention
/// (more lock hand-offs between parked threads); it bounds per-connection buffers to
/// 4 x 32 MiB in the worst case. Raise it for slow storage with many FUA writes.
pub const WORKERS_PER_CONNECTION_DEFAULT: usize = 4;

/// Upper clamp on `workers_per_connection`, so a misconfiguration cannot spawn thousands of
/// threads per client.
pub const WORKERS_PER_CONNECTION_MAX: usize = 64;

/// A worker keeps its I/O buffer between requests up to this size so requests up to 2 MiB
/// (qemu-img convert's chunk; nbdcopy uses 256 KiB) never allocate nor zero-fill, with 4 KiB
/// of headroom for the reply header in front of read data. A buffer grown for a larger
/// request is shrunk back after it, so idle memory stays at most workers x ~2 MiB.
pub const RETAINED_BUFFER_BYTES: usize = 2 * 1024 * 1024 + 4096;

/// Capacity of the buffered reader on a connection's socket (64 KiB): enough to pick up a
/// burst of pipelined small requests with one read system call.
pub const SOCKET_READ_BUFFER_BYTES: usize = 64 * 1024;

/// Read requests one worker serves per hand-off of the connection's reader lock, at most. A
/// worker that read a small read request also takes the small read requests already buffered
/// behind it (whole headers in the socket buffer: no system call, no waiting), serves them in
/// order and sends their replies with one write. Each hand-off of the lock wakes a parked
/// worker; with several queued reads per wake-up the workers spend their time reading, not
/// switching (bench T2, docs/PERFORMANCE.md). Disk concurrency is unchanged: still one
/// backend call in flight per worker.
pub const READ_BATCH_MAX: usize = 8;

/// Largest read taken into a batch: a batch's replies are gathered in the worker's buffer,
/// so batches stay within [`READ_BATCH_MAX`] x 64 KiB.
pub const READ_BATCH_BYTES_MAX: u32 = 64 * 1024;

/// Stack of connection and worker threads (256 KiB): they only hold small fixed frames; I/O
/// buffers live on the heap.
pub const THREAD_STACK_BYTES: usize = 256 * 1024;
