//! Fuzz the delta decoder with arbitrary bytes: it must never panic, never allocate beyond one
//! frame, and never report a verified footer for bytes that were not written with the key.
//! The first input byte picks the path: the pull reader or the push decoder with that chunk size.

#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x5a; 32];

/// A genuine header (made with KEY), so frame parsing is reached: the keyed header MAC would
/// otherwise stop nearly every input at the first bytes.
fn valid_header() -> Vec<u8> {
    let header = delta::DeltaHeader {
        app_consistent: false,
        vm_id: delta::VmName::parse("fuzz").unwrap(),
        generation: delta::Generation(1),
        seq: delta::Seq(2),
        parent_seq: delta::Seq(1),
        cut_time_unix_ns: 1,
        kind: delta::DeltaKind::Incremental,
        compression: delta::Compression::Zstd,
        disks: vec![
            delta::DiskEntry { index: 0, size_bytes: 1 << 20 },
            delta::DiskEntry { index: 3, size_bytes: 64 << 10 },
        ],
    };
    let w = delta::DeltaWriter::new(Vec::new(), &header, &KEY).expect("valid header");
    let (mut out, _) = w.finish().expect("empty delta");
    // Drop the footer (the last 64 bytes) to keep only the header.
    out.truncate(out.len() - 64);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let owned;
    let bytes = if mode & 0x80 != 0 {
        owned = [valid_header().as_slice(), rest].concat();
        owned.as_slice()
    } else {
        rest
    };
    let mode = mode & 0x7f;
    if mode & 1 == 0 {
        if let Ok(mut r) = delta::DeltaReader::new(bytes, &KEY) {
            while let Ok(Some(_)) = r.next_frame() {}
        }
    } else {
        let mut p = delta::PushDecoder::new(&KEY);
        let chunk = usize::from(mode >> 1).max(1);
        for piece in bytes.chunks(chunk) {
            if p.feed::<delta::DeltaError>(piece, |_| Ok(())).is_err() {
                break;
            }
        }
        let _ = p.finish();
    }
    // Stored-frame re-reads parse untrusted bytes too.
    if let Ok(f) = delta::decode_stored_frame(bytes, 0) {
        let _ = f.data();
    }
});
