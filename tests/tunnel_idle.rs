#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `clients.tunnel_idle_timeout`: a tunnel that passes no byte either way for that long is
//! closed and logged, whether it went quiet after talking or never carried a byte; one that
//! keeps talking stays open. (A peer that vanished without a FIN or RST would otherwise hold
//! its tunnel, and a descriptor at each end, for ever.)

use std::time::{Duration, Instant};

use outrider::testing::{open_tunnel, TcpEcho, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits (up to `limit`) for the proxy to close `s`; returns how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => start.elapsed(),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", &buf[..n]),
        Err(_) => panic!("the tunnel was still open after {limit:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_tunnels_are_closed_and_busy_ones_are_not() {
    let echo = TcpEcho::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\nclients:\n  tunnel_idle_timeout: 1s\n",
    )
    .await;
    let target = echo.addr.to_string();

    // Talking every 300 ms for 3 s, three timeouts: still open, and echoing.
    let mut busy = open_tunnel(proxy.proxy_addr(), &target).await;
    for i in 0..10u8 {
        busy.write_all(&[b'a' + i]).await.unwrap();
        let mut back = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), busy.read_exact(&mut back))
            .await
            .expect("the busy tunnel stopped echoing")
            .unwrap();
        assert_eq!(back[0], b'a' + i);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Then quiet: closed about a second (the timeout, checked every quarter) later.
    let took = closed_within(&mut busy, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(700),
        "closed {took:?} after the last byte, before the timeout"
    );
    let rec = proxy
        .wait_log(|r| r["method"] == "CONNECT" && r["bytes_in"] == 10)
        .await;
    assert_eq!(
        rec["error"], "tunnel closed after 1s with no bytes either way",
        "{rec}"
    );
    assert_eq!(rec["bytes_out"], 10, "{rec}");

    // A tunnel that never carries a byte (the echo does not speak first) is closed too.
    let mut silent = open_tunnel(proxy.proxy_addr(), &target).await;
    closed_within(&mut silent, Duration::from_secs(10)).await;
    let rec = proxy
        .wait_log(|r| r["method"] == "CONNECT" && r["bytes_in"] == 0)
        .await;
    assert_eq!(
        rec["error"], "tunnel closed after 1s with no bytes either way",
        "{rec}"
    );
}

#[test]
fn a_zero_tunnel_idle_timeout_is_refused_by_name() {
    let config =
        outrider::config::Config::from_yaml("clients:\n  tunnel_idle_timeout: 0s\n").unwrap();
    let err = outrider::config::validate(config).unwrap_err().to_string();
    assert!(err.contains("clients.tunnel_idle_timeout"), "{err}");
}
