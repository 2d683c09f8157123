//! Fuzz NBD transmission request parsing: the first byte picks the session (export size
//! class, read-only, structured replies, base:allocation), the rest is read as a stream of
//! 28-byte request headers. Parsing must never panic, and any request the codec lets through
//! must lie inside the export and within the payload bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::codec::request::{parse_request, Command, Decision, ExportView, REQUEST_HEADER_LEN};
use nbd::limits::REQUEST_PAYLOAD_BYTES_MAX;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let size_bytes = match mode & 3 {
        0 => 0,
        1 => 4096,
        2 => 1 << 30,
        _ => u64::MAX,
    };
    let view = ExportView {
        size_bytes,
        read_only: mode & 4 != 0,
        structured_replies: mode & 8 != 0,
        base_allocation: mode & 16 != 0,
    };
    for chunk in rest.chunks(REQUEST_HEADER_LEN) {
        let Some(decision) = parse_request(chunk, &view) else {
            return;
        };
        if let Decision::Execute(r) = decision {
            let end = r.offset.checked_add(u64::from(r.len_bytes));
            match r.command {
                Command::Flush | Command::Disconnect => {}
                Command::Read | Command::Write { .. } => {
                    assert!(end.is_some_and(|e| e <= size_bytes));
                    assert!(r.len_bytes <= REQUEST_PAYLOAD_BYTES_MAX);
                }
                _ => assert!(end.is_some_and(|e| e <= size_bytes)),
            }
            if view.read_only {
                assert!(!matches!(r.command, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }));
            }
        }
    }
});
