//! The admin listener: `/live`, `/ready`, `/metrics` (Prometheus text), `/config`, `/logging`,
//! and the `POST`s, from loopback only: `/logging?level=…`, `/cache/purge`, `/reopen_logs`,
//! `/shutdown`.

use std::convert::Infallible;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::server::ServerHandle;

/// Serves admin requests until the task is aborted.
pub async fn serve(listener: TcpListener, handle: ServerHandle) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let local = peer.ip().to_canonical().is_loopback();
        let h = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(h.clone(), req, local));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<Body> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// `local`: the caller is on loopback (in the pod), not elsewhere on the network.
async fn route(
    handle: ServerHandle,
    req: Request<Incoming>,
    local: bool,
) -> Result<Response<Body>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        // What changes the proxy's state (stopping it, emptying its cache, reopening its
        // log) is for the pod's own processes: with the admin port open to the network for
        // the kubelet's probes, another pod must not be able to stop this one or empty its
        // cache. Reading (`/ready`, `/metrics`) stays open, for probes and scrapers.
        (&Method::POST, path) if !local => text(
            StatusCode::FORBIDDEN,
            plain,
            format!("POST {path} is accepted from loopback only\n"),
        ),
        (&Method::GET, "/live") => text(StatusCode::OK, plain, "live\n"),
        (&Method::GET, "/ready") => {
            if handle.is_ready() {
                text(StatusCode::OK, plain, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, plain, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => match crate::metrics::install() {
            Some(h) => text(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                plain,
                "metrics recorder unavailable\n",
            ),
        },
        (&Method::GET, "/certs") => match handle.certs() {
            None => text(StatusCode::NOT_FOUND, plain, "no identity configured\n"),
            Some(body) => text(StatusCode::OK, "application/json", body.to_string()),
        },
        (&Method::GET, "/config") => match serde_json::to_vec_pretty(&handle.config()) {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, plain, e.to_string()),
        },
        (&Method::POST, "/cache/purge") => {
            let url = query_value(&req, "url=");
            let n = handle.purge_cache(url.as_deref());
            text(StatusCode::OK, plain, format!("purged {n}\n"))
        }
        // A Job's app calls this when it is done, so that the pod completes: a sidecar that
        // is not a native one (Kubernetes before 1.29) would otherwise run on and keep the
        // Job from finishing, as Istio's `/quitquitquit` and Linkerd's `/shutdown` are for.
        // The same drain as SIGTERM. Traffic does not escape the policy once the proxy is
        // gone: the capture rules still send it to the closed port.
        (&Method::POST, "/shutdown") => {
            tracing::info!("POST /shutdown: draining");
            handle.shutdown();
            text(StatusCode::OK, plain, "shutting down\n")
        }
        (&Method::GET, "/logging") => match crate::logging::current() {
            Ok(filter) => text(StatusCode::OK, plain, format!("log filter: {filter}\n")),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, plain, format!("{e}\n")),
        },
        // Envoy's form: `POST /logging?level=debug`; the value may also be a whole filter,
        // `outrider=debug,info` (commas and `=` as they are, or percent-encoded).
        (&Method::POST, "/logging") => {
            let level = query_value(&req, "level=");
            match level.as_deref().map(crate::logging::set) {
                None => text(
                    StatusCode::BAD_REQUEST,
                    plain,
                    "say which: POST /logging?level=debug (or a filter: level=outrider=debug,info)\n",
                ),
                Some(Ok(was)) => {
                    // As `set` kept it: a value percent-decoded to ` debug` is `debug`.
                    let now = level.as_deref().map(str::trim).unwrap_or_default();
                    tracing::info!("log filter set to {now} (was {was}) by POST /logging");
                    text(StatusCode::OK, plain, format!("log filter: {now} (was {was})\n"))
                }
                Some(Err(e @ crate::logging::FilterError::Invalid(..))) => {
                    text(StatusCode::BAD_REQUEST, plain, format!("{e}\n"))
                }
                Some(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, plain, format!("{e}\n")),
            }
        }
        (&Method::POST, "/reopen_logs") => match handle.reopen_logs() {
            Ok(done) => text(StatusCode::OK, plain, format!("{done}\n")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, plain, format!("{e}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /live, /ready, /metrics, /config, /logging, POST /logging?level=…, POST /cache/purge, POST /reopen_logs, POST /shutdown\n",
        ),
    })
}

/// The first value of `key` (given with its `=`) in the query string, decoded.
fn query_value<B>(req: &Request<B>, key: &str) -> Option<String> {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(key)))
        .map(percent_decode)
}

/// Decodes `%XX` escapes in a query value (`+` stays as is: URLs don't use it for spaces).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
