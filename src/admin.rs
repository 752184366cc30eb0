//! The admin listener: `/live`, `/ready`, `/metrics` (Prometheus text), `/config`.

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
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let h = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(h.clone(), req));
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

async fn route(handle: ServerHandle, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
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
        (&Method::GET, "/config") => match serde_json::to_vec_pretty(&handle.config()) {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, plain, e.to_string()),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "not found: try /live, /ready, /metrics, /config\n",
        ),
    })
}
