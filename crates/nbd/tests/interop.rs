//! The server driven by the real tools users have: qemu-io, qemu-img, nbdinfo, nbdcopy and
//! fio's nbd engine. A missing tool fails the test with the package to install.

mod common;

use std::io::{Seek, SeekFrom, Write};

use common::{need, pattern, run, same_files, test_config, TestServer};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    need("qemu-io", "qemu-utils");
    let t = TestServer::start(&[("disk", 16 * MIB)], test_config());
    let uri = t.uri("disk");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd -f 3M 512k",
            "-c",
            "write -z 1M 1M",
            "-c",
            "discard 4M 1M",
            "-c",
            "flush",
            &uri,
        ],
    );
    // Read back through the server, including zeroed and discarded ranges.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0xcd 3M 512k",
            "-c",
            "read -P 0 4M 1M",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // And the bytes reached the file.
    let img = std::fs::read(t.image("disk")).expect("image");
    assert!(img[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(img[3 * MIB as usize..3 * MIB as usize + 512 * 1024]
        .iter()
        .all(|&b| b == 0xcd));
}

#[test]
fn qemu_io_pattern_mismatch_is_detected() {
    // Guards the test above: a wrong pattern must make qemu-io report a failure.
    need("qemu-io", "qemu-utils");
    let t = TestServer::start(&[("disk", 4 * MIB)], test_config());
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "read -P 0x22 0 64k",
            &t.uri("disk"),
        ])
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_img_info_map_and_convert_both_ways() {
    need("qemu-img", "qemu-utils");
    let t = TestServer::start(&[("disk", 32 * MIB)], test_config());
    let uri = t.uri("disk");
    let info = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");

    // A source with data at 0-2 MiB and 20-21 MiB, holes elsewhere.
    let src = t.path("src.img");
    let mut f = std::fs::File::create(&src).expect("src");
    f.set_len(32 * MIB).expect("len");
    f.write_all(&pattern(2 * MIB as usize, 1)).expect("data");
    f.seek(SeekFrom::Start(20 * MIB)).expect("seek");
    f.write_all(&pattern(MIB as usize, 2)).expect("data");
    drop(f);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );

    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert!(
        map.contains("\"data\": false"),
        "holes must be reported: {map}"
    );
    assert!(
        map.contains("\"start\": 20971520") || map.contains("\"start\": 0"),
        "{map}"
    );
    let holes = map.lines().filter(|l| l.contains("\"zero\": true")).count();
    assert!(
        holes >= 2,
        "expected holes before and after the 20 MiB extent: {map}"
    );

    let out = t.path("out.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    same_files(&src, &out);
    same_files(&src, &t.image("disk"));
}

#[test]
fn nbdinfo_size_map_and_list() {
    need("nbdinfo", "libnbd-bin");
    let t = TestServer::start(&[("disk", 8 * MIB), ("other", MIB)], test_config());
    let uri = t.uri("disk");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), "8388608");
    std::fs::OpenOptions::new()
        .write(true)
        .open(t.image("disk"))
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], 4 * MIB))
        .expect("write data");
    let map = run("nbdinfo", &["--map", &uri]);
    let rows: Vec<&str> = map.lines().collect();
    assert!(rows.len() >= 3, "hole, data, hole: {map}");
    assert!(
        rows[0].contains("hole,zero") && rows[0].trim_start().starts_with('0'),
        "{map}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains("4194304") && r.contains("data")),
        "{map}"
    );
    let list = run("nbdinfo", &["--list", &t.uri("")]);
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"other\""),
        "{list}"
    );
    let json = run("nbdinfo", &["--json", &uri]);
    assert!(
        json.contains("\"can_multi_conn\": true") && json.contains("\"can_fua\": true"),
        "{json}"
    );
}

#[test]
fn nbdcopy_both_directions_with_multi_conn() {
    need("nbdcopy", "libnbd-bin");
    let t = TestServer::start(&[("disk", 24 * MIB)], test_config());
    let uri = t.uri("disk");
    let src = t.path("src.img");
    let mut data = pattern(24 * MIB as usize, 7);
    data[8 * MIB as usize..12 * MIB as usize].fill(0); // a zero run nbdcopy may write sparsely
    std::fs::write(&src, &data).expect("src");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    same_files(&src, &t.image("disk"));
    let out = t.path("out.img");
    run("nbdcopy", &["--connections=4", &uri, out.to_str().unwrap()]);
    same_files(&src, &out);
}

#[test]
fn fio_randwrite_with_crc32c_verification() {
    need("fio", "fio");
    let t = TestServer::start(&[("disk", 32 * MIB)], test_config());
    let uri = t.uri("disk");
    let out = run(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=16M",
            "--offset_increment=16M", // disjoint regions: each job verifies only its own writes
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise leave *-verify.state files in the working directory.
            "--verify_state_save=0",
            "--group_reporting",
        ],
    );
    // fio exits non-zero on a verification mismatch (run() fails then); also make sure the
    // verify phase really read the data back.
    assert!(out.contains("err= 0"), "{out}");
    assert!(out.contains("read: IOPS="), "no verify reads in: {out}");
}
