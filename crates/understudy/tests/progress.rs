//! Long work shows its progress: a bar on a terminal, plain lines (percent, bytes, rate, ETA)
//! on stdout otherwise, so logs and CI output show that it moves; stderr stays for the error
//! (one line).

mod common;

use common::*;

fn is_progress_line(l: &str, what: &str) -> bool {
    l.starts_with(&format!("{what}: ")) && l.contains("% (") && l.contains(", eta ")
}

#[test]
fn export_start_wait_and_failover_complete_print_plain_progress_lines_when_not_a_terminal() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = pair(root.path());
    a.ok(&["vm", "create", "web", "--disk", "16M"]);
    qemu_io_ok(&a.nbd_uri("web", 0), &["write -P 0x5a 0 6M"]);
    a.ok(&[
        "replication",
        "enable",
        "web",
        "--replica",
        &b.addr(),
        "--frequency",
        "60",
    ]);
    // Initial replication: whatever progress lines it printed (it may be done before the
    // first look), then the result.
    let out = a.run(&["replication", "start", "web", "--wait"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"initial replication of web complete"),
        "{text}"
    );
    for l in &lines[..lines.len() - 1] {
        assert!(is_progress_line(l, "initial replication of web"), "{l}");
    }

    // Export: progress lines on stdout, always ending with the whole disk, its rate and ETA.
    let to = root.path().join("web-0.raw");
    let out = b.run(&["points", "export", "web", "--to", to.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    assert!(n >= 2, "{text}");
    assert!(lines[n - 1].starts_with("exported web point "), "{text}");
    let last = lines[n - 2];
    assert!(
        last.starts_with("export of web disk 0: 100% (16.0 MiB of 16.0 MiB), ")
            && last.ends_with("/s, eta 0 s"),
        "the last progress line has the rate and ETA: {text}"
    );
    for l in &lines[..n - 1] {
        assert!(is_progress_line(l, "export of web disk 0"), "{l}");
    }
    let data = std::fs::read(&to).unwrap();
    assert!(data[..6 << 20].iter().all(|&x| x == 0x5a));
    assert!(data[6 << 20..].iter().all(|&x| x == 0));
    std::fs::remove_file(&to).unwrap();

    // A failed export: one line on stderr, no progress line claiming it finished.
    let out = b.run(&["points", "export", "web", "--to", "/nonexistent-dir/x.raw"]);
    let err = one_line_failure(&out);
    assert!(err.contains("nonexistent-dir"), "{err}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("100%"), "{text}");

    // Backup: the same progress lines, ending with the whole point, then the result.
    let dir = root.path().join("backup");
    std::fs::create_dir(&dir).unwrap();
    let out = b.run(&[
        "backup",
        "web",
        "--to",
        dir.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let done = lines
        .iter()
        .position(|l| l.starts_with("backed up web point "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(done >= 1, "{text}");
    assert!(
        lines[done - 1].starts_with("backup of web: 100% (16.0 MiB of 16.0 MiB), "),
        "{text}"
    );
    for l in &lines[..done] {
        assert!(is_progress_line(l, "backup of web"), "{l}");
    }
    // With --json, stdout is the JSON document alone.
    let dir2 = root.path().join("backup2");
    std::fs::create_dir(&dir2).unwrap();
    let v = b.json(&[
        "backup",
        "web",
        "--to",
        dir2.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert_eq!(v["vm"], "web", "{v}");

    // Failover complete copies the failover disks into the new primary VM's: the same lines.
    b.ok(&["failover", "start", "web"]);
    let out = b.run(&["failover", "complete", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let done = lines
        .iter()
        .position(|l| l.starts_with("web: failover complete"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(done >= 1, "{text}");
    assert!(
        lines[done - 1].starts_with("failover complete of web: 100% (16.0 MiB of 16.0 MiB), ")
            && lines[done - 1].ends_with("/s, eta 0 s"),
        "{text}"
    );
    for l in &lines[..done] {
        assert!(is_progress_line(l, "failover complete of web"), "{l}");
    }
}
