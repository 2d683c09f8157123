//! Fuzz the NBD handshake: the input is the client's byte stream after the greeting (client
//! flags, then options). It is cut into option headers and payloads exactly as the server
//! reads them and fed to the codec's Negotiator. It must never panic, and every reply it
//! produces must be a well-formed option reply (or the EXPORT_NAME answer).

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nbd::codec::negotiate::{Negotiator, Step, CLIENT_FLAGS_LEN};
use nbd::codec::option::{parse_option_header, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN};
use nbd::{MemoryBackend, StaticRegistry};

fuzz_target!(|data: &[u8]| {
    let registry = StaticRegistry::new();
    registry.add("", Arc::new(MemoryBackend::new(4096)));
    registry.add("disk", Arc::new(MemoryBackend::read_only(vec![0; 512])));
    let Some((flags, mut rest)) = data.split_first_chunk::<CLIENT_FLAGS_LEN>() else {
        return;
    };
    let Ok(mut negotiator) = Negotiator::new(*flags) else {
        return;
    };
    let mut out = Vec::new();
    while let Some((header, tail)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() {
        out.clear();
        let header = match parse_option_header(header) {
            Ok(h) => h,
            Err(_) => return,
        };
        let len = header.len_bytes as usize;
        if tail.len() < len {
            return;
        }
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        let step = negotiator.on_option(header, payload, &registry, &mut out);
        if header.code != 1 {
            check_replies(&out);
        }
        if !matches!(step, Step::Continue) {
            return;
        }
    }
});

fn check_replies(mut out: &[u8]) {
    while !out.is_empty() {
        assert!(out.len() >= OPTION_REPLY_HEADER_LEN, "truncated reply header");
        let len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
        assert!(out.len() >= OPTION_REPLY_HEADER_LEN + len, "truncated reply payload");
        out = &out[OPTION_REPLY_HEADER_LEN + len..];
    }
}
