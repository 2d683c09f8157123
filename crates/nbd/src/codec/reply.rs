//! Transmission replies: simple replies and structured reply chunks (OFFSET_DATA, NONE,
//! ERROR, BLOCK_STATUS), encoded into caller-provided buffers so the server can send header
//! and payload in one write without copying data. Pure functions; never does I/O.

use super::error::NbdErrno;
use super::wire::*;
use crate::backend::Extent;
use crate::limits::BLOCK_STATUS_EXTENTS_MAX;

/// Simple reply: magic (4), error (4), handle (8).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured chunk header: magic (4), flags (2), type (2), handle (8), length (4).
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Structured OFFSET_DATA prefix: chunk header plus the 8-byte offset.
pub const OFFSET_DATA_PREFIX_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// A simple reply header; for a successful read the data follows it.
pub fn simple_reply(error: Option<NbdErrno>, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.map_or(0, NbdErrno::code).to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured chunk header announcing `len_bytes` of payload.
pub fn structured_header(
    flags: u16,
    kind: u16,
    handle: u64,
    len_bytes: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len_bytes.to_be_bytes());
    b
}

/// The final OFFSET_DATA chunk carrying `data_len` bytes read at `offset`; the data follows.
/// `data_len` is at most the 32 MiB payload bound, so the chunk length cannot overflow.
pub fn offset_data_prefix(handle: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_PREFIX_LEN] {
    let mut b = [0u8; OFFSET_DATA_PREFIX_LEN];
    let header = structured_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len.saturating_add(8),
    );
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&header);
    b[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The final NONE chunk (a successful read of zero bytes).
pub fn none_chunk(handle: u64) -> [u8; STRUCTURED_HEADER_LEN] {
    structured_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0)
}

/// Appends a final ERROR chunk (no message) to `out`.
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, error: NbdErrno) {
    out.extend_from_slice(&structured_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6,
    ));
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends the final BLOCK_STATUS chunk for a request of `request_len` bytes to `out`.
/// Extents are clipped to the request, zero-length ones dropped, at most one kept with
/// `req_one` and at most [`BLOCK_STATUS_EXTENTS_MAX`] otherwise. Returns the number of
/// descriptors written; zero means nothing was appended and the caller must send an error,
/// since the spec requires at least one descriptor.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    handle: u64,
    extents: &[Extent],
    request_len: u32,
    req_one: bool,
) -> usize {
    let runs = allocation_runs(extents);
    encode_status_chunk(
        out,
        handle,
        BASE_ALLOCATION_ID,
        &runs,
        request_len,
        req_one,
        true,
    )
}

/// `base:allocation` extents as `(len, NBD_STATE_* flags)` runs.
pub fn allocation_runs(extents: &[Extent]) -> Vec<(u64, u32)> {
    extents
        .iter()
        .map(|e| {
            let mut status = 0;
            if e.hole {
                status |= NBD_STATE_HOLE;
            }
            if e.zero {
                status |= NBD_STATE_ZERO;
            }
            (e.len_bytes, status)
        })
        .collect()
}

/// Appends one BLOCK_STATUS chunk of context `context_id` with `(len, flags)` runs, clipped
/// as [`encode_block_status`]; `done` sets NBD_REPLY_FLAG_DONE (the last chunk of the reply).
pub fn encode_status_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    runs: &[(u64, u32)],
    request_len: u32,
    req_one: bool,
    done: bool,
) -> usize {
    let limit = if req_one { 1 } else { BLOCK_STATUS_EXTENTS_MAX };
    let start = out.len();
    out.extend_from_slice(&[0u8; STRUCTURED_HEADER_LEN]);
    out.extend_from_slice(&context_id.to_be_bytes());
    let mut remaining = u64::from(request_len);
    let mut count = 0usize;
    for &(len_bytes, status) in runs {
        if remaining == 0 || count == limit {
            break;
        }
        let len = len_bytes.min(remaining);
        if len == 0 {
            continue;
        }
        // `len <= request_len`, which is a u32.
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        out.extend_from_slice(&len32.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
        remaining -= len;
        count += 1;
    }
    if count == 0 {
        out.truncate(start);
        return 0;
    }
    // 4 + 8 * count bytes, with count <= 64 Ki: fits a u32.
    let payload = u32::try_from(out.len() - start - STRUCTURED_HEADER_LEN).unwrap_or(u32::MAX);
    let header = structured_header(
        if done { NBD_REPLY_FLAG_DONE } else { 0 },
        NBD_REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload,
    );
    out[start..start + STRUCTURED_HEADER_LEN].copy_from_slice(&header);
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::option::{be_u32, be_u64};

    fn ext(len_bytes: u64, hole: bool) -> Extent {
        Extent {
            len_bytes,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(Some(NbdErrno::Inval), 0x0102_0304_0506_0708);
        assert_eq!(be_u32(&r[0..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u32(&r[4..8]), 22);
        assert_eq!(be_u64(&r[8..16]), 0x0102_0304_0506_0708);
    }

    #[test]
    fn offset_data_announces_offset_plus_data() {
        let p = offset_data_prefix(7, 4096, 512);
        assert_eq!(be_u32(&p[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), NBD_REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), NBD_REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u32(&p[16..20]), 520);
        assert_eq!(be_u64(&p[20..28]), 4096);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, NbdErrno::NoSpc);
        assert_eq!(out.len(), STRUCTURED_HEADER_LEN + 6);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), NBD_REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&out[16..20]), 6);
        assert_eq!(be_u32(&out[20..24]), 28);
    }

    #[test]
    fn block_status_clips_to_the_request_and_drops_empty_extents() {
        let mut out = vec![0xaa]; // appends after existing bytes
        let n = encode_block_status(
            &mut out,
            1,
            &[ext(0, false), ext(100, true), ext(1000, false)],
            300,
            false,
        );
        assert_eq!(n, 2);
        let chunk = &out[1..];
        assert_eq!(be_u32(&chunk[16..20]), 4 + 16);
        assert_eq!(be_u32(&chunk[20..24]), BASE_ALLOCATION_ID);
        assert_eq!(
            (be_u32(&chunk[24..28]), be_u32(&chunk[28..32])),
            (100, NBD_STATE_HOLE | NBD_STATE_ZERO)
        );
        assert_eq!((be_u32(&chunk[32..36]), be_u32(&chunk[36..40])), (200, 0));
    }

    #[test]
    fn block_status_req_one_sends_one_and_empty_sends_none() {
        let mut out = Vec::new();
        assert_eq!(
            encode_block_status(&mut out, 1, &[ext(10, false), ext(10, true)], 20, true),
            1
        );
        let mut out = vec![1, 2, 3];
        assert_eq!(
            encode_block_status(&mut out, 1, &[ext(0, false)], 20, false),
            0
        );
        assert_eq!(out, vec![1, 2, 3]);
    }
}
