#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `outrider_connections_open` counts client connections that are open now, including
//! those that became CONNECT tunnels. In its own binary: the gauge is process-wide, and
//! other tests' connections would move it; the two tests here take turns (`SERIAL`), as
//! `cargo test` runs them side by side in one process.

use std::time::Duration;

use outrider::testing::{admin_get, metric_value, ProxyClient, TcpEcho, TestProxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Held by each test for its whole run: the full-listener test's connections moved the
/// other's gauge reading (6 where 5 were open).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn open_gauge(proxy: &TestProxy) -> f64 {
    let (_, text) = admin_get(proxy.admin_addr(), "/metrics").await;
    metric_value(&text, "outrider_connections_open", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_include_http_keep_alive_and_tunnels() {
    let _turn = SERIAL.lock().await;
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

/// `clients.max_connections`: a listener that holds as many client connections as allowed
/// closes the next one at once, counts it, and keeps serving those it holds; the other
/// listener is not affected; a connection that ends makes room, and a reload moves the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_closes_new_connections_and_the_other_keeps_serving() {
    let _turn = SERIAL.lock().await;
    let echo = TcpEcho::start().await;
    let up = Upstream::start().await;
    let yaml = |max: u32| {
        format!(
            "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n\
             inbound:\n  listen: 127.0.0.1:0\n  mtls: disabled\n  routes:\n\
             \x20   - match: {{ path_prefix: / }}\n      to: 127.0.0.1:{}\n\
             clients:\n  max_connections: {max}\n",
            up.port()
        )
    };
    let proxy = TestProxy::start(&yaml(3)).await;
    let url = format!("http://127.0.0.1:{}/", up.port());
    let overflowed = |listener: &'static str| {
        let admin = proxy.admin_addr();
        async move {
            let (_, text) = admin_get(admin, "/metrics").await;
            metric_value(
                &text,
                "outrider_connections_overflow_total",
                &[("listener", listener)],
            )
        }
    };
    // A new connection that sends a request: what comes back before the proxy closes it.
    let try_one = || async {
        let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr())
            .await
            .unwrap();
        let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        // The write may find the socket already closed: the answer is what matters.
        let _ = s.write_all(req.as_bytes()).await;
        outrider::testing::read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .expect("the connection was neither answered nor closed")
    };

    // Three held: two keep-alive connections and a CONNECT tunnel, which outlives the HTTP
    // connection it came from and keeps its slot.
    let mut a = ProxyClient::connect(proxy.proxy_addr()).await;
    let mut b = ProxyClient::connect(proxy.proxy_addr()).await;
    assert_eq!(a.get(&url).await.status, 200);
    assert_eq!(b.get(&url).await.status, 200);
    let mut tunnel =
        outrider::testing::open_tunnel(proxy.proxy_addr(), &echo.addr.to_string()).await;
    tunnel.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tunnel.read_exact(&mut one).await.unwrap();

    // The fourth is closed without an answer, and counted.
    let got = try_one().await;
    assert!(
        got.is_empty(),
        "a fourth connection was served: {}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(overflowed("outbound").await, 1.0);
    // Those held still work, and so does the inbound listener.
    assert_eq!(a.get(&url).await.status, 200);
    tunnel.write_all(b"y").await.unwrap();
    tunnel.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");
    let inbound = proxy.handle().inbound_addr.unwrap();
    let (status, _) = admin_get(inbound, "/via-inbound").await;
    assert_eq!(status, 200, "the inbound listener was refused too");
    assert_eq!(overflowed("inbound").await, 0.0);

    // The tunnel closes: a slot is free again.
    drop(tunnel);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = String::from_utf8_lossy(&try_one().await).into_owned();
        if got.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after the tunnel closed: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Lifted by a reload (0: no limit): more connections than before are all served.
    proxy.reload_with(&yaml(0)).unwrap();
    let mut more = Vec::new();
    for _ in 0..4 {
        let mut c = ProxyClient::connect(proxy.proxy_addr()).await;
        assert_eq!(c.get(&url).await.status, 200);
        more.push(c);
    }
    assert_eq!(b.get(&url).await.status, 200);
}
