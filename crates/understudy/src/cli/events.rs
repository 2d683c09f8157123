//! `understudy events [--vm NAME] [--since TIME] [--follow] [--json]`: the host's event log
//! (`<data-dir>/events.log` and its rotated `events.log.1`, JSON lines, docs/events.md), read
//! from the files so it works with the daemon stopped too (when it is needed most).
//! `--follow` keeps printing new events, across a rotation, until interrupted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use proto::time::{now_unix_ns, unix_ns_from_rfc3339};
use proto::Event;

/// How often `--follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Longest line read from the log: an event is a few hundred bytes; a longer line is not one
/// of ours and is skipped rather than buffered without bound.
const EVENT_LINE_MAX_BYTES: u64 = 64 << 10;

pub struct Filter {
    pub vm: Option<String>,
    pub since_unix_ns: Option<u64>,
}

impl Filter {
    fn keeps(&self, e: &Event) -> bool {
        if let Some(vm) = &self.vm {
            if e.vm.as_deref() != Some(vm.as_str()) {
                return false;
            }
        }
        match self.since_unix_ns {
            Some(since) => unix_ns_from_rfc3339(&e.time).is_some_and(|t| t >= since),
            None => true,
        }
    }
}

/// `--since`: an RFC 3339 time, or a duration back from now (`90s`, `30m`, `4h`, `2d`).
pub fn parse_since(s: &str) -> anyhow::Result<u64> {
    if let Some(ns) = unix_ns_from_rfc3339(s) {
        return Ok(ns);
    }
    let secs = super::parse_duration_secs(s).map_err(|_| {
        anyhow::anyhow!(
            "--since {s:?}: give an RFC 3339 time (2026-12-03T18:30:00Z) or a duration back from now (30m, 4h, 2d)"
        )
    })?;
    Ok(now_unix_ns().saturating_sub(secs.saturating_mul(1_000_000_000)))
}

pub fn events(data_dir: &Path, filter: &Filter, follow: bool, json: bool) -> anyhow::Result<()> {
    let path = data_dir.join("events.log");
    let rotated = host::events::rotated_path(&path);
    let print = |e: &Event| {
        if !filter.keeps(e) {
            return;
        }
        if json {
            if let Ok(line) = serde_json::to_string(e) {
                out(&line);
            }
        } else {
            out(&format!(
                "{}  {:>4}  {:<7}  {:<16}  {}",
                e.time,
                e.id,
                e.level,
                e.vm.as_deref().unwrap_or("-"),
                e.message
            ));
        }
    };
    if let Ok(f) = File::open(&rotated) {
        let mut r = BufReader::new(f);
        while let Some(e) = next_event(&mut r)? {
            print(&e);
        }
    }
    let mut current = match File::open(&path) {
        Ok(f) => Some(Tail::new(f)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(t) = &mut current {
        t.drain(&mut |e| print(e))?;
    }
    if !follow {
        if current.is_none() && !rotated.exists() && !data_dir.exists() {
            anyhow::bail!("no data directory {}", data_dir.display());
        }
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        match &mut current {
            Some(t) => {
                t.drain(&mut |e| print(e))?;
                // Rotated (the daemon renamed it to .1): finish the old file (done above),
                // then read the new one from its start.
                if t.replaced(&path) {
                    if let Ok(f) = File::open(&path) {
                        let mut next = Tail::new(f)?;
                        t.drain(&mut |e| print(e))?;
                        next.drain(&mut |e| print(e))?;
                        *t = next;
                    }
                }
            }
            None => {
                if let Ok(f) = File::open(&path) {
                    let mut t = Tail::new(f)?;
                    t.drain(&mut |e| print(e))?;
                    current = Some(t);
                }
            }
        }
    }
}

/// Prints one line; a closed stdout (`events | head`) ends the command quietly.
fn out(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|_| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// The next event of a reader, skipping lines that are not one (torn, foreign or too long).
fn next_event(r: &mut impl BufRead) -> anyhow::Result<Option<Event>> {
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(EVENT_LINE_MAX_BYTES)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with(b"\n") && n as u64 == EVENT_LINE_MAX_BYTES {
            // Too long: skip to the end of that line.
            let mut rest = Vec::new();
            r.read_until(b'\n', &mut rest)?;
            continue;
        }
        if let Ok(e) = serde_json::from_slice::<Event>(&line) {
            return Ok(Some(e));
        }
    }
}

/// A file read as it grows: complete lines only (a line still being written waits).
struct Tail {
    file: File,
    inode: (u64, u64),
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(file: File) -> anyhow::Result<Tail> {
        let m = file.metadata()?;
        Ok(Tail {
            file,
            inode: (m.dev(), m.ino()),
            offset: 0,
            partial: Vec::new(),
        })
    }

    fn drain(&mut self, print: &mut dyn FnMut(&Event)) -> anyhow::Result<()> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        let n = self.file.read_to_end(&mut buf)?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            if self.partial.len() as u64 > EVENT_LINE_MAX_BYTES {
                self.partial.clear();
            }
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let mut r = BufReader::new(&complete[..]);
        while let Some(e) = next_event(&mut r)? {
            print(&e);
        }
        Ok(())
    }

    /// `path` is now another file than the one being read (rotation).
    fn replaced(&self, path: &Path) -> bool {
        match std::fs::metadata(path) {
            Ok(m) => (m.dev(), m.ino()) != self.inode,
            Err(_) => false,
        }
    }
}
