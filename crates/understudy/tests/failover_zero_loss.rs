//! Promise "zero loss on planned failover and failback": a verifying fio workload writes to the
//! VM on A while replication runs; a planned failover A→B (`failover prepare` on A, `failover
//! start` + `complete` on B) keeps every acknowledged write (fio `--verify_only` replays the
//! workload against B's disk); `replication reverse` ships back only what the VM wrote on B; a
//! failback B→A the same way keeps both workloads' writes. The bytes each reverse shipped are
//! printed against what was written after the failover.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const DISK: u64 = 256 << 20;
/// The first workload (on A, before the failover): offset and size.
const FIRST: (u64, u64) = (0, 64 << 20);
/// The second workload (on B, after the reverse): a region of its own, so the first workload's
/// pattern can still be verified after it.
const SECOND: (u64, u64) = (128 << 20, 16 << 20);
/// Slack for what a reverse may ship beyond what was written: tracking is per block, and
/// each cycle's metadata.
const SLACK: u64 = 8 << 20;

/// One fio job over `[offset, offset + size)` of `uri`: random writes of 4k-64k, each block
/// written once (fio's random map) with a crc32c verify header, from random seed `seed`; with
/// `verify_only`, the same job replayed as reads checking every block it wrote. Returns
/// fio's JSON job; asserts success.
fn fio(uri: &str, (offset, size): (u64, u64), seed: u64, verify_only: bool) -> serde_json::Value {
    let mut c = Command::new("fio");
    c.args([
        "--name=zero-loss",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=8",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        &format!("--randseed={seed}"),
        "--output-format=json",
    ]);
    c.arg(if verify_only {
        "--verify_only"
    } else {
        "--do_verify=0"
    });
    let out = c.output().unwrap();
    // fio prints "fio: connected to NBD server" on stdout before its JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .find('{')
        .and_then(|i| serde_json::from_str::<serde_json::Value>(&stdout[i..]).ok());
    match json {
        Some(j) if out.status.success() && j["jobs"][0]["error"] == 0 => j["jobs"][0].clone(),
        _ => panic!(
            "fio {} of seed {seed} on {uri} failed ({}): {}\n{stdout}",
            if verify_only { "verify" } else { "write" },
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Writes a workload; returns the bytes fio wrote (all of them acknowledged).
fn write_workload(uri: &str, region: (u64, u64), seed: u64) -> u64 {
    let j = fio(uri, region, seed, false);
    let written = j["write"]["io_bytes"].as_u64().unwrap();
    assert_eq!(written, region.1, "fio wrote the whole region once: {j}");
    written
}

/// Every block a workload wrote reads back with its verify header and checksum.
fn verify_workload(uri: &str, region: (u64, u64), seed: u64) {
    let j = fio(uri, region, seed, true);
    assert_eq!(
        j["read"]["io_bytes"].as_u64().unwrap(),
        region.1,
        "every written block was verified: {j}"
    );
}

/// `failover prepare` on `h`, retried while a client that just closed is still connected (75).
fn prepare(h: &Host, vm: &str) {
    wait_until("the prepare", Duration::from_secs(30), || {
        let out = h.run(&["failover", "prepare", vm]);
        assert!(
            out.status.success() || out.status.code() == Some(75),
            "prepare on {}: {}",
            h.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    });
}

/// (bytes of the deltas, bytes sent) since the relationship of `vm` on `h` started.
fn shipped(h: &Host, vm: &str) -> (u64, u64) {
    let m = h.json(&["replication", "measure", vm]);
    assert_eq!(m["failed_cycles"], 0, "{m}");
    (
        m["average_delta_bytes"].as_u64().unwrap() * m["successful_cycles"].as_u64().unwrap(),
        m["sent_bytes_total"].as_u64().unwrap(),
    )
}

fn reverse(h: &Host, vm: &str, to: &Host) {
    let st = h.json(&[
        "replication",
        "reverse",
        vm,
        "--replica",
        &to.addr(),
        "--frequency",
        "1",
    ]);
    assert_eq!(st["state"], "Replicating", "{st}");
    assert_eq!(st["role"], "Primary", "{st}");
}

#[test]
fn planned_failover_and_failback_lose_no_acknowledged_write() {
    require("fio", "fio");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    enable_replica_server(&a);
    let disk = format!("{}M", DISK >> 20);
    replicate(&a, &b, "web", &[&disk], 1);

    // The first workload on A, while cycles run every second; the fio run ends by itself and
    // every write it made was acknowledged.
    let written1 = write_workload(&a.nbd_uri("web", 0), FIRST, 1);

    // A → B, planned.
    prepare(&a, "web");
    b.ok(&["failover", "start", "web"]);
    b.ok(&["failover", "complete", "web"]);
    let on_b = b.nbd_uri("web", 0);
    verify_workload(&on_b, FIRST, 1);

    // Reverse B → A: only the second workload crosses, not the disk.
    reverse(&b, "web", &a);
    assert_eq!(a.json(&["replication", "status", "web"])["role"], "Replica");
    let written2 = write_workload(&on_b, SECOND, 2);
    verify_workload(&on_b, FIRST, 1);
    prepare(&b, "web");
    let (delta, sent) = shipped(&b, "web");
    println!(
        "reverse B→A shipped {delta} bytes of deltas ({sent} sent) of a {DISK}-byte disk; \
         {written2} bytes written on B after the failover ({written1} written on A before it)"
    );
    // Random data, none of it zeros: every written byte had to cross (an average times a
    // count rounds down by less than one byte per cycle).
    assert!(delta + 1024 >= written2, "{delta} < {written2}");
    assert!(
        sent < 4 * written2 + SLACK && sent < DISK / 4,
        "the reverse ships what was written ({written2}), not the disk: {sent} sent"
    );

    // B → A (failback), planned.
    a.ok(&["failover", "start", "web"]);
    a.ok(&["failover", "complete", "web"]);
    let on_a = a.nbd_uri("web", 0);
    verify_workload(&on_a, FIRST, 1);
    verify_workload(&on_a, SECOND, 2);

    // And A → B again: nothing written since the failback, so (almost) nothing crosses.
    reverse(&a, "web", &b);
    assert_eq!(b.json(&["replication", "status", "web"])["role"], "Replica");
    sync_until_ok(&a, "web", 20);
    let (delta, sent) = shipped(&a, "web");
    println!("reverse A→B shipped {delta} bytes of deltas ({sent} sent); nothing written after the failback");
    assert!(
        sent < SLACK,
        "nothing was written after the failback: {sent} sent"
    );
    verify_workload(&on_a, FIRST, 1);
    verify_workload(&on_a, SECOND, 2);
}
