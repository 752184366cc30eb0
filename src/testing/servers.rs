//! Test upstreams: a hyper origin that counts requests and connections, a TCP echo, and a
//! TLS origin with a certificate made at test time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    clippy::needless_pass_by_value
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------
// The upstream.

/// A real HTTP/1 origin on 127.0.0.1:0.
///
/// Routes: `/stream?bytes=N` (N bytes in 64 KiB chunks, generated as sent), `/upload`
/// (consumes the body, answers its byte count), `/slow?ms=N` (answers after N ms),
/// `/drip?n=N&ms=M` (head at once, then N one-byte chunks M ms apart), `/upgrade` (with an
/// `Upgrade` header: 101, then a byte echo), and
/// anything else echoes the request as JSON `{method, uri, headers: {name: [values]}}`.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    /// Bytes the `/stream` route actually wrote into response frames.
    pub streamed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Upstream {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// Like [`Upstream::start`] on another loopback address, e.g. `[::1]:0`.
    pub async fn start_on(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let streamed = Arc::new(AtomicU64::new(0));
        let (r, c, s) = (requests.clone(), connections.clone(), streamed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        upstream_route(req, s.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            streamed,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

pub(crate) fn full_body(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).boxed()
}

async fn upstream_route(
    req: Request<Incoming>,
    streamed: Arc<AtomicU64>,
) -> Result<Response<UpBody>, Infallible> {
    let q = query(&req);
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    match req.uri().path() {
        "/stream" => {
            let total = num("bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let chunk = chunk.clone();
                let streamed = streamed.clone();
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = usize::try_from((total - sent).min(chunk.len() as u64)).unwrap();
                    streamed.fetch_add(n as u64, Ordering::Relaxed);
                    Some((
                        Ok::<_, Infallible>(Frame::data(chunk.slice(..n))),
                        sent + n as u64,
                    ))
                }
            });
            let mut resp = Response::new(StreamBody::new(stream).boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                total.to_string().parse().unwrap(),
            );
            Ok(resp)
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Ok(Response::new(full_body(n.to_string())))
        }
        "/drip" => {
            // The head now, then one byte every `ms` for `n` bytes: a slow body, not a slow head.
            let (n, ms) = (num("n"), num("ms"));
            let stream = futures_util::stream::unfold(0u64, move |sent| async move {
                if sent >= n {
                    return None;
                }
                if sent > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"d"))),
                    sent + 1,
                ))
            });
            Ok(Response::new(StreamBody::new(stream).boxed()))
        }
        "/upgrade" if req.headers().contains_key(http::header::UPGRADE) => {
            // Switches to a byte echo, like a WebSocket server would switch protocols.
            let on_upgrade = hyper::upgrade::on(req);
            tokio::spawn(async move {
                if let Ok(up) = on_upgrade.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut resp = Response::new(full_body(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(http::header::UPGRADE, "echo".parse().unwrap());
            resp.headers_mut()
                .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
            Ok(resp)
        }
        "/empty" => Ok(Response::new(full_body(Bytes::new()))),
        "/no-content" => {
            let mut resp = Response::new(full_body(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(num("ms"))).await;
            Ok(Response::new(full_body("slow done")))
        }
        _ => {
            let mut headers = serde_json::Map::new();
            for (name, value) in req.headers() {
                let entry = headers
                    .entry(name.as_str().to_owned())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                if let serde_json::Value::Array(a) = entry {
                    a.push(
                        String::from_utf8_lossy(value.as_bytes())
                            .into_owned()
                            .into(),
                    );
                }
            }
            let echo = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            let mut resp = Response::new(full_body(echo.to_string()));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                "application/json".parse().unwrap(),
            );
            resp.headers_mut()
                .insert("x-upstream-secret-hop", "1".parse().unwrap());
            resp.headers_mut().insert(
                http::header::CONNECTION,
                "x-upstream-secret-hop".parse().unwrap(),
            );
            Ok(resp)
        }
    }
}

/// A plain TCP echo server on 127.0.0.1:0 (for CONNECT tunnels); counts connections.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// A TLS origin, for HTTPS through CONNECT.

/// An HTTPS origin on 127.0.0.1:0 with a self-signed certificate for `name`, generated at
/// test time; answers every request with `tls ok <path>`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    /// The certificate in PEM, for curl's `--cacert`.
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    pub async fn start(name: &str) -> Self {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let ca_pem = ck.cert.pem();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(full_body(format!(
                            "tls ok {}",
                            req.uri().path()
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, ca_pem, task }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
