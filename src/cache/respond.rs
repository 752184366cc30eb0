//! Responses the cache builds itself: from a stored object (with `Age`, answering the
//! client's conditionals and ranges), the `only-if-cached` 504, and `Cache-Status`.

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode};

use super::policy::{self, RangeAnswer};
use super::store::StoredResponse;
use crate::body::{self, Body};

/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Appends this cache's member to `Cache-Status` (the last member is the cache
/// closest to the client, RFC 9211 §2).
pub fn add_cache_status(headers: &mut HeaderMap, member: &str) {
    let mut value = String::with_capacity(10 + member.len());
    value.push_str("outrider; ");
    value.push_str(member);
    // From the String itself: no second copy of the bytes.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.append(CACHE_STATUS, v);
    }
}

/// Remaining freshness in seconds, negative when stale (RFC 9211 `ttl`).
pub fn ttl(obj: &StoredResponse, now: SystemTime) -> i64 {
    let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    secs(obj.lifetime) - secs(obj.age(now))
}

/// Answers a GET or HEAD from a stored response. `member` is the `Cache-Status`
/// member without the cache's name, e.g. `hit; ttl=42`.
pub fn from_store(
    req: &request::Parts,
    obj: &StoredResponse,
    now: SystemTime,
    member: &str,
) -> Response<Body> {
    let age = HeaderValue::from(obj.age(now).as_secs());
    let success = obj.status.is_success();
    let mut resp = if success && policy::client_not_modified(&req.headers, &obj.headers) {
        let mut r = Response::new(body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = policy::not_modified_headers(&obj.headers);
        r
    } else if req.method == Method::GET && obj.status == StatusCode::OK {
        ranged(req, obj)
    } else {
        let body = if req.method == Method::HEAD {
            body::empty()
        } else {
            body::full(obj.body.clone())
        };
        let mut r = Response::new(body);
        *r.status_mut() = obj.status;
        *r.headers_mut() = obj.headers.clone();
        r
    };
    resp.headers_mut().insert(header::AGE, age);
    add_cache_status(resp.headers_mut(), member);
    resp
}

/// A GET answered whole, or partially when it asks for one satisfiable range.
fn ranged(req: &request::Parts, obj: &StoredResponse) -> Response<Body> {
    let len = obj.body.len() as u64;
    let mut headers = obj.headers.clone();
    let (status, body) = match policy::range_answer(&req.headers, &obj.headers, len) {
        RangeAnswer::Full => (StatusCode::OK, body::full(obj.body.clone())),
        RangeAnswer::Partial { start, end } => {
            let range = format!("bytes {start}-{end}/{len}");
            if let Ok(v) = HeaderValue::from_str(&range) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            // Bounds come from `range_answer`: start <= end < len.
            let slice = obj.body.slice(start as usize..=end as usize);
            (StatusCode::PARTIAL_CONTENT, body::full(slice))
        }
        RangeAnswer::Unsatisfiable => {
            headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            if let Some(date) = obj.headers.get(header::DATE) {
                headers.insert(header::DATE, date.clone());
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
            (StatusCode::RANGE_NOT_SATISFIABLE, body::empty())
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// The answer to `only-if-cached` when nothing stored may be used (RFC 9111 §5.2.1.7).
pub fn only_if_cached_miss() -> Response<Body> {
    let mut r = Response::new(body::full("only-if-cached: no usable stored response\n"));
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("x-outrider-error"),
        HeaderValue::from_static("only-if-cached"),
    );
    add_cache_status(h, "fwd=miss; detail=only-if-cached");
    r
}
