#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `outrider_connections_open` counts client connections that are open now, including
//! those that became CONNECT tunnels. In its own binary: the gauge is process-wide, and
//! other tests' connections would move it.

use std::time::Duration;

use outrider::testing::{admin_get, metric_value, ProxyClient, TcpEcho, TestProxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn open_gauge(proxy: &TestProxy) -> f64 {
    let (_, text) = admin_get(proxy.admin_addr(), "/metrics").await;
    metric_value(&text, "outrider_connections_open", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_include_http_keep_alive_and_tunnels() {
    let echo = TcpEcho::start().await;
    let up = Upstream::start().await;
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let base = open_gauge(&proxy).await;

    // Two idle keep-alive HTTP connections.
    let mut a = ProxyClient::connect(proxy.proxy_addr()).await;
    let mut b = ProxyClient::connect(proxy.proxy_addr()).await;
    let url = format!("http://127.0.0.1:{}/", up.port());
    assert_eq!(a.get(&url).await.status, 200);
    assert_eq!(b.get(&url).await.status, 200);
    assert_eq!(
        open_gauge(&proxy).await - base,
        2.0,
        "two keep-alive connections"
    );

    // Three CONNECT tunnels, proven open by an echo.
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut s =
            outrider::testing::open_tunnel(proxy.proxy_addr(), &echo.addr.to_string()).await;
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        tunnels.push(s);
    }
    let open = open_gauge(&proxy).await - base;
    assert_eq!(
        open, 5.0,
        "2 keep-alive connections and 3 open tunnels, the gauge says {open}"
    );

    drop(tunnels);
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        open_gauge(&proxy).await - base,
        0.0,
        "the gauge went back down"
    );
}
