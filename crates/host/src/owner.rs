//! The one owner of host-level changes. Creating, importing and changing VMs, enabling and
//! changing replication, serving points and the replica-server settings are a closed set of
//! [`HostCommand`]s handled one at a time, in arrival order, by a single task; so no two
//! requests can interleave (a create and a remove of the same VM, two enables of one VM).
//! Readers never wait for it: after every command the owner publishes a [`HostView`]
//! snapshot on a watch channel.
//!
//! Slow work that needs no host state (the first hello to a new replica, up to its deadline)
//! is done by the caller before the command is sent, so one unreachable replica never holds
//! up the other commands; the command then checks again and commits.

use std::path::PathBuf;
use std::sync::Arc;

use proto::{
    CreateVm, ReplicaServerConfig, ReplicationStatus, ServePoint, ServedPoint, SetReplication,
    SetVm, UnservePoint, VmInfo,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::transient;
use crate::shared::PreparedEnable;
use crate::Shared;

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

/// Every host-level change there is.
pub enum HostCommand {
    CreateVm(CreateVm, Reply<VmInfo>),
    ImportVm {
        name: String,
        images: Vec<PathBuf>,
        reply: Reply<VmInfo>,
    },
    SetVm(SetVm, Reply<VmInfo>),
    /// Replication of a VM whose replica already accepted it (see [`PreparedEnable`]).
    EnableReplication(Box<PreparedEnable>, Reply<ReplicationStatus>),
    SetReplication(SetReplication, Reply<ReplicationStatus>),
    ServePoint(ServePoint, Reply<ServedPoint>),
    UnservePoint(UnservePoint, Reply<Vec<u64>>),
    EnableReplicaServer(ReplicaServerConfig, Reply<ReplicaServerConfig>),
    DisableReplicaServer(Reply<ReplicaServerConfig>),
    /// `failover start NAME [--point] [--test] [--start]` on the replica host. The launch
    /// command (`--start`) runs after the command is done, beside the owner.
    FailoverStart {
        vm: String,
        req: proto::FailoverStart,
        reply: Reply<proto::FailoverInfo>,
    },
    /// `replication reverse NAME` whose old primary already accepted it.
    InstallReverse(
        Box<crate::shared::PreparedReverse>,
        Reply<ReplicationStatus>,
    ),
    /// `failover complete NAME` on the replica host.
    FailoverComplete {
        vm: String,
        reply: Reply<VmInfo>,
    },
    /// `replication remove NAME` on the primary: no relationship any more, the disks served.
    RemoveReplication {
        vm: String,
        reply: Reply<String>,
    },
    /// `failover stop NAME [--test]`: the name the failover was served as.
    FailoverStop {
        vm: String,
        test: bool,
        reply: Reply<String>,
    },
}

/// What readers see of the host without asking the owner: published after every command.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    /// Commands handled since the daemon started.
    pub commands: u64,
    /// VMs of this host (primary side), sorted.
    pub vms: Vec<String>,
    /// Whether this host accepts replicas.
    pub replica_server: bool,
}

/// Commands waiting for the owner; beyond this a request gets "busy, retry" (503).
const QUEUE: usize = 64;

/// The sending half, kept by [`Shared`].
pub struct Owner {
    tx: mpsc::Sender<HostCommand>,
    view: watch::Receiver<Arc<HostView>>,
}

impl Owner {
    /// Makes the channel pair; [`run`] consumes the receiver.
    pub fn new() -> (
        Owner,
        mpsc::Receiver<HostCommand>,
        watch::Sender<Arc<HostView>>,
    ) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (vtx, view) = watch::channel(Arc::new(HostView::default()));
        (Owner { tx, view }, rx, vtx)
    }

    /// Sends a command and waits for its answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> HostCommand) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(make(reply))
            .map_err(|_| transient("the host is busy with other changes; retry"))?;
        answer
            .await
            .map_err(|_| transient("the daemon is stopping"))?
    }

    /// The latest snapshot.
    pub fn view(&self) -> Arc<HostView> {
        self.view.borrow().clone()
    }
}

/// The owner task: one command at a time. Blocking commands run on a blocking thread but are
/// awaited here, so the next command starts only when this one is done.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<HostCommand>,
    view: watch::Sender<Arc<HostView>>,
) {
    let mut commands = 0u64;
    view.send_replace(Arc::new(shared.snapshot(commands)));
    while let Some(cmd) = rx.recv().await {
        let s = shared.clone();
        match cmd {
            HostCommand::CreateVm(req, reply) => {
                let r = blocking(move || s.create_vm(&req.name, &req.disk_sizes_bytes)).await;
                let _ = reply.send(r);
            }
            HostCommand::ImportVm {
                name,
                images,
                reply,
            } => {
                let _ = reply.send(blocking(move || s.import_vm(&name, &images)).await);
            }
            HostCommand::SetVm(req, reply) => {
                let _ = reply.send(blocking(move || s.set_vm(&req)).await);
            }
            HostCommand::EnableReplication(prepared, reply) => {
                let _ = reply.send(blocking(move || s.install_replication(*prepared)).await);
            }
            HostCommand::SetReplication(req, reply) => {
                let _ = reply.send(blocking(move || s.set_replication(&req)).await);
            }
            HostCommand::ServePoint(req, reply) => {
                let _ = reply.send(blocking(move || s.serve_point(&req)).await);
            }
            HostCommand::UnservePoint(req, reply) => {
                let _ = reply.send(blocking(move || s.unserve_point(&req)).await);
            }
            HostCommand::EnableReplicaServer(cfg, reply) => {
                let _ = reply.send(blocking(move || s.enable_replica_server(cfg)).await);
            }
            HostCommand::DisableReplicaServer(reply) => {
                let _ = reply.send(blocking(move || s.disable_replica_server()).await);
            }
            HostCommand::FailoverStart { vm, req, reply } => {
                let r =
                    blocking(move || s.failover_start(&vm, &req.point, req.test, req.start)).await;
                match r {
                    // The launch command may take up to `LAUNCH_WAIT`: it runs beside the
                    // owner, which goes on with the next command (the failover is done).
                    Ok((info, Some(launch))) => {
                        let s = shared.clone();
                        tokio::spawn(async move {
                            let r = blocking(move || Ok(s.launch(info, launch))).await;
                            let _ = reply.send(r);
                        });
                    }
                    Ok((info, None)) => {
                        let _ = reply.send(Ok(info));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            HostCommand::InstallReverse(prepared, reply) => {
                let _ = reply.send(blocking(move || s.install_reverse(*prepared)).await);
            }
            HostCommand::FailoverComplete { vm, reply } => {
                let _ = reply.send(blocking(move || s.failover_complete(&vm)).await);
            }
            HostCommand::FailoverStop { vm, test, reply } => {
                let _ = reply.send(blocking(move || s.failover_stop(&vm, test)).await);
            }
            HostCommand::RemoveReplication { vm, reply } => {
                let _ = reply.send(s.remove_replication(&vm).await);
            }
        }
        commands += 1;
        view.send_replace(Arc::new(shared.snapshot(commands)));
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("host command failed: {e}"))?
}
