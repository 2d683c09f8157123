//! Human-readable output of the CLI: tables and progress bars. `--json` bypasses all of this.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::{Measure, PointInfo, ReplicationStatus, ServedPoint, VmInfo};

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// How often the plain (not a terminal) form of [`Progress`] prints a line: often enough to
/// show a log or CI output that the work moves, rarely enough not to flood it.
pub const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The progress of long work (initial replication, resynchronization, export, failover,
/// backup): an indicatif bar with bytes, rate and ETA on stderr when stderr is a terminal,
/// else a plain line on stdout every [`PLAIN_PROGRESS_EVERY`]
/// (`initial replication of web: 42% (420.0 MiB of 1.0 GiB), 35.2 MiB/s, eta 17 s`), one when
/// it starts and one when it ends. Never plain lines on stderr: there a failure stays one line
/// that scripts read. Every command that shows progress uses this one type.
pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    plain: Plain,
}

#[derive(Default)]
struct Plain {
    /// First sample (time, bytes done): the rate is measured from it.
    first: Option<(Instant, u64)>,
    last_line: Option<Instant>,
    done: u64,
    total: u64,
    message: String,
}

impl Progress {
    /// A bar if stderr is a terminal, plain lines (stdout) otherwise.
    pub fn start(what: impl Into<String>) -> Progress {
        Progress::to(what, std::io::stderr().is_terminal())
    }

    /// A bar when `terminal`, plain lines on stdout otherwise.
    pub fn to(what: impl Into<String>, terminal: bool) -> Progress {
        let what = what.into();
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(&format!(
                "{{spinner}} {} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}} {{msg}}",
                what.replace('{', "{{").replace('}', "}}")
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress {
            what,
            bar,
            plain: Plain::default(),
        }
    }

    /// The work starts now from 0 bytes: the rate counts from here (without it, from the
    /// first [`Self::set`]).
    pub fn begin(&mut self) {
        if self.bar.is_none() {
            self.plain.first = Some((Instant::now(), 0));
        }
    }

    /// `done` of `total` bytes, without a plain line (the next line or [`Self::finish`]
    /// shows it).
    pub fn set_quietly(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total.max(1));
                bar.set_position(done);
            }
            None => {
                self.plain.first.get_or_insert((Instant::now(), done));
                self.plain.done = done;
                self.plain.total = total;
            }
        }
    }

    /// `done` of `total` bytes.
    pub fn set(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(1));
            bar.set_position(done);
            return;
        }
        let now = Instant::now();
        let p = &mut self.plain;
        p.first.get_or_insert((now, done));
        p.done = done;
        p.total = total;
        let due = match p.last_line {
            None => true,
            Some(t) => now.duration_since(t) >= PLAIN_PROGRESS_EVERY,
        };
        if due {
            p.last_line = Some(now);
            println!("{}", self.line());
        }
    }

    /// A note after the numbers (a retry, a wait); empty clears it.
    pub fn message(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None => self.plain.message = msg,
        }
    }

    /// The work is done: the bar disappears, or a last plain line says 100 %.
    pub fn finish(mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish_and_clear(),
            None if self.plain.total > 0 => {
                self.plain.done = self.plain.total;
                self.plain.message.clear();
                println!("{}", self.line());
            }
            None => {}
        }
    }

    /// The work stopped unfinished: the bar stays as it was; plain output prints nothing more.
    pub fn abandon(mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// `initial replication of web: 42% (420.0 MiB of 1.0 GiB), 35.2 MiB/s, eta 17 s`.
    fn line(&self) -> String {
        let p = &self.plain;
        let pct = (p.done as f64 * 100.0 / p.total.max(1) as f64).min(100.0);
        let (rate, eta) = match p.first {
            Some((t0, d0)) => {
                let secs = t0.elapsed().as_secs_f64();
                let moved = p.done.saturating_sub(d0) as f64;
                if secs > 0.0 && moved > 0.0 {
                    let rate = moved / secs;
                    let left = p.total.saturating_sub(p.done) as f64;
                    (
                        format!("{}/s", bytes(rate as u64)),
                        format!("{} s", (left / rate).ceil() as u64),
                    )
                } else {
                    ("rate unknown".to_owned(), "unknown".to_owned())
                }
            }
            None => ("rate unknown".to_owned(), "unknown".to_owned()),
        };
        let mut line = format!(
            "{}: {pct:.0}% ({} of {}), {rate}, eta {eta}",
            self.what,
            bytes(p.done),
            bytes(p.total)
        );
        if !p.message.is_empty() {
            line.push_str(", ");
            line.push_str(&p.message);
        }
        line
    }
}

/// A resynchronization's progress on `progress`: the daemon's count of compared blocks and
/// sent bytes as the note (rate and ETA are the bar's).
pub fn show_resync(progress: &mut Progress, r: &proto::ResyncProgress) {
    // Before its cycle cut there is nothing to show ("0 B of 0 B").
    if r.bytes_total == 0 {
        return;
    }
    progress.set(r.bytes_done, r.bytes_total);
    progress.message(format!(
        "{} blocks compared, {} sent",
        r.blocks_compared,
        bytes(r.bytes_sent)
    ));
}

/// `12 blocks compared, 3.0 MiB sent, 40.0 MiB/s, eta 5 s`.
pub fn resync_line(r: &proto::ResyncProgress) -> String {
    format!(
        "{} blocks compared, {} sent, {}/s, eta {}",
        r.blocks_compared,
        bytes(r.bytes_sent),
        bytes(r.rate_bytes_per_sec),
        r.eta_secs
            .map(|s| format!("{s} s"))
            .unwrap_or_else(|| "unknown".into())
    )
}

/// `auto-resynchronize on (window 18:30-06:00 UTC)`.
pub fn auto_resync_summary(st: &ReplicationStatus) -> String {
    let window = st
        .resynchronize_window
        .as_deref()
        .map(|w| format!(" (window {w})"))
        .unwrap_or_default();
    if st.auto_resynchronize {
        format!("auto-resynchronize on{window}")
    } else {
        format!("auto-resynchronize off (manual){window}")
    }
}

pub fn print_vm(vm: &VmInfo) {
    if vm.created_at.is_empty() {
        println!("VM {} (replication: {})", vm.name, vm.replication_role);
    } else {
        println!(
            "VM {} (created {}, replication: {})",
            vm.name, vm.created_at, vm.replication_role
        );
    }
    if let Some(why) = &vm.broken {
        println!("  BROKEN, not served: {why}");
    }
    if let Some(s) = &vm.guest_agent {
        println!("  guest agent: {s}");
    }
    if let Some(h) = &vm.pre_freeze_hook {
        println!("  pre-freeze hook: {h}");
    }
    if let Some(h) = &vm.post_thaw_hook {
        println!("  post-thaw hook: {h}");
    }
    if let Some(l) = &vm.launch {
        println!("  launch: {l}");
    }
    if let Some(n) = &vm.failover_network {
        println!("  failover network: {n}");
    }
    for d in &vm.disks {
        println!(
            "  disk {}  {:>10}  {}",
            d.index,
            bytes(d.size_bytes),
            d.nbd_uri
        );
        if !d.qemu_blockdev.is_empty() {
            println!(
                "    qemu:    -blockdev {} -device virtio-blk-pci,drive={}",
                d.qemu_blockdev, d.qemu_node_name
            );
        }
    }
    if let Some(seed) = &vm.seed {
        println!(
            "  seed (cloud-init, read-only)  {:>10}  {}",
            bytes(seed.size_bytes),
            seed.nbd_uri
        );
    }
}

pub fn print_vm_table(vms: &[VmInfo]) {
    println!(
        "{:<24} {:>5} {:>12} {:<10}",
        "NAME", "DISKS", "SIZE", "REPLICATION"
    );
    for vm in vms {
        let total: u64 = vm.disks.iter().map(|d| d.size_bytes).sum();
        println!(
            "{:<24} {:>5} {:>12} {:<10}",
            vm.name,
            vm.disks.len(),
            bytes(total),
            if vm.broken.is_some() {
                "BROKEN"
            } else {
                vm.replication_role.as_str()
            }
        );
    }
}

pub fn print_status(list: &[ReplicationStatus]) {
    println!(
        "{:<20} {:<8} {:<30} {:<8} {:<25} {:>12}",
        "VM", "ROLE", "STATE", "HEALTH", "LAST REPLICATION", "PENDING"
    );
    for st in list {
        println!(
            "{:<20} {:<8} {:<30} {:<8} {:<25} {:>12}",
            st.vm,
            st.role,
            format!("{:?}", st.state),
            format!("{:?}", st.health),
            st.last_replication_time.as_deref().unwrap_or("never"),
            bytes(st.pending_bytes)
        );
        if st.history.is_some() {
            println!("    {}", history_summary(st.history.as_ref()));
        }
        if st.auto_resynchronize || st.resynchronize_window.is_some() {
            println!("    {}", auto_resync_summary(st));
        }
        if let Some(at) = &st.resync_start_time {
            println!("    resynchronization starts at {at}");
        }
        if let Some(r) = &st.resync {
            println!(
                "    resynchronization since {}: {} of {}, {}",
                r.started_at,
                bytes(r.bytes_done),
                bytes(r.bytes_total),
                resync_line(r)
            );
        }
        for r in &st.health_reasons {
            match &r.since {
                Some(since) => println!("    {} (since {since})", r.reason),
                None => println!("    {}", r.reason),
            }
        }
    }
}

pub fn print_measure(m: &Measure) {
    println!("VM {}: {:?}, health {:?}", m.vm, m.state, m.health);
    println!("  measuring since        {}", m.measuring_since);
    println!("  successful cycles      {}", m.successful_cycles);
    println!("  failed cycles          {}", m.failed_cycles);
    println!("  average delta          {}", bytes(m.average_delta_bytes));
    println!("  maximum delta          {}", bytes(m.maximum_delta_bytes));
    println!("  sent in total          {}", bytes(m.sent_bytes_total));
    println!("  average latency        {} ms", m.average_latency_ms);
    println!("  maximum latency        {} ms", m.maximum_latency_ms);
    println!("  longest cut pause      {} us", m.maximum_cut_pause_us);
    println!(
        "  copied before write    {}",
        bytes(m.cbw_copied_bytes_total)
    );
    println!(
        "    of which spilled     {}",
        bytes(m.cbw_spilled_bytes_total)
    );
    println!(
        "  resumed uploads        {} ({} not sent again)",
        m.resumed_uploads_total,
        bytes(m.resumed_bytes_total)
    );
    println!(
        "  app-consistent points  {} ({} fell back to crash-consistent)",
        m.app_consistent_points_total, m.app_consistent_failures_total
    );
    println!(
        "  last replication       {}",
        m.last_replication_time.as_deref().unwrap_or("never")
    );
    println!("  pending                {}", bytes(m.pending_bytes));
}

pub fn print_points(points: &[PointInfo]) {
    println!(
        "{:>8}  {:<25} {:<15} {:<12} {:>12} {:>12}  PINNED BY",
        "ID", "CUT TIME", "KIND", "CONSISTENCY", "CHANGED", "STORED"
    );
    for p in points {
        println!(
            "{:>8}  {:<25} {:<15} {:<12} {:>12} {:>12}  {}",
            p.id,
            p.cut_time,
            p.kind,
            p.consistency,
            bytes(p.data_bytes + p.zero_bytes),
            bytes(p.stored_bytes),
            if p.pinned_by.is_empty() {
                "-".to_string()
            } else {
                p.pinned_by.join(", ")
            }
        );
    }
}

/// One line saying what a replica keeps.
pub fn history_summary(h: Option<&proto::HistoryPolicy>) -> String {
    let Some(h) = h else {
        return "history: the newest 64 points".into();
    };
    let mut s = format!(
        "history: latest point + {} hourly point(s)",
        h.recovery_history
    );
    if let Some(a) = h.app_consistent_every_hours {
        s.push_str(&format!(", application-consistent every {a} h"));
    }
    if h.keep_every_point_for_secs > 0 {
        s.push_str(&format!(
            ", every point of the last {}",
            duration(h.keep_every_point_for_secs)
        ));
    }
    s
}

fn duration(secs: u64) -> String {
    match secs {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

pub fn print_served(s: &ServedPoint) {
    println!(
        "{} point {} ({}) served read-only until {}",
        s.vm,
        s.point.id,
        s.point.created_at,
        s.expires_at.as_deref().unwrap_or("unserved")
    );
    for d in &s.disks {
        println!("  disk {}  {}", d.index, d.nbd_uri);
    }
}
