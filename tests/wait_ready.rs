#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `outrider wait-ready`: a container's postStart hook that holds the app back until the
//! sidecar can carry its traffic (Istio's `holdApplicationUntilProxyStarts`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outrider::testing::BinProxy;

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

fn wait_ready(admin: &str, timeout: &str) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["wait-ready", "--admin", admin, "--timeout", timeout])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn it_returns_once_the_sidecar_is_ready_and_fails_at_the_timeout() {
    // Nothing there: a failure at the timeout that says where it looked and what it got.
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let (ok, _, stderr) = wait_ready(&addr, "300ms");
    assert!(!ok);
    assert!(
        stderr.contains(&addr) && stderr.contains("not ready"),
        "{stderr}"
    );

    // An admin port that says "not ready" for a while (a sidecar still fetching its
    // certificate), then ready: it waits, and returns.
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = admin.local_addr().unwrap().to_string();
    let ready = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicUsize::new(0));
    let (r, n) = (ready.clone(), asked.clone());
    std::thread::spawn(move || {
        for conn in admin.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            n.fetch_add(1, Ordering::SeqCst);
            let answer: &[u8] = if r.load(Ordering::SeqCst) {
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nnot ready\n"
            };
            let _ = conn.write_all(answer);
        }
    });
    let (ok, _, stderr) = wait_ready(&addr, "300ms");
    assert!(!ok);
    assert!(stderr.contains("503"), "the last answer is told: {stderr}");
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        ready.store(true, Ordering::SeqCst);
    });
    let before = asked.load(Ordering::SeqCst);
    let (ok, stdout, stderr) = wait_ready(&addr, "20s");
    flip.join().unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ready"), "{stdout}");
    assert!(
        asked.load(Ordering::SeqCst) - before >= 2,
        "it asked again until ready"
    );

    // The real thing.
    let proxy = BinProxy::start(BIN, "outbound: {}\n");
    let (ok, _, stderr) = wait_ready(&proxy.admin_addr.to_string(), "10s");
    assert!(ok, "{stderr}");
}
