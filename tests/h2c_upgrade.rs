#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! h2c smuggling: a request that offers to switch to cleartext HTTP/2 (`Upgrade: h2c`)
//! goes on as an ordinary request, on both listeners. Forwarded as an upgrade, an app that
//! accepts h2c (Go's h2c handler, for one) would answer `101` and the joined connection
//! would then carry HTTP/2 requests for any path, past the inbound authorization rules
//! that checked only the first one, and past the access log. Envoy does the same; RFC 9113
//! §3.1 deprecates the upgrade.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::testing::{read_head, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An app that accepts the h2c upgrade: to a request with `Upgrade: h2c` it answers `101`
/// and then serves HTTP/2 on the connection, answering "h2 <path>" for any path. To any
/// other request it answers HTTP/1.1 "http1 <path> upgrade=<Upgrade or none>
/// settings=<whether HTTP2-Settings came>" and closes.
async fn h2c_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                // Byte by byte, so that nothing after the head is read here.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                let field = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}:")))
                        .map(|v| v.trim().to_owned())
                };
                let upgrade = field("upgrade");
                if upgrade.as_deref().is_some_and(|u| u.contains("h2c")) {
                    s.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                    )
                    .await
                    .unwrap();
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("h2 {}", req.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                    return;
                }
                let body = format!(
                    "http1 {path} upgrade={} settings={}",
                    upgrade.as_deref().unwrap_or("none"),
                    field("http2-settings").is_some()
                );
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// Sends `request` on a fresh connection to `to` and reads one response (head and a
/// Content-Length body). A `101` is returned with no body, the connection still open.
async fn exchange(to: SocketAddr, request: &str) -> (String, String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    if head.starts_with("http/1.1 101") {
        return (head, String::new(), s);
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body))
        .await
        .expect("no response body")
        .unwrap();
    (head, String::from_utf8_lossy(&body).into_owned(), s)
}

/// What a smuggler does after a `101`: HTTP/2 on the joined connection, for `path`.
/// Returns the app's answer.
async fn h2_get(s: tokio::net::TcpStream, path: &str) -> String {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://app{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

fn h2c_request(target: &str, host: &str, upgrade: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_h2c_upgrade_goes_on_as_an_ordinary_request() {
    let app = h2c_app().await;
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n  \
         authorization:\n    - paths: [/public]\n"
    ))
    .await;
    let inbound = p.handle().inbound_addr.unwrap();
    // The rule holds for a plain request.
    let (head, _, _) = exchange(inbound, "GET /admin HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert!(head.starts_with("http/1.1 403"), "{head}");

    let (head, body, s) = exchange(inbound, &h2c_request("/public", "app", "h2c")).await;
    if head.starts_with("http/1.1 101") {
        let smuggled = h2_get(s, "/admin").await;
        panic!("the h2c upgrade reached the app, and /admin answered through it: {smuggled:?}");
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Neither the offer nor its settings reached the app.
    assert_eq!(body, "http1 /public upgrade=none settings=false");
    let rec = p.wait_log(|r| r["path"] == "/public").await;
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["decision"], "allow", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_h2c_upgrade_goes_on_as_an_ordinary_request() {
    let app = h2c_app().await;
    let p =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let target = format!("http://{app}/page");
    let (head, body, s) = exchange(
        p.proxy_addr(),
        &h2c_request(&target, &app.to_string(), "h2c"),
    )
    .await;
    if head.starts_with("http/1.1 101") {
        let smuggled = h2_get(s, "/unlogged").await;
        panic!("the h2c upgrade reached the app, which answered through it: {smuggled:?}");
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "http1 /page upgrade=none settings=false");

    // Another protocol offered beside h2c still reaches the app; only h2c is taken out.
    let (head, body, _) = exchange(
        p.proxy_addr(),
        &h2c_request(&target, &app.to_string(), "h2c, websocket"),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "http1 /page upgrade=websocket settings=false");
}
