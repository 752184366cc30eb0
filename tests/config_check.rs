#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `outrider check --config FILE`, run as the real binary: every error case exits non-zero
//! with stderr naming the key path; a valid file exits 0; every shipped file under
//! `config/` loads.

use std::path::Path;
use std::process::Command;

use outrider::testing::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

fn check(yaml: &str) -> (i32, String, String) {
    let dir = TempDir::new("check");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_rejected(yaml: &str, key: &str) {
    let (code, _, stderr) = check(yaml);
    assert_ne!(code, 0, "check accepted:\n{yaml}");
    assert!(
        stderr.contains(key),
        "stderr does not name {key:?}:\n{stderr}\nconfig:\n{yaml}"
    );
}

#[test]
fn valid_file_exits_zero() {
    let (code, stdout, stderr) = check(
        "admin: { listen: 127.0.0.1:25000 }\n\
         outbound:\n  listen: 127.0.0.1:25001\n  egress:\n    mode: report\n    allow:\n\
         \x20     - host: api.example.com\n      - host: \"*.example.org\"\n        ports: [443]\n\
         \x20     - cidr: 10.20.0.0/16\n        ports: [5432]\n",
    );
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn unknown_key_is_named() {
    assert_rejected("outbound:\n  egress:\n    allw: []\n", "outbound.egress");
    assert_rejected("outbound:\n  egress:\n    allw: []\n", "allw");
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: a.com\n        port: [80]\n",
        "outbound.egress.allow[0]",
    );
    assert_rejected("admn:\n  listen: 127.0.0.1:1\n", "admn");
}

#[test]
fn bad_cidr_is_named() {
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - cidr: 10.0.0.0/33\n",
        "outbound.egress.allow[0].cidr",
    );
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: a.com\n      - cidr: not-a-net\n",
        "outbound.egress.allow[1].cidr",
    );
}

#[test]
fn bad_ports_are_named() {
    for port in ["0", "70000", "-1"] {
        let (code, _, stderr) = check(&format!(
            "outbound:\n  egress:\n    allow:\n      - host: a.com\n        ports: [443, {port}]\n"
        ));
        assert_ne!(code, 0, "port {port} accepted");
        assert!(
            stderr.contains("outbound.egress.allow[0].ports"),
            "port {port}: stderr does not name the key:\n{stderr}"
        );
    }
    assert_rejected("outbound:\n  listen: 127.0.0.1:70000\n", "outbound.listen");
}

#[test]
fn unparseable_listen_address_is_named() {
    assert_rejected("admin:\n  listen: localhost-ish\n", "admin.listen");
    assert_rejected("outbound:\n  listen: \"127.0.0.1\"\n", "outbound.listen");
    assert_rejected("inbound:\n  listen: \"0.0.0.0:port\"\n", "inbound.listen");
}

#[test]
fn malformed_host_patterns_are_named() {
    for pattern in [
        "a.*.com", "a..com", "*.", "*", "**.a.com", ".a.com", "a b.com", "a@b.com", "*.*.com",
    ] {
        let (code, _, stderr) = check(&format!(
            "outbound:\n  egress:\n    allow:\n      - host: a.com\n      - host: \"{pattern}\"\n"
        ));
        assert_ne!(code, 0, "host pattern {pattern:?} accepted");
        assert!(
            stderr.contains("outbound.egress.allow[1].host"),
            "pattern {pattern:?}: stderr does not name the key:\n{stderr}"
        );
    }
}

#[test]
fn two_listeners_on_one_address_are_refused() {
    assert_rejected(
        "admin:\n  listen: 127.0.0.1:25100\noutbound:\n  listen: 127.0.0.1:25100\n",
        "outbound.listen",
    );
    assert_rejected(
        "admin:\n  listen: 127.0.0.1:25100\noutbound:\n  listen: 127.0.0.1:25101\ninbound:\n  listen: 0.0.0.0:25101\n",
        "inbound.listen",
    );
}

#[test]
fn an_absurd_number_of_worker_threads_is_refused() {
    assert_rejected(
        "runtime:\n  worker_threads: 100000\n",
        "runtime.worker_threads",
    );
}

#[test]
fn a_rule_needs_exactly_one_of_host_and_cidr() {
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: a.com\n        cidr: 10.0.0.0/8\n",
        "outbound.egress.allow[0]",
    );
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - ports: [80]\n",
        "outbound.egress.allow[0]",
    );
}

#[test]
fn other_invalid_values_are_named() {
    assert_rejected(
        "admin:\n  listen: 127.0.0.1:1\nadmin:\n  listen: 127.0.0.1:2\n",
        "admin",
    );
    assert_rejected(
        "outbound:\n  egress:\n    mode: block\n",
        "outbound.egress.mode",
    );
    assert_rejected(
        "outbound:\n  timeouts:\n    response: fast\n",
        "outbound.timeouts.response",
    );
    assert_rejected("dns:\n  hosts:\n    a.test: 1.2.3\n", "dns.hosts.a.test");
    assert_rejected("dns:\n  hosts:\n    a..test: 1.2.3.4\n", "dns.hosts");
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: a.test\n        ports: []\n",
        "outbound.egress.allow[0].ports",
    );
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: a.test\n        ports: [\"443\"]\n",
        "outbound.egress.allow[0].ports[0]",
    );
    assert_rejected(
        "outbound:\n  egress:\n    allow:\n      - host: 10.0.0.1\n",
        "outbound.egress.allow[0].host",
    );
    assert_rejected("outbound:\n  egress:\n    allow: [\n", "YAML");
    assert_rejected("clients:\n  idle_timeout: 0s\n", "clients.idle_timeout");
    assert_rejected("clients:\n  idle_timeout: soon\n", "clients.idle_timeout");
    // hyper cannot read with a buffer under 8 KiB (it would panic on the first connection).
    assert_rejected(
        "clients:\n  max_request_head_bytes: 1024\n",
        "clients.max_request_head_bytes",
    );
    assert_rejected(
        "clients:\n  max_request_head_bytes: -1\n",
        "clients.max_request_head_bytes",
    );
}

/// The README documents `output: off`; unquoted, YAML 1.1 reads it as the boolean false.
#[test]
fn unquoted_off_turns_the_access_log_off() {
    let (code, _, stderr) = check("access_log:\n  output: off\n");
    assert_eq!(code, 0, "{stderr}");
    let config = outrider::config::Config::from_yaml("access_log:\n  output: off\n").unwrap();
    assert_eq!(config.access_log.output, "off");
    let config = outrider::config::Config::from_yaml("access_log:\n  output: \"off\"\n").unwrap();
    assert_eq!(config.access_log.output, "off");
    // `on` is no output at all.
    assert_rejected("access_log:\n  output: on\n", "access_log.output");
    assert_rejected("access_log:\n  output: [a]\n", "access_log.output");
}

#[test]
fn a_missing_file_is_an_error() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/outrider.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/outrider.yaml"));
}

#[test]
fn every_shipped_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    // Shipped configs and the examples' configs: none may rot.
    let entries: Vec<_> = ["config", "examples"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .collect();
    for entry in entries {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        n += 1;
        outrider::config::Config::load(Some(&path))
            .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "outrider check {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(n > 0, "no config files found in {}", root.display());
    // The embedded default is one of them, and loads too.
    outrider::config::Config::load(None).unwrap();
}

#[test]
fn run_refuses_a_bad_config_and_a_taken_port() {
    let dir = TempDir::new("run");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "outbound:\n  egress:\n    allow:\n      - cidr: 10.0.0.0/33\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outbound.egress.allow[0].cidr"), "{stderr}");

    // A listen address another process holds: the error names the key and the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = dir.path().join("taken.yaml");
    let log = dir.path().join("access.log");
    std::fs::write(
        &cfg,
        format!(
            "admin:\n  listen: 127.0.0.1:0\noutbound:\n  listen: {addr}\naccess_log:\n  output: {}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let status =
        status.unwrap_or_else(|| panic!("outrider kept running on a taken port:\n{stderr}"));
    assert!(!status.success());
    assert!(
        stderr.contains("outbound.listen") && stderr.contains(&addr.to_string()),
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn default_config_prints_the_shipped_example() {
    let out = Command::new(BIN).arg("default-config").output().unwrap();
    assert!(out.status.success());
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/outrider.yaml"))
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), shipped);
}

/// `${NAME}` in values comes from the environment: one file for every pod, each sidecar
/// filling in its own identity and addresses. `check` and `run` both expand it; an unset
/// variable is refused naming the key and the variable; a whole reference is a number where
/// the key takes one.
#[test]
fn environment_variables_fill_in_values() {
    let dir = TempDir::new("env");
    let path = dir.path().join("c.yaml");
    let log = dir.path().join("access.log");
    std::fs::write(
        &path,
        format!(
            "admin:\n  listen: \"127.0.0.1:${{OUTRIDER_TEST_ADMIN_PORT}}\"\n\
             outbound:\n  listen: 127.0.0.1:0\n  egress:\n    allow:\n\
             \x20     - host: \"api.${{OUTRIDER_TEST_NS}}.example\"\n\
             \x20       ports: [\"${{OUTRIDER_TEST_PORT}}\"]\n\
             clients:\n  max_connections: ${{OUTRIDER_TEST_LIMIT:-700}}\n\
             access_log:\n  output: {}\n",
            log.display()
        ),
    )
    .unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_port = free.local_addr().unwrap().port();
    drop(free);
    let env = [
        ("OUTRIDER_TEST_ADMIN_PORT", admin_port.to_string()),
        ("OUTRIDER_TEST_NS", "shop".to_owned()),
        ("OUTRIDER_TEST_PORT", "8443".to_owned()),
    ];
    let with_env = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg(&path);
        cmd.env_remove("OUTRIDER_TEST_LIMIT");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd
    };

    let out = with_env(&["check", "--config"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with_env(&["check", "--config"])
        .env_remove("OUTRIDER_TEST_NS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("outbound.egress.allow[0].host")
            && stderr.contains("OUTRIDER_TEST_NS is not set"),
        "{stderr}"
    );

    // The running proxy has the values: its admin port, and /config shows them typed.
    let mut child = with_env(&["run", "--config"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let config = loop {
        let got = std::net::TcpStream::connect(("127.0.0.1", admin_port)).and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET /config HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match got {
            Ok(text) if text.starts_with("HTTP/1.1 200") => break text,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => {
                let _ = child.kill();
                panic!("no /config on the admin port from the environment: {other:?}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(config.contains("\"api.shop.example\""), "{config}");
    assert!(config.contains("8443"), "{config}");
    assert!(config.contains("\"max_connections\": 700"), "{config}");
}
