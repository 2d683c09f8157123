//! The daemon's tracked exports work with the real NBD clients users run: qemu-io, qemu-img,
//! nbdinfo, nbdcopy (multi-conn) and fio with crc32c verification.

mod common;

use std::process::Command;

use common::*;

#[test]
fn tracked_exports_work_with_real_nbd_clients() {
    for (tool, pkg) in [
        ("qemu-io", "qemu-utils"),
        ("qemu-img", "qemu-utils"),
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("fio", "fio"),
    ] {
        require(tool, pkg);
    }
    let root = tempfile::tempdir().unwrap();
    let h = Host::start(root.path(), "solo");
    h.ok(&["vm", "create", "web", "--disk", "64M", "--disk", "16M"]);
    let vm = h.json(&["vm", "show", "web"]);
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2);
    assert_eq!(vm["disks"][0]["size_bytes"], 64 << 20);
    assert_eq!(vm["disks"][1]["size_bytes"], 16 << 20);
    let uri = vm["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("nbd+unix:///web-0?socket="), "{uri}");

    // qemu-io: write a pattern, read it back, zero and discard ranges, flush.
    sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 256k",
        "-c",
        "write -z 4M 64k",
        "-c",
        "discard 8M 1M",
        "-c",
        "flush",
        &uri,
    ]));
    sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 1M 256k",
        "-c",
        "read -P 0 4M 64k",
        "-c",
        "read -P 0 8M 1M",
        &uri,
    ]));
    // A read past the end is refused, the export keeps working.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 64M 4k", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("rror") || text.contains("out of") || !out.status.success(),
        "read past end accepted: {text}"
    );
    sh(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xab 1M 4k", &uri]));

    // qemu-img sees the size and the sparse map.
    let info = sh(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    let map = sh(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        (256 << 10..8 << 20).contains(&data),
        "map should show the written 256k as data and most of the disk as holes: {map}"
    );

    // nbdinfo: size, the export list and the allocation map.
    let ni = sh(Command::new("nbdinfo").args(["--json", &uri]));
    let ni: serde_json::Value = serde_json::from_str(&ni).unwrap();
    assert_eq!(ni["exports"][0]["export-size"], 64 << 20);
    assert_eq!(ni["exports"][0]["can_multi_conn"], true, "{ni}");
    let socket = h.dir.join("nbd.sock");
    let list = sh(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!("nbd+unix://?socket={}", socket.display())));
    assert!(list.contains("web-0") && list.contains("web-1"), "{list}");
    let nmap = sh(Command::new("nbdinfo").args(["--map", &uri]));
    assert!(nmap.contains("hole"), "{nmap}");

    // nbdcopy in and out with 4 connections; qemu-img convert out; contents equal.
    let src = root.path().join("src.raw");
    let mut content = vec![0u8; 16 << 20];
    for (i, b) in content.iter_mut().enumerate() {
        *b = if (i / 65536) % 3 == 0 {
            0
        } else {
            (i * 7 % 251) as u8
        };
    }
    std::fs::write(&src, &content).unwrap();
    let uri1 = vm["disks"][1]["nbd_uri"].as_str().unwrap().to_string();
    sh(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(&src)
        .arg(&uri1));
    let back = root.path().join("back.raw");
    sh(Command::new("nbdcopy")
        .args(["--connections=4", &uri1])
        .arg(&back));
    assert!(files_equal(&src, &back), "nbdcopy round trip differs");
    let back2 = root.path().join("back2.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri1])
        .arg(&back2));
    assert!(files_equal(&src, &back2), "qemu-img convert differs");

    // fio with the nbd engine, two jobs (two connections), crc32c verification.
    let fio = sh(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=8M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--group_reporting",
        "--output-format=json",
    ]));
    let fio: serde_json::Value = serde_json::from_str(&fio[fio.find('{').unwrap()..]).unwrap();
    assert_eq!(fio["jobs"][0]["error"], 0, "fio reported an error");
    assert!(fio["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() >= 16 << 20);
}
