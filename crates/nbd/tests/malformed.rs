//! Hostile and broken clients over raw sockets: each must get the error the spec asks for,
//! or lose its own connection, while other clients are served normally.

mod common;

use std::time::{Duration, Instant};

use common::raw::*;
use common::{test_config, TestServer};
use understudy_nbd::ServerConfig;

const SIZE: u64 = 1 << 20;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EPERM: u32 = 1;

fn server() -> TestServer {
    TestServer::start(&[("disk", SIZE), ("disk-ro", SIZE)], test_config())
}

/// A full round trip on a fresh connection: the server still serves.
fn assert_serves(t: &TestServer) {
    let mut c = Raw::open(&t.socket, "disk", true);
    c.request(CMD_WRITE, 0, 1, 0, 4, b"live");
    assert_eq!(c.reply(0), (1, 0, vec![]));
    c.request(CMD_READ, 0, 2, 0, 4, &[]);
    assert_eq!(c.reply(4), (2, 0, b"live".to_vec()));
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn garbage_during_option_haggling_closes_only_that_connection() {
    let t = server();
    let mut c = Raw::connect(&t.socket);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed_by_server());
    assert_serves(&t);
}

#[test]
fn option_with_absurd_length_gets_too_big_then_close() {
    let t = server();
    let mut c = Raw::connect(&t.socket);
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&header);
    let (opt, kind, _) = c.opt_reply();
    assert_eq!((opt, kind), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(c.closed_by_server());
    assert_serves(&t);
}

#[test]
fn opt_abort_is_acknowledged_then_closed() {
    let t = server();
    let mut c = Raw::connect(&t.socket);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().1, REP_ACK);
    assert!(c.closed_by_server());
}

#[test]
fn read_past_the_end_is_einval_and_the_connection_continues() {
    let t = server();
    for structured in [true, false] {
        let mut c = Raw::open(&t.socket, "disk", structured);
        c.request(CMD_READ, 0, 7, SIZE - 512, 1024, &[]);
        assert_eq!(
            c.reply(1024),
            (7, EINVAL, vec![]),
            "structured={structured}"
        );
        c.request(CMD_READ, 0, 8, u64::MAX - 10, 512, &[]);
        assert_eq!(c.reply(512), (8, EINVAL, vec![]));
        c.request(CMD_READ, 0, 9, SIZE - 512, 512, &[]);
        assert_eq!(c.reply(512), (9, 0, vec![0; 512]));
    }
}

#[test]
fn write_past_the_end_is_enospc_and_its_payload_is_skipped() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk", true);
    c.request(CMD_WRITE, 0, 1, SIZE - 2, 4, b"abcd");
    // If the payload were not skipped, "abcd" would be parsed as the next header.
    c.request(CMD_WRITE, 0, 2, 0, 4, b"wxyz");
    assert_eq!(c.reply(0), (1, ENOSPC, vec![]));
    assert_eq!(c.reply(0), (2, 0, vec![]));
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk-ro", false);
    c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd");
    assert_eq!(c.reply(0), (1, EPERM, vec![]));
    c.request(CMD_READ, 0, 2, 0, 4, &[]);
    assert_eq!(c.reply(4), (2, 0, vec![0; 4]));
}

#[test]
fn unknown_command_and_unknown_flags_are_einval() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk", false);
    c.request(42, 0, 1, 0, 0, &[]);
    assert_eq!(c.reply(0), (1, EINVAL, vec![]));
    c.request(CMD_FLUSH, 1 << 9, 2, 0, 0, &[]);
    assert_eq!(c.reply(0), (2, EINVAL, vec![]));
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply(0), (3, 0, vec![]));
}

#[test]
fn oversized_write_closes_that_connection_and_others_are_served() {
    let t = server();
    let mut other = Raw::open(&t.socket, "disk", false);
    let mut c = Raw::open(&t.socket, "disk", false);
    c.request(CMD_WRITE, 0, 1, 0, 64 << 20, &[0; 4096]);
    assert!(c.closed_by_server());
    other.request(CMD_READ, 0, 5, 0, 16, &[]);
    assert_eq!(other.reply(16).1, 0);
    assert_serves(&t);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk", false);
    c.send(&[0xde; 28]);
    assert!(c.closed_by_server());
    assert_serves(&t);
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout_while_others_are_served() {
    let t = server();
    let silent = std::os::unix::net::UnixStream::connect(&t.socket).expect("connect");
    let start = Instant::now();
    assert_serves(&t); // a normal client is served while the silent one waits
    wait_until("silent client dropped", || {
        t.server().connection_count() == 0
    });
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "dropped too early: {waited:?}"
    );
    drop(silent);
}

#[test]
fn disconnect_ends_the_connection_after_pending_replies() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk", false);
    c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd");
    c.request(CMD_DISC, 0, 2, 0, 0, &[]);
    assert_eq!(c.reply(0), (1, 0, vec![]));
    assert!(c.closed_by_server());
    wait_until("connection released", || t.server().connection_count() == 0);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let cfg = ServerConfig {
        max_connections: 2,
        ..test_config()
    };
    let t = TestServer::start(&[("disk", SIZE)], cfg);
    let _a = Raw::open(&t.socket, "disk", false);
    let _b = Raw::open(&t.socket, "disk", false);
    let mut third = std::os::unix::net::UnixStream::connect(&t.socket).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 18];
    let n = std::io::Read::read(&mut third, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "third connection should be closed without a greeting");
    assert_eq!(t.server().connection_count(), 2);
}

#[test]
fn pipelined_requests_all_get_their_own_reply() {
    let t = server();
    let mut c = Raw::open(&t.socket, "disk", true);
    let data = common::pattern(64 * 4096, 3);
    for i in 0..64u64 {
        let chunk = &data[i as usize * 4096..(i as usize + 1) * 4096];
        c.request(CMD_WRITE, 0, 1000 + i, i * 4096, 4096, chunk);
    }
    let mut handles: Vec<u64> = (0..64)
        .map(|_| c.reply(0))
        .map(|(h, e, _)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (1000..1064).collect::<Vec<_>>());
    for i in 0..64u64 {
        c.request(CMD_READ, 0, i, i * 4096, 4096, &[]);
    }
    for _ in 0..64 {
        let (h, e, got) = c.reply(4096);
        assert_eq!(e, 0);
        assert_eq!(
            got,
            data[h as usize * 4096..(h as usize + 1) * 4096],
            "handle {h}"
        );
    }
}

#[test]
fn shutdown_closes_clients_and_removes_the_socket() {
    let mut t = server();
    let mut c = Raw::open(&t.socket, "disk", false);
    t.server.take().expect("running").shutdown();
    assert!(c.closed_by_server());
    assert!(!t.socket.exists());
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_refused() {
    let t = server();
    let again = understudy_nbd::NbdServer::serve_unix(&t.socket, t.registry.clone(), test_config());
    assert!(
        again.is_err(),
        "a second server must not steal a live socket"
    );
    let stale = t.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let s = understudy_nbd::NbdServer::serve_unix(&stale, t.registry.clone(), test_config())
        .expect("replace stale");
    let mut c = Raw::open(&stale, "disk", false);
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(c.reply(0), (1, 0, vec![]));
    s.shutdown();
}

#[test]
fn closing_one_exports_connections_leaves_the_others() {
    let t = server();
    let mut a = Raw::open(&t.socket, "disk", false);
    let mut b = Raw::open(&t.socket, "disk-ro", false);
    wait_until("both connections registered", || {
        t.server().connection_count() == 2
    });
    assert_eq!(t.server().close_export_connections("disk"), 1);
    assert!(a.closed_by_server());
    b.request(CMD_READ, 0, 1, 0, 8, &[]);
    assert_eq!(b.reply(8), (1, 0, vec![0; 8]));
}

/// A memory disk whose reads fail (EIO) when they touch one 4 KiB block.
struct FailingBlock {
    inner: understudy_nbd::MemoryBackend,
    bad_offset: u64,
}

impl understudy_nbd::BlockBackend for FailingBlock {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset <= self.bad_offset && self.bad_offset < offset + buf.len() as u64 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.inner.write_at(data, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
}

/// Reads sent in one burst are served in batches by one worker (READ_BATCH_MAX per hand-off
/// of the reader lock, replies gathered into one write). Every read still gets exactly its own
/// reply: data, a backend error, an empty read, and the requests that end a batch (a large
/// read, an out-of-range read) in between. Run with simple and structured replies.
#[test]
fn burst_of_reads_each_get_their_own_reply_in_batches() {
    use understudy_nbd::BlockBackend;
    const EIO: u32 = 5;
    let cfg = ServerConfig {
        workers_per_connection: 1,
        ..test_config()
    };
    let t = TestServer::start(&[("disk", SIZE)], cfg);
    let data = common::pattern(SIZE as usize, 11);
    let backend = FailingBlock {
        inner: understudy_nbd::MemoryBackend::new(SIZE as usize),
        bad_offset: 40 * 4096,
    };
    backend.write_at(&data, 0, false).expect("fill");
    t.registry.add("flaky", std::sync::Arc::new(backend));
    for structured in [false, true] {
        let mut c = Raw::open(&t.socket, "flaky", structured);
        // (handle, offset, len, expected error)
        let mut reqs: Vec<(u64, u64, u32, u32)> = vec![
            (1, 0, 4096, 0),
            (2, 40 * 4096, 4096, EIO),
            (3, 8192, 0, 0),
            (4, 256 * 1024, 128 * 1024, 0),
            (5, SIZE, 4096, EINVAL),
            (6, 12288, 65536, 0),
        ];
        for i in 0..20u64 {
            let offset = (i * 7919 * 4096) % (SIZE - 4096);
            let offset = if offset / 4096 == 40 {
                offset + 4096
            } else {
                offset
            };
            reqs.push((100 + i, offset, 4096, 0));
        }
        let mut burst = Vec::new();
        for &(handle, offset, len, _) in &reqs {
            burst.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            burst.extend_from_slice(&0u16.to_be_bytes());
            burst.extend_from_slice(&CMD_READ.to_be_bytes());
            burst.extend_from_slice(&handle.to_be_bytes());
            burst.extend_from_slice(&offset.to_be_bytes());
            burst.extend_from_slice(&len.to_be_bytes());
        }
        c.send(&burst);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..reqs.len() {
            // One worker answers in order, so the next reply's length is known.
            let &(handle, offset, len, error) = &reqs[seen.len()];
            let (h, e, got) = c.reply(len as usize);
            assert_eq!((h, e), (handle, error), "structured={structured}");
            if error == 0 {
                let range = offset as usize..(offset + u64::from(len)) as usize;
                assert!(
                    got == data[range],
                    "handle {h}: wrong data (structured={structured})"
                );
            }
            assert!(seen.insert(h));
        }
        // The connection is still in step.
        c.request(CMD_READ, 0, 999, 4096, 4096, &[]);
        assert_eq!(c.reply(4096), (999, 0, data[4096..8192].to_vec()));
    }
}
