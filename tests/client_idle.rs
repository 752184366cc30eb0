//! Client connections, in-process, with `clients.idle_timeout: 2s` (the default is 30 s):
//! HTTP/2 ones are served on the inbound listener (prior knowledge), kept open while a
//! response is still being sent, and closed once they have been idle for the timeout, so
//! that quiet clients cannot hold connections forever; HTTP/1 keep-alive ones are closed
//! after the same time. The timeouts are real (a few seconds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::testing::TestProxy;

/// The configured idle timeout.
const IDLE: &str = "2s";
/// How long `/drip` takes to finish its body: longer than the idle timeout.
const DRIP: Duration = Duration::from_secs(4);
/// How long the tests wait for a close they expect: well past the timeout, well short of
/// the 30 s default (so a key that did nothing would fail them).
const CLOSED_WITHIN: Duration = Duration::from_secs(15);

/// An HTTP/1 and HTTP/2 app: `/` answers `ok`; `/drip` sends `first`, then `last` after
/// [`DRIP`]; `/upload` reads the whole request body, then answers with its length.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/upload" {
                        // Answers once the whole body is in: with its length.
                        let n = match req.into_body().collect().await {
                            Ok(body) => body.to_bytes().len(),
                            Err(_) => 0,
                        };
                        let chunks = futures_util::stream::iter([Ok::<_, Infallible>(
                            Frame::data(Bytes::from(format!("{n} bytes"))),
                        )]);
                        return Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(
                            chunks.boxed(),
                        )));
                    }
                    if req.uri().path() == "/own-keep-alive" {
                        // An app's own hint is about its connection to the proxy, not the
                        // client's: it must not reach the client.
                        let mut resp =
                            hyper::Response::new(StreamBody::new(futures_stream(false).boxed()));
                        resp.headers_mut().insert(
                            "keep-alive",
                            hyper::header::HeaderValue::from_static("timeout=99"),
                        );
                        return Ok::<_, Infallible>(resp);
                    }
                    let drip = req.uri().path() == "/drip";
                    let chunks = futures_stream(drip);
                    Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(chunks.boxed())))
                });
                // Both protocols: the proxy's hop to the app is HTTP/2 when the client's is.
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The app's body as a stream of frames.
fn futures_stream(
    drip: bool,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        if !drip {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"ok")))).await;
            return;
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .await;
        tokio::time::sleep(DRIP).await;
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last")))).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) })
}

async fn proxy(app: SocketAddr) -> TestProxy {
    TestProxy::start(&format!(
        "clients:\n  idle_timeout: {IDLE}\n\
         inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n"
    ))
    .await
}

#[tokio::test]
async fn http2_connections_stay_while_busy_and_close_when_idle() {
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();

    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        hyper::Request::builder()
            .uri(format!("http://{inbound}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    let resp = sender.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    // HTTP/2 has no `Keep-Alive` (RFC 9113 §8.2.2): the GOAWAY says when it ends.
    assert_eq!(resp.headers().get("keep-alive"), None);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");

    // A response still being sent when the idle timeout would have passed is not cut.
    let resp = sender.send_request(get("/drip")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "first last");
    assert!(
        !conn.is_finished(),
        "the connection closed while a response was being sent"
    );

    // Now nothing is in flight: the proxy closes the connection after the idle timeout.
    let ended = tokio::time::timeout(CLOSED_WITHIN, conn).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection was still open {CLOSED_WITHIN:?} after its last response"
    );
    assert!(sender.send_request(get("/")).await.is_err());
    p.shutdown().await;
}

/// Sends `GET path` on a keep-alive HTTP/1 connection and reads the whole response (the
/// app's bodies are chunked: it ends with the last chunk), leaving the connection open.
async fn http1_get(s: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response to {path} ended: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The head of the next response on `s` (the connection stays open), lower-cased.
async fn response_head(s: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.unwrap();
        assert!(n > 0, "closed before the head ended: {got:?}");
        got.push(byte[0]);
    }
    String::from_utf8_lossy(&got).to_ascii_lowercase()
}

/// An HTTP/1.1 response on a connection that stays open says how long the proxy keeps it
/// idle (`Keep-Alive: timeout=2`, the idle timeout), so that a client lets it go rather than
/// send a request as it closes (Node's and Java's clients go by it), on both listeners and
/// for the proxy's own refusals too. Not when the connection closes, and
/// never the app's own hint, which is about the app's connection to the proxy.
#[tokio::test]
async fn http1_responses_say_how_long_an_idle_connection_is_kept() {
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
    let head = response_head(&mut s, &get("/own-keep-alive")).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\r\nkeep-alive: timeout=2\r\n"), "{head}");
    assert!(!head.contains("timeout=99"), "{head}");

    let mut s = tokio::net::TcpStream::connect(p.proxy_addr())
        .await
        .unwrap();
    let denied = "GET http://not-allowed.test/ HTTP/1.1\r\nHost: not-allowed.test\r\n\r\n";
    let head = response_head(&mut s, denied).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("\r\nkeep-alive: timeout=2\r\n"), "{head}");

    let closing = outrider::testing::raw_exchange(
        inbound,
        b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(closing.status, 200, "{closing:?}");
    assert_eq!(closing.header("keep-alive"), None, "{closing:?}");
    p.shutdown().await;
}

#[tokio::test]
async fn http1_keep_alive_connections_close_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let text = http1_get(&mut s, "/").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // A response still being sent when the idle timeout would have passed is not cut.
    let text = http1_get(&mut s, "/drip").await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("first ") && text.contains("last"),
        "{text}"
    );
    let mut buf = [0u8; 64];
    // Nothing more is sent: the proxy closes the connection after the idle timeout.
    let read = tokio::time::timeout(CLOSED_WITHIN, s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle HTTP/1 keep-alive connection was not closed within {CLOSED_WITHIN:?}: {read:?}"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn http1_a_request_head_that_trickles_in_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    // Slowloris: the head never ends, but a header line arrives every 300 ms, so the
    // connection is never quiet. It must still be closed, without an answer.
    s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let closed = loop {
        assert!(
            start.elapsed() < CLOSED_WITHIN,
            "a request head still arriving after {CLOSED_WITHIN:?} was not cut off"
        );
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            break Vec::new();
        }
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Vec::new(),
            Ok(Ok(n)) => break buf[..n].to_vec(),
            Err(_) => {}
        }
    };
    assert!(
        closed.is_empty(),
        "got an answer to a head that never ended: {:?}",
        String::from_utf8_lossy(&closed)
    );
    p.shutdown().await;
}

/// Sends `POST /upload` declaring `len` body bytes and the first of them; returns the stream.
async fn start_upload(inbound: SocketAddr, len: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {len}\r\n\r\nx");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn http1_a_request_body_that_stops_arriving_is_408() {
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    // A head and one byte of a 100-byte body, then nothing: before, the client's
    // connection and the proxy's to the app stayed open for as long as the client liked.
    let mut s = start_upload(inbound, 100).await;
    let got = outrider::testing::read_until_closed(&mut s, CLOSED_WITHIN).await;
    assert!(
        got.is_some(),
        "a request body that stopped arriving was still open after {CLOSED_WITHIN:?}"
    );
    let got = got.unwrap_or_default();
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 408"), "{text}");
    assert!(
        text.contains("x-outrider-error: no byte of the request body arrived for 2s"),
        "{text}"
    );
    let rec = p.wait_log(|r| r["path"] == "/upload").await;
    assert_eq!(rec["status"], 408, "{rec}");
    p.shutdown().await;
}

#[tokio::test]
async fn http1_a_slow_body_that_keeps_moving_is_not_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    // Ten bytes, one every 600 ms: 6 s in all, three times the idle timeout, but never
    // quiet for as long as it.
    let mut s = start_upload(inbound, 10).await;
    for _ in 1..10 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        s.write_all(b"x").await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(CLOSED_WITHIN, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("10 bytes"), "{text}");
    p.shutdown().await;
}

/// HTTP/2 request bodies have no pause limit: a gRPC streaming call may pause for longer
/// than the idle timeout, and flow control and the stream limit hold a stream in check.
#[tokio::test]
async fn http2_a_request_body_may_pause_longer_than_the_idle_timeout() {
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) })
            .boxed(),
    );
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{inbound}/upload"))
        .body(body)
        .unwrap();
    let send = tokio::spawn(sender.send_request(req));
    tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    // Half as long again as the idle timeout, with nothing sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send(Ok(Frame::data(Bytes::from_static(b"last"))))
        .await
        .unwrap();
    drop(tx);
    let resp = tokio::time::timeout(CLOSED_WITHIN, send)
        .await
        .expect("no answer")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "10 bytes");
    p.shutdown().await;
}

/// An HTTP/2 client that sends the connection preface and then nothing (no SETTINGS) is
/// closed too: the graceful close waited for a handshake that never came.
#[tokio::test]
async fn http2_a_client_that_stops_after_the_preface_is_closed() {
    use tokio::io::AsyncWriteExt;
    let app = app().await;
    let p = proxy(app).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // The server's SETTINGS (and later its GOAWAY) come first; then the close.
    let closed = outrider::testing::read_until_closed(&mut s, CLOSED_WITHIN).await;
    assert!(
        closed.is_some(),
        "an HTTP/2 client silent after its preface was still connected after {CLOSED_WITHIN:?}"
    );
    p.shutdown().await;
}
