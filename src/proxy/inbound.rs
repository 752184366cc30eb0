//! The inbound listener: connections redirected to the pod (or addressed to the listener)
//! go to the local app at `app_host:<original port>`, or where `inbound.routes` send them.
//! HTTP is proxied per request (logged, `x-forwarded-for`, `forwarded`, `x-request-id`);
//! anything else is passed through as bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::detect::{detect, Protocol, Rewind};
use super::error::ProxyError;
use super::http::{add_via, strip_hop_by_hop};
use super::tunnel::splice;
use super::{ConnInfo, Inputs};
use crate::access_log::{LogGuard, Record};
use crate::body::{self, Body, Counted};
use crate::net::connect;

/// Accepts inbound connections until shutdown.
pub async fn accept(listener: TcpListener, inputs: Arc<Inputs>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, client)) => {
                let local = stream.local_addr().ok();
                let od =
                    crate::net::orig_dst::original_dst(&stream).filter(|od| Some(*od) != local);
                inputs
                    .tasks
                    .spawn(serve(inputs.clone(), stream, client, od, shutdown.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one inbound connection.
pub async fn serve(
    inputs: Arc<Inputs>,
    mut stream: TcpStream,
    client: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: CancellationToken,
) {
    let _gauge = crate::metrics::ConnectionGauge::open();
    let _ = stream.set_nodelay(true);
    let conn = ConnInfo {
        client,
        original_dst,
    };
    let timeout = inputs.state.load().cfg.detect_timeout;
    let (protocol, prefix) = match detect(&mut stream, timeout).await {
        Ok(found) => found,
        Err(_) => return,
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let svc = service_fn(move |req| handle(inputs.clone(), conn, req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(Rewind::new(prefix, stream)), svc);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        }
        other => pass_through(inputs, stream, prefix, conn, other.name()).await,
    }
}

async fn pass_through(
    inputs: Arc<Inputs>,
    stream: TcpStream,
    prefix: bytes::Bytes,
    conn: ConnInfo,
    protocol: &'static str,
) {
    let state = inputs.state.load_full();
    let mut guard = LogGuard::start(
        state.log.clone(),
        Record {
            direction: "inbound",
            mode: conn.mode(),
            protocol,
            client: Some(conn.client),
            original_dst: conn.original_dst,
            ..Record::default()
        },
    );
    let Some(od) = conn.original_dst else {
        guard.record.error =
            Some("no original destination and not HTTP: nowhere to send it".into());
        return;
    };
    let app = SocketAddr::new(state.cfg.app_host, od.port());
    guard.record.upstream = Some(app);
    guard.record.authority = Some(od.to_string());
    let mut upstream = match connect::connect(app, state.cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            guard.record.error = Some(e.to_string());
            return;
        }
    };
    if upstream.write_all(&prefix).await.is_err() {
        return;
    }
    guard
        .bytes
        .inbound
        .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    splice(stream, upstream, guard).await;
}

/// One inbound HTTP request: route, add forwarding headers, send to the app, log.
async fn handle(
    inputs: Arc<Inputs>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let state = inputs.state.load_full();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let mut guard = LogGuard::start(
        state.log.clone(),
        Record {
            direction: "inbound",
            mode: conn.mode(),
            protocol: if req.version() == http::Version::HTTP_2 {
                "http2"
            } else {
                "http1"
            },
            client: Some(conn.client),
            original_dst: conn.original_dst,
            method: Some(req.method().to_string()),
            path: req.uri().path_and_query().map(|p| p.to_string()),
            authority: req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .or_else(|| req.uri().authority().map(|a| a.to_string())),
            request_id: Some(request_id.clone()),
            ..Record::default()
        },
    );
    let host = guard.record.authority.clone();
    let target = state
        .cfg
        .routes
        .pick(host.as_deref(), req.uri().path(), req.headers())
        .or_else(|| {
            conn.original_dst
                .map(|od| SocketAddr::new(state.cfg.app_host, od.port()))
        });
    let Some(target) = target else {
        let e = ProxyError::BadRequest(
            "no inbound route matches and the connection has no original destination".into(),
        );
        guard.record.status = 404;
        guard.record.error = Some(e.to_string());
        let mut resp = e.response();
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        return Ok(resp);
    };
    guard.record.upstream = Some(target);
    let (mut parts, incoming) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    add_forwarding(&mut parts.headers, conn, host.as_deref(), &request_id);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = Uri::try_from(format!("http://{target}{path}")) else {
        guard.record.status = 400;
        return Ok(ProxyError::BadRequest("bad request target".into()).response());
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let counter = guard.bytes.clone();
    let up = Request::from_parts(
        parts,
        body::boxed(Counted::new(incoming, counter, false, None::<()>)),
    );
    let result = tokio::time::timeout(state.cfg.response_timeout, state.client.request(up)).await;
    let resp = match result {
        Err(_) => Err(ProxyError::ResponseTimeout(target.to_string())),
        Ok(Err(e)) => Err(ProxyError::Upstream(target.to_string(), format!("{e}"))),
        Ok(Ok(r)) => Ok(r),
    };
    match resp {
        Ok(resp) => {
            let (mut parts, incoming) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            add_via(&mut parts.headers, http::Version::HTTP_11);
            guard.record.status = parts.status.as_u16();
            let counter = guard.bytes.clone();
            Ok(Response::from_parts(
                parts,
                body::boxed(Counted::new(incoming, counter, true, Some(guard))),
            ))
        }
        Err(e) => {
            let resp = e.response();
            guard.record.status = resp.status().as_u16();
            guard.record.error = Some(e.to_string());
            Ok(resp)
        }
    }
}

fn add_forwarding(
    headers: &mut http::HeaderMap,
    conn: ConnInfo,
    host: Option<&str>,
    request_id: &str,
) {
    let ip = conn.client.ip();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    let for_ = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let mut fwd = format!("for={for_};proto=http");
    if let Some(h) = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic())) {
        fwd.push_str(&format!(";host=\"{h}\""));
    }
    let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(header::FORWARDED, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", v);
    }
}

/// A random 128-bit id in hex.
fn new_request_id() -> String {
    let mut b = [0u8; 16];
    // getrandom through std's hasher seed would be weak; the OS RNG is one syscall.
    if getrandom_fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}
