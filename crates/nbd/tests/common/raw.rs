//! A deliberately minimal NBD client over a raw Unix socket: just enough of the protocol to
//! reach transmission and to send whatever bytes a test wants, valid or not.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

pub struct Raw {
    pub s: UnixStream,
    pub structured: bool,
}

/// An option reply: (option, type, data).
pub type OptReply = (u32, u32, Vec<u8>);

/// A transmission reply: (handle, error, data).
pub type Reply = (u64, u32, Vec<u8>);

impl Raw {
    /// Connects and exchanges greeting and flags (fixed newstyle, no zeroes).
    pub fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut raw = Raw {
            s,
            structured: false,
        };
        let mut greeting = [0u8; 18];
        raw.s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        raw.send(&3u32.to_be_bytes());
        raw
    }

    /// Connects and negotiates `export` (structured replies when asked) with NBD_OPT_GO.
    pub fn open(socket: &Path, export: &str, structured: bool) -> Raw {
        let mut raw = Raw::connect(socket);
        if structured {
            raw.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(raw.opt_reply().1, REP_ACK);
            raw.structured = true;
        }
        let mut p = (export.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        raw.option(OPT_GO, &p);
        loop {
            let (_, kind, _) = raw.opt_reply();
            match kind {
                REP_INFO => {}
                REP_ACK => return raw,
                other => panic!("NBD_OPT_GO failed with reply type {other:#x}"),
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    pub fn option(&mut self, code: u32, payload: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply header");
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("option reply data");
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        )
    }

    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads one reply; `read_len` is the data length expected for a successful simple read
    /// (simple replies do not carry it). Structured chunks are gathered until DONE.
    pub fn reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        match u32::from_be_bytes(magic) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).expect("simple reply");
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut data).expect("simple reply data");
                (handle, error, data)
            }
            0x668e_33ef => {
                let mut data = Vec::new();
                let mut error = 0;
                let mut first = true;
                loop {
                    if !first {
                        self.s.read_exact(&mut magic).expect("chunk magic");
                        assert_eq!(u32::from_be_bytes(magic), 0x668e_33ef);
                    }
                    first = false;
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h).expect("chunk header");
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let kind = u16::from_be_bytes([h[2], h[3]]);
                    let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                    let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                    let mut payload = vec![0u8; len];
                    self.s.read_exact(&mut payload).expect("chunk payload");
                    match kind {
                        1 => data.extend_from_slice(&payload[8..]),
                        k if k & 0x8000 != 0 => {
                            error = u32::from_be_bytes(payload[0..4].try_into().unwrap())
                        }
                        _ => data.extend_from_slice(&payload),
                    }
                    if flags & 1 != 0 {
                        return (handle, error, data);
                    }
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout;
    /// false when it sent data or stayed silent.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}
