//! Failover network settings for Linux guests: the setting (`vm set --failover-network`, kept
//! in catalog `failover-network/<vm>`) and the cloud-init NoCloud seed image a failover serves
//! (`docs/formats/failover-seed.md`). This module is pure but for writing the image file; the
//! daemon's side (storing, serving, dropping) is `shared/seed.rs`.

pub mod network;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use network::{BadNetwork, FailoverNetwork};

/// Size of a seed image: the files are a few hundred bytes; 1 MiB is the smallest size every
/// FAT reader and `blkid` take without complaint (FAT12 on 512-byte sectors).
pub const SEED_IMAGE_BYTES: u64 = 1 << 20;

/// The FAT volume label cloud-init's NoCloud datasource looks for (it also takes `CIDATA`).
pub const SEED_LABEL: &[u8; 11] = b"cidata     ";

/// First line of every file of the seed: the layout version (`failover-seed.md`).
pub const SEED_LAYOUT_HEADER: &str = "# understudy failover seed, layout 1\n";

/// The seed image's file name in a failover's directory (beside its `disk-N/` overlays).
pub const SEED_FILE: &str = "seed.img";

/// The NBD export a failover's seed is served as: `<served name>-seed` (a disk's export ends
/// in digits, so the names never meet).
pub fn seed_export_name(served_as: &str) -> String {
    format!("{served_as}-seed")
}

/// `failover-network/<vm>` in the catalog (`docs/formats/catalog.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverNetworkRecord {
    pub version: u32,
    pub vm: String,
    /// What `vm set --failover-network` gave on this host (normalized).
    #[serde(default)]
    pub network: Option<String>,
    /// Replica host: what the primary's last hello carried.
    #[serde(default)]
    pub from_primary: Option<String>,
}

impl FailoverNetworkRecord {
    pub const VERSION: u32 = 1;

    pub fn key(vm: &str) -> String {
        format!("failover-network/{vm}")
    }

    /// The setting in force on this host: its own, else the primary's.
    pub fn effective(&self) -> Option<&str> {
        self.network.as_deref().or(self.from_primary.as_deref())
    }
}

/// What a seed is made of: the three files of the NoCloud datasource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Who a seed is for: the VM, the name its failover is served as, and the point.
#[derive(Debug, Clone, Copy)]
pub struct SeedFor<'a> {
    pub vm: &'a str,
    pub served_as: &'a str,
    pub generation: u64,
    pub point: u64,
    /// Makes the instance-id new at every failover.
    pub random: u64,
}

impl SeedFiles {
    pub fn new(network: &FailoverNetwork, who: SeedFor<'_>) -> SeedFiles {
        let instance_id = format!(
            "understudy-{}-{}-{}-{:016x}",
            who.served_as, who.generation, who.point, who.random
        );
        SeedFiles {
            meta_data: format!(
                "{SEED_LAYOUT_HEADER}instance-id: {}\nlocal-hostname: {}\n",
                network::quoted(&instance_id),
                network::quoted(who.vm)
            ),
            user_data: format!("#cloud-config\n{SEED_LAYOUT_HEADER}ssh_deletekeys: false\n"),
            network_config: network.network_config_yaml(SEED_LAYOUT_HEADER),
        }
    }
}

/// Writes `files` as a FAT image labelled `cidata` at `path` (through a temporary beside it,
/// fsynced and renamed, so `path` is whole or absent).
pub fn write_image(path: &Path, files: &SeedFiles, volume_id: u32) -> io::Result<()> {
    let tmp = path.with_extension("img.tmp");
    let result = (|| {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.set_len(SEED_IMAGE_BYTES)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*SEED_LABEL)
                .volume_id(volume_id)
                .fat_type(fatfs::FatType::Fat12),
        )?;
        {
            let fs = fatfs::FileSystem::new(
                &mut file,
                fatfs::FsOptions::new().time_provider(&UTC_CLOCK),
            )?;
            for (name, text) in [
                ("meta-data", &files.meta_data),
                ("user-data", &files.user_data),
                ("network-config", &files.network_config),
            ] {
                let mut f = fs.root_dir().create_file(name)?;
                f.truncate()?;
                f.write_all(text.as_bytes())?;
                f.flush()?;
            }
            fs.unmount()?;
        }
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sysutil::rename_durable(&tmp, path)
}

/// The files' timestamps: the time the seed is made, in UTC (FAT keeps local time without a
/// zone; a guest reads nothing from it). Without it `fatfs` (built without `chrono`) writes
/// the invalid date 1980-00-00.
#[derive(Debug)]
struct UtcClock;

static UTC_CLOCK: UtcClock = UtcClock;

impl fatfs::TimeProvider for UtcClock {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fat_date_time(proto::time::now_unix_ns() / 1_000_000_000)
    }
}

/// A Unix time as a FAT date and time (UTC), within FAT's years 1980-2107.
fn fat_date_time(unix_secs: u64) -> fatfs::DateTime {
    // FAT's range: 1980-01-01 to 2107-12-31.
    let secs = unix_secs.clamp(315_532_800, 4_354_819_199);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    fatfs::DateTime {
        date: fatfs::Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: fatfs::Time {
            hour: (rem / 3600) as u16,
            min: (rem / 60 % 60) as u16,
            sec: (rem % 60) as u16,
            millis: 0,
        },
    }
}

/// Opens a seed image to serve it.
pub fn open_image(path: &Path) -> io::Result<File> {
    File::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> SeedFiles {
        let n = FailoverNetwork::parse("ipv4=10.2.0.5/24,gateway=10.2.0.1,dns=10.2.0.53").unwrap();
        SeedFiles::new(
            &n,
            SeedFor {
                vm: "1e5",
                served_as: "1e5-test",
                generation: 2,
                point: 7,
                random: 0xabc,
            },
        )
    }

    #[test]
    fn meta_data_quotes_a_name_yaml_would_read_as_a_number() {
        let f = files();
        assert_eq!(
            f.meta_data,
            "# understudy failover seed, layout 1\ninstance-id: \"understudy-1e5-test-2-7-0000000000000abc\"\nlocal-hostname: \"1e5\"\n"
        );
        assert!(f.user_data.starts_with("#cloud-config\n"));
    }

    #[test]
    fn fat_timestamps_are_valid_utc_dates() {
        let d = fat_date_time(1_796_300_000); // 2026-12-03T12:13:20Z
        assert_eq!((d.date.year, d.date.month, d.date.day), (2026, 12, 3));
        assert_eq!((d.time.hour, d.time.min, d.time.sec), (12, 13, 20));
        let d = fat_date_time(951_782_400); // 2000-02-29T00:00:00Z
        assert_eq!((d.date.year, d.date.month, d.date.day), (2000, 2, 29));
        let d = fat_date_time(0);
        assert_eq!((d.date.year, d.date.month, d.date.day), (1980, 1, 1));
        let d = fat_date_time(u64::MAX);
        assert_eq!((d.date.year, d.date.month, d.date.day), (2107, 12, 31));
    }

    #[test]
    fn the_image_holds_the_three_files_under_the_cidata_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEED_FILE);
        let f = files();
        write_image(&path, &f, 0x1234_5678).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEED_IMAGE_BYTES);
        assert!(!path.with_extension("img.tmp").exists());
        let mut file = File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "cidata");
        assert_eq!(
            fs.read_volume_label_from_root_dir().unwrap().as_deref(),
            Some("cidata")
        );
        for (name, want) in [
            ("meta-data", &f.meta_data),
            ("user-data", &f.user_data),
            ("network-config", &f.network_config),
        ] {
            let mut text = String::new();
            io::Read::read_to_string(&mut fs.root_dir().open_file(name).unwrap(), &mut text)
                .unwrap();
            assert_eq!(&text, want, "{name}");
        }
    }
}
