//! The phases of one request through the cache, in order: bypass check → invalidation
//! (unsafe methods) → lookup → serve / revalidate / collapse → fetch → store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;

use super::collapse::{LeaderGuard, Role, Waiter};
use super::policy::{self, Directives, Timing, Usability};
use super::respond::{self, add_cache_status};
use super::store::{self, StoredResponse};
use super::tee::{OnDone, TeeBody};
use super::{CacheOutcome, Handled, Inner, Upstream};
use crate::body::{self, Body};

/// Entry point: see [`super::HttpCache::handle`].
pub async fn handle(inner: &Arc<Inner>, req: Request<Body>, up: Arc<dyn Upstream>) -> Handled {
    let host = req.uri().host().unwrap_or_default();
    if !inner.enabled || inner.bypass.matches(host) {
        return (up.send(req).await, CacheOutcome::Bypass);
    }
    let Some(key) = store::primary_key(req.uri()) else {
        return (up.send(req).await, CacheOutcome::Uncacheable);
    };
    // A scoped request lives in its own key space (see `CacheScope`).
    let scope = req
        .extensions()
        .get::<super::CacheScope>()
        .map(|s| format!("{}|", s.0))
        .unwrap_or_default();
    let key = if scope.is_empty() {
        key
    } else {
        format!("{scope}{key}")
    };
    match *req.method() {
        Method::GET | Method::HEAD => read(inner, req, key, up).await,
        Method::OPTIONS | Method::TRACE | Method::CONNECT => {
            let res = up.send(req).await.map(|mut r| {
                add_cache_status(r.headers_mut(), "fwd=method");
                r
            });
            (res, CacheOutcome::Uncacheable)
        }
        _ => (
            write(inner, req, key, &scope, up).await,
            CacheOutcome::Uncacheable,
        ),
    }
}

/// Unsafe methods: forward, and on a non-error response invalidate the URL and the
/// same-origin `Location` / `Content-Location` (RFC 9111 §4.4).
async fn write(
    inner: &Arc<Inner>,
    req: Request<Body>,
    key: String,
    scope: &str,
    up: Arc<dyn Upstream>,
) -> Result<Response<Body>, super::UpstreamError> {
    let uri = req.uri().clone();
    let mut resp = up.send(req).await?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        inner.store.invalidate(&key).await;
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let target = resp.headers().get(&name).and_then(|v| v.to_str().ok());
            if let Some(k) = target.and_then(|t| same_origin_key(&uri, t)) {
                inner.store.invalidate(&format!("{scope}{k}")).await;
            }
        }
        add_cache_status(resp.headers_mut(), "fwd=method; detail=invalidated");
    } else {
        add_cache_status(resp.headers_mut(), "fwd=method");
    }
    Ok(resp)
}

/// The cache key of `target` (absolute or absolute-path reference) if it has the
/// same origin as `base`; other origins must not be invalidated (RFC 9111 §4.4).
fn same_origin_key(base: &Uri, target: &str) -> Option<String> {
    let origin = store::origin(base)?;
    if target.starts_with('/') && !target.starts_with("//") {
        return Some(format!("{origin}{target}"));
    }
    let key = store::primary_key(&target.parse().ok()?)?;
    key.starts_with(&format!("{origin}/")).then_some(key)
}

/// GET and HEAD: serve from storage when allowed, otherwise revalidate or fetch.
async fn read(
    inner: &Arc<Inner>,
    req: Request<Body>,
    key: String,
    up: Arc<dyn Upstream>,
) -> Handled {
    let (parts, body) = req.into_parts();
    let req_cc = Directives::from_headers(&parts.headers);
    let only_if_cached = req_cc.has("only-if-cached");
    // If-Match / If-Unmodified-Since are preconditions only the origin can evaluate
    // (a 412 must not be answered with a stored 200).
    let preconditions = parts.headers.contains_key(header::IF_MATCH)
        || parts.headers.contains_key(header::IF_UNMODIFIED_SINCE);
    let stored = if preconditions {
        None
    } else {
        inner.store.lookup(&key, &parts.headers).await
    };
    if let Some(obj) = stored {
        let now = SystemTime::now();
        let age = obj.age(now);
        let ttl = respond::ttl(&obj, now);
        match policy::usability(&parts.headers, &req_cc, &obj.cc, obj.lifetime, age) {
            Usability::Fresh => {
                let member = format!("hit; ttl={ttl}");
                return served(&parts, &obj, now, &member, CacheOutcome::Hit);
            }
            Usability::StaleAccepted => {
                let member = format!("hit; ttl={ttl}; detail=max-stale");
                return served(&parts, &obj, now, &member, CacheOutcome::Stale);
            }
            Usability::StaleWhileRevalidate => {
                spawn_refresh(inner, &parts, key, Arc::clone(&obj), up);
                let member = format!("hit; ttl={ttl}; detail=stale-while-revalidate");
                return served(&parts, &obj, now, &member, CacheOutcome::Stale);
            }
            Usability::Revalidate { .. } if only_if_cached => {
                return (Ok(respond::only_if_cached_miss()), CacheOutcome::Miss);
            }
            Usability::Revalidate { forced } => {
                return revalidate_collapsed(inner, parts, key, obj, forced, up).await;
            }
        }
    }
    if only_if_cached {
        return (Ok(respond::only_if_cached_miss()), CacheOutcome::Miss);
    }
    fetch(inner, parts, body, key, up, true).await
}

/// A stored response answered to this request, with `Cache-Status` member `member`.
fn served(
    parts: &request::Parts,
    obj: &StoredResponse,
    now: SystemTime,
    member: &str,
    outcome: CacheOutcome,
) -> Handled {
    (Ok(respond::from_store(parts, obj, now, member)), outcome)
}

/// Concurrent requests for a stale response share one validation; a request that
/// itself demands validation (no-cache, max-age) does not wait for others.
async fn revalidate_collapsed(
    inner: &Arc<Inner>,
    parts: request::Parts,
    key: String,
    obj: Arc<StoredResponse>,
    forced: bool,
    up: Arc<dyn Upstream>,
) -> Handled {
    let mut guard = None;
    if !forced {
        match inner.collapser.join(&key) {
            Role::Leader(g) => guard = Some(g),
            Role::Follower(waiter) => {
                if let Some(done) = after_leader(inner, &parts, &key, waiter).await {
                    return done;
                }
            }
        }
    }
    revalidate(inner, parts, key, obj, forced, up, guard).await
}

/// Conditional headers and ranges make the leader's response unusable for others.
const PERSONAL: [header::HeaderName; 6] = [
    header::RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

/// A miss: fetch from the origin, collapsing concurrent misses for one URL.
async fn fetch(
    inner: &Arc<Inner>,
    parts: request::Parts,
    body: Body,
    key: String,
    up: Arc<dyn Upstream>,
    may_collapse: bool,
) -> Handled {
    let collapsible = may_collapse
        && parts.method == Method::GET
        && !PERSONAL.iter().any(|h| parts.headers.contains_key(h))
        && !Directives::from_headers(&parts.headers).has("no-store");
    let mut guard = None;
    if collapsible {
        match inner.collapser.join(&key) {
            Role::Leader(g) => guard = Some(g),
            Role::Follower(waiter) => {
                if let Some(done) = after_leader(inner, &parts, &key, waiter).await {
                    return done;
                }
                // The leader's response was not reusable: go upstream ourselves.
            }
        }
    }
    let request_time = SystemTime::now();
    let (method, uri, req_headers) = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.headers.clone(),
    );
    let resp = match up.send(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return (Err(e), CacheOutcome::Miss),
    };
    let timing = Timing {
        request_time,
        response_time: SystemTime::now(),
    };
    let fetched = Fetched {
        key,
        method,
        uri,
        req_headers,
        timing,
    };
    let (resp, outcome) = store_or_pass(inner, resp, fetched, "fwd=miss", guard);
    (Ok(resp), outcome)
}

/// How long a collapsed request waits for the leader before going upstream itself
/// (the leader's body moves at the pace of the leader's client).
const COLLAPSE_WAIT: Duration = Duration::from_secs(10);

/// Waits for the leader's fetch, then serves its stored response if it is fresh for
/// this request; `None` means: go upstream yourself.
async fn after_leader(
    inner: &Arc<Inner>,
    parts: &request::Parts,
    key: &str,
    waiter: Waiter,
) -> Option<Handled> {
    if tokio::time::timeout(COLLAPSE_WAIT, waiter.wait())
        .await
        .is_err()
    {
        return None;
    }
    let obj = inner.store.lookup(key, &parts.headers).await?;
    let now = SystemTime::now();
    let req_cc = Directives::from_headers(&parts.headers);
    let usable = policy::usability(&parts.headers, &req_cc, &obj.cc, obj.lifetime, obj.age(now));
    if usable != Usability::Fresh {
        return None;
    }
    let member = format!("hit; ttl={}; collapsed", respond::ttl(&obj, now));
    Some((
        Ok(respond::from_store(parts, &obj, now, &member)),
        CacheOutcome::Hit,
    ))
}

/// What the cache knows about a forwarded request once its response arrived.
struct Fetched {
    key: String,
    method: Method,
    uri: Uri,
    req_headers: HeaderMap,
    timing: Timing,
}

/// Streams a fetched response to the client; when it may be stored and is not too
/// large, copies it on the way and stores it once complete. `guard` (collapsing)
/// is released once the response is stored or known not to be.
fn store_or_pass(
    inner: &Arc<Inner>,
    resp: Response<Body>,
    f: Fetched,
    fwd: &str,
    guard: Option<LeaderGuard>,
) -> (Response<Body>, CacheOutcome) {
    let (mut rparts, rbody) = resp.into_parts();
    let verdict = policy::storable(
        &f.method,
        &f.uri,
        &f.req_headers,
        rparts.status,
        &rparts.headers,
    );
    let declared_len = rparts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = declared_len.is_some_and(|n| n > inner.max_object_bytes as u64);
    match verdict {
        Err(reason) => {
            add_cache_status(
                &mut rparts.headers,
                &format!("{fwd}; detail={}", reason.as_str()),
            );
            (
                Response::from_parts(rparts, rbody),
                CacheOutcome::Uncacheable,
            )
        }
        Ok(()) if too_large => {
            add_cache_status(&mut rparts.headers, &format!("{fwd}; detail=too-large"));
            (Response::from_parts(rparts, rbody), CacheOutcome::Miss)
        }
        Ok(()) => {
            let status = rparts.status;
            let headers = stored_headers(&rparts.headers, f.timing);
            let store = inner.store.clone();
            let on_done: OnDone = Box::new(move |body: Option<Bytes>| {
                // On `None`, dropping `guard` releases the followers.
                let body = body?;
                Some(Box::pin(async move {
                    let obj = finished(status, headers, body, f.timing, &f.req_headers);
                    store.put(f.key, Arc::new(obj), f.req_headers).await;
                    drop(guard);
                }))
            });
            let tee = TeeBody::new(rbody, inner.max_object_bytes, on_done);
            add_cache_status(&mut rparts.headers, &format!("{fwd}; stored"));
            (
                Response::from_parts(rparts, body::boxed(tee)),
                CacheOutcome::Miss,
            )
        }
    }
}

/// Headers as stored, with a `Date` (RFC 9110 §6.6.1: the recipient's time if absent).
fn stored_headers(headers: &HeaderMap, timing: Timing) -> HeaderMap {
    let mut out = policy::headers_to_store(headers, &Directives::from_headers(headers));
    if !out.contains_key(header::DATE) {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(timing.response_time)) {
            out.insert(header::DATE, v);
        }
    }
    out
}

/// The stored object for a complete body; `Content-Length` always matches it.
fn finished(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    timing: Timing,
    req_headers: &HeaderMap,
) -> StoredResponse {
    if status != StatusCode::NO_CONTENT {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() as u64));
    }
    StoredResponse::new(status, headers, body, timing, req_headers)
}

/// The request sent to validate `obj`: the client's own validators and range are
/// replaced by the stored response's, so a 304 is about what the cache holds.
fn validation_request(parts: &request::Parts, obj: &StoredResponse) -> Request<Body> {
    let mut headers = parts.headers.clone();
    for h in &PERSONAL {
        headers.remove(h);
    }
    if let Some(etag) = obj.headers.get(header::ETAG) {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = obj.headers.get(header::LAST_MODIFIED) {
        headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
    }
    let mut req = Request::new(body::empty());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = headers;
    // The name's other addresses, if it has any, serve a revalidation as they serve a miss.
    if let Some(others) = parts.extensions.get::<crate::net::upstream::Alternates>() {
        req.extensions_mut().insert(others.clone());
    }
    req
}

/// The stored object updated by a 304 (RFC 9111 §4.3.4), with fresh timing.
fn updated(
    obj: &StoredResponse,
    not_modified: &HeaderMap,
    timing: Timing,
    req: &HeaderMap,
) -> StoredResponse {
    let mut headers = obj.headers.clone();
    // The old Date and Age describe the old response; the 304's (or now) replace them.
    headers.remove(header::AGE);
    headers.remove(header::DATE);
    let headers = stored_headers(&policy::merge_not_modified(&headers, not_modified), timing);
    StoredResponse::new(obj.status, headers, obj.body.clone(), timing, req)
}

/// A stored response that may not be served as is: ask the origin whether it changed.
async fn revalidate(
    inner: &Arc<Inner>,
    parts: request::Parts,
    key: String,
    obj: Arc<StoredResponse>,
    forced: bool,
    up: Arc<dyn Upstream>,
    guard: Option<LeaderGuard>,
) -> Handled {
    metrics::counter!("outrider_cache_revalidations_total").increment(1);
    let fwd = if forced { "fwd=request" } else { "fwd=stale" };
    let request_time = SystemTime::now();
    let result = up.send(validation_request(&parts, &obj)).await;
    let timing = Timing {
        request_time,
        response_time: SystemTime::now(),
    };
    let now = timing.response_time;
    let req_cc = Directives::from_headers(&parts.headers);
    // A client that demanded validation (no-cache, max-age) does not get the old copy.
    let may_serve_stale =
        !forced && policy::stale_if_error(&req_cc, &obj.cc, obj.lifetime, obj.age(now));
    let resp = match result {
        // The origin's failure is replaced by the stale response.
        Err(_) if may_serve_stale => {
            let member = format!(
                "{fwd}; ttl={}; detail=stale-if-error",
                respond::ttl(&obj, now)
            );
            return served(&parts, &obj, now, &member, CacheOutcome::Stale);
        }
        Err(e) => return (Err(e), CacheOutcome::Miss),
        Ok(resp) => resp,
    };
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED {
        if !policy::validators_match(&obj.headers, resp.headers()) {
            // The 304 is about another representation: fetch the full response.
            return fetch(inner, parts, body::empty(), key, up, false).await;
        }
        let fresh = Arc::new(updated(&obj, resp.headers(), timing, &parts.headers));
        let member = format!("{fwd}; fwd-status=304; ttl={}", respond::ttl(&fresh, now));
        let headers = parts.headers.clone();
        inner.store.put(key, Arc::clone(&fresh), headers).await;
        return served(&parts, &fresh, now, &member, CacheOutcome::Revalidated);
    }
    if status.is_server_error() && may_serve_stale {
        let member = format!(
            "{fwd}; fwd-status={}; ttl={}; detail=stale-if-error",
            status.as_u16(),
            respond::ttl(&obj, now)
        );
        return served(&parts, &obj, now, &member, CacheOutcome::Stale);
    }
    let fetched = Fetched {
        key,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        req_headers: parts.headers.clone(),
        timing,
    };
    let fwd = format!("{fwd}; fwd-status={}", status.as_u16());
    let (resp, outcome) = store_or_pass(inner, resp, fetched, &fwd, guard);
    (Ok(resp), outcome)
}

/// `stale-while-revalidate`: one background refresh per URL at a time.
fn spawn_refresh(
    inner: &Arc<Inner>,
    parts: &request::Parts,
    key: String,
    obj: Arc<StoredResponse>,
    up: Arc<dyn Upstream>,
) {
    let Role::Leader(guard) = inner.collapser.join(&key) else {
        return; // a fetch for this URL is already in flight
    };
    let inner = Arc::clone(inner);
    let mut req = validation_request(parts, &obj);
    *req.method_mut() = Method::GET;
    let req_headers = parts.headers.clone();
    tokio::spawn(async move {
        let _guard = guard;
        refresh(&inner, req, key, &obj, req_headers, up).await;
    });
}

async fn refresh(
    inner: &Inner,
    req: Request<Body>,
    key: String,
    obj: &StoredResponse,
    req_headers: HeaderMap,
    up: Arc<dyn Upstream>,
) {
    metrics::counter!("outrider_cache_revalidations_total").increment(1);
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let request_time = SystemTime::now();
    let Ok(resp) = up.send(req).await else {
        return; // keep serving the stale copy until its window closes
    };
    let timing = Timing {
        request_time,
        response_time: SystemTime::now(),
    };
    let (rparts, rbody) = resp.into_parts();
    if rparts.status == StatusCode::NOT_MODIFIED {
        if policy::validators_match(&obj.headers, &rparts.headers) {
            let fresh = updated(obj, &rparts.headers, timing, &req_headers);
            inner.store.put(key, Arc::new(fresh), req_headers).await;
        }
        return;
    }
    if policy::storable(&method, &uri, &req_headers, rparts.status, &rparts.headers).is_err() {
        return;
    }
    let Some(collected) = collect_limited(rbody, inner.max_object_bytes).await else {
        return;
    };
    let headers = stored_headers(&rparts.headers, timing);
    let fresh = finished(rparts.status, headers, collected, timing, &req_headers);
    inner.store.put(key, Arc::new(fresh), req_headers).await;
}

/// The whole body, or `None` if it fails or exceeds `limit`.
async fn collect_limited(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > limit {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}
