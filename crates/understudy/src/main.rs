//! `understudy`: the daemon (`serve`) and the CLI that talks to it over `<data-dir>/api.sock`.
//!
//! The CLI never opens a disk image: every command that touches VM state is a call to the
//! local daemon. Only `identity` and `trust` work on files directly, so a host can be paired
//! before its daemon first runs.

mod api;
mod cli;
mod config;
mod demo;
mod metrics;
mod nbd_client;
mod notify;
mod serve;

use host::errfmt;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// Exit status for a transient refusal: retry later (EX_TEMPFAIL).
pub const EXIT_TRANSIENT: u8 = 75;

/// Exit status for a bad command line or config file (clap's own usage errors use it too).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "understudy",
    version,
    about = "Disaster-recovery replication for KVM/QEMU virtual machine disks"
)]
struct Cli {
    /// The host's state directory (identity, catalog, disks, sockets).
    #[arg(
        long,
        global = true,
        env = "UNDERSTUDY_DATA_DIR",
        default_value = "/var/lib/understudy"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host daemon in the foreground.
    Serve(ServeArgs),
    /// Print this host's CA certificate (PEM) for peers to trust.
    Identity,
    /// Manage the certificates this host trusts.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Configure this host as a replica server.
    #[command(subcommand, name = "replica-server")]
    ReplicaServer(ReplicaServerCmd),
    /// Create, import and inspect virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Replicate a VM to another host.
    #[command(subcommand)]
    Replication(ReplicationCmd),
    /// Recovery points on a replica host.
    #[command(subcommand)]
    Points(PointsCmd),
    /// On the replica host: write every disk of a recovery point to a directory, with a
    /// manifest (point, cut time, consistency, BLAKE3 per disk). The point is pinned while
    /// it is read; replication goes on. Exit 75 when no consistent point exists yet (the
    /// message says when to retry). `backup verify DIR` checks a backup.
    Backup(BackupArgs),
    /// Bring a VM up on the replica host from a recovery point (test or real failover).
    #[command(subcommand)]
    Failover(FailoverCmd),
    /// The guided end-to-end tour on loopback (temporary directory, no setup).
    Demo,
    /// The host's events (failovers, resyncs, health changes, ...; ids in docs/events.md),
    /// oldest first, read from the event log (works with the daemon stopped).
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
        /// Only events at or after TIME: RFC 3339 (2026-12-03T18:30:00Z) or a duration back
        /// from now (30m, 4h, 2d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages (roff) generated from these definitions into DIR: understudy.1 and
    /// one per subcommand (understudy-serve.1, ...); scripts/package-deb ships them.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file (keys are these flags' names, e.g.
    /// `cbw-memory = "256M"`, and `data-dir`); flags given here override it (docs/config.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for peer (replication) traffic, HOST:PORT.
    #[arg(long)]
    pub listen: String,
    /// This host's name (certificate subject).
    #[arg(long)]
    pub name: Option<String>,
    /// Use this certificate (PEM) instead of the generated identity.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA certificate (PEM) that issued --cert, printed by `identity`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Memory per disk for copy-before-write copies (old data of blocks the guest overwrites
    /// before they are shipped); beyond it copies spill to a file in the disk's state
    /// directory. 0 = always the file.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size_arg)]
    pub cbw_memory: u64,
    /// Seconds the primary waits for a replica's answer to hello (docs/limits.md).
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub hello_timeout: u64,
    /// Seconds an upload may make no progress (the replica reads nothing) before the cycle
    /// fails and the cut is given back.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub upload_idle_timeout: u64,
    /// Seconds the primary waits for the replica's answer once a whole delta was sent (the
    /// replica verifies and fsyncs it in that time).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub answer_timeout: u64,
    /// Serve Prometheus metrics over plain HTTP at http://ADDR/metrics (HOST:PORT; e.g.
    /// 127.0.0.1:9469). Off by default. Every metric is listed in docs/metrics.md.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// The interval health is judged over (1h to 7d) unless `replica-server enable
    /// --monitoring-interval` set one (docs/health.md).
    #[arg(long, value_name = "DURATION", default_value = "12h", value_parser = parse_monitoring_interval)]
    pub monitoring_interval: u64,
    /// Tests only: cap on each epoch's copy-before-write spill file instead of a quarter of
    /// the free space of its filesystem.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, hide = true)]
    pub cbw_spill_max: Option<u64>,
    /// Tests only: rotate the event log at this size instead of 16 MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, hide = true)]
    pub events_file_max: Option<u64>,
    /// Tests only: recovery points kept per replica VM instead of 64.
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub retain_points: Option<u64>,
}

impl ServeArgs {
    fn into_config(self) -> host::HostConfig {
        host::HostConfig {
            listen: self.listen,
            name: self.name,
            cert: self.cert,
            key: self.key,
            ca: self.ca,
            cbw_memory: self.cbw_memory,
            cbw_spill_max: self.cbw_spill_max,
            hello_timeout: self.hello_timeout,
            upload_idle_timeout: self.upload_idle_timeout,
            answer_timeout: self.answer_timeout,
            retain_points: self.retain_points,
            metrics_listen: self.metrics_listen,
            monitoring_interval_secs: self.monitoring_interval,
            events_file_max: self.events_file_max,
        }
    }
}

fn parse_monitoring_interval(s: &str) -> Result<u64, String> {
    use host::health::{MONITORING_INTERVAL_MAX_SECS, MONITORING_INTERVAL_MIN_SECS};
    let secs = cli::parse_duration_secs(s)?;
    if !(MONITORING_INTERVAL_MIN_SECS..=MONITORING_INTERVAL_MAX_SECS).contains(&secs) {
        return Err(format!("{s} is out of range: 1h to 7d"));
    }
    Ok(secs)
}

/// `understudy man DIR`: the pages for `scripts/package-deb` (no build script needed).
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    cli::parse_size(s).map_err(|_| {
        format!("invalid size {s:?}: use 0 or a multiple of 4 KiB with K, M or G, e.g. 256M")
    })
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TrustRole {
    Replica,
    Primary,
    Both,
}

#[derive(Subcommand)]
enum TrustCmd {
    /// Trust a peer's CA (PEM file, the output of `understudy identity` on the peer), pinned to
    /// the peer's name and scoped to a role.
    Add {
        file: PathBuf,
        /// What the peer is to this host: `replica` (we ship to it), `primary` (it ships to
        /// us) or `both`.
        #[arg(long = "as", value_name = "ROLE", default_value = "both")]
        role: TrustRole,
        /// Peer name(s) this CA speaks for (certificate CN or first DNS name; `*.example.com`
        /// or `*` allowed). Default: the host name in the CA's subject.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// List trusted certificates.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReplicaServerCmd {
    /// Accept replicas from trusted peers into DIR.
    Enable {
        #[arg(long)]
        storage: PathBuf,
        /// Peer name allowed to replicate here (repeatable; `*` = any trusted peer).
        #[arg(long = "allow")]
        allow: Vec<String>,
        #[arg(long)]
        trust_group: Option<String>,
        /// The interval health is judged over on this host (1h to 7d; default 12h, or
        /// `serve --monitoring-interval`): Warning when more than 20 % of the cycles due in
        /// it were missed (docs/health.md).
        #[arg(long, value_name = "DURATION")]
        monitoring_interval: Option<String>,
    },
    /// Stop accepting replicas (existing replicas are kept).
    Disable,
    /// Show the replica server settings.
    Show {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM with new raw sparse disks.
    Create {
        name: String,
        /// Disk size (e.g. 8G, 512M); repeat for more disks.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
    /// Create a VM from existing images (any format qemu-img reads).
    Import {
        name: String,
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
    },
    /// List VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// How the guest is quiesced for application-consistent points (`replication enable/set
    /// --app-consistent-every H`): its QEMU guest agent socket, or hooks.
    Set {
        name: String,
        /// Unix socket of the VM's `org.qemu.guest_agent.0` channel.
        #[arg(long, value_name = "SOCKET", conflicts_with = "no_guest_agent")]
        guest_agent: Option<PathBuf>,
        /// Forget the guest agent socket.
        #[arg(long)]
        no_guest_agent: bool,
        /// Shell command run before the cut (non-zero exit or 30 s timeout: crash-consistent
        /// point); "" removes it.
        #[arg(long, value_name = "CMD")]
        pre_freeze_hook: Option<String>,
        /// Shell command run after the cut whenever the pre-freeze hook ran; "" removes it.
        #[arg(long, value_name = "CMD")]
        post_thaw_hook: Option<String>,
        /// Command `failover start NAME --start` runs (sh -c) once the failover disks are
        /// served, e.g. 'virsh start {name}'. Placeholders, single-quoted when filled: {name}
        /// (NAME or NAME-test), {diskN} (disk N's nbd_uri), {blockdevN} (its qemu -blockdev
        /// argument), {nodeN} (its node name); {{ and }} are literal braces. Also for a replica
        /// VM.
        #[arg(long, value_name = "CMD", conflicts_with = "no_launch")]
        launch: Option<String>,
        /// Forget the launch command.
        #[arg(long)]
        no_launch: bool,
        /// Addresses a failover of NAME gives a Linux guest through cloud-init (a NoCloud seed
        /// disk served as NAME-seed), e.g. 'ipv4=10.2.0.5/24,gateway=10.2.0.1,dns=10.2.0.53';
        /// keys ipv4, gateway, ipv6, gateway6, dns (repeatable), mac. Set on the primary it
        /// reaches the replica host; set on the replica host it overrides the primary's.
        #[arg(long, value_name = "SETTINGS", conflicts_with = "no_failover_network")]
        failover_network: Option<String>,
        /// Forget the failover network settings (on the replica host: its override).
        #[arg(long)]
        no_failover_network: bool,
    },
    /// Show one VM and its disks.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReplicationCmd {
    /// Enable replication of a VM to a replica host.
    Enable {
        name: String,
        #[arg(long)]
        replica: String,
        /// Seconds between cycles: 30, 300, 900 or any value from 1 to 3600.
        #[arg(long, default_value_t = 300)]
        frequency: u32,
        #[arg(long, default_value = "zstd", value_parser = ["zstd", "none"])]
        compression: String,
        /// Disk indexes to replicate, e.g. 0,1 (default: all).
        #[arg(long, value_delimiter = ',')]
        disks: Option<Vec<u32>>,
        #[command(flatten)]
        history: HistoryArgs,
    },
    /// Change a replicating VM's frequency, compression, recovery history or resynchronization
    /// schedule (no new initial replication).
    Set {
        name: String,
        /// Seconds between cycles, 1 to 3600.
        #[arg(long)]
        frequency: Option<u32>,
        #[arg(long, value_parser = ["zstd", "none"])]
        compression: Option<String>,
        #[command(flatten)]
        history: HistoryArgs,
        /// Start a required resynchronization by itself (on), or wait for `replication resume
        /// NAME --resynchronize` (off, the default).
        #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
        auto_resynchronize: Option<String>,
        /// With auto-resynchronize on: start only inside this daily window, HH:MM-HH:MM in UTC
        /// (it may wrap midnight, e.g. 18:30-06:00); `none` removes it (any time).
        #[arg(long, value_name = "HH:MM-HH:MM")]
        resynchronize_window: Option<String>,
        /// Health turns Warning after this many cycles without a successful one (Critical at 4
        /// times that); 0 goes back to the default: 3 cycles, or Hyper-V's hour when that is
        /// sooner, never under 2 cycles.
        #[arg(long, value_name = "N")]
        lag_warning_cycles: Option<u32>,
    },
    /// Start initial replication.
    Start {
        name: String,
        /// Return only when initial replication is complete.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 75; replication goes on).
        #[arg(long, requires = "wait")]
        timeout: Option<u64>,
        /// Start from an existing copy: a raw image ON THE REPLICA HOST, in the `+existing`
        /// directory of its replica storage, one per replicated disk in disk order (repeat the
        /// option). The replica adopts the file itself; only the blocks that differ are sent.
        #[arg(long = "use-existing", value_name = "PATH", conflicts_with_all = ["at", "to_media"])]
        use_existing: Vec<String>,
        /// Write the initial copy (point 1: sparse, checksummed, keyed) to DIR, to carry to
        /// the replica host and import there with `replication import-media`; nothing is sent
        /// over the network until then.
        #[arg(long = "to-media", value_name = "DIR", conflicts_with_all = ["at", "wait"])]
        to_media: Option<String>,
        /// Start at this time (RFC 3339, e.g. 2026-12-03T18:30:00Z) instead of now; until
        /// then the VM stays ReadyForInitialReplication and its status shows the time.
        #[arg(long)]
        at: Option<String>,
    },
    /// On the replica host: verify the initial copy that `replication start --to-media` wrote
    /// and commit it as the replica's first point.
    ImportMedia {
        name: String,
        /// The media directory (absolute, or relative to the current directory).
        #[arg(long)]
        from: String,
    },
    /// Cut and ship now; returns when the replica has committed the point.
    Sync {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Replication state and health.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replication statistics.
    Measure {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Reset the statistics of `measure` and the Warning of failed and missed cycles
    /// (Hyper-V's Reset-VMReplicationStatistics); the Prometheus counters go on.
    ResetStatistics { name: String },
    /// Pause shipping (changes keep being tracked).
    Suspend { name: String },
    /// On the primary: stop replicating NAME from this host, whatever its state (Hyper-V's
    /// Remove-VMReplication). Its disks are served again, also after a fence (this is how an
    /// admin forces a VM failed over elsewhere back into service here); the replica keeps
    /// its copy and its points.
    Remove { name: String },
    /// After a failover to this host (`failover complete`): replicate NAME back to its old
    /// primary, which becomes the replica with its own disks as the base. After a planned
    /// failover only what the VM wrote since is sent; after an unplanned one, only the blocks
    /// that can differ (or every block compared, when its tracking cannot say).
    Reverse {
        name: String,
        /// The old primary, HOST:PORT (a replica server; with no guest using the VM's disks).
        #[arg(long)]
        replica: String,
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        frequency: u32,
        #[arg(long)]
        json: bool,
    },
    /// Resume shipping; with --resynchronize, bring a VM in ResynchronizationRequired back.
    Resume {
        name: String,
        /// Start a resynchronization (from ResynchronizationRequired, or at any time to
        /// check the replica): both hosts hash their disks, only the blocks that differ are
        /// sent, and the result is a new recovery point on top of the existing ones.
        #[arg(long)]
        resynchronize: bool,
        /// With --resynchronize: start it at this time (RFC 3339, e.g. 2026-12-03T18:30:00Z)
        /// instead of now; until then the VM is WaitingForStartResynchronize.
        #[arg(long, value_name = "TIME", requires = "resynchronize")]
        at: Option<String>,
        /// With --resynchronize: follow it to the end (a progress bar on a terminal); exit 0
        /// once Replicating, non-zero with the reason if it ends ResynchronizationRequired.
        #[arg(long, requires = "resynchronize")]
        wait: bool,
    },
    /// Cancel a resynchronization running, scheduled or suspended: the replica keeps its
    /// points exactly as before it began, and the VM is ResynchronizationRequired again
    /// (Hyper-V's Stop-VMReplication of a resynchronization).
    #[command(visible_aliases = ["resync-stop", "stop"])]
    ResyncCancel { name: String },
}

/// Recovery history, as Hyper-V's `-RecoveryHistory` and `-VSSSnapshotFrequencyHour`, plus a
/// window in which every cycle stays a recovery point.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HistoryArgs {
    /// Hourly recovery points kept besides the latest one, 0-24.
    #[arg(long, value_name = "N")]
    pub recovery_history: Option<u32>,
    /// Hours between application-consistent points, 1-12 (needs --recovery-history > 0).
    #[arg(long, value_name = "H")]
    pub app_consistent_every: Option<u32>,
    /// Keep every point of this last stretch of time, e.g. 30m, 4h, 90s (0: off; at most 24h).
    #[arg(long, value_name = "DURATION")]
    pub keep_every_point_for: Option<String>,
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// On the replica host: serve NAME's disks at a recovery point, writable (copy-on-write
    /// over the point, ready at once). With --test they are served as NAME-test and
    /// replication goes on; without, as NAME, and the replica stops receiving.
    Start {
        name: String,
        /// `latest` or a point id (`points list`).
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        test: bool,
        /// Then run the VM's launch command (`vm set NAME --launch`): waited for up to 10 s,
        /// left running after that; if it fails the failover stays and the exit status is 1.
        #[arg(long)]
        start: bool,
        #[arg(long)]
        json: bool,
    },
    /// On the primary host, planned failover: with the VM shut down, fence it (its disks are
    /// no longer served), ship every last change and wait until the replica committed it.
    /// `replication resume NAME` cancels it.
    Prepare { name: String },
    /// Keep the failover: NAME's failover disks (the chosen point and what was written since)
    /// become the disks of a primary VM of this host; the other points are dropped. Shut the
    /// VM down first.
    Complete { name: String },
    /// End a test failover (--test: NAME-test and its writes are thrown away) or cancel a
    /// failover (the replica goes back to receiving).
    Stop {
        name: String,
        #[arg(long)]
        test: bool,
    },
}

/// `backup NAME --to DIR ...` or `backup verify DIR`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupArgs {
    #[command(subcommand)]
    verify: Option<BackupCmd>,
    /// The replica VM to back up.
    #[arg(required = true)]
    name: Option<String>,
    /// `latest` or a point id (`points list`).
    #[arg(long, default_value = "latest")]
    point: String,
    /// Directory to write (created if missing; must not hold a backup already).
    #[arg(long, required = true)]
    to: Option<PathBuf>,
    /// raw (sparse), qcow2, vmdk or vhdx.
    #[arg(long, default_value = "raw")]
    format: String,
    /// Copy only the blocks changed since this point: a qcow2 whose backing file is the
    /// backup of that point, found in a directory next to --to.
    #[arg(long, value_name = "ID")]
    incremental_from: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Check a backup without restoring it: every disk's contents against its manifest's
    /// BLAKE3 (needs no daemon). Exit 1 naming the disk that differs.
    Verify { dir: PathBuf },
}

#[derive(Subcommand)]
enum PointsCmd {
    /// List the recovery points of a replica VM.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Write one disk of a recovery point to a raw image file.
    Export {
        name: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long, default_value_t = 0)]
        disk: u32,
        #[arg(long)]
        to: PathBuf,
    },
    /// Serve a recovery point read-only over this host's NBD socket (one nbd_uri per disk).
    /// The point is pinned (retention folds around it) until `points unserve` or --for ends.
    Serve {
        name: String,
        #[arg(long, default_value = "latest")]
        point: String,
        /// Serve only this disk (default: every disk of the point).
        #[arg(long)]
        disk: Option<u32>,
        /// Release the point after this long (e.g. 90s, 30m, 4h, 2d); default: until unserved.
        #[arg(long = "for", value_name = "DURATION")]
        for_secs: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop serving a point (or every served point of the VM) and release its pin.
    Unserve {
        name: String,
        #[arg(long)]
        point: Option<u64>,
    },
    /// List the served points of a replica VM with their NBD URIs.
    Served {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let argv = match config::apply(Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(err) => {
            eprintln!("error: {}", errfmt::one_line(&err));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Serve(args) => serve::serve(&cli.data_dir, args.into_config()),
        Command::Demo => demo::run(),
        Command::Events {
            vm,
            since,
            follow,
            json,
        } => since
            .as_deref()
            .map(cli::events::parse_since)
            .transpose()
            .and_then(|since_unix_ns| {
                cli::events::events(
                    &cli.data_dir,
                    &cli::events::Filter { vm, since_unix_ns },
                    follow,
                    json,
                )
            }),
        Command::Man { dir } => write_man_pages(&dir),
        Command::Identity => cli::identity(&cli.data_dir),
        Command::Trust(TrustCmd::Add { file, role, names }) => {
            let scope = transport::Scope {
                names,
                replica: matches!(role, TrustRole::Replica | TrustRole::Both),
                primary: matches!(role, TrustRole::Primary | TrustRole::Both),
            };
            cli::trust_add(&cli.data_dir, &file, &scope)
        }
        Command::Trust(TrustCmd::List { json }) => cli::trust_list(&cli.data_dir, json),
        Command::ReplicaServer(cmd) => {
            let api = cli::Api::new(&cli.data_dir);
            match cmd {
                ReplicaServerCmd::Enable {
                    storage,
                    allow,
                    trust_group,
                    monitoring_interval,
                } => cli::replica_server_enable(
                    &api,
                    &storage,
                    allow,
                    trust_group,
                    monitoring_interval.as_deref(),
                ),
                ReplicaServerCmd::Disable => cli::replica_server_disable(&api),
                ReplicaServerCmd::Show { json } => cli::replica_server_show(&api, json),
            }
        }
        Command::Vm(cmd) => {
            let api = cli::Api::new(&cli.data_dir);
            match cmd {
                VmCmd::Create { name, disks } => cli::vm_create(&api, &name, &disks),
                VmCmd::Import { name, images } => cli::vm_import(&api, &name, &images),
                VmCmd::List { json } => cli::vm_list(&api, json),
                VmCmd::Show { name, json } => cli::vm_show(&api, &name, json),
                VmCmd::Set {
                    name,
                    guest_agent,
                    no_guest_agent,
                    pre_freeze_hook,
                    post_thaw_hook,
                    launch,
                    no_launch,
                    failover_network,
                    no_failover_network,
                } => cli::vm_set(
                    &api,
                    guest_agent.as_deref(),
                    proto::SetVm {
                        vm: name,
                        guest_agent: None,
                        no_guest_agent,
                        pre_freeze_hook,
                        post_thaw_hook,
                        launch,
                        no_launch,
                        failover_network,
                        no_failover_network,
                    },
                ),
            }
        }
        Command::Replication(cmd) => {
            let api = cli::Api::new(&cli.data_dir);
            match cmd {
                ReplicationCmd::Enable {
                    name,
                    replica,
                    frequency,
                    compression,
                    disks,
                    history,
                } => cli::replication_enable(
                    &api,
                    &name,
                    &replica,
                    frequency,
                    &compression,
                    disks,
                    &history,
                ),
                ReplicationCmd::Set {
                    name,
                    frequency,
                    compression,
                    history,
                    auto_resynchronize,
                    resynchronize_window,
                    lag_warning_cycles,
                } => cli::replication_set(
                    &api,
                    &name,
                    frequency,
                    compression.as_deref(),
                    &history,
                    (
                        auto_resynchronize.as_deref().map(|v| v == "on"),
                        resynchronize_window,
                    ),
                    lag_warning_cycles,
                ),
                ReplicationCmd::Start {
                    name,
                    to_media: Some(dir),
                    ..
                } => cli::replication_start_to_media(&api, &name, &dir),
                ReplicationCmd::Start {
                    name,
                    wait,
                    timeout,
                    use_existing,
                    at,
                    to_media: None,
                } => {
                    cli::replication_start(&api, &name, wait, timeout, use_existing, at.as_deref())
                }
                ReplicationCmd::ImportMedia { name, from } => {
                    cli::replication_import_media(&api, &name, &from)
                }
                ReplicationCmd::Sync { name, json } => cli::replication_sync(&api, &name, json),
                ReplicationCmd::Status { name, json } => {
                    cli::replication_status(&api, name.as_deref(), json)
                }
                ReplicationCmd::Measure { name, json } => {
                    cli::replication_measure(&api, &name, json)
                }
                ReplicationCmd::ResetStatistics { name } => {
                    cli::replication_reset_statistics(&api, &name)
                }
                ReplicationCmd::Suspend { name } => cli::replication_action(&api, &name, "suspend"),
                ReplicationCmd::Remove { name } => cli::replication_remove(&api, &name),
                ReplicationCmd::Resume {
                    name,
                    resynchronize: true,
                    at,
                    wait,
                } => cli::resynchronize(&api, &name, at.as_deref(), wait),
                ReplicationCmd::ResyncCancel { name } => {
                    cli::replication_action(&api, &name, "resync-cancel")
                }
                ReplicationCmd::Reverse {
                    name,
                    replica,
                    frequency,
                    json,
                } => cli::reverse(&api, &name, &replica, frequency, json),
                ReplicationCmd::Resume { name, .. } => {
                    cli::replication_action(&api, &name, "resume")
                }
            }
        }
        Command::Failover(cmd) => {
            let api = cli::Api::new(&cli.data_dir);
            match cmd {
                FailoverCmd::Start {
                    name,
                    point,
                    test,
                    start,
                    json,
                } => cli::failover_start(
                    &api,
                    &name,
                    proto::FailoverStart { point, test, start },
                    json,
                ),
                FailoverCmd::Stop { name, test } => cli::failover_stop(&api, &name, test),
                FailoverCmd::Complete { name } => cli::failover_complete(&api, &name),
                FailoverCmd::Prepare { name } => cli::failover_prepare(&api, &name),
            }
        }
        Command::Backup(args) => match (args.verify, args.name, args.to) {
            (Some(BackupCmd::Verify { dir }), _, _) => cli::backup_verify(&dir),
            (None, Some(name), Some(to)) => cli::backup(
                &cli::Api::new(&cli.data_dir),
                proto::BackupPoint {
                    vm: name,
                    point: args.point,
                    to: to.display().to_string(),
                    format: args.format,
                    incremental_from: args.incremental_from,
                    progress_id: None,
                },
                args.json,
            ),
            _ => Err(anyhow::anyhow!(
                "backup needs NAME and --to DIR (or `backup verify DIR`)"
            )),
        },
        Command::Points(cmd) => {
            let api = cli::Api::new(&cli.data_dir);
            match cmd {
                PointsCmd::List { name, json } => cli::points_list(&api, &name, json),
                PointsCmd::Export {
                    name,
                    point,
                    disk,
                    to,
                } => cli::points_export(&api, &name, &point, disk, &to),
                PointsCmd::Serve {
                    name,
                    point,
                    disk,
                    for_secs,
                    json,
                } => cli::points_serve(&api, &name, &point, disk, for_secs.as_deref(), json),
                PointsCmd::Unserve { name, point } => cli::points_unserve(&api, &name, point),
                PointsCmd::Served { name, json } => cli::points_served(&api, &name, json),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let transient = err
                .downcast_ref::<cli::ApiFailure>()
                .is_some_and(|f| f.transient);
            // One line: the chain of causes joined, as scripts read stderr line by line.
            eprintln!("error: {}", errfmt::one_line(&err));
            if transient {
                ExitCode::from(EXIT_TRANSIENT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
