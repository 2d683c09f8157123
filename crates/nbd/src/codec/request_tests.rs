//! Request validation tests: every error the spec asks for, and fuzz-style properties.

use super::*;
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

fn view() -> ExportView {
    ExportView {
        size_bytes: SIZE,
        read_only: false,
        structured_replies: true,
        base_allocation: true,
    }
}

fn hdr(command: u16, flags: u16, offset: u64, len_bytes: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        handle: 42,
        offset,
        len_bytes,
    }
}

fn encode(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.len_bytes.to_be_bytes());
    b
}

fn rejected(d: Decision) -> (NbdErrno, u32, bool) {
    match d {
        Decision::Reject(r) => (r.error, r.payload_bytes, r.structured),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn bad_magic_closes() {
    let mut b = encode(&hdr(NBD_CMD_READ, 0, 0, 1));
    b[0] = 0;
    assert!(matches!(
        parse_request(&b, &view()),
        Some(Decision::Close(ProtocolError::BadRequestMagic(_)))
    ));
    assert!(parse_request(&b[..27], &view()).is_none());
}

#[test]
fn in_range_requests_execute() {
    let d = decide(
        &hdr(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, SIZE - 4096, 4096),
        &view(),
    );
    assert_eq!(
        d,
        Decision::Execute(Request {
            handle: 42,
            offset: SIZE - 4096,
            len_bytes: 4096,
            command: Command::Write { fua: true }
        })
    );
    let d = decide(
        &hdr(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            0,
            10,
        ),
        &view(),
    );
    assert!(matches!(
        d,
        Decision::Execute(Request {
            command: Command::WriteZeroes {
                may_trim: false,
                fua: false,
                fast: true
            },
            ..
        })
    ));
    let d = decide(
        &hdr(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 10),
        &view(),
    );
    assert!(matches!(
        d,
        Decision::Execute(Request {
            command: Command::BlockStatus { req_one: true },
            ..
        })
    ));
    // FLUSH and DISC ignore their (meaningless) range.
    assert!(matches!(
        decide(&hdr(NBD_CMD_FLUSH, 0, u64::MAX, 9), &view()),
        Decision::Execute(_)
    ));
    assert!(matches!(
        decide(&hdr(NBD_CMD_DISC, 0, 0, 0), &view()),
        Decision::Execute(_)
    ));
}

#[test]
fn out_of_range_read_is_einval_as_a_structured_error() {
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_READ, 0, SIZE - 1, 2), &view())),
        (NbdErrno::Inval, 0, true)
    );
    let simple = ExportView {
        structured_replies: false,
        ..view()
    };
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_READ, 0, SIZE, 1), &simple)),
        (NbdErrno::Inval, 0, false)
    );
    // offset + len overflows u64
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_TRIM, 0, u64::MAX, 2), &view())).0,
        NbdErrno::Inval
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_CACHE, 0, SIZE, 1), &view())).0,
        NbdErrno::Inval
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_BLOCK_STATUS, 0, SIZE, 1), &view())).0,
        NbdErrno::Inval
    );
}

#[test]
fn out_of_range_writes_are_enospc_and_keep_their_payload_to_skip() {
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_WRITE, 0, SIZE, 512), &view())),
        (NbdErrno::NoSpc, 512, false)
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_WRITE_ZEROES, 0, SIZE, 512), &view())),
        (NbdErrno::NoSpc, 0, false)
    );
}

#[test]
fn writes_on_read_only_are_eperm() {
    let ro = ExportView {
        read_only: true,
        ..view()
    };
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_WRITE, 0, 0, 512), &ro)),
        (NbdErrno::Perm, 512, false)
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_TRIM, 0, 0, 512), &ro)).0,
        NbdErrno::Perm
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_WRITE_ZEROES, 0, 0, 512), &ro)).0,
        NbdErrno::Perm
    );
    assert!(matches!(
        decide(&hdr(NBD_CMD_READ, 0, 0, 512), &ro),
        Decision::Execute(_)
    ));
}

#[test]
fn oversized_write_closes_but_oversized_read_is_einval() {
    let big = REQUEST_PAYLOAD_BYTES_MAX + 1;
    assert!(matches!(
        decide(&hdr(NBD_CMD_WRITE, 0, 0, big), &view()),
        Decision::Close(ProtocolError::OversizedWrite { .. })
    ));
    let huge = ExportView {
        size_bytes: u64::MAX,
        ..view()
    };
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_READ, 0, 0, big), &huge)).0,
        NbdErrno::Inval
    );
    // Commands without payload may cover more than the payload bound.
    assert!(matches!(
        decide(&hdr(NBD_CMD_TRIM, 0, 0, big), &huge),
        Decision::Execute(_)
    ));
}

#[test]
fn unknown_commands_and_misplaced_flags_are_einval() {
    assert_eq!(
        rejected(decide(&hdr(99, 0, 0, 0), &view())).0,
        NbdErrno::Inval
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_READ, 1 << 2, 0, 1), &view())).0,
        NbdErrno::Inval
    ); // DF
    assert_eq!(
        rejected(decide(
            &hdr(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 8),
            &view()
        )),
        (NbdErrno::Inval, 8, false)
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_READ, 1 << 15, 0, 1), &view())).0,
        NbdErrno::Inval
    );
    // FUA is accepted everywhere (some clients set it on reads).
    assert!(matches!(
        decide(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 1), &view()),
        Decision::Execute(_)
    ));
}

#[test]
fn block_status_needs_the_negotiated_context_and_a_length() {
    let no_ctx = ExportView {
        base_allocation: false,
        ..view()
    };
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &no_ctx)).0,
        NbdErrno::Inval
    );
    assert_eq!(
        rejected(decide(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &view())).0,
        NbdErrno::Inval
    );
}

proptest! {
    #[test]
    fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), size in any::<u64>(), ro in any::<bool>(), sr in any::<bool>()) {
        let v = ExportView { size_bytes: size, read_only: ro, structured_replies: sr, base_allocation: sr };
        let _ = parse_request(&bytes, &v);
    }

    /// Round trip, and the central invariant: an executed request with a range lies inside
    /// the export and within the payload bound.
    #[test]
    fn executed_requests_are_in_range(command in 0u16..10, flags in any::<u16>(), offset in 0u64..(2 * SIZE), len in 0u32..(2 * SIZE as u32), handle in any::<u64>()) {
        let h = RequestHeader { flags, command, handle, offset, len_bytes: len };
        prop_assert_eq!(parse_request_header(&encode(&h)), Ok(h));
        match decide(&h, &view()) {
            Decision::Execute(r) => {
                prop_assert_eq!(r.handle, handle);
                if !matches!(r.command, Command::Flush | Command::Disconnect) {
                    prop_assert!(r.offset + u64::from(r.len_bytes) <= SIZE);
                }
            }
            Decision::Reject(r) => {
                prop_assert_eq!(r.handle, handle);
                prop_assert_eq!(r.payload_bytes, if command == NBD_CMD_WRITE { len } else { 0 });
            }
            Decision::Close(_) => prop_assert!(command == NBD_CMD_WRITE && len > REQUEST_PAYLOAD_BYTES_MAX),
        }
    }
}
