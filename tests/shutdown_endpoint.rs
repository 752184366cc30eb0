//! `POST /shutdown` on the admin port: a Job's app stops its sidecar when it is done, so that
//! the pod completes (Istio's `/quitquitquit`, Linkerd's `/shutdown`). Only from loopback.
//!
//! Run: `sudo -E cargo test --test shutdown_endpoint` (CI runs as root). Without root the
//! test fails saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::panic,
    reason = "a test reports an unexpected outcome by panicking"
)]

mod common;

use std::time::Duration;

use common::netns::{self, NetNs};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");

#[test]
fn shutdown_from_the_pod_drains_and_exits_and_posts_from_elsewhere_are_refused() {
    // The pod, and another one on the network that can reach its admin port (open to the
    // network for the kubelet's probes).
    let pod = NetNs::new("orshut");
    let other = NetNs::new("orshuto");
    let veth = netns::link(&pod, &other);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outrider.yaml");
    std::fs::write(
        &config,
        "admin: { listen: 0.0.0.0:15000 }\noutbound: { listen: 127.0.0.1:15001 }\n",
    )
    .unwrap();
    let mut proxy = pod.spawn(OUTRIDER, &["run", "--config", config.to_str().unwrap()]);
    let ready = |ns: &NetNs, host: &str| {
        let url = format!("http://{host}:15000/ready");
        ns.exec(
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while String::from_utf8_lossy(&ready(&pod, "127.0.0.1").stdout) != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy did not become ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let post = |ns: &NetNs, host: &str, path: &str| -> (String, String) {
        let url = format!("http://{host}:15000{path}");
        let out = ns.exec("curl", &["-s", "-X", "POST", "-w", "\n%{http_code}", &url]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    };
    // From another pod: refused, as every POST is (nor can it empty the cache, reopen
    // the log or change what is logged), and the proxy serves on.
    let pod_ip = veth.a_ip.to_string();
    for path in [
        "/shutdown",
        "/cache/purge",
        "/reopen_logs",
        "/logging?level=debug",
    ] {
        let (code, body) = post(&other, &pod_ip, path);
        assert_eq!(code, "403", "{path}: {body}");
        assert!(body.contains("loopback"), "{body}");
    }
    assert!(proxy.exited_within(Duration::from_millis(500)).is_none());
    assert_eq!(
        String::from_utf8_lossy(&ready(&other, &pod_ip).stdout),
        "200"
    );

    // From the pod: accepted, and the proxy drains and exits cleanly, as on SIGTERM.
    let (code, body) = post(&pod, "127.0.0.1", "/reopen_logs");
    assert_eq!(code, "200", "{body}");
    let (code, body) = post(&pod, "127.0.0.1", "/shutdown");
    assert_eq!(code, "200", "{body}");
    let status = proxy
        .exited_within(Duration::from_secs(20))
        .expect("the proxy did not exit after POST /shutdown");
    assert!(status.success(), "{status:?}");
}
