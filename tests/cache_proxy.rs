//! The cache on the proxy's outbound path: explicit requests are served from the cache,
//! the outcome is in the access log and `Cache-Status`, the admin purge empties it, and a
//! transparent request whose Host was never checked against its destination is not cached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outrider::testing::{proxy_get, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An origin that counts requests and answers with `Cache-Control: max-age=60`.
async fn cacheable_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let resp = hyper::Response::builder()
                            .header("cache-control", "max-age=60")
                            .header("x-origin-count", n.to_string())
                            .body(Full::new(Bytes::from(format!(
                                "body of {}",
                                req.uri().path()
                            ))))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn config(extra: &str) -> String {
    format!(
        "outbound:\n  egress:\n    allow:\n      - host: cached.test\n      - cidr: 127.0.0.1/32\n  cache: {{ enabled: true }}\ndns:\n  hosts:\n    cached.test: 127.0.0.1\n{extra}"
    )
}

#[tokio::test]
async fn explicit_requests_are_served_from_the_cache_until_purged() {
    let (origin, hits) = cacheable_origin().await;
    let p = TestProxy::start(&config("")).await;
    let url = format!("http://cached.test:{}/doc", origin.port());

    let first = proxy_get(p.proxy_addr(), &url).await;
    assert_eq!(first.status, 200);
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    let second = proxy_get(p.proxy_addr(), &url).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), "body of /doc");
    assert!(
        second.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        second.headers
    );
    assert!(second.header("age").is_some());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the second request must not reach the origin"
    );

    let lines = p.log_lines().await;
    let caches: Vec<_> = lines
        .iter()
        .map(|l| l["cache"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(caches, ["miss", "hit"]);

    // Admin purge empties the cache: the next request goes to the origin again.
    let mut admin = tokio::net::TcpStream::connect(p.admin_addr())
        .await
        .unwrap();
    admin
        .write_all(b"POST /cache/purge HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    admin.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("purged 1"), "{out}");
    let third = proxy_get(p.proxy_addr(), &url).await;
    assert!(third.header("cache-status").unwrap().contains("fwd=miss"));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cache_off_by_default_sends_every_request_upstream() {
    let (origin, hits) = cacheable_origin().await;
    let p =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let url = format!("http://127.0.0.1:{}/doc", origin.port());
    for _ in 0..2 {
        let r = proxy_get(p.proxy_addr(), &url).await;
        assert_eq!(r.status, 200);
        assert!(r.header("cache-status").is_none());
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// An origin that always answers `body` with `max-age=60`, counting requests.
async fn fixed_origin(body: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("cache-control", "max-age=60")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn transparent_traffic_is_cached_per_destination_and_cannot_poison_a_name() {
    use outrider::config::{validate, Config};
    use outrider::server::Server;
    use std::sync::atomic::AtomicBool;

    let (victim, victim_hits) = fixed_origin("the real victim page").await;
    let (attacker, attacker_hits) = fixed_origin("attacker content").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\noutbound:\n  listen: 127.0.0.1:0\n  egress:\n    allow:\n      - host: victim.test\n      - cidr: 127.0.0.1/32\n  cache: {{ enabled: true }}\ndns:\n  hosts:\n    victim.test: 127.0.0.1\naccess_log: {{ output: {} }}\n",
        log.display()
    );
    // Connections are transparent (to the attacker's server) while the flag is set, and
    // explicit-proxy clients otherwise.
    let transparent = Arc::new(AtomicBool::new(true));
    let t = transparent.clone();
    let server = Server::bind(validate(Config::from_yaml(&yaml).unwrap()).unwrap(), None)
        .await
        .unwrap()
        .with_orig_dst(Arc::new(move |_s: &tokio::net::TcpStream| {
            t.load(Ordering::SeqCst).then_some(attacker)
        }));
    let handle = server.handle();
    tokio::spawn(server.run());

    // A captured app names victim.test but connects to the attacker's address, which a CIDR
    // rule allows: served, and cached, but only for that destination.
    let planted = format!(
        "GET /page HTTP/1.1\r\nHost: victim.test:{}\r\nConnection: close\r\n\r\n",
        victim.port()
    );
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(handle.outbound_addr)
            .await
            .unwrap();
        s.write_all(planted.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("attacker content"), "{out}");
    }
    assert_eq!(
        attacker_hits.load(Ordering::SeqCst),
        1,
        "the second transparent request is a cache hit"
    );

    // Another client asks for the same URL through the explicit proxy: it gets the real page.
    transparent.store(false, Ordering::SeqCst);
    let url = format!("http://victim.test:{}/page", victim.port());
    let r = proxy_get(handle.outbound_addr, &url).await;
    assert_eq!(r.text(), "the real victim page");
    assert_eq!(victim_hits.load(Ordering::SeqCst), 1);
}
