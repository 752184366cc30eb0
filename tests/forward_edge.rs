#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Edges of the explicit proxy that a user would trip over: request smuggling through
//! conflicting framing, slow bodies versus the response timeout, cancelled requests in the
//! log, loops through IPv4-mapped addresses, uploads with `Expect: 100-continue`, HTTP/1.0
//! clients and mixed-case rules.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use http_body_util::BodyExt;
use outrider::testing::{
    curl, generated_body, proxy_get, raw_exchange, ProxyClient, TestProxy, Upstream,
};

fn config() -> String {
    "outbound:\n  timeouts:\n    response: 300ms\n  egress:\n    allow:\n      - host: Api.TEST\n      - cidr: 127.0.0.1/32\n\
     dns:\n  hosts:\n    api.test: 127.0.0.1\n    other.test: 10.9.9.9\n"
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_cannot_smuggle_a_second_request() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let p = up.port();
    // Chunked body of 30 bytes that, read as Content-Length: 5, would leave a second request.
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let body = format!("abcde{hidden}");
    let req = format!(
        "POST http://api.test:{p}/upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let raw = raw_exchange(proxy.proxy_addr(), req.as_bytes()).await;
    eprintln!(
        "TE+CL request answered: {}",
        raw.head.lines().next().unwrap_or("")
    );
    // Refusing it (400) is fine; forwarding it must deliver the whole chunked body as one.
    if raw.status == 200 {
        assert!(
            raw.all.ends_with(&body.len().to_string()),
            "upstream got a different body: {raw:?}"
        );
    } else {
        assert_eq!(raw.status, 400, "{raw:?}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A later request on the pooled upstream connection must not be answered by a smuggled one.
    let r = proxy_get(proxy.proxy_addr(), &format!("http://api.test:{p}/after")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["uri"], "/after", "{}", r.text());
    assert!(
        up.requests() <= 2,
        "the upstream saw {} requests: one was smuggled",
        up.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_bounds_the_head_not_a_slow_body() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    // Ten bytes 100 ms apart: the whole body takes ~900 ms, three times the timeout.
    let r = proxy_get(
        proxy.proxy_addr(),
        &format!("http://api.test:{}/drip?n=10&ms=100", up.port()),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "dddddddddd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_holds_on_reused_upstream_connections() {
    // Each pooled upstream connection keeps one timer across its requests (see
    // `HeadTimer`). Reused, it must still time out a slow head, and a timer that went off
    // while the connection was idle must not cut the next request short.
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let url = |path: &str| format!("http://api.test:{}{path}", up.port());

    let r = proxy_get(proxy.proxy_addr(), &url("/")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = proxy_get(proxy.proxy_addr(), &url("/slow?ms=3000")).await;
    assert_eq!(r.status, 504, "a reused connection did not time out: {r:?}");
    assert_eq!(
        up.connections(),
        1,
        "the slow request did not reuse the connection"
    );

    // The timed-out connection is not reused: a new one, then idle past its deadline.
    let r = proxy_get(proxy.proxy_addr(), &url("/")).await;
    assert_eq!(r.status, 200, "{r:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Half the timeout: answered, although this connection's timer already went off.
    let r = proxy_get(proxy.proxy_addr(), &url("/slow?ms=150")).await;
    assert_eq!(
        r.status, 200,
        "cut short by a timer that had gone off: {r:?}"
    );
    // Right after, on the same connection: the timer still stops a slow head.
    let r = proxy_get(proxy.proxy_addr(), &url("/slow?ms=3000")).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(
        up.connections(),
        2,
        "the requests did not reuse the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_before_its_response_is_logged() {
    let up = Upstream::start().await;
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let url = format!("http://127.0.0.1:{}/slow?ms=2000", up.port());
    {
        let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
        let req = http::Request::get(&url).body(generated_body(0)).unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(300), client.send(req)).await;
    }
    let rec = proxy.wait_log(|r| r["path"] == "/slow?ms=2000").await;
    assert_eq!(rec["status"], 0, "{rec}");
    assert!(
        rec["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{rec}"
    );
    assert_eq!(rec["upstream"], up.addr.to_string(), "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_through_an_ipv4_mapped_address_is_refused() {
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let pp = proxy.proxy_addr().port();
    let url = format!("http://[::ffff:127.0.0.1]:{pp}/");
    let r = proxy_get(proxy.proxy_addr(), &url).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.error_header().contains("loop"), "{r:?}");
    // Refused by the first hop: one record, for the client's request. A second record
    // (with no authority) means the proxy dialled itself and only its second hop noticed.
    let recs = proxy.log_lines().await;
    assert_eq!(
        recs.len(),
        1,
        "the proxy forwarded the request to itself: {recs:#?}"
    );
    assert_eq!(
        recs[0]["authority"],
        format!("[::ffff:127.0.0.1]:{pp}"),
        "{recs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_loop_through_an_ipv4_mapped_address_is_refused() {
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let pp = proxy.proxy_addr().port();
    let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    s.write_all(format!("CONNECT [::ffff:127.0.0.1]:{pp} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "CONNECT to the proxy itself was not refused:\n{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("x-outrider-error: loop"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_expect_continue_and_chunking() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let dir = outrider::testing::TempDir::new("upload");
    let file = dir.path().join("two-mib");
    std::fs::write(&file, vec![b'z'; 2 * 1024 * 1024]).unwrap();
    let url = format!("http://api.test:{}/upload", up.port());
    let at = format!("@{}", file.display());
    // curl sends Expect: 100-continue for a body this size.
    let c = curl(&["-x", &proxy.proxy_url(), "--data-binary", &at, &url]).await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.text(), (2 * 1024 * 1024).to_string());
    // Chunked from stdin-like upload (-T with unknown size uses chunked).
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &at,
        &url,
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.text(), (2 * 1024 * 1024).to_string());
    // The Rust client streaming a body of unknown length.
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    let resp = client
        .send(
            http::Request::post(&url)
                .body(generated_body(3_000_000))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"3000000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_are_served() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let raw = raw_exchange(
        proxy.proxy_addr(),
        format!("GET http://api.test:{}/ten HTTP/1.0\r\n\r\n", up.port()).as_bytes(),
    )
    .await;
    assert_eq!(raw.status, 200, "{raw:?}");
    assert!(raw.all.contains("/ten"), "{raw:?}");
    let c = curl(&[
        "-0",
        "-x",
        &proxy.proxy_url(),
        &format!("http://api.test:{}/stream?bytes=200000", up.port()),
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.body.len(), 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_after_connect_reach_the_target() {
    let echo = outrider::testing::TcpEcho::start().await;
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    // A client that does not wait for the 200 (TLS False Start style): one write.
    s.write_all(
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\nearly bytes",
            echo.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).ends_with("early bytes") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let p = up.port();
    let reqs = format!(
        "GET http://api.test:{p}/one HTTP/1.1\r\nHost: api.test\r\n\r\nGET http://api.test:{p}/two HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"
    );
    let mut s = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    s.write_all(reqs.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    let one = all.find("/one").unwrap_or_else(|| panic!("{all}"));
    let two = all.find("/two").unwrap_or_else(|| panic!("{all}"));
    assert!(one < two, "{all}");
    assert_eq!(all.matches("HTTP/1.1 200").count(), 2, "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_upload_is_refused_without_sending_the_body() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let dir = outrider::testing::TempDir::new("upload");
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'z'; 8 * 1024 * 1024]).unwrap();
    let at = format!("@{}", file.display());
    let started = std::time::Instant::now();
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        "--data-binary",
        &at,
        &format!("http://other.test:{}/upload", up.port()),
    ])
    .await;
    assert_eq!(c.status, 403, "{c:?}");
    // curl waits up to 1 s for `100 Continue`; a final 403 must come without that wait.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
    let rec = proxy.wait_log(|r| r["path"] == "/upload").await;
    assert_eq!(rec["decision"], "deny");
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_does_not_cut_a_slow_upload() {
    // The client streams its body for ~1 s, three times outbound.timeouts.response (300ms);
    // the upstream answers as soon as it has read it all. The timeout is about an upstream
    // that does not answer, not a client whose upload is still flowing.
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        if i == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
                b"0123456789",
            ))),
            i + 1,
        ))
    });
    let body = http_body_util::StreamBody::new(chunks).boxed();
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    let resp = client
        .send(
            http::Request::post(format!("http://api.test:{}/upload", up.port()))
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        200,
        "a 1 s upload with a 300ms response timeout: {}",
        String::from_utf8_lossy(&text)
    );
    assert_eq!(&text[..], b"100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_is_504() {
    // A loopback listener that never accepts, its backlog filled: further SYNs go unanswered.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        } else {
            break;
        }
    }
    // Linux drops SYNs to a listener whose accept queue is full. A kernel that completed
    // them anyway would leave nothing to time out: that fails here, loudly, rather than
    // letting the test pass without checking anything.
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(
        !matches!(probe, Ok(Ok(_))),
        "this kernel completes connects to a full backlog: no connect timeout can be provoked here"
    );
    let proxy = TestProxy::start(
        "outbound:\n  timeouts:\n    connect: 300ms\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    )
    .await;
    let r = proxy_get(proxy.proxy_addr(), &format!("http://{addr}/")).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.error_header().contains("timed out"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_one_host_the_checked_authority() {
    // Absolute form names the target; a second Host header (first one matching, second
    // not) must not reach the upstream, where it could route the request elsewhere.
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let p = up.port();
    for hosts in [
        format!("Host: api.test:{p}\r\nHost: other.test\r\n"),
        "Host: other.test\r\n".to_owned(),
        String::new(),
    ] {
        let req = format!("GET http://api.test:{p}/h HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let raw = raw_exchange(proxy.proxy_addr(), req.as_bytes()).await;
        if raw.status == 400 {
            continue; // refusing two Host headers outright is fine too
        }
        assert_eq!(raw.status, 200, "{hosts:?}: {raw:?}");
        let body = &raw.all[raw.all.find("\r\n\r\n").unwrap() + 4..];
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            echo["headers"]["host"],
            serde_json::json!([format!("api.test:{p}")]),
            "{hosts:?}"
        );
    }
}

/// A request head of about `kib` KiB to the upstream on port `p`, in headers of 6 KiB each:
/// few enough that hyper's limit on the number of headers (100) is not what answers.
fn head_of(p: u16, kib: usize) -> String {
    let filler = "a".repeat(6 * 1024);
    let headers: String = (0..kib / 6)
        .map(|i| format!("X-Filler-{i}: {filler}\r\n"))
        .collect();
    format!(
        "GET http://api.test:{p}/big HTTP/1.1\r\nHost: api.test\r\n{headers}Connection: close\r\n\r\n"
    )
}

/// A request head larger than 128 KiB is refused with 431 (and logged); one just under it
/// is proxied, and a URI too long gets 414. Without a bound, every connection could make
/// the proxy hold ~400 KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_128_kib_are_refused_with_431() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let p = up.port();
    let raw = raw_exchange(proxy.proxy_addr(), head_of(p, 120).as_bytes()).await;
    assert_eq!(raw.status, 200, "{raw:?}");
    let raw = raw_exchange(proxy.proxy_addr(), head_of(p, 200).as_bytes()).await;
    assert_eq!(raw.status, 431, "{}", raw.head);
    let rec = proxy.wait_log(|r| r["status"] == 431).await;
    assert_eq!(rec["decision"], "deny", "{rec}");
    // A URI over hyper's 64 KiB gets 414, and the log says what the client got (431 before).
    let long = format!(
        "GET http://api.test:{p}/{} HTTP/1.1\r\nHost: api.test\r\n\r\n",
        "a".repeat(70_000)
    );
    let raw = raw_exchange(proxy.proxy_addr(), long.as_bytes()).await;
    assert_eq!(raw.status, 414, "{}", raw.head);
    let rec = proxy.wait_log(|r| r["status"] == 414).await;
    assert_eq!(rec["decision"], "deny", "{rec}");
}

/// `clients.max_request_head_bytes` sets that bound: at 32 KiB, a 48 KiB head (proxied by
/// default) gets 431 and a 24 KiB one still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_head_limit_is_configurable() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&format!(
        "{}clients:\n  max_request_head_bytes: 32768\n",
        config()
    ))
    .await;
    let p = up.port();
    let raw = raw_exchange(proxy.proxy_addr(), head_of(p, 24).as_bytes()).await;
    assert_eq!(raw.status, 200, "{raw:?}");
    let raw = raw_exchange(proxy.proxy_addr(), head_of(p, 48).as_bytes()).await;
    assert_eq!(raw.status, 431, "{}", raw.head);
}

/// `Max-Forwards` on TRACE and OPTIONS (RFC 9110 §7.6.2, a must for intermediaries): at 0
/// the proxy answers itself and nothing reaches the upstream (TRACE echoes the request
/// without its credentials); above 0 the request goes on with one less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_forwards_zero_is_answered_by_the_proxy_and_higher_values_count_down() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&config()).await;
    let p = up.port();
    let trace = raw_exchange(
        proxy.proxy_addr(),
        format!(
            "TRACE http://127.0.0.1:{p}/t HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nMax-Forwards: 0\r\n\
             X-Probe: 1\r\nCookie: session=s3cret\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(trace.status, 200, "{trace:?}");
    assert_eq!(
        trace.header("content-type").as_deref(),
        Some("message/http")
    );
    assert!(
        trace
            .all
            .contains(&format!("TRACE http://127.0.0.1:{p}/t HTTP/1.1\r\n")),
        "{trace:?}"
    );
    assert!(trace.all.contains("x-probe: 1\r\n"), "{trace:?}");
    assert!(
        !trace.all.contains("s3cret"),
        "a credential was echoed: {trace:?}"
    );

    let options = raw_exchange(
        proxy.proxy_addr(),
        format!(
            "OPTIONS http://127.0.0.1:{p}/o HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(options.status, 200, "{options:?}");
    assert!(
        options
            .header("allow")
            .unwrap_or_default()
            .contains("OPTIONS"),
        "{options:?}"
    );
    assert_eq!(
        up.requests(),
        0,
        "a request with Max-Forwards: 0 was forwarded"
    );

    // Above 0: forwarded, one less (the upstream echoes the headers it got).
    let mut client = ProxyClient::connect(proxy.proxy_addr()).await;
    let req = http::Request::builder()
        .method("OPTIONS")
        .uri(format!("http://127.0.0.1:{p}/o"))
        .header("max-forwards", "3")
        .body(generated_body(0))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["max-forwards"][0], "2", "{seen}");
    assert_eq!(up.requests(), 1);
}
