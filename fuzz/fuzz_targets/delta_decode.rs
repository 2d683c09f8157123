//! Fuzz the delta decoder with arbitrary bytes: it must never panic, never allocate beyond one
//! frame, and never report a verified footer for bytes that were not written with the key.
//! The first input byte picks the path: the pull reader or the push decoder with that chunk size.

#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
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
