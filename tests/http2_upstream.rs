//! HTTP/2 end to end, in-process: a client that speaks HTTP/2 to the destination itself
//! (the inbound listener, or a `CONNECT` tunnel) has its requests go on in HTTP/2, so that
//! an app that speaks nothing else — a gRPC server — is reached, and its trailers
//! (`grpc-status`) come back. Inside a `CONNECT`, each stream is admitted and logged on
//! its own, as an HTTP/1 request is. An explicit-proxy
//! request in HTTP/2 still goes on in HTTP/1.1: its client chose HTTP/2 for the proxy,
//! not for the origin. The mesh hop is in `tests/mesh_proxy.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use outrider::testing::{
    grpc_call, h2_client, open_tunnel, text_body as body, ClientBody, GrpcApp, TestProxy, Upstream,
    ERROR_HEADER,
};

/// A proxy whose inbound listener routes everything to `app` (`extra`: more config), and
/// an HTTP/2 client connected to that listener.
async fn inbound_proxy(app: std::net::SocketAddr, extra: &str) -> (TestProxy, H2) {
    let p = TestProxy::start(&format!(
        "{extra}inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n"
    ))
    .await;
    let inbound = p.handle().inbound_addr.unwrap();
    let send = h2_client(tokio::net::TcpStream::connect(inbound).await.unwrap()).await;
    (p, send)
}

type H2 = hyper::client::conn::http2::SendRequest<ClientBody>;

#[tokio::test]
async fn inbound_http2_reaches_an_http2_only_app_and_its_trailers_come_back() {
    let app = GrpcApp::start().await;
    let (p, mut send) = inbound_proxy(app.addr, "").await;

    for _ in 0..2 {
        let r = grpc_call(&mut send, "app.test", "/pkg.Greeter/Hello", body("hello")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "path=/pkg.Greeter/Hello te=trailers len=5", "{r:?}");
        assert_eq!(r.trailer("grpc-status"), Some("0"), "{r:?}");
        assert_eq!(r.trailer("grpc-message"), Some("ok"), "{r:?}");
    }
    // Both calls shared one connection to the app.
    assert_eq!(app.connections(), 1);
    let seen = app.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_2, "{s:?}");
        assert_eq!(s.authority, "app.test", "{s:?}");
        // `:authority` names the app; no Host beside it.
        assert_eq!(s.host, None, "{s:?}");
    }
    let line = p
        .wait_log(|l| l["path"] == "/pkg.Greeter/Hello" && l["status"] == 200)
        .await;
    assert_eq!(line["protocol"], "http2", "{line}");
    p.shutdown().await;
}

/// A burst of calls on a cold pool (a gRPC client opening many streams at once) opens one
/// connection to the app, not one each.
#[tokio::test]
async fn a_burst_of_calls_opens_one_connection_to_the_app() {
    let app = GrpcApp::start().await;
    let (p, send) = inbound_proxy(app.addr, "").await;
    let calls = (0..20).map(|i| {
        let mut send = send.clone();
        async move {
            grpc_call(
                &mut send,
                "app.test",
                &format!("/pkg.Svc/Call{i}"),
                body("x"),
            )
            .await
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert_eq!(app.seen().len(), 20);
    assert_eq!(app.connections(), 1);
    p.shutdown().await;
}

/// When every connection to the app carries as many streams as the app allows (long
/// calls, such as gRPC watches), a new call goes on another connection instead of waiting
/// behind them.
#[tokio::test]
async fn a_call_beyond_the_apps_stream_limit_opens_another_connection() {
    let app = GrpcApp::start_limited(2).await;
    let (p, mut send) = inbound_proxy(app.addr, "").await;
    // The first call opens the connection, and the app's limit arrives with its SETTINGS.
    let r = grpc_call(&mut send, "app.test", "/pkg.Svc/Warm", body("w")).await;
    assert_eq!(r.status, 200, "{r:?}");
    // Two calls the app holds for 5 s fill that connection.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move { grpc_call(&mut send, "app.test", "/slow", body("s")).await })
        })
        .collect();
    for _ in 0..200 {
        if app.seen().iter().filter(|s| s.path == "/slow").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.seen().iter().filter(|s| s.path == "/slow").count(), 2);

    let r = grpc_call(&mut send, "app.test", "/pkg.Svc/Quick", body("q")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "the call waited for the held ones to end"
    );
    assert_eq!(app.connections(), 2);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    p.shutdown().await;
}

/// A burst far beyond the app's stream limit is answered whole: a few more connections are
/// opened, and the rest of the calls wait their turn on them.
#[tokio::test]
async fn a_burst_beyond_the_stream_limit_is_answered_whole() {
    let app = GrpcApp::start_limited(2).await;
    let (p, send) = inbound_proxy(app.addr, "").await;
    let calls = (0..40).map(|i| {
        let mut send = send.clone();
        async move { grpc_call(&mut send, "app.test", &format!("/pkg.Svc/B{i}"), body("x")).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert_eq!(app.seen().len(), 40);
    assert!(app.connections() <= 5, "{} connections", app.connections());
    p.shutdown().await;
}

/// A TCP relay to `target` whose open connections can be frozen: nothing more passes either
/// way and nothing is closed, as when a peer's node dies or a NAT entry is dropped. New
/// connections still pass.
async fn freezing_relay(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<tokio::sync::watch::Sender<bool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (freeze, _) = tokio::sync::watch::channel(false);
    let freeze = std::sync::Arc::new(freeze);
    let f = freeze.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)] {
                // Sees only a freeze that comes after the connection began.
                let mut frozen = f.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            n = from.read(&mut buf) => {
                                let Ok(n @ 1..) = n else { return };
                                if to.write_all(&buf[..n]).await.is_err() { return; }
                            }
                            _ = frozen.changed() => {
                                if *frozen.borrow() {
                                    // Hold both sockets, pass nothing, close nothing.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    }
                });
            }
        }
    });
    (addr, freeze)
}

/// An app whose connection goes silent without closing (its node died): a call that gets no
/// response head in time retires the connection, and the next goes on a new one, instead of
/// every call to the app waiting out the response timeout on it for ever. (PINGs, which
/// also find it, come only every 5 minutes to an app that is not a sidecar: gRPC servers
/// close connections PINGed more often; `tests/grpc.rs`.)
#[tokio::test]
async fn a_silently_dead_connection_is_retired_and_replaced() {
    let app = GrpcApp::start().await;
    let (relay, freeze) = freezing_relay(app.addr).await;
    let (p, mut send) = inbound_proxy(relay, "outbound:\n  timeouts: { response: 1s }\n").await;
    let r = grpc_call(&mut send, "app.test", "/pkg.Svc/Before", body("a")).await;
    assert_eq!(r.status, 200, "{r:?}");
    freeze.send_replace(true);
    // The first call times out (504), the next goes on a new connection.
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while tokio::time::Instant::now() < deadline {
        let r = grpc_call(&mut send, "app.test", "/pkg.Svc/After", body("b")).await;
        statuses.push(r.status);
        if r.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(statuses.contains(&504), "{statuses:?}");
    assert_eq!(app.connections(), 2);
    p.shutdown().await;
}

/// Calls that wait for the same dial to an app that is down all hear why it failed.
#[tokio::test]
async fn calls_to_an_app_that_is_down_all_get_a_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = closed.local_addr().unwrap();
    drop(closed);
    let (p, send) = inbound_proxy(down, "").await;
    let calls = (0..5).map(|_| {
        let mut send = send.clone();
        async move { grpc_call(&mut send, "app.test", "/pkg.Svc/Call", body("x")).await }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status, 502, "{r:?}");
        let why = r.headers[ERROR_HEADER].to_str().unwrap();
        assert!(
            why.contains("connect to") && why.contains("failed"),
            "{why}"
        );
    }
    p.shutdown().await;
}

/// An app that closes its HTTP/2 connection (GOAWAY, as servers do with idle ones) costs
/// the next call nothing: it goes on a new connection.
#[tokio::test]
async fn a_call_after_the_app_closed_its_connection_goes_on_a_new_one() {
    let app = GrpcApp::start().await;
    let (p, mut send) = inbound_proxy(app.addr, "").await;
    let r = grpc_call(&mut send, "app.test", "/pkg.Svc/First", body("a")).await;
    assert_eq!(r.status, 200, "{r:?}");
    app.close_connections();
    // However soon after the GOAWAY it comes, the next call is answered.
    for path in ["/pkg.Svc/Second", "/pkg.Svc/Third"] {
        let r = grpc_call(&mut send, "app.test", path, body("b")).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.trailer("grpc-status"), Some("0"), "{r:?}");
    }
    assert_eq!(app.connections(), 2);
    p.shutdown().await;
}

/// A request body that arrives in three parts over about 2.4 s.
fn slow_body() -> ClientBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        for part in ["one ", "two ", "three"] {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
                .await;
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    StreamBody::new(stream).boxed()
}

/// The response timeout runs from the end of the request body, over HTTP/2 as over
/// HTTP/1.1: a client-streaming call longer than it is not cut off, and an app that says
/// nothing once the body is in gets `504`.
#[tokio::test]
async fn the_response_timeout_starts_when_the_request_body_ends() {
    let app = GrpcApp::start().await;
    let (p, mut send) = inbound_proxy(app.addr, "outbound:\n  timeouts: { response: 1s }\n").await;

    let r = grpc_call(&mut send, "app.test", "/pkg.Upload/Stream", slow_body()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body, "path=/pkg.Upload/Stream te=trailers len=13",
        "{r:?}"
    );

    // The app answers `/slow` 5 s after the body: past the 1 s timeout.
    let r = grpc_call(&mut send, "app.test", "/slow", body("x")).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.headers.contains_key(ERROR_HEADER), "{r:?}");
    p.shutdown().await;
}

/// An app that does not speak HTTP/2 gets the caller's HTTP/2 anyway (the caller chose
/// it), and the caller hears why it failed.
#[tokio::test]
async fn an_app_that_does_not_speak_http2_is_a_502_that_says_so() {
    let app = Upstream::start().await;
    let (p, mut send) = inbound_proxy(app.addr, "").await;
    let r = grpc_call(&mut send, "app.test", "/", body("x")).await;
    assert_eq!(r.status, 502, "{r:?}");
    let why = r.headers[ERROR_HEADER].to_str().unwrap().to_owned();
    assert!(why.contains("HTTP/2"), "{why}");
    p.shutdown().await;
}

/// HTTP/2 with prior knowledge inside a `CONNECT` is served stream by stream: each stream
/// is admitted on its own `:authority` and logged (with the address dialled), and goes on in
/// HTTP/2, trailers included. (That a stream for a denied host is refused, which needs a
/// public-range origin, is `plain_http_inside_a_connect_is_checked_request_by_request` in
/// `tests/netns_transparent.rs`.)
#[tokio::test]
async fn http2_inside_a_connect_is_served_stream_by_stream() {
    let app = GrpcApp::start().await;
    let p =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let target = app.addr.to_string();
    let tunnel = open_tunnel(p.proxy_addr(), &target).await;
    let mut send = h2_client(tunnel).await;

    for path in ["/pkg.Svc/One", "/pkg.Svc/Two"] {
        let r = grpc_call(&mut send, &target, path, body("a")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.trailer("grpc-status"), Some("0"), "{r:?}");
        let line = p.wait_log(|l| l["path"] == path).await;
        assert_eq!(line["protocol"], "http2", "{line}");
        assert_eq!(line["mode"], "explicit", "{line}");
        assert_eq!(line["original_dst"], target, "{line}");
        assert_eq!(line["decision"], "allow", "{line}");
    }
    assert!(app
        .seen()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
    // Closes the tunnel, which the shutdown would otherwise wait for until its drain ends.
    drop(send);
    p.shutdown().await;
}

/// An HTTP/2 client of the explicit proxy chose HTTP/2 for the proxy, not the origin: its
/// request reaches an HTTP/1.1-only origin.
#[tokio::test]
async fn an_explicit_proxy_request_in_http2_goes_on_in_http1() {
    let origin = Upstream::start().await;
    let p =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let mut send = h2_client(
        tokio::net::TcpStream::connect(p.proxy_addr())
            .await
            .unwrap(),
    )
    .await;
    let authority = origin.addr.to_string();
    let req = http::Request::get(format!("http://{authority}/hello"))
        .body(body(""))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.requests(), 1);
    p.shutdown().await;
}

/// The HTTP/2 client takes an origin-form request too: the Host names `:authority` (and is
/// not sent beside it), and the scheme is `http`.
#[tokio::test]
async fn an_origin_form_request_gets_its_authority_from_host() {
    let app = GrpcApp::start().await;
    let pool = outrider::net::upstream::Upstreams::new(Duration::from_secs(5), None, None);
    let mut req = http::Request::post("/pkg.Svc/Origin")
        .header("host", "named.test")
        .body(outrider::body::full("x"))
        .unwrap();
    *req.version_mut() = http::Version::HTTP_2;
    let resp = pool
        .send(app.addr, req, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = app.seen();
    assert_eq!(seen[0].authority, "named.test", "{seen:?}");
    assert_eq!(seen[0].host, None, "{seen:?}");
}

/// How the frame-by-frame app below turns away the streams after the first on a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Turn {
    /// GOAWAY (NO_ERROR) naming the first stream as the last: what nginx sends once a
    /// connection has served `keepalive_requests` (1,000 by default), and a server that is
    /// restarting.
    GoAway,
    /// RST_STREAM (REFUSED_STREAM) for each later stream.
    Refuse,
}

fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HTTP/2 app written frame by frame, so that it says exactly which streams it did not
/// process (the h2 crate's server decides that by what it has read, a race): it answers the
/// first stream of each connection with `200` and that stream's body, and turns away the
/// others. Returns its address and how many streams it answered.
async fn first_stream_only_app(turn: Turn) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let _ = first_stream_only(s, turn, &count).await;
            });
        }
    });
    (addr, answered)
}

async fn first_stream_only(
    mut s: tokio::net::TcpStream,
    turn: Turn,
    answered: &AtomicUsize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    const REFUSED_STREAM: u32 = 7;
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await?;
    s.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await?;
    let mut body = Vec::new();
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await?;
        let len = usize::from(head[1]) << 8 | usize::from(head[2]) | usize::from(head[0]) << 16;
        let (ty, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await?;
        match (ty, id) {
            (SETTINGS, _) if flags & 1 == 0 => s.write_all(&h2_frame(SETTINGS, 1, 0, &[])).await?,
            (HEADERS, id) if id > 1 && turn == Turn::Refuse => {
                let code = REFUSED_STREAM.to_be_bytes();
                s.write_all(&h2_frame(RST_STREAM, 0, id, &code)).await?;
            }
            (DATA, 1) => body.extend_from_slice(&payload),
            _ => {}
        }
        if id == 1 && (ty == DATA || ty == HEADERS) && flags & END_STREAM != 0 {
            if turn == Turn::GoAway {
                // Last stream 1, no error: every stream above it was not processed.
                let mut away = 1u32.to_be_bytes().to_vec();
                away.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&h2_frame(GOAWAY, 0, 0, &away)).await?;
            }
            // `:status: 200` is entry 8 of HPACK's static table: one byte.
            s.write_all(&h2_frame(HEADERS, END_HEADERS, 1, &[0x88]))
                .await?;
            s.write_all(&h2_frame(DATA, END_STREAM, 1, &body)).await?;
            answered.fetch_add(1, Ordering::SeqCst);
            if turn == Turn::GoAway {
                // Closed the way a server does once its last stream is done: a FIN, then
                // whatever the client still sends is read and dropped (a close with unread
                // bytes would be a reset, which could overtake the answer).
                s.shutdown().await?;
                tokio::io::copy(&mut s, &mut tokio::io::sink()).await?;
                return Ok(());
            }
        }
    }
}

/// A request the server did not process (RFC 9113 §8.7: refused, or above the last stream of
/// a graceful GOAWAY) is sent again on another connection, body and all, whatever its method:
/// the client gets the answer, and the app sees each request once. Before, each was a 502,
/// 7 % of the requests to an nginx origin at its default of 1,000 requests per connection
/// under 160 concurrent streams.
#[tokio::test]
async fn a_request_the_server_did_not_process_is_sent_again() {
    for turn in [Turn::GoAway, Turn::Refuse] {
        let (app, answered) = first_stream_only_app(turn).await;
        let (p, send) = inbound_proxy(app, "").await;
        let calls = (0..3).map(|i| {
            let mut send = send.clone();
            async move {
                let sent = format!("payload {i}");
                let req = http::Request::post("http://app.test/echo")
                    .body(http_body_util::Full::new(Bytes::from(sent.clone())).boxed())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                let status = resp.status();
                let got = resp.into_body().collect().await.unwrap().to_bytes();
                (status, sent, String::from_utf8_lossy(&got).into_owned())
            }
        });
        for (status, sent, got) in futures_util::future::join_all(calls).await {
            assert_eq!(status, 200, "{turn:?}: {got}");
            assert_eq!(got, sent, "{turn:?}");
        }
        assert_eq!(
            answered.load(Ordering::SeqCst),
            3,
            "{turn:?}: each request once"
        );
        p.shutdown().await;
    }
}
