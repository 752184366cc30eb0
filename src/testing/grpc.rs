//! A server that speaks only HTTP/2 with prior knowledge and answers the way a gRPC server
//! does (status in trailers), and a client for it: what a gRPC app and its stub look like
//! on the wire, without protobuf.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::ClientBody;

/// How long `/slow` waits after the request body before it answers.
pub const GRPC_SLOW: Duration = Duration::from_secs(5);

/// What the app saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub version: http::Version,
    pub authority: String,
    pub path: String,
    pub te: Option<String>,
    pub host: Option<String>,
    pub xfcc: Option<String>,
    pub body_len: usize,
}

/// An HTTP/2-only app (an HTTP/1 request fails its connection, as with a gRPC server). Each
/// request is answered `200` with the body `path=P te=T len=N`, then the trailers
/// `grpc-status: 0` and `grpc-message: ok`; `/slow` waits [`GRPC_SLOW`] after the request
/// body first.
pub struct GrpcApp {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Bumped to make every open connection shut down gracefully (GOAWAY).
    goaway: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcApp {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Like [`GrpcApp::start`], allowing at most `max_streams` streams at once on each
    /// connection (`SETTINGS_MAX_CONCURRENT_STREAMS`; gRPC servers often set 100).
    pub async fn start_limited(max_streams: u32) -> Self {
        Self::start_with(Some(max_streams)).await
    }

    async fn start_with(max_streams: Option<u32>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (goaway, goaway_rx) = tokio::sync::watch::channel(0u64);
        let (log, count) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let mut goaway = goaway_rx.clone();
                goaway.mark_unchanged();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(req, log.clone()));
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = goaway.changed() => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
        });
        Self {
            addr,
            seen,
            connections,
            goaway,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Shuts every open connection down gracefully, as a server that closes idle HTTP/2
    /// connections does (GOAWAY, then close).
    pub fn close_connections(&self) {
        self.goaway.send_modify(|n| *n += 1);
    }

    /// Every request the app has answered, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type AppBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<AppBody>, Infallible> {
    let text = |h: &HeaderMap, n: &str| h.get(n).map(|v| v.to_str().unwrap_or("?").to_owned());
    let (parts, body) = req.into_parts();
    let body_len = body.collect().await.map_or(0, |b| b.to_bytes().len());
    let seen = Seen {
        version: parts.version,
        authority: parts
            .uri
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default(),
        path: parts.uri.path().to_owned(),
        te: text(&parts.headers, "te"),
        host: text(&parts.headers, "host"),
        xfcc: text(&parts.headers, "x-forwarded-client-cert"),
        body_len,
    };
    log.lock().unwrap().push(seen.clone());
    if seen.path == "/slow" {
        tokio::time::sleep(GRPC_SLOW).await;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("grpc-message", "ok".parse().unwrap());
    let data = format!(
        "path={} te={} len={}",
        seen.path,
        seen.te.as_deref().unwrap_or("-"),
        body_len
    );
    let frames = vec![
        Ok(Frame::data(Bytes::from(data))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    resp.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    Ok(resp)
}

/// A request body held whole.
pub fn text_body(text: &'static str) -> ClientBody {
    http_body_util::Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

/// An HTTP/2 client with prior knowledge over `io` (a TCP stream, or a CONNECT tunnel).
pub async fn h2_client<I>(io: I) -> SendRequest<ClientBody>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// What a gRPC call got back: status, headers, body text and trailers.
#[derive(Debug)]
pub struct GrpcResp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

impl GrpcResp {
    /// A trailer's value.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.as_ref()?.get(name)?.to_str().ok()
    }
}

/// A gRPC-style call: `POST http://{authority}{path}` with `te: trailers`, the body, and
/// the response read whole with its trailers (at most 20 s).
pub async fn grpc_call(
    send: &mut SendRequest<ClientBody>,
    authority: &str,
    path: &str,
    body: ClientBody,
) -> GrpcResp {
    let req = Request::post(format!("http://{authority}{path}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap();
    let call = async {
        let resp = send.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        GrpcResp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        }
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("no whole response within 20 s")
}
