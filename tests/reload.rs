#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Config reload (in-process and by SIGHUP to the real binary) and SIGTERM drain.
//!
//! The reload scenario: a host rule allows `api.test`, which maps to 127.0.0.1, but no CIDR
//! rule allows that address on the upstream's port, so it is refused; the new file adds the
//! CIDR rule and the same request passes, on a client connection opened before the reload.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use outrider::testing::{open_tunnel, read_head, BinProxy, ProxyClient, TestProxy, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

fn before(other: u16) -> String {
    format!(
        "outbound:\n  egress:\n    allow:\n      - host: api.test\n      - cidr: 127.0.0.1/32\n        ports: [{other}]\n\
         dns:\n  hosts:\n    api.test: 127.0.0.1\n"
    )
}

fn after() -> String {
    "outbound:\n  egress:\n    allow:\n      - host: api.test\n      - cidr: 127.0.0.1/32\n\
     dns:\n  hosts:\n    api.test: 127.0.0.1\n"
        .to_owned()
}

const BAD: &str = "outbound:\n  egress:\n    allow:\n      - cidr: 10.0.0.0/33\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_in_process_good_then_bad() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let proxy = TestProxy::start(&before(other.port())).await;
    let url = format!("http://api.test:{}/new", up.port());
    let keep = format!("http://127.0.0.1:{}/old", other.port());

    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    assert_eq!(client.get(&keep).await.status, 200);
    let r = client.get(&url).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.error_header().contains("private address"), "{r:?}");

    proxy.reload_with(&after()).unwrap();
    // The admin page shows the effective (new) config.
    let (status, cfg) = outrider::testing::admin_get(proxy.admin_addr(), "/config").await;
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert!(
        cfg["outbound"]["egress"]["allow"][1]["ports"].is_null(),
        "{cfg}"
    );
    // The connection opened before the reload is still served, under the new policy.
    let r = client.get(&url).await;
    assert_eq!(r.status, 200, "after reload: {r:?}");
    assert_eq!(client.get(&keep).await.status, 200);
    assert!(client.is_open());

    // A bad file is refused with the key named, and the running policy stays.
    let err = proxy.reload_with(BAD).map(|()| "accepted").err();
    let err = err.unwrap_or_else(|| {
        // `reload_with` parses the YAML itself; a semantically bad file must still be refused.
        panic!("reload accepted an invalid config")
    });
    assert!(err.contains("outbound.egress.allow[0].cidr"), "{err}");
    proxy.write_config_raw("outbound: [this is: not valid");
    assert!(proxy.reload().is_err());
    let r = client.get(&url).await;
    assert_eq!(
        r.status, 200,
        "the old policy must still apply after a refused reload: {r:?}"
    );
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_good_then_bad() {
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let proxy = BinProxy::start(BIN, &before(other.port()));
    let url = format!("http://api.test:{}/new", up.port());
    let keep = format!("http://127.0.0.1:{}/old", other.port());

    let mut client = ProxyClient::connect(proxy.proxy_addr).await;
    assert_eq!(client.get(&keep).await.status, 200);
    assert_eq!(client.get(&url).await.status, 403);

    proxy.write_config(&after());
    proxy.signal(Signal::SIGHUP);
    assert!(
        proxy.wait_stderr("config reloaded"),
        "no reload logged:\n{}",
        proxy.stderr()
    );
    let r = client.get(&url).await;
    assert_eq!(r.status, 200, "after SIGHUP: {r:?}\n{}", proxy.stderr());
    assert_eq!(client.get(&keep).await.status, 200);

    // A bad file: an error naming the key is logged, the old policy stays, the process lives.
    std::fs::write(&proxy.config_path, BAD).unwrap();
    proxy.signal(Signal::SIGHUP);
    assert!(
        proxy.wait_stderr("outbound.egress.allow[0].cidr"),
        "bad reload not reported:\n{}",
        proxy.stderr()
    );
    let r = client.get(&url).await;
    assert_eq!(
        r.status, 200,
        "old policy lost after a refused reload: {r:?}"
    );
    let mut fresh = ProxyClient::connect(proxy.proxy_addr).await;
    assert_eq!(fresh.get(&url).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_stops_accepting() {
    let up = Upstream::start().await;
    let mut proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nshutdown:\n  drain_timeout: 10s\n",
    );
    let addr = proxy.proxy_addr;
    let slow = format!("http://127.0.0.1:{}/slow?ms=1500", up.port());
    let in_flight = tokio::spawn(async move {
        let mut c = ProxyClient::connect(addr).await;
        c.get(&slow).await
    });
    // Let the request reach the upstream before the signal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.requests() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.requests(), 1);
    proxy.signal(Signal::SIGTERM);
    assert!(proxy.wait_stderr("draining"), "{}", proxy.stderr());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New connections are refused while the old request is still running, and the admin
    // listener reports not ready.
    assert!(!in_flight.is_finished());
    let (ready, _) = outrider::testing::admin_get(proxy.admin_addr, "/ready").await;
    assert_eq!(ready, 503, "/ready during drain");
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "the proxy accepted a connection after SIGTERM"
    );
    // The in-flight request completes normally.
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "slow done");
    // It says the connection closes, and not also how long it would be kept idle.
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{r:?}");
    assert_eq!(r.header("keep-alive"), None, "{r:?}");
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("outrider did not exit after draining");
    assert!(status.success(), "{status:?}\n{}", proxy.stderr());
    // The drained request was logged.
    let recs = outrider::testing::read_log(&proxy.log_path);
    assert!(
        recs.iter()
            .any(|r| r["path"] == "/slow?ms=1500" && r["status"] == 200),
        "{recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_after_the_drain_timeout() {
    let up = Upstream::start().await;
    let mut proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nshutdown:\n  drain_timeout: 300ms\n",
    );
    let addr = proxy.proxy_addr;
    let slow = format!("http://127.0.0.1:{}/slow?ms=20000", up.port());
    let _in_flight = tokio::spawn(async move {
        let mut c = ProxyClient::connect(addr).await;
        let req = http::Request::get(slow)
            .body(outrider::testing::generated_body(0))
            .unwrap();
        c.send(req).await.map(|r| r.status())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.requests() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some(),
        "outrider still running 5 s after SIGTERM with a 300ms drain timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_do_not_hold_up_shutdown() {
    let up = Upstream::start().await;
    let mut proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nshutdown:\n  drain_timeout: 10s\n",
    );
    // One keep-alive connection idle after a finished request, one that never sent a byte.
    let mut used = ProxyClient::connect(proxy.proxy_addr).await;
    assert_eq!(
        used.get(&format!("http://127.0.0.1:{}/x", up.port()))
            .await
            .status,
        200
    );
    let silent = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(12));
    let took = started.elapsed();
    assert!(status.is_some(), "outrider did not exit");
    assert!(
        took < Duration::from_secs(3),
        "idle connections held shutdown for {took:?} (drain timeout 10s): nothing was in flight\n{}",
        proxy.stderr()
    );
    drop(silent);
}

/// Sends `probe` on `s` and expects it echoed back within a second.
async fn echoes(s: &mut tokio::net::TcpStream, probe: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(probe).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; probe.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == probe
}

/// Opens a connection through the proxy at `proxy` that the upstream on `port` upgrades
/// to its echo protocol (as a WebSocket would be).
async fn open_upgraded(proxy: std::net::SocketAddr, port: u16) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut upgraded = tokio::net::TcpStream::connect(proxy).await.unwrap();
    upgraded
        .write_all(
            format!(
                "GET http://127.0.0.1:{port}/upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    assert!(read_head(&mut upgraded).await.starts_with("HTTP/1.1 101"));
    upgraded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_is_drained_not_cut() {
    let echo = outrider::testing::TcpEcho::start().await;
    let mut proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nshutdown:\n  drain_timeout: 3s\n",
    );
    let mut tunnel = open_tunnel(proxy.proxy_addr, &echo.addr.to_string()).await;
    assert!(echoes(&mut tunnel, b"before").await);
    proxy.signal(Signal::SIGTERM);
    assert!(proxy.wait_stderr("draining"), "{}", proxy.stderr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        echoes(&mut tunnel, b"during drain").await,
        "a CONNECT tunnel was cut at SIGTERM instead of drained"
    );
    // New connections are refused meanwhile; closing the tunnel lets the process finish
    // before the drain timeout.
    assert!(tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .is_err());
    drop(tunnel);
    let started = Instant::now();
    assert!(proxy.wait_exit(Duration::from_secs(5)).is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_alone_is_drained_not_cut() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nshutdown:\n  drain_timeout: 3s\n",
    );
    let mut upgraded = open_upgraded(proxy.proxy_addr, up.port()).await;
    assert!(echoes(&mut upgraded, b"before").await);
    proxy.signal(Signal::SIGTERM);
    assert!(proxy.wait_stderr("draining"), "{}", proxy.stderr());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        echoes(&mut upgraded, b"during drain").await,
        "an upgraded (WebSocket-like) connection was cut at SIGTERM instead of drained; stderr:\n{}",
        proxy.stderr()
    );
}

/// A `CONNECT` tunnel and an upgraded (WebSocket-like) connection admitted under one policy
/// are checked again at each reload: they stay open while the new policy still allows them,
/// and are closed (and logged as denied) once a reload revokes the rule that let them
/// through. Otherwise a security team that removes a host from the allowlist would leave
/// every long-lived tunnel to it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_the_tunnels_it_no_longer_allows() {
    use tokio::io::AsyncReadExt;
    let echo = outrider::testing::TcpEcho::start().await;
    let up = Upstream::start().await;
    let allowing = |ports: &str, extra: &str| {
        format!("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n        ports: [{ports}]\n{extra}")
    };
    let both = format!("{}, {}", echo.addr.port(), up.port());
    let proxy = TestProxy::start(&allowing(&both, "")).await;
    let mut tunnel = open_tunnel(proxy.proxy_addr(), &echo.addr.to_string()).await;
    let mut upgraded = open_upgraded(proxy.proxy_addr(), up.port()).await;
    for s in [&mut tunnel, &mut upgraded] {
        assert!(echoes(s, b"before").await);
    }

    // A reload that still allows them (another rule added) leaves them alone.
    proxy
        .reload_with(&allowing(&both, "      - host: other.test\n"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in [&mut tunnel, &mut upgraded] {
        assert!(
            echoes(s, b"after a harmless reload").await,
            "a reload that still allows the connection closed it"
        );
    }

    // The rule is revoked (the address is allowed on another port only): both close.
    proxy.reload_with(&allowing("1", "")).unwrap();
    for (what, s) in [
        ("CONNECT tunnel", &mut tunnel),
        ("upgraded connection", &mut upgraded),
    ] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the {what} was still open 5 s after a reload revoked its rule: {read:?}"
        );
    }
    for protocol in ["connect", "http1"] {
        let rec = proxy
            .wait_log(|r| r["protocol"] == protocol && r["decision"] == "deny")
            .await;
        let reason = rec["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("config reload"), "{rec}");
        // The record of a denial names no allowing rule; the one that let it in is in the reason.
        assert!(rec.get("rule").is_none(), "{rec}");
        assert!(reason.contains("admitted by allow[0]"), "{rec}");
        assert!(rec["bytes_in"].as_u64().unwrap_or(0) > 0, "{rec}");
    }
}

/// Waits (up to 5 s) until the file at `path` has a line containing `needle`; returns its text.
async fn file_with(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log rotation as logrotate does it: the file is renamed, then the proxy is told to reopen
/// its path (SIGUSR1 in `postrotate`, or the admin API). Records before the reopen stay in
/// the renamed file, and the ones after go to a new file at the configured path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_and_the_admin_api_reopen_the_access_log_after_rotation() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    let get = |path: &'static str| {
        let url = format!("http://127.0.0.1:{}{path}", up.port());
        async move {
            outrider::testing::proxy_get(proxy.proxy_addr, &url)
                .await
                .status
        }
    };
    let log = proxy.log_path.clone();
    let rotated = |n: u32| log.with_extension(format!("log.{n}"));

    assert_eq!(get("/before").await, 200);
    assert!(file_with(&log, "/before").await.contains("/before"));
    std::fs::rename(&log, rotated(1)).unwrap();
    // Until told, the proxy writes on into the file it has open, wherever it now is.
    assert_eq!(get("/between").await, 200);
    assert!(file_with(&rotated(1), "/between")
        .await
        .contains("/between"));

    proxy.signal(Signal::SIGUSR1);
    assert!(
        proxy.wait_stderr("access log reopened"),
        "no reopen logged:\n{}",
        proxy.stderr()
    );
    assert_eq!(get("/after-signal").await, 200);
    let fresh = file_with(&log, "/after-signal").await;
    assert!(fresh.contains("/after-signal"), "new file: {fresh:?}");
    assert!(
        !fresh.contains("/before") && !fresh.contains("/between"),
        "{fresh}"
    );
    let old = std::fs::read_to_string(rotated(1)).unwrap();
    assert!(!old.contains("/after-signal"), "{old}");

    // The admin API does the same, for when a signal is awkward to send (another container).
    std::fs::rename(&log, rotated(2)).unwrap();
    let resp = outrider::testing::raw_exchange(
        proxy.admin_addr,
        b"POST /reopen_logs HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(get("/after-admin").await, 200);
    let fresh = file_with(&log, "/after-admin").await;
    assert!(fresh.contains("/after-admin"), "new file: {fresh:?}");
    assert!(!fresh.contains("/after-signal"), "{fresh}");
    assert_eq!(up.requests(), 4);
}

/// A log that cannot be written (a full disk: here the path is made a link to /dev/full)
/// costs records, counted in `/metrics`, and not the proxy: requests are served, the
/// operator is told once when the failures begin (not once per batch) and once when they
/// end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_log_records_counts_them_and_says_so_once() {
    assert!(
        std::path::Path::new("/dev/full").exists(),
        "this test needs /dev/full to play a full disk"
    );
    let up = Upstream::start().await;
    let proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    let url = format!("http://127.0.0.1:{}/full", up.port());
    let log = proxy.log_path.clone();
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    proxy.signal(Signal::SIGUSR1);
    assert!(
        proxy.wait_stderr("access log reopened"),
        "{}",
        proxy.stderr()
    );

    // Apart in time, so that they are written in several batches, each of which fails.
    for _ in 0..5 {
        let r = outrider::testing::proxy_get(proxy.proxy_addr, &url).await;
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        proxy.wait_stderr("No space left on device"),
        "{}",
        proxy.stderr()
    );
    let dropped = || async {
        let (_, text) = outrider::testing::admin_get(proxy.admin_addr, "/metrics").await;
        outrider::testing::metric_value(&text, "outrider_access_log_dropped_total", &[])
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while dropped().await < 5.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dropped().await, 5.0, "{}", proxy.stderr());
    let told = proxy.stderr().matches("access log write").count();
    assert_eq!(
        told,
        1,
        "one line per episode, not per batch:\n{}",
        proxy.stderr()
    );

    // Room again: records are written, and the end of the episode is reported with its count.
    std::fs::remove_file(&log).unwrap();
    proxy.signal(Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stderr().matches("access log reopened").count() < 2 {
        assert!(Instant::now() < deadline, "{}", proxy.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://127.0.0.1:{}/room-again", up.port());
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/room-again")) {
        assert!(Instant::now() < deadline, "{}", proxy.stderr());
        let r = outrider::testing::proxy_get(proxy.proxy_addr, &url).await;
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.wait_stderr("access log writes work again"),
        "{}",
        proxy.stderr()
    );
    assert!(proxy.stderr().contains("dropped=5"), "{}", proxy.stderr());
}

/// With `shutdown.outbound_grace`, SIGTERM closes the inbound listener at once but the
/// outbound one only after the grace: the app in the same pod got its SIGTERM too, and its
/// own graceful shutdown may still call out. Then the proxy drains and exits as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_outbound_listener_open_for_the_grace() {
    let up = Upstream::start().await;
    let mut proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n\
         inbound:\n  mtls: disabled\n\
         shutdown:\n  outbound_grace: 2s\n",
    );
    let stderr = proxy.stderr();
    let inbound: std::net::SocketAddr = stderr
        .split("inbound=Some(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no inbound address in: {stderr}"));
    proxy.signal(Signal::SIGTERM);
    assert!(
        proxy.wait_stderr("outbound listener stays open"),
        "{}",
        proxy.stderr()
    );
    let (ready, _) = outrider::testing::admin_get(proxy.admin_addr, "/ready").await;
    assert_eq!(ready, 503, "/ready during the grace");
    assert!(
        tokio::net::TcpStream::connect(inbound).await.is_err(),
        "the inbound listener accepted a connection after SIGTERM"
    );
    // A new outbound connection, after the signal, is still served.
    let url = format!("http://127.0.0.1:{}/after-sigterm", up.port());
    let r = outrider::testing::proxy_get(proxy.proxy_addr, &url).await;
    assert_eq!(r.status, 200, "{r:?}");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .expect("outrider did not exit after the grace");
    assert!(status.success(), "{status:?}\n{}", proxy.stderr());
}
