//! Unit tests for the pure cache rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn lifetime(status: u16, pairs: &[(&str, &str)], now: SystemTime) -> Duration {
    let h = headers(pairs);
    let cc = Directives::from_headers(&h);
    freshness_lifetime(StatusCode::from_u16(status).unwrap(), &h, &cc, now)
}

const NOW_SECS: u64 = 1_700_000_000;

fn at(offset: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS.saturating_add_signed(offset))
}

fn date(offset: i64) -> String {
    httpdate::fmt_http_date(at(offset))
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn freshness_prefers_s_maxage_then_max_age_then_expires() {
    let now = at(0);
    let d = date(0);
    let e = date(100);
    assert_eq!(
        lifetime(200, &[("cache-control", "max-age=5, s-maxage=50")], now),
        secs(50)
    );
    assert_eq!(
        lifetime(
            200,
            &[
                ("cache-control", "max-age=5"),
                ("expires", &e),
                ("date", &d)
            ],
            now
        ),
        secs(5)
    );
    assert_eq!(
        lifetime(200, &[("expires", &e), ("date", &d)], now),
        secs(100)
    );
    // Without Date, the time of receipt stands in for it.
    assert_eq!(lifetime(200, &[("expires", &e)], now), secs(100));
}

#[test]
fn invalid_or_conflicting_freshness_means_stale() {
    let now = at(0);
    assert_eq!(lifetime(200, &[("expires", "0")], now), Duration::ZERO);
    assert_eq!(
        lifetime(200, &[("cache-control", "max-age=1x")], now),
        Duration::ZERO
    );
    assert_eq!(
        lifetime(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cache-control", "max-age=60")
            ],
            now
        ),
        Duration::ZERO
    );
    let (e1, e2) = (date(10), date(20));
    assert_eq!(
        lifetime(200, &[("expires", &e1), ("expires", &e2)], now),
        Duration::ZERO
    );
    // Overflowing delta-seconds saturate at 2^31.
    assert_eq!(
        lifetime(
            200,
            &[("cache-control", "max-age=99999999999999999999")],
            now
        ),
        secs(2_147_483_648)
    );
}

#[test]
fn heuristic_is_ten_percent_capped_and_only_for_cacheable_statuses() {
    let now = at(0);
    let d = date(0);
    let lm = date(-1000);
    let old = date(-100 * 86_400);
    assert_eq!(
        lifetime(200, &[("date", &d), ("last-modified", &lm)], now),
        secs(100)
    );
    assert_eq!(
        lifetime(200, &[("date", &d), ("last-modified", &old)], now),
        HEURISTIC_CAP
    );
    assert_eq!(
        lifetime(302, &[("date", &d), ("last-modified", &lm)], now),
        Duration::ZERO
    );
    assert_eq!(
        lifetime(
            302,
            &[
                ("date", &d),
                ("last-modified", &lm),
                ("cache-control", "public")
            ],
            now
        ),
        secs(100)
    );
}

#[test]
fn current_age_follows_rfc_9111_4_2_3() {
    // Date 10 s before receipt (apparent age 10); Age 3 plus 2 s response delay is 5.
    let timing = Timing {
        request_time: at(-2),
        response_time: at(0),
    };
    let h = headers(&[("date", &date(-10)), ("age", "3")]);
    assert_eq!(current_age(&h, timing, at(0)), secs(10));
    assert_eq!(current_age(&h, timing, at(7)), secs(17));
    let h = headers(&[("date", &date(0)), ("age", "30")]);
    assert_eq!(current_age(&h, timing, at(1)), secs(33));
}

fn use_of(req: &[(&str, &str)], res_cc: &str, life: u64, age: u64) -> Usability {
    let rh = headers(req);
    let req_cc = Directives::from_headers(&rh);
    let res_cc = Directives::from_headers(&headers(&[("cache-control", res_cc)]));
    usability(&rh, &req_cc, &res_cc, secs(life), secs(age))
}

#[test]
fn usability_applies_request_and_response_directives() {
    let fresh = Usability::Fresh;
    let forced = Usability::Revalidate { forced: true };
    let stale = Usability::Revalidate { forced: false };
    assert_eq!(use_of(&[], "max-age=60", 60, 10), fresh);
    assert_eq!(use_of(&[], "max-age=60", 60, 60), stale);
    assert_eq!(use_of(&[], "no-cache", 60, 10), stale);
    assert_eq!(
        use_of(&[], "no-cache=\"set-cookie\"", 60, 10),
        fresh,
        "qualified no-cache only strips fields"
    );
    assert_eq!(use_of(&[("cache-control", "no-cache")], "", 60, 10), forced);
    assert_eq!(use_of(&[("pragma", "no-cache")], "", 60, 10), forced);
    assert_eq!(
        use_of(&[("cache-control", "max-age=5")], "", 60, 10),
        forced
    );
    assert_eq!(
        use_of(&[("cache-control", "min-fresh=55")], "", 60, 10),
        forced
    );
    assert_eq!(
        use_of(&[("cache-control", "min-fresh=50")], "", 60, 10),
        fresh
    );
    let ms = [("cache-control", "max-stale=30")];
    assert_eq!(use_of(&ms, "", 60, 80), Usability::StaleAccepted);
    assert_eq!(use_of(&ms, "", 60, 100), stale);
    assert_eq!(
        use_of(&[("cache-control", "max-stale")], "", 60, 10_000),
        Usability::StaleAccepted
    );
    assert_eq!(use_of(&ms, "must-revalidate", 60, 80), stale);
    assert_eq!(use_of(&ms, "s-maxage=60", 60, 80), stale);
    assert_eq!(
        use_of(&[], "stale-while-revalidate=30", 60, 80),
        Usability::StaleWhileRevalidate
    );
    assert_eq!(use_of(&[], "stale-while-revalidate=30", 60, 100), stale);
}

#[test]
fn stale_if_error_window_from_response_or_request() {
    let cc = |v: &str| Directives::from_headers(&headers(&[("cache-control", v)]));
    let none = Directives::default();
    assert!(stale_if_error(
        &none,
        &cc("stale-if-error=30"),
        secs(60),
        secs(80)
    ));
    assert!(!stale_if_error(
        &none,
        &cc("stale-if-error=30"),
        secs(60),
        secs(100)
    ));
    assert!(stale_if_error(
        &cc("stale-if-error=60"),
        &none,
        secs(60),
        secs(100)
    ));
    assert!(!stale_if_error(
        &none,
        &cc("stale-if-error=30, must-revalidate"),
        secs(60),
        secs(80)
    ));
}

fn store_verdict(
    req: &[(&str, &str)],
    status: u16,
    res: &[(&str, &str)],
) -> Result<(), NotStorable> {
    let uri: Uri = "http://example.com/x".parse().unwrap();
    let status = StatusCode::from_u16(status).unwrap();
    storable(&Method::GET, &uri, &headers(req), status, &headers(res))
}

#[test]
fn storability_rules_for_a_shared_cache() {
    let ma = ("cache-control", "max-age=60");
    assert_eq!(store_verdict(&[], 200, &[ma]), Ok(()));
    assert_eq!(store_verdict(&[], 200, &[]), Err(NotStorable::Useless));
    assert_eq!(store_verdict(&[], 200, &[("etag", "\"a\"")]), Ok(()));
    assert_eq!(store_verdict(&[], 206, &[ma]), Err(NotStorable::Status));
    assert_eq!(store_verdict(&[], 302, &[]), Err(NotStorable::Status));
    assert_eq!(store_verdict(&[], 302, &[ma]), Ok(()));
    assert_eq!(
        store_verdict(&[], 200, &[("cache-control", "private, max-age=60")]),
        Err(NotStorable::Private)
    );
    let auth = [("authorization", "Basic x")];
    assert_eq!(
        store_verdict(&auth, 200, &[ma]),
        Err(NotStorable::Authorization)
    );
    for allowed in [
        "public, max-age=60",
        "s-maxage=60",
        "must-revalidate, max-age=60",
    ] {
        assert_eq!(
            store_verdict(&auth, 200, &[("cache-control", allowed)]),
            Ok(()),
            "{allowed}"
        );
    }
    assert_eq!(
        store_verdict(&[], 200, &[ma, ("vary", "accept, *")]),
        Err(NotStorable::VaryStar)
    );
    let cookie = ("set-cookie", "a=b");
    assert_eq!(
        store_verdict(&[], 200, &[ma, cookie]),
        Err(NotStorable::SetCookie)
    );
    assert_eq!(
        store_verdict(
            &[],
            200,
            &[
                ("cache-control", "max-age=60, no-cache=\"Set-Cookie\""),
                cookie
            ]
        ),
        Ok(())
    );
    assert_eq!(
        store_verdict(&[("cache-control", "no-store")], 200, &[ma]),
        Err(NotStorable::RequestNoStore)
    );
    let mu = ("cache-control", "max-age=60, must-understand, no-store");
    assert_eq!(
        store_verdict(&[], 200, &[mu]),
        Ok(()),
        "must-understand overrides no-store"
    );
    assert_eq!(store_verdict(&[], 299, &[mu]), Err(NotStorable::Status));
}

#[test]
fn stored_headers_drop_hop_by_hop_connection_named_and_cookies() {
    let h = headers(&[
        ("connection", "close, x-private"),
        ("x-private", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("set-cookie", "a=b"),
        ("x-internal", "secret"),
        ("cache-control", "max-age=60, no-cache=\"x-internal\""),
        ("etag", "\"e\""),
    ]);
    let kept = headers_to_store(&h, &Directives::from_headers(&h));
    let names: Vec<&str> = kept.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, ["cache-control", "etag"]);
}

#[test]
fn vary_names_and_normalized_values() {
    let h = headers(&[
        ("vary", "Accept-Encoding, accept-language"),
        ("vary", "X-A"),
    ]);
    let names = vary_names(&h).unwrap();
    assert_eq!(names, ["accept-encoding", "accept-language", "x-a"]);
    assert!(vary_names(&headers(&[("vary", "*")])).is_none());
    let r1 = headers(&[("accept-encoding", "gzip,  br")]);
    let r2 = headers(&[("accept-encoding", "gzip"), ("accept-encoding", "br")]);
    let n = HeaderName::from_static("accept-encoding");
    assert_eq!(normalized_value(&r1, &n), normalized_value(&r2, &n));
    assert_eq!(normalized_value(&HeaderMap::new(), &n), None);
}

#[test]
fn conditional_requests_against_a_stored_response() {
    let lm = date(-100);
    let stored = headers(&[("etag", "W/\"v1\""), ("last-modified", &lm)]);
    assert!(client_not_modified(
        &headers(&[("if-none-match", "\"v1\"")]),
        &stored
    ));
    assert!(client_not_modified(
        &headers(&[("if-none-match", "*")]),
        &stored
    ));
    assert!(!client_not_modified(
        &headers(&[("if-none-match", "\"v2\"")]),
        &stored
    ));
    let later = date(0);
    assert!(client_not_modified(
        &headers(&[("if-modified-since", &later)]),
        &stored
    ));
    let earlier = date(-200);
    assert!(!client_not_modified(
        &headers(&[("if-modified-since", &earlier)]),
        &stored
    ));
    // If-None-Match wins over If-Modified-Since.
    let both = headers(&[("if-none-match", "\"v2\""), ("if-modified-since", &later)]);
    assert!(!client_not_modified(&both, &stored));
    assert!(validators_match(&stored, &headers(&[("etag", "\"v1\"")])));
    assert!(!validators_match(&stored, &headers(&[("etag", "\"v2\"")])));
    assert!(validators_match(
        &stored,
        &headers(&[("last-modified", &lm)])
    ));
}

#[test]
fn range_parsing_and_if_range() {
    let stored = headers(&[("etag", "\"s\"")]);
    let r = |v: &str| range_answer(&headers(&[("range", v)]), &stored, 10);
    assert_eq!(r("bytes=0-4"), RangeAnswer::Partial { start: 0, end: 4 });
    assert_eq!(r("bytes=5-"), RangeAnswer::Partial { start: 5, end: 9 });
    assert_eq!(r("bytes=8-100"), RangeAnswer::Partial { start: 8, end: 9 });
    assert_eq!(r("bytes=-4"), RangeAnswer::Partial { start: 6, end: 9 });
    assert_eq!(r("bytes=-40"), RangeAnswer::Partial { start: 0, end: 9 });
    assert_eq!(r("bytes=10-"), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=-0"), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=5-2"), RangeAnswer::Full);
    assert_eq!(r("bytes=0-1,3-4"), RangeAnswer::Full);
    assert_eq!(r("items=0-1"), RangeAnswer::Full);
    let with_if_range = |v: &str| {
        range_answer(
            &headers(&[("range", "bytes=0-1"), ("if-range", v)]),
            &stored,
            10,
        )
    };
    assert_eq!(
        with_if_range("\"s\""),
        RangeAnswer::Partial { start: 0, end: 1 }
    );
    assert_eq!(with_if_range("\"t\""), RangeAnswer::Full);
    assert_eq!(with_if_range("W/\"s\""), RangeAnswer::Full);
}

#[test]
fn merge_304_replaces_headers_but_not_body_metadata() {
    let stored = headers(&[("x-v", "1"), ("content-length", "10"), ("etag", "\"e\"")]);
    let nm = headers(&[
        ("x-v", "2"),
        ("content-length", "0"),
        ("connection", "close"),
    ]);
    let merged = merge_not_modified(&stored, &nm);
    assert_eq!(merged["x-v"], "2");
    assert_eq!(merged["content-length"], "10");
    assert!(!merged.contains_key("connection"));
}
