//! Helpers for the cache tests: real hyper origins on 127.0.0.1:0 that count the
//! requests they get, an `Upstream` that forwards with a hyper client, and a client
//! helper that collects what a user would see.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::body::{self, Body};
use outrider::cache::{CacheConfig, CacheOutcome, HttpCache, Upstream, UpstreamError};

/// An origin's handler: the request and its 1-based sequence number.
pub type Handler =
    Arc<dyn Fn(Request<Incoming>, usize) -> BoxFuture<'static, Response<Body>> + Send + Sync>;

/// A running origin server.
pub struct Origin {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Origin {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// How many requests reached the origin.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    /// Headers of the n-th request (1-based).
    pub fn request_headers(&self, n: usize) -> HeaderMap {
        self.seen.lock().unwrap()[n - 1].clone()
    }
}

/// Starts an origin whose handler may be async.
pub async fn origin_async<F>(handler: F) -> Origin
where
    F: Fn(Request<Incoming>, usize) -> BoxFuture<'static, Response<Body>> + Send + Sync + 'static,
{
    let handler: Handler = Arc::new(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h, s) = (hits.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (handler, hits, seen) = (handler.clone(), h.clone(), s.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.lock().unwrap().push(req.headers().clone());
                    let fut = handler(req, n);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin { addr, hits, seen }
}

/// Starts an origin with a synchronous handler.
pub async fn origin<F>(handler: F) -> Origin
where
    F: Fn(&Request<Incoming>, usize) -> Response<Body> + Send + Sync + 'static,
{
    origin_async(move |req, n| {
        let resp = handler(&req, n);
        Box::pin(async move { resp })
    })
    .await
}

/// A response with these headers and body.
pub fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Body> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body::full(body.to_string())).unwrap()
}

/// An HTTP date `offset` seconds from now (negative: in the past).
pub fn http_date(offset: i64) -> String {
    let now = SystemTime::now();
    let t = if offset >= 0 {
        now + Duration::from_secs(offset as u64)
    } else {
        now - Duration::from_secs((-offset) as u64)
    };
    httpdate::fmt_http_date(t)
}

/// Forwards with a hyper client, like the proxy does; can be switched to fail.
pub struct HyperUpstream {
    client: Client<HttpConnector, Body>,
    pub failing: AtomicBool,
}

impl Upstream for HyperUpstream {
    fn send(
        &self,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(UpstreamError {
                    status: StatusCode::BAD_GATEWAY,
                    reason: "connection refused".into(),
                })
            });
        }
        let fut = self.client.request(req);
        Box::pin(async move {
            match fut.await {
                Ok(r) => Ok(r.map(body::boxed)),
                Err(e) => Err(UpstreamError {
                    status: StatusCode::BAD_GATEWAY,
                    reason: e.to_string(),
                }),
            }
        })
    }
}

pub fn hyper_upstream() -> Arc<HyperUpstream> {
    Arc::new(HyperUpstream {
        client: Client::builder(TokioExecutor::new()).build_http(),
        failing: AtomicBool::new(false),
    })
}

pub fn upstream() -> Arc<dyn Upstream> {
    hyper_upstream()
}

pub fn cache() -> HttpCache {
    HttpCache::new(&CacheConfig {
        enabled: true,
        ..CacheConfig::default()
    })
}

/// What the client saw.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub outcome: CacheOutcome,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    pub fn cache_status(&self) -> String {
        self.header("cache-status").unwrap_or_default()
    }
}

pub async fn send(
    cache: &HttpCache,
    up: &Arc<dyn Upstream>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(body::empty()).unwrap();
    let (res, outcome) = cache.handle(req, up.clone()).await;
    match res {
        Ok(r) => {
            let (parts, body) = r.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            Got {
                status: parts.status,
                headers: parts.headers,
                body,
                outcome,
            }
        }
        Err(e) => Got {
            status: e.status,
            headers: HeaderMap::new(),
            body: Bytes::from(e.reason),
            outcome,
        },
    }
}

pub async fn get(
    cache: &HttpCache,
    up: &Arc<dyn Upstream>,
    url: &str,
    headers: &[(&str, &str)],
) -> Got {
    send(cache, up, Method::GET, url, headers).await
}
