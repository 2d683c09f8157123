//! Foreign image formats go through `qemu-img`, never through our own parsers.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

pub fn virtual_size(image: &Path) -> anyhow::Result<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .context("running qemu-img (install Debian's qemu-utils)")?;
    if !out.status.success() {
        // The image the user named cannot be read as a disk image: their input, not ours.
        return Err(crate::error::bad_request(format!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing qemu-img info output")?;
    v.get("virtual-size")
        .and_then(|s| s.as_u64())
        .with_context(|| format!("qemu-img info {} reported no virtual-size", image.display()))
}

/// The format `qemu-img info` finds in `image` ("raw", "qcow2", ...). Opened shared (`-U`):
/// an image another process holds is still read.
pub fn format(image: &Path) -> anyhow::Result<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .context("running qemu-img (install Debian's qemu-utils)")?;
    if !out.status.success() {
        return Err(crate::error::bad_request(format!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing qemu-img info output")?;
    v.get("format")
        .and_then(|s| s.as_str())
        .map(String::from)
        .with_context(|| format!("qemu-img info {} reported no format", image.display()))
}

/// Converts `src` (any format) to a raw sparse file at `dest`, written to a temporary name
/// first so a failed conversion leaves nothing behind.
pub fn convert_to_raw(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension("raw.importing");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw", "-S", "4k", "-t", "none", "-W"])
        .arg(src)
        .arg(&tmp)
        .output()
        .context("running qemu-img (install Debian's qemu-utils)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        // -t none needs O_DIRECT; retry with the default cache mode on file systems without it.
        let out2 = Command::new("qemu-img")
            .args(["convert", "-O", "raw", "-S", "4k"])
            .arg(src)
            .arg(&tmp)
            .output()
            .context("running qemu-img")?;
        if !out2.status.success() {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "qemu-img convert {}: {}",
                src.display(),
                String::from_utf8_lossy(&out2.stderr).trim()
            );
        }
    }
    crate::durable::publish(&tmp, dest)
}
