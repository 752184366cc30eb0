//! HTTP/2 frames of many streams leave the proxy together: the answers (and the request
//! bodies) of streams handled at the same moment go out in a few TCP segments, not one per
//! stream. The h2 crate writes every DATA frame of 256 bytes or more by itself, so before
//! this 32 answers of 1 KiB took at least 32 segments, and as many syscalls (the HTTP/2
//! path's largest cost against HAProxy, which sends them in one). Counted with the
//! kernel's own `TCP_INFO` segment counters on real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// `TCP_INFO` is read with libc: neither nix nor socket2 has it.
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::net::corked;
use outrider::testing::{ClientBody, TestProxy};

/// How many streams are in flight together.
const STREAMS: usize = 32;

/// Segments the peer of `fd` has sent it so far (pure ACKs included).
fn segments_in(fd: RawFd) -> u32 {
    // SAFETY: `tcp_info` is plain integers, for which all zeroes is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a `tcp_info` of `len` bytes, which the kernel fills.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_segs_in
}

/// An HTTP/2 app that holds every request until `STREAMS` of them have come, then answers
/// each with 1 KiB: the proxy gets the answers together. The app's own writes are gathered
/// (as the proxy's are), so they reach the proxy in one go. Its socket's descriptor is
/// kept, to count what the proxy sent it.
struct App {
    addr: std::net::SocketAddr,
    fd: Arc<Mutex<Option<RawFd>>>,
}

async fn start_app() -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = Arc::new(Mutex::new(None));
    let seen = fd.clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(STREAMS));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            *seen.lock().unwrap() = Some(stream.as_raw_fd());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let barrier = barrier.clone();
                    async move {
                        let got = req.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(got.len(), 1024);
                        barrier.wait().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(vec![
                            b'a';
                            1024
                        ]))))
                    }
                });
                let (io, cork) = corked::new(stream);
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc);
                let _ = cork.drive(conn).await;
            });
        }
    });
    App { addr, fd }
}

#[tokio::test]
async fn the_frames_of_streams_answered_together_leave_in_a_few_segments() {
    let app = start_app().await;
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {}\n",
        app.addr
    ))
    .await;
    let inbound = p.handle().inbound_addr.unwrap();
    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let client_fd = stream.as_raw_fd();
    // The client gathers its writes too, so that its requests reach the proxy together.
    let (io, cork) = corked::new(stream);
    let (send, conn) = hyper::client::conn::http2::handshake(cork.client_exec(), TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);

    let call = |send: &hyper::client::conn::http2::SendRequest<ClientBody>| {
        let mut send = send.clone();
        async move {
            let req = http::Request::post("http://app.test/echo")
                .body(Full::new(Bytes::from(vec![b'q'; 1024])).boxed())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap().to_bytes().len()
        }
    };
    // A first round opens the proxy's connection to the app and warms both sides up.
    let sizes = futures_util::future::join_all((0..STREAMS).map(|_| call(&send))).await;
    assert!(sizes.iter().all(|&n| n == 1024), "{sizes:?}");
    let app_fd = app
        .fd
        .lock()
        .unwrap()
        .expect("the proxy connected to the app");

    let (client_before, app_before) = (segments_in(client_fd), segments_in(app_fd));
    let sizes = futures_util::future::join_all((0..STREAMS).map(|_| call(&send))).await;
    assert!(sizes.iter().all(|&n| n == 1024), "{sizes:?}");
    let to_client = segments_in(client_fd) - client_before;
    let to_app = segments_in(app_fd) - app_before;
    // One segment per stream (or more) was the old behaviour; a quarter leaves room for
    // ACKs, WINDOW_UPDATEs and a burst split over a few polls.
    assert!(
        to_client <= (STREAMS / 4) as u32,
        "{STREAMS} answers of 1 KiB reached the client in {to_client} segments"
    );
    assert!(
        to_app <= (STREAMS / 4) as u32,
        "{STREAMS} request bodies of 1 KiB reached the app in {to_app} segments"
    );
    p.shutdown().await;
}
