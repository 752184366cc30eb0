#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Idle keep-alive connections are parked: a thousand clients that each sent a request and
//! kept their connection open add a few KB each to the real binary's resident memory (a
//! child process, so the memory is its own), not the ~13 KB (debug build) that hyper's
//! buffers kept per connection, and every one of them is still served when it comes back.

use std::time::Duration;

use outrider::testing::{proc_status_kib, BinProxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_outrider");
const CONNECTIONS: usize = 1000;
/// Well past the proxy's 250 ms before a quiet connection is parked.
const SETTLE: Duration = Duration::from_millis(1500);
/// Per idle connection, in this (debug) build. Held by hyper, one added 13.0-13.3 KB (its
/// 8 KiB read and write buffers are a page touched each, plus the connection's task);
/// parked, 3.2-4.1 KB, and 0.9-2.8 KB since the task keeps only what parking needs (its
/// size has a test of its own: `proxy::tests`).
const MAX_PER_CONNECTION: u64 = 7 * 1024;

/// Sends a request for `/empty` (an empty 200) through the proxy, reads the answer, and
/// leaves the connection open.
async fn get(s: &mut TcpStream, origin: u16) {
    let head = format!("GET http://127.0.0.1:{origin}/empty HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_lowercase().contains("content-length: 0"), "{text}");
}

/// Opens `n` connections, a few dozen at a time, each with one request answered.
async fn open(proxy: std::net::SocketAddr, origin: u16, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n / 50 {
        let batch = (0..50).map(|_| async move {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            get(&mut s, origin).await;
            s
        });
        held.extend(futures_util::future::join_all(batch).await);
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_parked_and_served_when_they_come_back() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    let pid = proxy.child.id();
    // A first thousand, kept: what is measured is what the next thousand add. The first
    // set's burst leaves the proxy's allocator with memory it keeps for reuse (upstream
    // connections, the buffers of connections not yet parked), which would blur the
    // number; the second set draws on it.
    let mut held = open(proxy.proxy_addr, up.port(), CONNECTIONS).await;
    tokio::time::sleep(SETTLE).await;
    let before = proc_status_kib(pid, "VmRSS:");
    held.extend(open(proxy.proxy_addr, up.port(), CONNECTIONS).await);
    tokio::time::sleep(SETTLE).await;
    let after = proc_status_kib(pid, "VmRSS:");
    let per_connection = (after.saturating_sub(before)) * 1024 / CONNECTIONS as u64;
    eprintln!(
        "RSS {before} KiB with {CONNECTIONS} idle connections, {after} KiB with \
         {CONNECTIONS} more: {per_connection} bytes each"
    );
    assert!(
        per_connection < MAX_PER_CONNECTION,
        "an idle keep-alive connection costs {per_connection} bytes of the proxy's memory \
         ({before} KiB with {CONNECTIONS} connections, {after} KiB with {CONNECTIONS} more)"
    );

    // Every parked connection is served again, on the same connection.
    let origin = up.port();
    let again = held.iter_mut().map(|s| get(s, origin));
    futures_util::future::join_all(again).await;
    let served = up.requests();
    assert!(
        served >= 4 * CONNECTIONS,
        "the origin saw {served} requests"
    );
}
