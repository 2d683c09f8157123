//! The daemon's side of failover network settings (`docs/formats/failover-seed.md`): the
//! catalog record `failover-network/<vm>` (`vm set`, and the primary's value from its hellos),
//! and a failover's cloud-init seed image: made when the failover's disks are served, served
//! read-only as `<served name>-seed`, dropped with the failover.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use proto::SeedInfo;

use super::Shared;
use crate::error::bad_request;
use crate::seed::{
    seed_export_name, FailoverNetwork, FailoverNetworkRecord, SeedFiles, SeedFor, SEED_IMAGE_BYTES,
};

impl Shared {
    /// `failover-network/<vm>`, if any; a record of another version is an error.
    fn failover_network_record(&self, vm: &str) -> anyhow::Result<Option<FailoverNetworkRecord>> {
        let record: Option<FailoverNetworkRecord> =
            self.catalog.get(&FailoverNetworkRecord::key(vm))?;
        match record {
            Some(r) if r.version != FailoverNetworkRecord::VERSION => Err(anyhow::anyhow!(
                "catalog record failover-network/{vm} has version {}; this understudy reads version {}",
                r.version,
                FailoverNetworkRecord::VERSION
            )),
            other => Ok(other),
        }
    }

    /// The failover network setting in force for `vm` on this host (`vm show`'s
    /// `failover_network`): set here, else the primary's.
    pub(crate) fn failover_network(&self, vm: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .failover_network_record(vm)?
            .and_then(|r| r.effective().map(str::to_string)))
    }

    /// What a hello of primary VM `vm` carries: the value set on this host.
    pub(crate) fn failover_network_for_hello(&self, vm: &str) -> Option<String> {
        match self.failover_network_record(vm) {
            Ok(r) => r.and_then(|r| r.network),
            Err(e) => {
                tracing::warn!(%vm, "reading its failover network settings: {e:#}");
                None
            }
        }
    }

    /// Checks a `--failover-network` value; the normalized form is what is kept.
    pub(super) fn check_failover_network(value: &str) -> anyhow::Result<String> {
        FailoverNetwork::parse(value)
            .map(|n| n.to_string())
            .map_err(|e| bad_request(e.to_string()))
    }

    /// Applies one change to `failover-network/<vm>` (deleted once it holds nothing). Returns
    /// whether it changed.
    fn update_failover_network(
        &self,
        vm: &str,
        change: impl FnOnce(&mut FailoverNetworkRecord),
    ) -> anyhow::Result<bool> {
        let old = self.failover_network_record(vm)?.unwrap_or_default();
        let mut new = old.clone();
        new.version = FailoverNetworkRecord::VERSION;
        new.vm = vm.to_string();
        change(&mut new);
        if new.network == old.network && new.from_primary == old.from_primary {
            return Ok(false);
        }
        let key = FailoverNetworkRecord::key(vm);
        if new.network.is_none() && new.from_primary.is_none() {
            self.catalog.delete(&key)?;
        } else {
            self.catalog.put(&key, &new)?;
        }
        Ok(true)
    }

    /// `vm set --failover-network` (`Some`, already normalized) or `--no-failover-network`
    /// (`None`) on this host. A primary VM tells its replica at once (a hello, best effort).
    pub(super) fn set_failover_network(
        &self,
        vm: &str,
        network: Option<String>,
    ) -> anyhow::Result<()> {
        let removed = network.is_none();
        self.update_failover_network(vm, |r| r.network = network)
            .context("recording the failover network settings")?;
        if let Some(repl) = self.primary_of(vm) {
            // Persists nothing new and makes the task say hello (with the new value) now.
            repl.set(self, None, None, None, None, None)?;
        }
        self.events.emit(
            crate::events::VM_SET,
            Some(vm),
            "info",
            if removed {
                "failover network settings removed (vm set)"
            } else {
                "failover network settings set (vm set)"
            },
        );
        Ok(())
    }

    /// Checks the `failover_network` of a hello before anything changes.
    pub fn check_hello_failover_network(value: Option<&str>) -> Result<(), String> {
        match value {
            Some(v) => FailoverNetwork::parse(v).map(|_| ()).map_err(|e| {
                format!("the primary's failover network settings are refused here: {e}")
            }),
            None => Ok(()),
        }
    }

    /// Records the `failover_network` of a hello (checked) as the primary's value of replica
    /// VM `vm`; one catalog commit when it changed, none otherwise.
    pub fn note_primary_failover_network(
        &self,
        vm: &str,
        value: Option<&str>,
    ) -> anyhow::Result<()> {
        let value = match value {
            Some(v) => Some(Self::check_failover_network(v)?),
            None => None,
        };
        self.update_failover_network(vm, |r| r.from_primary = value)
            .context("recording the primary's failover network settings")?;
        Ok(())
    }

    fn seed_path(&self, served_as: &str) -> PathBuf {
        self.data_dir
            .join("failover")
            .join(served_as)
            .join(crate::seed::SEED_FILE)
    }

    /// Writes the seed image of the failover of `vm` served as `served_as` when `vm` has a
    /// failover network setting (a new instance-id each time); removes a stale one when it has
    /// none. Returns whether there is a seed to serve.
    pub(super) fn make_seed(
        &self,
        vm: &str,
        served_as: &str,
        generation: u64,
        point: u64,
    ) -> anyhow::Result<bool> {
        let path = self.seed_path(served_as);
        let Some(setting) = self.failover_network(vm)? else {
            self.remove_seed_file(served_as);
            return Ok(false);
        };
        let network = FailoverNetwork::parse(&setting)
            .map_err(|e| anyhow::anyhow!("the failover network settings of {vm}: {e}"))?;
        let mut random = [0u8; 12];
        let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
        std::io::Read::read_exact(&mut f, &mut random).context("reading /dev/urandom")?;
        let [r0, r1, r2, r3, r4, r5, r6, r7, v0, v1, v2, v3] = random;
        let files = SeedFiles::new(
            &network,
            SeedFor {
                vm,
                served_as,
                generation,
                point,
                random: u64::from_le_bytes([r0, r1, r2, r3, r4, r5, r6, r7]),
            },
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::seed::write_image(&path, &files, u32::from_le_bytes([v0, v1, v2, v3]))
            .with_context(|| format!("writing the cloud-init seed {}", path.display()))?;
        Ok(true)
    }

    /// Serves the seed image made by [`Shared::make_seed`] read-only as `<served_as>-seed`.
    pub(super) fn export_seed(&self, served_as: &str) -> anyhow::Result<()> {
        let path = self.seed_path(served_as);
        let backend = nbd::FileBackend::open(&path, true)
            .with_context(|| format!("opening the cloud-init seed {}", path.display()))?;
        let backend: Arc<dyn nbd::BlockBackend> = Arc::new(backend);
        self.exports.add_with_description(
            seed_export_name(served_as),
            format!("{served_as} cloud-init seed (failover network settings, read-only)"),
            backend,
        );
        Ok(())
    }

    /// Makes and serves the seed of a failover being served; what went wrong is returned,
    /// nothing is left served then.
    pub(super) fn serve_seed(
        &self,
        vm: &str,
        served_as: &str,
        generation: u64,
        point: u64,
    ) -> anyhow::Result<()> {
        let made = self
            .make_seed(vm, served_as, generation, point)
            .and_then(|made| {
                if made {
                    self.export_seed(served_as)?;
                }
                Ok(())
            });
        if made.is_err() {
            self.remove_seed_file(served_as);
        }
        made
    }

    /// Ends the seed of `served_as`: its export and connections, then the file.
    pub(super) fn drop_seed(&self, served_as: &str) -> anyhow::Result<()> {
        let name = seed_export_name(served_as);
        self.exports.remove(&name);
        if let Some(server) = self.nbd.lock().as_ref() {
            server.close_export_connections(&name);
        }
        let path = self.seed_path(served_as);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    fn remove_seed_file(&self, served_as: &str) {
        let path = self.seed_path(served_as);
        let _ = std::fs::remove_file(path.with_extension("img.tmp"));
        let _ = std::fs::remove_file(path);
    }

    /// `vm show` of a failover's seed, when it has one.
    pub(super) fn seed_info(&self, served_as: &str) -> Option<SeedInfo> {
        let path = self.seed_path(served_as);
        if !path.exists() {
            return None;
        }
        let socket = self.nbd_socket.display().to_string();
        let export = seed_export_name(served_as);
        let node = seed_node_name(served_as);
        Some(SeedInfo {
            nbd_uri: format!("nbd+unix:///{export}?socket={socket}"),
            size_bytes: SEED_IMAGE_BYTES,
            path: path.display().to_string(),
            qemu_blockdev: format!(
                "{},read-only=on",
                crate::vms::qemu_blockdev(
                    &export,
                    &node,
                    &socket,
                    super::NBD_RECONNECT_DELAY_SECS
                )
            ),
            qemu_node_name: node,
            libvirt_xml: format!(
                "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='{export}'><host transport='unix' socket='{socket}'/><reconnect delay='{}'/></source><target dev='vdz' bus='virtio'/><readonly/></disk>",
                super::NBD_RECONNECT_DELAY_SECS
            ),
            export_name: export,
        })
    }
}

/// The qemu node name of a failover's seed: starts with a letter, within qemu's 31 bytes.
fn seed_node_name(served_as: &str) -> String {
    let mut n = format!("seed-{served_as}");
    n.truncate(31);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello whose failover network a replica refuses (a newer primary's syntax) is a bad
    /// request in one line, before anything changes; no value is fine.
    #[test]
    fn a_hello_with_a_bad_failover_network_is_refused_in_one_line() {
        assert!(Shared::check_hello_failover_network(None).is_ok());
        assert!(Shared::check_hello_failover_network(Some("ipv4=10.0.0.5/24")).is_ok());
        let err =
            Shared::check_hello_failover_network(Some("ipv4=10.0.0.5/24,vlan=7")).unwrap_err();
        assert!(
            err.contains("refused here") && err.contains("vlan"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn seed_node_names_fit_qemu() {
        assert_eq!(seed_node_name("web-test"), "seed-web-test");
        assert_eq!(seed_node_name(&"x".repeat(64)).len(), 31);
    }
}
