//! Application-consistent cuts: freezing a guest's filesystems around the cut, through the QEMU
//! guest agent (`qemu-ga`, JSON lines over the unix socket of its virtio-serial channel) or
//! through user hooks (`vm set --pre-freeze-hook/--post-thaw-hook`). See docs/guest-agent.md.
//!
//! Everything here is blocking and bounded: it runs on the cut's blocking thread, every read
//! and write has a deadline, and a hook that outlives its timeout is killed. A failure never
//! stalls the guest or the cycle: the caller takes the cut crash-consistent. Once a freeze was
//! attempted (even one that failed or timed out, since the agent may still carry it out), a
//! thaw is always sent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a VM's guest is quiesced for application-consistent points (`vm set`), stored in the
/// VM's catalog record (`docs/formats/catalog.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSettings {
    /// Unix socket of the VM's `org.qemu.guest_agent.0` channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<String>,
    /// Shell command run before the cut (`sh -c`); non-zero exit or timeout is a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_freeze_hook: Option<String>,
    /// Shell command run after the cut whenever the pre-freeze hook was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_thaw_hook: Option<String>,
}

impl GuestSettings {
    /// True when the VM can be quiesced at all (an agent or a pre-freeze hook).
    pub fn can_quiesce(&self) -> bool {
        self.agent_socket.is_some() || self.pre_freeze_hook.is_some()
    }
}

/// Connecting, `guest-sync-delimited` and `guest-fsfreeze-status`: a live agent answers in
/// milliseconds (a TCG guest in well under a second); an agent that does not answer in this
/// time is absent or hung, and the cut goes on crash-consistent.
pub const AGENT_STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// `guest-fsfreeze-freeze` syncs the guest's dirty data first, so it may take longer than a
/// plain request; beyond this the guest's writes have waited long enough: the cut goes on
/// crash-consistent (and a thaw is sent, in case the freeze still lands).
pub const AGENT_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// `guest-fsfreeze-thaw`: the guest is stalled until it lands, so it is bounded like a freeze.
pub const AGENT_THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// A pre-freeze or post-thaw hook that has not exited after this long is killed (its process
/// group) and counts as a failure.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest agent answer line kept: real answers are under 1 KiB; a peer that sends more without
/// a newline is broken, and memory stays bounded.
const AGENT_LINE_BYTES_MAX: usize = 64 * 1024;

/// Ids for `guest-sync-delimited`, unique per process so a stale answer is never taken for a
/// fresh one.
static SYNC_ID: AtomicU64 = AtomicU64::new(1);

/// One connection to a guest agent, every step bounded.
struct Agent {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Agent {
    /// Connects and resynchronizes (`guest-sync-delimited`): answers left over from an earlier
    /// session are skipped.
    fn connect(socket: &Path) -> Result<Agent, String> {
        let stream = connect_bounded(socket, AGENT_STEP_TIMEOUT).map_err(|e| {
            format!(
                "cannot connect to the guest agent at {}: {e}",
                socket.display()
            )
        })?;
        let mut agent = Agent {
            stream,
            buf: Vec::new(),
        };
        let id =
            SYNC_ID.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 1_000_000;
        // A 0xFF first makes the agent drop any partial request a previous client left.
        agent.send(&[0xFFu8][..], AGENT_STEP_TIMEOUT)?;
        let req = serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        agent.send(format!("{req}\n").as_bytes(), AGENT_STEP_TIMEOUT)?;
        let deadline = Instant::now() + AGENT_STEP_TIMEOUT;
        // The answer is preceded by 0xFF: drop everything up to it.
        loop {
            if let Some(at) = agent.buf.iter().position(|&b| b == 0xFF) {
                agent.buf.drain(..=at);
                break;
            }
            agent.buf.clear();
            agent.fill(deadline, "guest-sync-delimited")?;
        }
        loop {
            let v = agent.line(deadline, "guest-sync-delimited")?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(agent);
            }
        }
    }

    fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), String> {
        self.stream
            .set_write_timeout(Some(timeout))
            .and_then(|_| self.stream.write_all(bytes))
            .map_err(|e| format!("cannot write to the guest agent: {e}"))
    }

    /// Reads more bytes into the buffer before `deadline`.
    fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("the guest agent did not answer {what} in time"));
        }
        if self.buf.len() > AGENT_LINE_BYTES_MAX {
            return Err(format!(
                "the guest agent sent an over-long answer to {what}"
            ));
        }
        let mut chunk = [0u8; 4096];
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("guest agent socket: {e}"))?;
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(format!(
                "the guest agent closed the connection during {what}"
            )),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(format!("the guest agent did not answer {what} in time"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(format!("reading from the guest agent: {e}")),
        }
    }

    /// The next JSON answer line before `deadline` (lines that are not JSON are skipped).
    fn line(&mut self, deadline: Instant, what: &str) -> Result<Value, String> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                let line: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
                match serde_json::from_slice::<Value>(&line) {
                    Ok(v) => return Ok(v),
                    Err(_) => continue,
                }
            }
            self.fill(deadline, what)?;
        }
    }

    /// Runs one command and returns its `return` value, or its error in one line.
    fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value, String> {
        let req = serde_json::json!({ "execute": command });
        self.send(format!("{req}\n").as_bytes(), AGENT_STEP_TIMEOUT)?;
        let v = self.line(Instant::now() + timeout, command)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        let why = v
            .get("error")
            .and_then(|e| e.get("desc"))
            .and_then(Value::as_str)
            .unwrap_or("no answer")
            .replace('\n', " ");
        Err(format!("the guest agent refused {command}: {why}"))
    }
}

/// `connect(2)` to a unix socket within `timeout`. A plain blocking connect waits forever when
/// the listener's backlog is full (qemu's chardev stops accepting while another client holds
/// the channel); non-blocking, a full backlog is `EAGAIN` at once, retried until the deadline.
fn connect_bounded(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: addr is a valid sockaddr_un of the size given.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Some(libc::EAGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the socket accepts no connection (backlog full)",
                ))
            }
            _ => return Err(e),
        }
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// What a quiesced cut cost: the error of a failed freeze (the cut is then crash-consistent) and
/// of a failed thaw (reported, the cut still stands).
#[derive(Debug, Default)]
pub struct Quiesced {
    pub freeze_error: Option<String>,
    pub thaw_error: Option<String>,
}

impl Quiesced {
    /// The cut was taken with the guest frozen.
    pub fn app_consistent(&self) -> bool {
        self.freeze_error.is_none()
    }
}

/// Freezes the guest, runs `cut`, thaws: the guest is frozen for the cut only. Whatever fails,
/// `cut` runs exactly once, and a thaw follows every freeze that was attempted.
pub fn quiesced<T>(vm: &str, s: &GuestSettings, cut: impl FnOnce() -> T) -> (T, Quiesced) {
    let mut q = Quiesced::default();
    let mut errors = Vec::new();
    let hook_ran = match &s.pre_freeze_hook {
        Some(cmd) => {
            if let Err(e) = run_hook(vm, "pre-freeze", cmd) {
                errors.push(e);
            }
            true
        }
        None => false,
    };
    // The agent is asked only once the hook succeeded (a failed hook makes the cut
    // crash-consistent anyway; no need to stall the guest for nothing).
    let mut agent = None;
    let mut freeze_sent = false;
    if let (Some(sock), true) = (&s.agent_socket, errors.is_empty()) {
        match Agent::connect(Path::new(sock)) {
            Ok(mut a) => {
                freeze_sent = true;
                match a.execute("guest-fsfreeze-freeze", AGENT_FREEZE_TIMEOUT) {
                    // The answer is the number of filesystems frozen: none is no consistency.
                    Ok(n) if n.as_u64() == Some(0) => {
                        errors.push("the guest agent froze no filesystem".into());
                        agent = Some(a);
                    }
                    Ok(_) => agent = Some(a),
                    // Its late answer could be taken for the thaw's: the thaw resyncs on a
                    // new connection.
                    Err(e) => errors.push(e),
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let out = cut();
    let mut thaw_errors = Vec::new();
    if freeze_sent {
        if let Err(e) = thaw_agent(agent.take(), s.agent_socket.as_deref()) {
            thaw_errors.push(e);
        }
    }
    if hook_ran {
        if let Some(cmd) = &s.post_thaw_hook {
            if let Err(e) = run_hook(vm, "post-thaw", cmd) {
                thaw_errors.push(e);
            }
        }
    }
    if !errors.is_empty() {
        q.freeze_error = Some(errors.join("; "));
    }
    if !thaw_errors.is_empty() {
        q.thaw_error = Some(thaw_errors.join("; "));
    }
    (out, q)
}

/// Thaws through `agent` or, when that connection is gone or fails, through a new one.
fn thaw_agent(agent: Option<Agent>, socket: Option<&str>) -> Result<(), String> {
    if let Some(mut a) = agent {
        if a.execute("guest-fsfreeze-thaw", AGENT_THAW_TIMEOUT).is_ok() {
            return Ok(());
        }
    }
    let sock = socket.ok_or("no guest agent socket")?;
    let mut a = Agent::connect(Path::new(sock))?;
    a.execute("guest-fsfreeze-thaw", AGENT_THAW_TIMEOUT)
        .map(|_| ())
}

/// At daemon start: a guest left frozen (the daemon died between freeze and thaw) is thawed.
/// Returns whether a thaw was sent.
pub fn thaw_if_frozen(socket: &str) -> Result<bool, String> {
    let mut a = Agent::connect(Path::new(socket))?;
    let status = a.execute("guest-fsfreeze-status", AGENT_STEP_TIMEOUT)?;
    if status.as_str() == Some("frozen") {
        a.execute("guest-fsfreeze-thaw", AGENT_THAW_TIMEOUT)?;
        return Ok(true);
    }
    Ok(false)
}

/// Runs a hook (`sh -c CMD`, `UNDERSTUDY_VM` set, in its own process group) for at most
/// [`HOOK_TIMEOUT`]; non-zero exit, a signal or the timeout is an error in one line.
pub fn run_hook(vm: &str, which: &str, cmd: &str) -> Result<(), String> {
    run_hook_for(vm, which, cmd, HOOK_TIMEOUT)
}

fn run_hook_for(vm: &str, which: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("UNDERSTUDY_VM", vm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{which} hook could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{which} hook failed ({st})")),
            Ok(None) if Instant::now() >= deadline => {
                // The whole group: a shell's children die with it.
                let pgid = child.id() as i32;
                // SAFETY: kill(2) with a negative pid signals the group the child leads.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(format!(
                    "{which} hook did not finish within {} s and was killed",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{which} hook: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_that_hangs_is_killed_and_a_failing_hook_is_one_line() {
        let e =
            run_hook_for("vm", "pre-freeze", "sleep 30", Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("killed") && !e.contains('\n'), "{e}");
        let e = run_hook("vm", "pre-freeze", "exit 3").unwrap_err();
        assert!(e.contains("failed") && !e.contains('\n'), "{e}");
        run_hook("vm", "pre-freeze", "test \"$UNDERSTUDY_VM\" = vm").unwrap();
    }

    #[test]
    fn agent_whose_socket_accepts_no_connection_does_not_hang_the_cut() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Backlog 0 and nothing accepts: one pending connection fills it.
        // SAFETY: listen(2) on a socket this test owns.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut pending = Vec::new();
        while let Ok(s) = connect_bounded(&path, Duration::ZERO) {
            pending.push(s);
            assert!(pending.len() < 64, "the backlog never filled");
        }
        let s = GuestSettings {
            agent_socket: Some(path.display().to_string()),
            ..Default::default()
        };
        let t = Instant::now();
        let ((), q) = quiesced("vm", &s, || ());
        assert!(t.elapsed() < AGENT_STEP_TIMEOUT * 2, "{:?}", t.elapsed());
        let e = q.freeze_error.unwrap();
        assert!(e.contains("backlog") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn missing_agent_socket_makes_a_crash_consistent_cut_and_no_thaw() {
        let s = GuestSettings {
            agent_socket: Some("/nonexistent/understudy-qga.sock".into()),
            ..Default::default()
        };
        let mut cuts = 0;
        let ((), q) = quiesced("vm", &s, || cuts += 1);
        assert_eq!(cuts, 1);
        assert!(!q.app_consistent());
        assert!(q.thaw_error.is_none(), "{q:?}");
    }
}
