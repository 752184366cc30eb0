//! The shared cache's RFC 9111 rules, each checked against a real hyper origin on
//! 127.0.0.1:0 that counts the requests it gets: what a client sees (status, body,
//! `Age`, `Cache-Status`) and whether the origin was contacted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cache_support/mod.rs"]
mod support;

use http::{Method, StatusCode};
use outrider::cache::{CacheConfig, CacheOutcome, HttpCache};
use support::*;

#[tokio::test]
async fn fresh_response_is_served_from_cache_with_age_and_cache_status() {
    let o = origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))).await;
    let (c, up) = (cache(), upstream());
    let first = get(&c, &up, &o.url("/a"), &[]).await;
    assert_eq!(first.outcome, CacheOutcome::Miss);
    assert_eq!(first.cache_status(), "outrider; fwd=miss; stored");
    let second = get(&c, &up, &o.url("/a"), &[]).await;
    assert_eq!(second.outcome, CacheOutcome::Hit);
    assert_eq!(second.text(), "v1");
    assert!(
        second.cache_status().starts_with("outrider; hit; ttl="),
        "{}",
        second.cache_status()
    );
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age <= 2);
    assert_eq!(o.hits(), 1);
    assert_eq!(CacheOutcome::Hit.as_str(), "hit");
}

#[tokio::test]
async fn s_maxage_overrides_max_age_in_a_shared_cache() {
    let o = origin(|_, n| {
        resp(
            200,
            &[("cache-control", "max-age=0, s-maxage=60")],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    let g = get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!((g.outcome, g.text().as_str()), (CacheOutcome::Hit, "v1"));
    assert_eq!(o.hits(), 1);
}

#[tokio::test]
async fn expires_relative_to_date_gives_freshness_and_invalid_expires_is_expired() {
    let o = origin(|req, n| {
        let expires = if req.uri().path() == "/future" {
            http_date(60)
        } else {
            "0".to_string()
        };
        resp(
            200,
            &[("date", &http_date(0)), ("expires", &expires)],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/future"), &[]).await;
    assert_eq!(
        get(&c, &up, &o.url("/future"), &[]).await.outcome,
        CacheOutcome::Hit
    );
    assert_eq!(o.hits(), 1);
    get(&c, &up, &o.url("/zero"), &[]).await;
    let g = get(&c, &up, &o.url("/zero"), &[]).await;
    assert_eq!(g.text(), "v3", "Expires: 0 means already expired");
    assert_eq!(o.hits(), 3);
}

#[tokio::test]
async fn conflicting_max_age_is_treated_as_stale() {
    let o = origin(|_, n| {
        resp(
            200,
            &[("cache-control", "max-age=60, max-age=120")],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!(get(&c, &up, &o.url("/"), &[]).await.text(), "v2");
    assert_eq!(o.hits(), 2);
}

#[tokio::test]
async fn heuristic_freshness_applies_only_to_heuristically_cacheable_statuses() {
    let o = origin(|req, n| {
        let status = if req.uri().path() == "/moved" {
            302
        } else {
            200
        };
        let lm = http_date(-10 * 24 * 3600);
        resp(
            status,
            &[
                ("date", &http_date(0)),
                ("last-modified", &lm),
                ("location", "/x"),
            ],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/doc"), &[]).await;
    let g = get(&c, &up, &o.url("/doc"), &[]).await;
    assert_eq!(g.outcome, CacheOutcome::Hit);
    // 10% of 10 days is capped at one day.
    let ttl: i64 = g
        .cache_status()
        .rsplit("ttl=")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ttl > 24 * 3600 - 10 && ttl <= 24 * 3600, "ttl {ttl}");
    get(&c, &up, &o.url("/moved"), &[]).await;
    get(&c, &up, &o.url("/moved"), &[]).await;
    assert_eq!(
        o.hits(),
        3,
        "a 302 without explicit freshness is not reused"
    );
}

#[tokio::test]
async fn age_from_upstream_counts_towards_staleness() {
    let o = origin(|req, n| {
        let age = if req.uri().path() == "/old" {
            "100"
        } else {
            "50"
        };
        resp(
            200,
            &[("cache-control", "max-age=60"), ("age", age)],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/young"), &[]).await;
    let g = get(&c, &up, &o.url("/young"), &[]).await;
    assert_eq!(g.outcome, CacheOutcome::Hit);
    let age: u64 = g.header("age").unwrap().parse().unwrap();
    assert!((50..55).contains(&age), "age {age}");
    get(&c, &up, &o.url("/old"), &[]).await;
    get(&c, &up, &o.url("/old"), &[]).await;
    assert_eq!(o.hits(), 3, "an Age beyond max-age is stale on arrival");
}

#[tokio::test]
async fn no_store_and_private_responses_are_not_stored() {
    let o = origin(|req, n| {
        let cc = if req.uri().path() == "/ns" {
            "no-store"
        } else {
            "private, max-age=60"
        };
        resp(200, &[("cache-control", cc)], &format!("v{n}"))
    })
    .await;
    let (c, up) = (cache(), upstream());
    let g = get(&c, &up, &o.url("/ns"), &[]).await;
    assert_eq!(g.outcome, CacheOutcome::Uncacheable);
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=no-store");
    get(&c, &up, &o.url("/ns"), &[]).await;
    get(&c, &up, &o.url("/p"), &[]).await;
    let g = get(&c, &up, &o.url("/p"), &[]).await;
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=private");
    assert_eq!(o.hits(), 4);
}

#[tokio::test]
async fn no_cache_response_is_stored_but_always_revalidated_and_304_updates_headers() {
    let o = origin(|req, n| {
        if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"e1\"")
        {
            return resp(
                304,
                &[("etag", "\"e1\""), ("x-version", &n.to_string())],
                "",
            );
        }
        resp(
            200,
            &[
                ("cache-control", "no-cache"),
                ("etag", "\"e1\""),
                ("x-version", "1"),
            ],
            "body",
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    let g = get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!(o.request_headers(2)["if-none-match"], "\"e1\"");
    assert_eq!(g.outcome, CacheOutcome::Revalidated);
    assert_eq!(g.text(), "body");
    assert_eq!(
        g.header("x-version").unwrap(),
        "2",
        "the 304's headers replace the stored ones"
    );
    assert!(
        g.cache_status()
            .starts_with("outrider; fwd=stale; fwd-status=304"),
        "{}",
        g.cache_status()
    );
    let g = get(&c, &up, &o.url("/"), &[]).await;
    assert_eq!(g.header("x-version").unwrap(), "3");
    assert_eq!(o.hits(), 3);
}

#[tokio::test]
async fn max_stale_serves_stale_unless_must_revalidate_or_proxy_revalidate() {
    let o = origin(|req, n| {
        let cc = match req.uri().path() {
            "/plain" => "max-age=10",
            "/must" => "max-age=10, must-revalidate",
            _ => "max-age=10, proxy-revalidate",
        };
        resp(
            200,
            &[("cache-control", cc), ("age", "20")],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    let stale_ok = [("cache-control", "max-stale=3600")];
    get(&c, &up, &o.url("/plain"), &[]).await;
    let g = get(&c, &up, &o.url("/plain"), &stale_ok).await;
    assert_eq!((g.outcome, g.text().as_str()), (CacheOutcome::Stale, "v1"));
    assert!(g.cache_status().contains("ttl=-"), "{}", g.cache_status());
    assert_eq!(
        get(&c, &up, &o.url("/plain"), &[]).await.text(),
        "v2",
        "without max-stale it is refetched"
    );
    for path in ["/must", "/proxy"] {
        let before = o.hits();
        get(&c, &up, &o.url(path), &[]).await;
        get(&c, &up, &o.url(path), &stale_ok).await;
        assert_eq!(
            o.hits(),
            before + 2,
            "{path} must be revalidated once stale"
        );
    }
}

#[tokio::test]
async fn request_directives_no_cache_max_age_min_fresh_force_validation() {
    let o = origin(|req, n| {
        if req.headers().contains_key("if-none-match") {
            return resp(304, &[("etag", "\"t\"")], "");
        }
        resp(
            200,
            &[("cache-control", "max-age=60"), ("etag", "\"t\"")],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    for directive in ["no-cache", "max-age=0", "min-fresh=120"] {
        let g = get(&c, &up, &o.url("/"), &[("cache-control", directive)]).await;
        assert_eq!(g.outcome, CacheOutcome::Revalidated, "{directive}");
        assert!(
            g.cache_status()
                .starts_with("outrider; fwd=request; fwd-status=304"),
            "{}",
            g.cache_status()
        );
        assert_eq!(g.text(), "v1");
    }
    let g = get(&c, &up, &o.url("/"), &[("pragma", "no-cache")]).await;
    assert_eq!(
        g.outcome,
        CacheOutcome::Revalidated,
        "Pragma: no-cache without Cache-Control"
    );
    assert_eq!(
        get(&c, &up, &o.url("/"), &[("cache-control", "max-age=30")])
            .await
            .outcome,
        CacheOutcome::Hit
    );
    assert_eq!(o.hits(), 5);
}

#[tokio::test]
async fn request_no_store_keeps_the_response_out_of_the_cache() {
    let o = origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))).await;
    let (c, up) = (cache(), upstream());
    let g = get(&c, &up, &o.url("/"), &[("cache-control", "no-store")]).await;
    assert_eq!(
        g.cache_status(),
        "outrider; fwd=miss; detail=request-no-store"
    );
    assert_eq!(get(&c, &up, &o.url("/"), &[]).await.text(), "v2");
}

#[tokio::test]
async fn only_if_cached_answers_504_without_contacting_the_origin() {
    let o = origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))).await;
    let (c, up) = (cache(), upstream());
    let g = get(&c, &up, &o.url("/"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(o.hits(), 0);
    get(&c, &up, &o.url("/"), &[]).await;
    let g = get(&c, &up, &o.url("/"), &[("cache-control", "only-if-cached")]).await;
    assert_eq!((g.status, g.text().as_str()), (StatusCode::OK, "v1"));
    assert_eq!(o.hits(), 1);
}

#[tokio::test]
async fn authorized_requests_are_stored_only_when_the_response_allows_sharing() {
    let o = origin(|req, n| {
        let cc = if req.uri().path() == "/shared" {
            "public, max-age=60"
        } else {
            "max-age=60"
        };
        resp(200, &[("cache-control", cc)], &format!("v{n}"))
    })
    .await;
    let (c, up) = (cache(), upstream());
    let auth = [("authorization", "Bearer alice")];
    let g = get(&c, &up, &o.url("/mine"), &auth).await;
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=authorization");
    get(&c, &up, &o.url("/mine"), &auth).await;
    assert_eq!(o.hits(), 2);
    get(&c, &up, &o.url("/shared"), &auth).await;
    assert_eq!(
        get(&c, &up, &o.url("/shared"), &auth).await.outcome,
        CacheOutcome::Hit
    );
    assert_eq!(o.hits(), 3);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_request_header_value_and_vary_star_never_matches() {
    let o = origin(|req, n| {
        let lang = req
            .headers()
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_string());
        let vary = if req.uri().path() == "/star" {
            "*"
        } else {
            "Accept-Language"
        };
        let body = format!("{}-{n}", lang.unwrap_or_default());
        resp(
            200,
            &[("cache-control", "max-age=60"), ("vary", vary)],
            &body,
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(get(&c, &up, &o.url("/"), &en).await.text(), "en-1");
    assert_eq!(get(&c, &up, &o.url("/"), &fr).await.text(), "fr-2");
    assert_eq!(get(&c, &up, &o.url("/"), &en).await.text(), "en-1");
    assert_eq!(get(&c, &up, &o.url("/"), &fr).await.text(), "fr-2");
    assert_eq!(
        get(&c, &up, &o.url("/"), &[]).await.text(),
        "-3",
        "no header is its own variant"
    );
    assert_eq!(o.hits(), 3);
    let g = get(&c, &up, &o.url("/star"), &en).await;
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=vary-star");
    get(&c, &up, &o.url("/star"), &en).await;
    assert_eq!(o.hits(), 5);
}

#[tokio::test]
async fn client_conditional_requests_are_answered_304_from_the_cache() {
    let lm = http_date(-3600);
    let o = origin(move |_, _| {
        resp(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "W/\"v1\""),
                ("last-modified", &lm),
            ],
            "body",
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    let g = get(&c, &up, &o.url("/"), &[("if-none-match", "\"v0\", \"v1\"")]).await;
    assert_eq!(
        (g.status, g.outcome),
        (StatusCode::NOT_MODIFIED, CacheOutcome::Hit)
    );
    assert!(g.body.is_empty());
    assert_eq!(g.header("etag").unwrap(), "W/\"v1\"");
    let now = http_date(0);
    let g = get(&c, &up, &o.url("/"), &[("if-modified-since", &now)]).await;
    assert_eq!(g.status, StatusCode::NOT_MODIFIED);
    let g = get(&c, &up, &o.url("/"), &[("if-match", "\"nope\"")]).await;
    assert_eq!(
        g.outcome,
        CacheOutcome::Miss,
        "preconditions go to the origin"
    );
    let g = get(&c, &up, &o.url("/"), &[("if-none-match", "\"other\"")]).await;
    assert_eq!((g.status, g.text().as_str()), (StatusCode::OK, "body"));
    assert_eq!(o.hits(), 2);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url_and_same_origin_locations() {
    let other =
        origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("o{n}"))).await;
    let other_url = other.url("/x");
    let o = origin(move |req, n| match *req.method() {
        Method::POST => resp(
            201,
            &[("location", "/created"), ("content-location", &other_url)],
            "",
        ),
        Method::PUT => resp(500, &[], ""),
        _ => resp(200, &[("cache-control", "max-age=60")], &format!("v{n}")),
    })
    .await;
    let (c, up) = (cache(), upstream());
    for path in ["/list", "/created"] {
        get(&c, &up, &o.url(path), &[]).await;
    }
    get(&c, &up, &other.url("/x"), &[]).await;
    let g = send(&c, &up, Method::PUT, &o.url("/list"), &[]).await;
    assert_eq!(g.outcome, CacheOutcome::Uncacheable);
    assert_eq!(
        get(&c, &up, &o.url("/list"), &[]).await.outcome,
        CacheOutcome::Hit,
        "an error does not invalidate"
    );
    let g = send(&c, &up, Method::POST, &o.url("/list"), &[]).await;
    assert_eq!(g.cache_status(), "outrider; fwd=method; detail=invalidated");
    assert_eq!(
        get(&c, &up, &o.url("/list"), &[]).await.outcome,
        CacheOutcome::Miss
    );
    assert_eq!(
        get(&c, &up, &o.url("/created"), &[]).await.outcome,
        CacheOutcome::Miss
    );
    assert_eq!(
        get(&c, &up, &other.url("/x"), &[]).await.outcome,
        CacheOutcome::Hit,
        "other origins untouched"
    );
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let o = origin(|_, _| resp(200, &[("cache-control", "max-age=60")], "0123456789")).await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/"), &[]).await;
    let g = send(&c, &up, Method::HEAD, &o.url("/"), &[]).await;
    assert_eq!((g.status, g.outcome), (StatusCode::OK, CacheOutcome::Hit));
    assert!(g.body.is_empty());
    assert_eq!(g.header("content-length").unwrap(), "10");
    assert_eq!(o.hits(), 1);
}

#[tokio::test]
async fn ranges_are_answered_from_a_full_stored_response() {
    let o = origin(|req, _| {
        if req.headers().contains_key("range") {
            return resp(206, &[("content-range", "bytes 0-0/10")], "0");
        }
        resp(
            200,
            &[("cache-control", "max-age=60"), ("etag", "\"r\"")],
            "0123456789",
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    let g = get(&c, &up, &o.url("/"), &[("range", "bytes=0-0")]).await;
    assert_eq!(
        (g.status, g.text().as_str()),
        (StatusCode::PARTIAL_CONTENT, "0"),
        "a miss passes the range through"
    );
    get(&c, &up, &o.url("/"), &[]).await;
    let g = get(&c, &up, &o.url("/"), &[("range", "bytes=2-5")]).await;
    assert_eq!(
        (g.status, g.text().as_str()),
        (StatusCode::PARTIAL_CONTENT, "2345")
    );
    assert_eq!(g.header("content-range").unwrap(), "bytes 2-5/10");
    let g = get(&c, &up, &o.url("/"), &[("range", "bytes=-3")]).await;
    assert_eq!(g.text(), "789");
    let g = get(&c, &up, &o.url("/"), &[("range", "bytes=20-")]).await;
    assert_eq!(g.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(g.header("content-range").unwrap(), "bytes */10");
    let g = get(&c, &up, &o.url("/"), &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!(
        (g.status, g.text().as_str()),
        (StatusCode::OK, "0123456789")
    );
    let g = get(
        &c,
        &up,
        &o.url("/"),
        &[("range", "bytes=1-2"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!(
        g.status,
        StatusCode::OK,
        "a failed If-Range gets the whole body"
    );
    assert_eq!(o.hits(), 2);
}

#[tokio::test]
async fn hop_by_hop_headers_and_set_cookie_are_not_served_from_the_cache() {
    let o = origin(|req, n| {
        let cc = if req.uri().path() == "/public" {
            "public, max-age=60"
        } else {
            "max-age=60"
        };
        resp(
            200,
            &[
                ("cache-control", cc),
                ("set-cookie", "sid=alice"),
                ("connection", "x-secret"),
                ("x-secret", "1"),
            ],
            &format!("v{n}"),
        )
    })
    .await;
    let (c, up) = (cache(), upstream());
    let g = get(&c, &up, &o.url("/login"), &[]).await;
    assert_eq!(g.cache_status(), "outrider; fwd=miss; detail=set-cookie");
    get(&c, &up, &o.url("/login"), &[]).await;
    assert_eq!(
        o.hits(),
        2,
        "Set-Cookie without explicit sharing is not stored"
    );
    let miss = get(&c, &up, &o.url("/public"), &[]).await;
    assert_eq!(
        miss.header("set-cookie").unwrap(),
        "sid=alice",
        "the requester still gets its cookie"
    );
    assert_eq!(miss.header("x-secret").unwrap(), "1");
    let hit = get(&c, &up, &o.url("/public"), &[]).await;
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.header("set-cookie"), None, "other users never get it");
    assert_eq!(
        hit.header("x-secret"),
        None,
        "fields named by Connection are not stored"
    );
}

#[tokio::test]
async fn bypassed_hosts_and_a_disabled_cache_go_straight_upstream() {
    let o = origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))).await;
    let up = upstream();
    let bypassing = HttpCache::new(&CacheConfig {
        enabled: true,
        bypass_hosts: vec!["127.0.0.1".into()],
        ..CacheConfig::default()
    });
    let disabled = HttpCache::new(&CacheConfig::default());
    for c in [&bypassing, &disabled] {
        let g = get(c, &up, &o.url("/"), &[]).await;
        assert_eq!(g.outcome, CacheOutcome::Bypass);
        assert_eq!(g.header("cache-status"), None);
        get(c, &up, &o.url("/"), &[]).await;
    }
    assert_eq!(o.hits(), 4);
}

#[tokio::test]
async fn purge_drops_stored_responses() {
    let o = origin(|_, n| resp(200, &[("cache-control", "max-age=60")], &format!("v{n}"))).await;
    let (c, up) = (cache(), upstream());
    get(&c, &up, &o.url("/a"), &[]).await;
    get(&c, &up, &o.url("/b"), &[]).await;
    assert!(c.stored_bytes() > 0);
    assert_eq!(c.purge_url(&o.url("/a")), 1);
    assert_eq!(
        get(&c, &up, &o.url("/a"), &[]).await.outcome,
        CacheOutcome::Miss
    );
    assert_eq!(
        get(&c, &up, &o.url("/b"), &[]).await.outcome,
        CacheOutcome::Hit
    );
    assert_eq!(c.purge_all(), 2);
    assert_eq!(
        get(&c, &up, &o.url("/b"), &[]).await.outcome,
        CacheOutcome::Miss
    );
}

#[test]
fn config_defaults_reject_unknown_keys_and_validation_names_the_key() {
    let cfg: CacheConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, CacheConfig::default());
    assert!(!cfg.enabled);
    assert_eq!((cfg.max_bytes, cfg.max_object_bytes), (64 << 20, 1 << 20));
    assert!(serde_json::from_str::<CacheConfig>(r#"{"max_byte": 1}"#).is_err());
    let bad = CacheConfig {
        max_bytes: 10,
        max_object_bytes: 20,
        ..CacheConfig::default()
    };
    assert_eq!(
        bad.validate("outbound.cache").unwrap_err(),
        "outbound.cache.max_object_bytes: must be at most max_bytes (10)"
    );
    let bad = CacheConfig {
        bypass_hosts: vec!["ok.example".into(), "a*b".into()],
        ..CacheConfig::default()
    };
    assert!(bad
        .validate("outbound.cache")
        .unwrap_err()
        .starts_with("outbound.cache.bypass_hosts[1]:"));
    assert!(CacheConfig::default().validate("outbound.cache").is_ok());
}
