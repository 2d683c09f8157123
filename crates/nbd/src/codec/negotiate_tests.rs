//! Handshake state machine tests: option sequences in, reply bytes out.

use super::*;
use crate::codec::option::{be_u32, be_u64, OPTION_REPLY_HEADER_LEN};
use crate::memory::MemoryBackend;
use crate::registry::StaticRegistry;
use proptest::prelude::*;

fn registry() -> StaticRegistry {
    let reg = StaticRegistry::new();
    reg.add_with_description("disk", "the disk", Arc::new(MemoryBackend::new(1 << 20)));
    reg.add("ro", Arc::new(MemoryBackend::read_only(vec![0; 4096])));
    reg
}

/// Splits option replies into (option, type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(be_u64(&out[0..8]), OPTION_REPLY_MAGIC);
        let len = be_u32(&out[16..20]) as usize;
        v.push((
            be_u32(&out[8..12]),
            be_u32(&out[12..16]),
            out[20..20 + len].to_vec(),
        ));
        out = &out[OPTION_REPLY_HEADER_LEN + len..];
    }
    v
}

fn opt(
    n: &mut Negotiator,
    reg: &StaticRegistry,
    code: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Step {
    out.clear();
    let header = OptionHeader {
        code,
        len_bytes: payload.len() as u32,
    };
    n.on_option(header, payload, reg, out)
}

fn name_payload(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(tail);
    p
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut tail = (queries.len() as u32).to_be_bytes().to_vec();
    for q in queries {
        tail.extend_from_slice(&(q.len() as u32).to_be_bytes());
        tail.extend_from_slice(q.as_bytes());
    }
    name_payload(name, &tail)
}

fn client(flags: u32) -> Negotiator {
    Negotiator::new(flags.to_be_bytes()).expect("known flags")
}

#[test]
fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let g = greeting();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    );
}

#[test]
fn unknown_client_flags_end_the_handshake() {
    assert!(matches!(
        Negotiator::new(4u32.to_be_bytes()),
        Err(ProtocolError::UnknownClientFlags(4))
    ));
}

#[test]
fn go_sends_export_info_block_size_then_ack_and_transmits() {
    let reg = registry();
    let mut n = client(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    let mut out = Vec::new();
    let p = name_payload("disk", &[0, 3, 0, 3, 0, 1, 0, 3]); // BLOCK_SIZE, NAME, BLOCK_SIZE again
    let Step::Transmit(session) = opt(&mut n, &reg, NBD_OPT_GO, &p, &mut out) else {
        panic!("no session")
    };
    assert_eq!(session.size_bytes, 1 << 20);
    assert!(!session.structured_replies && !session.base_allocation);
    let r = replies(&out);
    assert_eq!(r.len(), 4, "EXPORT, BLOCK_SIZE once, NAME, ACK: {r:?}");
    assert_eq!(r[0].1, NBD_REP_INFO);
    assert_eq!(u16::from_be_bytes([r[0].2[0], r[0].2[1]]), NBD_INFO_EXPORT);
    assert_eq!(be_u64(&r[0].2[2..10]), 1 << 20);
    let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
    assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(&r[1].2[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    assert_eq!(&r[2].2[2..], b"disk");
    assert_eq!(r[3].1, NBD_REP_ACK);
}

#[test]
fn info_does_not_transmit_and_unknown_export_is_err_unknown() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    assert!(matches!(
        opt(
            &mut n,
            &reg,
            NBD_OPT_INFO,
            &name_payload("ro", &[0, 0]),
            &mut out
        ),
        Step::Continue
    ));
    let r = replies(&out);
    let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert!(matches!(
        opt(
            &mut n,
            &reg,
            NBD_OPT_GO,
            &name_payload("nope", &[0, 0]),
            &mut out
        ),
        Step::Continue
    ));
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_UNKNOWN);
}

#[test]
fn malformed_go_is_invalid_and_haggling_continues() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_GO, &[0, 0, 0, 9, b'x'], &mut out),
        Step::Continue
    ));
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_INVALID);
}

#[test]
fn export_name_pads_unless_no_zeroes_and_closes_on_unknown() {
    let reg = registry();
    let mut out = Vec::new();
    let mut n = client(1);
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_EXPORT_NAME, b"disk", &mut out),
        Step::Transmit(_)
    ));
    assert_eq!(out.len(), 8 + 2 + 124);
    let mut n = client(3);
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_EXPORT_NAME, b"disk", &mut out),
        Step::Transmit(_)
    ));
    assert_eq!(out.len(), 10);
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_EXPORT_NAME, b"nope", &mut out),
        Step::Close
    ));
    assert!(out.is_empty());
}

#[test]
fn list_names_every_export() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    opt(&mut n, &reg, NBD_OPT_LIST, &[], &mut out);
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[0].1, &r[0].2[4..]),
        (NBD_REP_SERVER, &b"diskthe disk"[..])
    );
    assert_eq!((r[1].1, &r[1].2[4..]), (NBD_REP_SERVER, &b"ro"[..]));
    assert_eq!(r[2].1, NBD_REP_ACK);
}

#[test]
fn abort_acks_then_closes_and_unknown_options_are_unsup() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    assert!(matches!(
        opt(&mut n, &reg, 11, &[1, 2, 3], &mut out),
        Step::Continue
    ));
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_UNSUP);
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_STARTTLS, &[], &mut out),
        Step::Continue
    ));
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_UNSUP);
    assert!(matches!(
        opt(&mut n, &reg, NBD_OPT_ABORT, &[], &mut out),
        Step::Close
    ));
    assert_eq!(replies(&out)[0].1, NBD_REP_ACK);
    assert!(matches!(
        n.on_oversized_option(NBD_OPT_GO, &mut out),
        Step::Close
    ));
}

#[test]
fn set_meta_context_needs_structured_replies_and_the_same_export() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    opt(
        &mut n,
        &reg,
        NBD_OPT_SET_META_CONTEXT,
        &meta("disk", &[BASE_ALLOCATION]),
        &mut out,
    );
    assert_eq!(replies(&out)[0].1, NBD_REP_ERR_INVALID);
    opt(&mut n, &reg, NBD_OPT_STRUCTURED_REPLY, &[], &mut out);
    assert_eq!(replies(&out)[0].1, NBD_REP_ACK);
    opt(
        &mut n,
        &reg,
        NBD_OPT_SET_META_CONTEXT,
        &meta("disk", &["qemu:x", BASE_ALLOCATION]),
        &mut out,
    );
    let r = replies(&out);
    assert_eq!(r[0].1, NBD_REP_META_CONTEXT);
    assert_eq!(be_u32(&r[0].2[0..4]), BASE_ALLOCATION_ID);
    assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(r[1].1, NBD_REP_ACK);
    // GO on another export: no base:allocation there.
    let Step::Transmit(s) = opt(
        &mut n,
        &reg,
        NBD_OPT_GO,
        &name_payload("ro", &[0, 0]),
        &mut out,
    ) else {
        panic!()
    };
    assert!(s.structured_replies && !s.base_allocation);
    let Step::Transmit(s) = opt(
        &mut n,
        &reg,
        NBD_OPT_GO,
        &name_payload("disk", &[0, 0]),
        &mut out,
    ) else {
        panic!()
    };
    assert!(s.base_allocation);
}

#[test]
fn list_meta_context_wildcards() {
    let reg = registry();
    let mut n = client(1);
    let mut out = Vec::new();
    for queries in [&[][..], &["base:"][..], &[BASE_ALLOCATION][..]] {
        opt(
            &mut n,
            &reg,
            NBD_OPT_LIST_META_CONTEXT,
            &meta("disk", queries),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
    }
    opt(
        &mut n,
        &reg,
        NBD_OPT_LIST_META_CONTEXT,
        &meta("disk", &["qemu:"]),
        &mut out,
    );
    assert_eq!(replies(&out).len(), 1);
}

/// A backend with its own contexts `x:a` and `x:b`.
struct WithContexts(MemoryBackend);

impl BlockBackend for WithContexts {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(data, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> std::io::Result<()> {
        self.0.write_zeroes(o, l, t, f)
    }
    fn meta_contexts(&self, prefix: &str) -> Vec<String> {
        ["x:a", "x:b"]
            .iter()
            .filter(|c| c.starts_with(prefix))
            .map(|c| c.to_string())
            .collect()
    }
    fn has_meta_context(&self, name: &str) -> bool {
        name == "x:a" || name == "x:b"
    }
}

#[test]
fn a_backends_contexts_are_listed_by_prefix_and_selected_after_base_allocation() {
    let reg = registry();
    reg.add("ctx", Arc::new(WithContexts(MemoryBackend::new(4096))));
    let mut n = client(1);
    let mut out = Vec::new();
    let names = |out: &[u8]| -> Vec<(u32, String)> {
        replies(out)
            .into_iter()
            .filter(|r| r.1 == NBD_REP_META_CONTEXT)
            .map(|r| {
                (
                    be_u32(&r.2[0..4]),
                    String::from_utf8(r.2[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    };
    opt(
        &mut n,
        &reg,
        NBD_OPT_LIST_META_CONTEXT,
        &meta("ctx", &[]),
        &mut out,
    );
    assert_eq!(names(&out).len(), 3);
    opt(
        &mut n,
        &reg,
        NBD_OPT_LIST_META_CONTEXT,
        &meta("ctx", &["x:"]),
        &mut out,
    );
    assert_eq!(names(&out), vec![(0, "x:a".into()), (0, "x:b".into())]);
    opt(&mut n, &reg, NBD_OPT_STRUCTURED_REPLY, &[], &mut out);
    opt(
        &mut n,
        &reg,
        NBD_OPT_SET_META_CONTEXT,
        &meta("ctx", &["x:b", "x:nope", "x:b", BASE_ALLOCATION]),
        &mut out,
    );
    assert_eq!(
        names(&out),
        vec![
            (2, "x:b".into()),
            (BASE_ALLOCATION_ID, BASE_ALLOCATION.into())
        ]
    );
    let Step::Transmit(s) = opt(
        &mut n,
        &reg,
        NBD_OPT_GO,
        &name_payload("ctx", &[0, 0]),
        &mut out,
    ) else {
        panic!()
    };
    assert!(s.base_allocation);
    assert_eq!(s.contexts, vec![(2, "x:b".to_string())]);
    // Only the backend's context: BLOCK_STATUS answers it alone.
    opt(
        &mut n,
        &reg,
        NBD_OPT_SET_META_CONTEXT,
        &meta("ctx", &["x:a"]),
        &mut out,
    );
    let Step::Transmit(s) = opt(
        &mut n,
        &reg,
        NBD_OPT_GO,
        &name_payload("ctx", &[0, 0]),
        &mut out,
    ) else {
        panic!()
    };
    assert!(!s.base_allocation);
    assert_eq!(s.contexts, vec![(2, "x:a".to_string())]);
    // Another export has none of them.
    opt(
        &mut n,
        &reg,
        NBD_OPT_SET_META_CONTEXT,
        &meta("disk", &["x:a"]),
        &mut out,
    );
    assert!(names(&out).is_empty());
}

proptest! {
    /// Any sequence of options with arbitrary payloads: no panic, replies always parse.
    #[test]
    fn arbitrary_option_sequences_never_panic(
        opts in proptest::collection::vec((0u32..14, proptest::collection::vec(any::<u8>(), 0..64)), 0..12)
    ) {
        let reg = registry();
        let mut n = client(1);
        let mut out = Vec::new();
        for (code, payload) in opts {
            let step = opt(&mut n, &reg, code, &payload, &mut out);
            if code != NBD_OPT_EXPORT_NAME {
                let _ = replies(&out);
            }
            if !matches!(step, Step::Continue) {
                break;
            }
        }
    }
}
