//! HTTP/2 client connections, in-process: served on the inbound listener (prior knowledge),
//! kept open while a response is still being sent, and closed once they have been idle for
//! the idle timeout (30 s, as HTTP/1's), so that quiet clients cannot hold connections
//! forever. Takes about 70 s: the timeout is real.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::testing::TestProxy;

/// How long `/drip` takes to finish its body: longer than the idle timeout.
const DRIP: Duration = Duration::from_secs(35);

/// An HTTP/1 app: `/` answers `ok`; `/drip` sends `first`, then `last` after [`DRIP`].
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let drip = req.uri().path() == "/drip";
                    let chunks = futures_stream(drip);
                    Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(chunks)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
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

#[tokio::test]
async fn http2_connections_stay_while_busy_and_close_when_idle() {
    let app = app().await;
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n"
    ))
    .await;
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
    let ended = tokio::time::timeout(Duration::from_secs(60), conn).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection was still open 60 s after its last response"
    );
    assert!(sender.send_request(get("/")).await.is_err());
    p.shutdown().await;
}
