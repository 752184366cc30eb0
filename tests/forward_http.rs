#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! HTTP semantics of the explicit proxy: keep-alive on both sides, hop-by-hop headers and
//! `Via`, the Host header following the request target, and a download cut off by the
//! client still being logged.

use std::time::Duration;

use http_body_util::BodyExt;
use outrider::testing::{
    curl, generated_body, open_tunnel, read_head, ProxyClient, TestProxy, Upstream,
};

fn config() -> String {
    "outbound:\n  egress:\n    allow:\n      - host: api.test\n      - host: other.test\n      - cidr: 127.0.0.1/32\n\
     dns:\n  hosts:\n    api.test: 127.0.0.1\n    other.test: 127.0.0.1\n    denied.test: 10.9.9.9\n"
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_on_both_sides() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    for i in 0..5 {
        let r = client
            .get(&format!("http://api.test:{}/ka/{i}", up.port()))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            client.is_open(),
            "the proxy closed the client connection after request {i}"
        );
    }
    // A refusal does not cost the client its connection.
    let r = client
        .get(&format!("http://denied.test:{}/no", up.port()))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        client.is_open(),
        "the proxy closed the client connection after a 403"
    );
    // A body sent on the same connection does not break it.
    let req = http::Request::post(format!("http://api.test:{}/upload", up.port()))
        .header("content-length", "100000")
        .body(generated_body(100_000))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"100000");
    // Another name mapped to the same checked address may share the pooled connection.
    let r = client
        .get(&format!("http://other.test:{}/ka/other", up.port()))
        .await;
    assert_eq!(r.status, 200);
    assert!(client.is_open());
    assert_eq!(up.requests(), 7);
    assert_eq!(
        up.connections(),
        1,
        "7 sequential requests on one client connection should reuse one pooled upstream connection"
    );

    // curl sending several URLs on one connection: one client connection to the proxy.
    let url = format!("http://api.test:{}/curl", up.port());
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        &url,
        &url,
        &url,
        "-w",
        "%{num_connects}\n",
    ])
    .await;
    assert_eq!(c.exit, 0, "{c:?}");
    assert_eq!(up.requests(), 10);
    assert_eq!(
        up.connections(),
        1,
        "curl's requests should reuse the pooled upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_via_added() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    let r = client
        .get_with(
            &format!("http://api.test:{}/hop", up.port()),
            &[
                ("connection", "keep-alive, X-Private-Hop"),
                ("x-private-hop", "secret"),
                ("proxy-authorization", "Basic dXNlcjpwYXNz"),
                ("proxy-connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("x-end-to-end", "kept"),
                ("host", "evil.test"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json();
    let seen = &echo["headers"];
    for gone in [
        "x-private-hop",
        "proxy-authorization",
        "proxy-connection",
        "keep-alive",
        "te",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "upstream saw hop-by-hop header {gone}: {seen}"
        );
    }
    if let Some(c) = seen.get("connection") {
        assert!(!c.to_string().contains("x-private-hop"), "{seen}");
    }
    assert_eq!(seen["x-end-to-end"][0], "kept");
    let via = seen["via"][0].as_str().unwrap_or_default();
    assert!(via.contains("outrider"), "upstream's Via: {seen}");
    // The Host the upstream sees is the request target's, never the client's stray header.
    assert_eq!(seen["host"][0], format!("api.test:{}", up.port()), "{seen}");
    // Response side: the upstream's Connection-named header is gone, and Via is added.
    assert!(
        r.header("x-upstream-secret-hop").is_none(),
        "{:?}",
        r.headers
    );
    assert!(
        r.header("via").unwrap_or_default().contains("outrider"),
        "{:?}",
        r.headers
    );

    // curl as the client: same story.
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        "-H",
        "Proxy-Authorization: Basic eDp5",
        "-H",
        "Connection: x-curl-hop",
        "-H",
        "X-Curl-Hop: 1",
        "-H",
        "Via: 1.0 edge",
        "-H",
        "Via: 1.1 mid",
        &format!("http://api.test:{}/hop", up.port()),
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    let echo: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
    let seen = &echo["headers"];
    assert!(seen.get("proxy-authorization").is_none(), "{seen}");
    assert!(seen.get("x-curl-hop").is_none(), "{seen}");
    // Two `Via` lines are one list: both earlier hops are passed on, then this one.
    assert_eq!(
        seen["via"],
        serde_json::json!(["1.0 edge, 1.1 mid, 1.1 outrider"]),
        "{seen}"
    );
    assert!(
        c.header("via").unwrap_or_default().contains("outrider"),
        "{c:?}"
    );
    // The upstream received an origin-form target, not the absolute URL.
    assert_eq!(echo["uri"], "/hop", "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_by_the_client_is_still_logged() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let total: u64 = 256 * 1024 * 1024;
    let url = format!("http://api.test:{}/stream?bytes={total}", up.port());
    {
        let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
        let req = http::Request::get(&url).body(generated_body(0)).unwrap();
        let resp = client.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut got = 0u64;
        while got < 1024 * 1024 {
            let frame = body.frame().await.unwrap().unwrap();
            got += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        // Dropping the client closes the connection mid-body.
    }
    let rec = proxy
        .wait_log(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/stream")))
        .await;
    assert_eq!(rec["method"], "GET", "{rec}");
    assert_eq!(rec["authority"], format!("api.test:{}", up.port()), "{rec}");
    let out = rec["bytes_out"].as_u64().unwrap();
    assert!(out > 0 && out < total, "bytes_out {out}: {rec}");
    // The upstream stopped producing soon after: the proxy did not read the rest ahead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let streamed = up.streamed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        streamed < total / 2,
        "upstream produced {streamed} of {total} bytes for a client that left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_upgrades_pass_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET http://api.test:{}/upgrade HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"hello upgraded").await.unwrap();
    let mut back = [0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello upgraded");

    // Without `Connection: upgrade`, an Upgrade header is hop-by-hop noise and is dropped.
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    let r = client
        .get_with(
            &format!("http://api.test:{}/echo", up.port()),
            &[("upgrade", "h2c")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("upgrade").is_none(), "{}", r.text());
}

/// Plain HTTP inside a CONNECT is served request by request (see tests/netns_transparent.rs
/// for the Host check); a protocol switch in there (ws:// through a proxy) still joins the
/// two sides, and each request has its own log record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_switch_inside_a_connect_tunnel_is_joined() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let target = format!("api.test:{}", up.port());
    let mut s = open_tunnel(proxy.proxy_addr(), &target).await;
    s.write_all(
        format!("GET /upgrade HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"through both").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"through both");
    drop(s);
    let rec = proxy
        .wait_log(|r| r["path"] == "/upgrade" && r["status"] == 101)
        .await;
    assert_eq!(rec["mode"], "explicit", "{rec}");
    assert_eq!(rec["decision"], "allow", "{rec}");
}
