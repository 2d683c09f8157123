//! A deliberately small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one request
//! at a time) used by `understudy demo` to play the guest. Tests use the real clients
//! (qemu-io, nbdcopy, fio, libnbd); this exists so the demo needs nothing installed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// Largest option reply we accept from the server.
const OPTION_REPLY_MAX_BYTES: u32 = 64 << 10;

pub struct NbdClient {
    sock: UnixStream,
    pub size_bytes: u64,
    cookie: u64,
}

impl NbdClient {
    pub fn connect(socket: &Path, export: &str) -> anyhow::Result<NbdClient> {
        let mut sock = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        if read_u64(&mut sock)? != NBDMAGIC || read_u64(&mut sock)? != IHAVEOPT {
            bail!("not a newstyle NBD server");
        }
        let _server_flags = read_u16(&mut sock)?;
        sock.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&opt)?;
        let mut size_bytes = None;
        loop {
            if read_u64(&mut sock)? != REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let _opt = read_u32(&mut sock)?;
            let typ = read_u32(&mut sock)?;
            let len = read_u32(&mut sock)?;
            if len > OPTION_REPLY_MAX_BYTES {
                bail!("option reply too long ({len} bytes)");
            }
            let mut data = vec![0u8; len as usize];
            sock.read_exact(&mut data)?;
            if typ & 0x8000_0000 != 0 {
                bail!(
                    "server refused export {export:?}: {}",
                    String::from_utf8_lossy(&data)
                );
            }
            if typ == REP_INFO
                && data.len() >= 12
                && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT
            {
                size_bytes = Some(u64::from_be_bytes(
                    data[2..10].try_into().expect("slice of 8"),
                ));
            }
            if typ == REP_ACK {
                break;
            }
        }
        let size_bytes = size_bytes.context("server sent no export size")?;
        Ok(NbdClient {
            sock,
            size_bytes,
            cookie: 0,
        })
    }

    fn request(
        &mut self,
        typ: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        self.cookie += 1;
        let mut hdr = Vec::with_capacity(28 + data.map_or(0, <[u8]>::len));
        hdr.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr.extend_from_slice(&0u16.to_be_bytes());
        hdr.extend_from_slice(&typ.to_be_bytes());
        hdr.extend_from_slice(&self.cookie.to_be_bytes());
        hdr.extend_from_slice(&offset.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        if let Some(d) = data {
            hdr.extend_from_slice(d);
        }
        self.sock.write_all(&hdr)?;
        Ok(())
    }

    fn reply(&mut self) -> anyhow::Result<()> {
        if read_u32(&mut self.sock)? != SIMPLE_REPLY_MAGIC {
            bail!("bad reply magic");
        }
        let err = read_u32(&mut self.sock)?;
        let cookie = read_u64(&mut self.sock)?;
        if cookie != self.cookie {
            bail!("reply for an unknown request");
        }
        if err != 0 {
            bail!("server returned error {err}");
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, Some(data))?;
        self.reply()
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        self.request(CMD_READ, offset, buf.len() as u32, None)?;
        self.reply()?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.request(CMD_FLUSH, 0, 0, None)?;
        self.reply()
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, None);
    }
}

fn read_u64(r: &mut impl Read) -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u16(r: &mut impl Read) -> anyhow::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
