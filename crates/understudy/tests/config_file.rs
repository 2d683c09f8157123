//! `serve --config FILE` (docs/config.md): a daemon configured only by its file serves; flags on
//! the command line override the file; a bad file is refused in one line naming it.

mod common;

use common::*;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Starts `understudy serve ARGS` and waits for its ready line; returns the child.
fn serve_ready(args: &[&str], log: &Path) -> std::process::Child {
    let mut child = Command::new(EXE)
        .arg("serve")
        .args(args)
        .env_remove("UNDERSTUDY_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "daemon did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    child
}

fn stop(mut child: std::process::Child) {
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon stopped with {status}");
}

#[test]
fn daemon_started_only_from_a_config_file_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let cfg = tmp.path().join("understudy.toml");
    write(
        &cfg,
        &format!(
            "# every serve flag by its name\n\
             data-dir = \"{}\"\n\
             listen = \"127.0.0.1:{port}\"\n\
             name = \"from-file\"\n\
             cbw-memory = \"64M\"\n\
             hello-timeout = 15\n",
            data.display()
        ),
    );
    let log = tmp.path().join("daemon.log");
    let child = serve_ready(&["--config", cfg.to_str().unwrap()], &log);
    // The API answers in the data directory the file named, the peer port is the file's.
    let out = Command::new(EXE)
        .args(["--data-dir", data.to_str().unwrap(), "vm", "create", "v"])
        .args(["--disk", "16M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("peer port from the file");
    let events = std::fs::read_to_string(data.join("events.log")).unwrap();
    assert!(events.contains("serving as from-file"), "{events}");
    stop(child);

    // A flag on the command line overrides the file's value.
    let child = serve_ready(
        &["--config", cfg.to_str().unwrap(), "--name", "from-flag"],
        &log,
    );
    let events = std::fs::read_to_string(data.join("events.log")).unwrap();
    assert!(events.contains("serving as from-flag"), "{events}");
    stop(child);
}

#[test]
fn bad_config_key_or_value_is_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    let file = cfg.display().to_string();
    let data = tmp.path().join("data");
    let run = |extra: &[&str]| {
        Command::new(EXE)
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "serve",
                "--config",
                &file,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let cases: &[(&str, &[&str])] = &[
        // Unknown key: named with the file.
        (
            "listen = \"127.0.0.1:1\"\nlisten-port = 7000\n",
            &["listen-port", &file],
        ),
        // Snake case is not the flag's name: say which one it is.
        (
            "cbw_memory = \"64M\"\n",
            &["cbw_memory", "cbw-memory", &file],
        ),
        // A value the flag's own parser refuses.
        (
            "listen = \"127.0.0.1:1\"\nhello-timeout = \"soon\"\n",
            &["hello-timeout", "soon", &file],
        ),
        (
            "listen = \"127.0.0.1:1\"\ncbw-memory = \"12345\"\n",
            &["cbw-memory", &file],
        ),
        (
            "listen = \"127.0.0.1:1\"\nname = [\"a\"]\n",
            &["name", &file],
        ),
        // Not TOML: the line is named.
        (
            "listen = \"127.0.0.1:1\"\nhello-timeout = = 3\n",
            &["line 2", &file],
        ),
    ];
    for (text, wanted) in cases {
        write(&cfg, text);
        let out = run(&[]);
        let err = one_line_failure(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        for w in *wanted {
            assert!(err.contains(w), "{text:?}: {err:?} should name {w:?}");
        }
        assert!(!data.join("daemon.lock").exists(), "no daemon ran: {err}");
    }
    // A missing file named explicitly is an error, not an empty config.
    std::fs::remove_file(&cfg).unwrap();
    let out = run(&["--listen", "127.0.0.1:1"]);
    let err = one_line_failure(&out);
    assert!(err.contains(&file) && err.contains("No such file"), "{err}");
}
