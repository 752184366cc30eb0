#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A name with several addresses, one of which cannot be reached: the explicit proxy and
//! `CONNECT` go to the next allowed address, as curl and Squid do, instead of answering 502
//! for as long as the resolver puts the dead one first.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use outrider::testing::{
    admin_get, curl, metric_value, open_tunnel, proxy_get, TcpEcho, TestProxy, Upstream,
};

/// `multi.test` resolves to `first` (which does not answer as it should), then 127.0.0.1;
/// each is allowed by a rule of its own.
fn config(first: &str, connect_timeout: &str) -> String {
    format!(
        "outbound:\n  timeouts:\n    connect: {connect_timeout}\n  egress:\n    allow:\n      - host: multi.test\n      - host: dead.test\n      - cidr: 127.0.0.1/32\n      - cidr: 127.0.0.0/8\n\
         dns:\n  hosts:\n    multi.test: [{first}, 127.0.0.1]\n    dead.test: [127.0.0.2, 127.0.0.3]\n"
    )
}

async fn connect_errors(proxy: &TestProxy) -> f64 {
    let (_, text) = admin_get(proxy.admin_addr(), "/metrics").await;
    metric_value(&text, "outrider_upstream_connect_errors_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_whose_first_address_refuses_is_served_by_the_next() {
    let up = Upstream::start().await;
    let echo = TcpEcho::start().await;
    let proxy = TestProxy::start(&config("127.0.0.2", "5s")).await;
    let url = format!("http://multi.test:{}/first", up.port());

    // Nothing listens on 127.0.0.2: refused, and the request goes to 127.0.0.1.
    let r = proxy_get(proxy.proxy_addr(), &url).await;
    assert_eq!(r.status, 200, "{r:?}");
    let rec = proxy.wait_log(|r| r["path"] == "/first").await;
    assert_eq!(
        rec["upstream"],
        format!("127.0.0.1:{}", up.port()),
        "the log names the address that answered: {rec}"
    );
    assert_eq!(
        rec["rule"], "allow[0] host multi.test + allow[2] cidr 127.0.0.1/32",
        "and the rule that allows it: {rec}"
    );

    // The dead address is tried last for a while: five slow requests at once, which need
    // five upstream connections, cost no further failed connect.
    let slow = format!("http://multi.test:{}/drip?n=3&ms=100", up.port());
    let all = (0..5).map(|_| proxy_get(proxy.proxy_addr(), &slow));
    for r in futures_util::future::join_all(all).await {
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(up.connections() >= 5, "{} connections", up.connections());
    assert_eq!(connect_errors(&proxy).await, 1.0);

    // CONNECT to the same name: the tunnel goes to the address that answers.
    let target = format!("multi.test:{}", echo.addr.port());
    let mut s = open_tunnel(proxy.proxy_addr(), &target).await;
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    drop(s);
    let rec = proxy
        .wait_log(|r| r["method"] == "CONNECT" && r["authority"] == target.as_str())
        .await;
    assert_eq!(rec["upstream"], format!("127.0.0.1:{}", echo.addr.port()));

    // curl's own tunnel to an HTTP server, for good measure.
    let c = curl(&["-p", "-x", &proxy.proxy_url(), &format!("{url}/tunnelled")]).await;
    assert_eq!(c.status, 200, "{c:?}");
}

/// A listening socket whose accept queue is full: the kernel drops further SYNs, so a
/// connect to it neither succeeds nor fails until its timeout (a dead host, as seen from
/// here), without leaving loopback.
fn silent_listener(addr: SocketAddr) -> (socket2::Socket, Vec<std::net::TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            fillers.push(c);
        }
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the listener's queue should be full"
    );
    (s, fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_address_that_never_answers_does_not_hold_the_request_for_the_timeout() {
    let up = Upstream::start().await;
    let _silent = silent_listener(SocketAddr::from(([127, 0, 0, 2], up.port())));
    // A connect timeout far beyond the client's patience: waiting it out would fail.
    let proxy = TestProxy::start(&config("127.0.0.2", "60s")).await;
    let url = format!("http://multi.test:{}/silent", up.port());
    let r = tokio::time::timeout(Duration::from_secs(20), proxy_get(proxy.proxy_addr(), &url))
        .await
        .expect("the request waited for the silent address instead of trying the next");
    assert_eq!(r.status, 200, "{r:?}");
    let rec = proxy.wait_log(|r| r["path"] == "/silent").await;
    assert_eq!(rec["upstream"], format!("127.0.0.1:{}", up.port()), "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_address_fails_the_answer_names_each() {
    // (Under `dead.test` nothing listens on 127.0.0.2 and 127.0.0.3.)
    let proxy = TestProxy::start(&config("127.0.0.2", "5s")).await;
    let r = proxy_get(proxy.proxy_addr(), "http://dead.test:9/").await;
    assert_eq!(r.status, 502, "{r:?}");
    let error = r.error_header();
    assert!(
        error.contains("127.0.0.2:9") && error.contains("127.0.0.3:9"),
        "{error}"
    );
}
