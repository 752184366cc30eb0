//! The cache under load and over time: request collapsing, the memory bound, streaming
//! of responses too large to store, stale-while-revalidate and stale-if-error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cache_support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use outrider::body::{self, BoxError};
use outrider::cache::{CacheConfig, CacheOutcome, HttpCache, Upstream};
use support::*;
use tokio::sync::{mpsc, oneshot};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_misses_make_one_upstream_request() {
    let o = origin_async(|_, n| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))
        })
    })
    .await;
    let (c, up) = (cache(), upstream());
    let url = o.url("/hot");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, up, url) = (c.clone(), up.clone(), url.clone());
            tokio::spawn(async move { get(&c, &up, &url, &[]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!((g.status, g.text().as_str()), (StatusCode::OK, "v1"));
        outcomes.push((g.outcome, g.cache_status()));
    }
    assert_eq!(o.hits(), 1);
    let misses = outcomes
        .iter()
        .filter(|(o, _)| *o == CacheOutcome::Miss)
        .count();
    assert_eq!(misses, 1);
    let collapsed = outcomes
        .iter()
        .filter(|(_, s)| s.ends_with("collapsed"))
        .count();
    assert_eq!(collapsed, 19, "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collapsed_requests_go_upstream_themselves_when_the_response_is_uncacheable() {
    let o = origin_async(|_, n| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            resp(200, &[("cache-control", "no-store")], &format!("v{n}"))
        })
    })
    .await;
    let (c, up) = (cache(), upstream());
    let url = o.url("/private");
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (c, up, url) = (c.clone(), up.clone(), url.clone());
            tokio::spawn(async move { get(&c, &up, &url, &[]).await })
        })
        .collect();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, StatusCode::OK);
        assert!(g.text().starts_with('v'));
    }
    assert_eq!(o.hits(), 5);
}

#[tokio::test]
async fn stored_bytes_never_exceed_max_bytes_while_many_objects_are_stored() {
    let o = origin(|_, _| resp(200, &[("cache-control", "max-age=600")], &"x".repeat(4096))).await;
    let max_bytes = 64 * 1024;
    let c = HttpCache::new(&CacheConfig {
        enabled: true,
        max_bytes,
        max_object_bytes: 8 * 1024,
        ..CacheConfig::default()
    });
    let up = upstream();
    for i in 0..200 {
        let g = get(&c, &up, &o.url(&format!("/obj/{i}")), &[]).await;
        assert_eq!(g.body.len(), 4096);
        assert!(
            c.stored_bytes() <= max_bytes,
            "{} > {max_bytes} after {i}",
            c.stored_bytes()
        );
    }
    assert!(
        c.stored_bytes() > max_bytes / 2,
        "the cache is used: {}",
        c.stored_bytes()
    );
    let mut hits = 0;
    for i in 0..200 {
        let url = o.url(&format!("/obj/{i}"));
        let g = get(&c, &up, &url, &[("cache-control", "only-if-cached")]).await;
        hits += usize::from(g.status == StatusCode::OK);
    }
    assert!(
        hits > 0 && hits < 20,
        "at most 64 KiB of 4 KiB objects stay: {hits}"
    );
}

const CHUNK: usize = 64 * 1024;
const TOTAL: usize = 64 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_size_limit_streams_through_without_being_buffered() {
    // The origin sends one chunk, then waits until the client has it before sending
    // the remaining 64 MiB: if the cache buffered the body, this would never finish.
    let (first_seen_tx, first_seen_rx) = oneshot::channel::<()>();
    let first_seen_rx = Arc::new(std::sync::Mutex::new(Some(first_seen_rx)));
    let o =
        origin_async(move |_, _| {
            let gate = first_seen_rx.lock().unwrap().take();
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'z'; CHUNK]);
                tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
                if let Some(gate) = gate {
                    gate.await.unwrap();
                }
                for _ in 1..TOTAL / CHUNK {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            let mut r = Response::new(body::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("cache-control", "max-age=60".parse().unwrap());
            Box::pin(async move { r })
        })
        .await;
    let (c, up) = (cache(), upstream());
    let req = http::Request::get(o.url("/big"))
        .body(body::empty())
        .unwrap();
    let (res, outcome) = c.handle(req, up.clone()).await;
    assert_eq!(outcome, CacheOutcome::Miss);
    let mut body = res.unwrap().into_body();
    // The first 64 KiB chunk arrives (possibly split into several frames) while the
    // origin is still holding back the rest.
    let mut received = 0;
    while received < CHUNK {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("first chunk before the upstream finished")
            .unwrap()
            .unwrap();
        received += frame.into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(received, CHUNK);
    first_seen_tx.send(()).unwrap();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
    {
        received += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(received, TOTAL);
    assert!(
        c.stored_bytes() < 1024 * 1024,
        "not stored: {}",
        c.stored_bytes()
    );
    let again = get(
        &c,
        &up,
        &o.url("/big"),
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(again.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_response_declaring_a_length_over_the_limit_is_passed_through_unstored() {
    let o = origin(|_, _| resp(200, &[("cache-control", "max-age=60")], &"y".repeat(5000))).await;
    let c = HttpCache::new(&CacheConfig {
        enabled: true,
        max_bytes: 100_000,
        max_object_bytes: 4096,
        ..CacheConfig::default()
    });
    let up = upstream();
    let g = get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!(g.body.len(), 5000);
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=too-large");
    get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!(o.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once_in_the_background() {
    let o = origin_async(|_, n| {
        Box::pin(async move {
            if n == 1 {
                let cc = [
                    ("cache-control", "max-age=10, stale-while-revalidate=600"),
                    ("age", "20"),
                ];
                return resp(200, &cc, "old");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            resp(200, &[("cache-control", "max-age=60")], "new")
        })
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    for _ in 0..5 {
        let g = get(&c, &up, &o.url("/"), &[]).await;
        assert_eq!((g.outcome, g.text().as_str()), (CacheOutcome::Stale, "old"));
        assert!(
            g.cache_status().ends_with("detail=stale-while-revalidate"),
            "{}",
            g.cache_status()
        );
    }
    let mut fresh = None;
    for _ in 0..100 {
        let g = get(&c, &up, &o.url("/"), &[]).await;
        if g.text() == "new" {
            fresh = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fresh.expect("refreshed in the background").outcome,
        CacheOutcome::Hit
    );
    assert_eq!(o.hits(), 2, "one background refresh for all the stale hits");
}

#[tokio::test]
async fn stale_if_error_serves_stale_on_5xx_and_on_upstream_failure() {
    let o = origin(|req, n| {
        if n > 2 {
            return resp(503, &[], "down");
        }
        let cc = if req.uri().path() == "/sie" {
            "max-age=10, stale-if-error=600"
        } else {
            "max-age=10, stale-if-error=600, must-revalidate"
        };
        resp(200, &[("cache-control", cc), ("age", "20")], "old")
    })
    .await;
    let hyper_up = hyper_upstream();
    let up: Arc<dyn Upstream> = hyper_up.clone();
    let c = cache();
    get(&c, &up, &o.url("/sie"), &[]).await;
    get(&c, &up, &o.url("/must"), &[]).await;
    let g = get(&c, &up, &o.url("/sie"), &[]).await;
    assert_eq!(
        (g.status, g.outcome, g.text().as_str()),
        (StatusCode::OK, CacheOutcome::Stale, "old")
    );
    assert!(
        g.cache_status()
            .starts_with("outrider; fwd=stale; fwd-status=503;"),
        "{}",
        g.cache_status()
    );
    let g = get(&c, &up, &o.url("/must"), &[]).await;
    assert_eq!(
        g.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "must-revalidate wins"
    );
    hyper_up.failing.store(true, Ordering::SeqCst);
    let g = get(&c, &up, &o.url("/sie"), &[]).await;
    assert_eq!((g.status, g.text().as_str()), (StatusCode::OK, "old"));
    let g = get(&c, &up, &o.url("/must"), &[]).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_a_stale_response_share_one_revalidation() {
    let o = origin_async(|_, n| {
        Box::pin(async move {
            if n == 1 {
                let cc = [
                    ("cache-control", "max-age=10, must-revalidate"),
                    ("age", "20"),
                    ("etag", "\"a\""),
                ];
                return resp(200, &cc, "v1");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            resp(
                304,
                &[("cache-control", "max-age=60"), ("etag", "\"a\"")],
                "",
            )
        })
    })
    .await;
    let (c, up) = (cache(), upstream());
    let url = o.url("/stale");
    get(&c, &up, &url, &[]).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, up, url) = (c.clone(), up.clone(), url.clone());
            tokio::spawn(async move { get(&c, &up, &url, &[]).await })
        })
        .collect();
    let mut revalidated = 0;
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!((g.status, g.text().as_str()), (StatusCode::OK, "v1"));
        revalidated += usize::from(g.outcome == CacheOutcome::Revalidated);
    }
    assert_eq!(revalidated, 1);
    assert_eq!(o.hits(), 2, "one revalidation for ten concurrent requests");
}

#[tokio::test]
async fn a_body_the_client_abandons_midway_is_not_stored() {
    // Two chunks 200 ms apart: the client leaves after the first.
    let o = origin_async(|_, _| {
        let chunks = futures_util::stream::unfold(0, |i| async move {
            match i {
                0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from("first "))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Ok(Frame::data(Bytes::from("second"))), 2))
                }
                _ => None,
            }
        });
        let mut r = Response::new(body::boxed(StreamBody::new(chunks)));
        r.headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        Box::pin(async move { r })
    })
    .await;
    let (c, up) = (cache(), upstream());
    let req = http::Request::get(o.url("/partial"))
        .body(body::empty())
        .unwrap();
    let (res, _) = c.handle(req, up.clone()).await;
    let mut body = res.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let g = get(
        &c,
        &up,
        &o.url("/partial"),
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(
        g.status,
        StatusCode::GATEWAY_TIMEOUT,
        "an incomplete copy is never served"
    );
    let g = get(&c, &up, &o.url("/partial"), &[]).await;
    assert_eq!(g.text(), "first second");
    assert_eq!(
        get(&c, &up, &o.url("/partial"), &[]).await.outcome,
        CacheOutcome::Hit
    );
}
