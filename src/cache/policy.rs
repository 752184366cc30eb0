//! The cache's rules (RFC 9111, RFC 5861, RFC 9110 conditionals and ranges) as pure
//! functions over headers and times, so each rule can be unit-tested without I/O.
//!
//! Storability is decided by `http-cache-semantics` (`CachePolicy::is_storable`), with
//! the proxy's own additions on top (Set-Cookie, `Vary: *`, objects with neither freshness
//! nor a validator). Freshness and age are computed here because the crate deviates from
//! RFC 9111 where it matters for a shared cache: it has no cap on heuristic freshness and
//! applies it to any status, keeps the first of conflicting `max-age` values, treats
//! `proxy-revalidate` as "never fresh", and computes `Age` without the response delay.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

/// Heuristic freshness never exceeds one day, however old `Last-Modified` is.
pub const HEURISTIC_CAP: Duration = Duration::from_secs(24 * 3600);

/// RFC 9111 §1.2.2: delta-seconds too large to represent count as 2^31.
const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// Statuses whose caching semantics this cache implements (for `must-understand`);
/// 206 is not stored (ranges are answered from complete responses instead).
const UNDERSTOOD_STATUSES: &[u16] = &[
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// Statuses that are heuristically cacheable (RFC 9110 §15.1).
const HEURISTIC_STATUSES: &[u16] = &[200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// Parsed `Cache-Control` directives of one message.
#[derive(Debug, Clone, Default)]
pub struct Directives {
    entries: Vec<(String, Option<String>)>,
    duplicated: HashSet<String>,
}

impl Directives {
    /// Parses every `Cache-Control` line of `headers`. Directive names are case-insensitive;
    /// quoted values may contain commas (`private="a, b"`).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut out = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for part in split_list(text) {
                let (name, val) = match part.split_once('=') {
                    Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"').to_string())),
                    None => (part.trim(), None),
                };
                if name.is_empty() {
                    continue;
                }
                let name = name.to_ascii_lowercase();
                if out.entries.iter().any(|(n, _)| *n == name) {
                    out.duplicated.insert(name);
                } else {
                    out.entries.push((name, val));
                }
            }
        }
        out
    }

    /// Whether the directive is present (with or without a value).
    pub fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| n == name)
    }

    /// The directive's value, if it has one.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// A delta-seconds directive: `None` when absent, `Some(None)` when present but
    /// invalid or duplicated (RFC 9111 §4.2.1: such a response is treated as stale).
    pub fn seconds(&self, name: &str) -> Option<Option<Duration>> {
        if !self.has(name) {
            return None;
        }
        if self.duplicated.contains(name) {
            return Some(None);
        }
        Some(self.value(name).and_then(parse_delta_seconds))
    }

    /// Field names listed in a qualified directive such as `no-cache="Set-Cookie"`.
    pub fn field_names(&self, name: &str) -> Vec<String> {
        self.value(name)
            .map(|v| {
                v.split(',')
                    .map(|f| f.trim().to_ascii_lowercase())
                    .filter(|f| !f.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The same directives without `name`.
    pub fn without(&self, name: &str) -> Self {
        let mut out = self.clone();
        out.entries.retain(|(n, _)| n != name);
        out
    }

    /// `headers` with `Cache-Control` replaced by these directives.
    pub fn into_headers(self, headers: &HeaderMap) -> HeaderMap {
        let mut out = headers.clone();
        out.remove(header::CACHE_CONTROL);
        let text: Vec<String> = self
            .entries
            .into_iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}=\"{v}\""),
                None => n,
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&text.join(", ")) {
            out.insert(header::CACHE_CONTROL, v);
        }
        out
    }

    /// `no-cache` without field names: the stored response must be revalidated every time.
    pub fn no_cache_unqualified(&self) -> bool {
        self.has("no-cache") && self.field_names("no-cache").is_empty()
    }

    /// Once stale, the response must not be served without validation (RFC 9111
    /// §5.2.2.2, §5.2.2.8, and §5.2.2.10: `s-maxage` implies `proxy-revalidate`).
    pub fn must_revalidate_when_stale(&self) -> bool {
        self.has("must-revalidate") || self.has("proxy-revalidate") || self.has("s-maxage")
    }
}

/// Splits a comma-separated header list, keeping quoted strings whole.
fn split_list(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// delta-seconds: digits only; overflow saturates at 2^31 (RFC 9111 §1.2.2).
pub fn parse_delta_seconds(s: &str) -> Option<Duration> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = s.parse::<u64>().unwrap_or(DELTA_SECONDS_MAX);
    Some(Duration::from_secs(secs.min(DELTA_SECONDS_MAX)))
}

fn header_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(first.to_str().ok()?).ok()
}

/// Freshness lifetime of a response for a shared cache (RFC 9111 §4.2.1, §4.2.2):
/// `s-maxage`, then `max-age`, then `Expires` − `Date`, then 10% of `Date` −
/// `Last-Modified` capped at [`HEURISTIC_CAP`] for heuristically cacheable statuses.
/// Invalid or duplicated values, and invalid `Expires`, give zero (already stale).
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &Directives,
    response_time: SystemTime,
) -> Duration {
    if let Some(v) = cc.seconds("s-maxage") {
        return v.unwrap_or(Duration::ZERO);
    }
    if let Some(v) = cc.seconds("max-age") {
        return v.unwrap_or(Duration::ZERO);
    }
    let date = header_date(headers, &header::DATE).unwrap_or(response_time);
    if headers.contains_key(header::EXPIRES) {
        return match header_date(headers, &header::EXPIRES) {
            Some(expires) => expires.duration_since(date).unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        };
    }
    let heuristic_allowed = HEURISTIC_STATUSES.contains(&status.as_u16()) || cc.has("public");
    match header_date(headers, &header::LAST_MODIFIED) {
        Some(lm) if heuristic_allowed => date
            .duration_since(lm)
            .map(|d| (d / 10).min(HEURISTIC_CAP))
            .unwrap_or(Duration::ZERO),
        _ => Duration::ZERO,
    }
}

/// When the cache sent the request and received the response, for age calculation.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the request that produced the response was sent.
    pub request_time: SystemTime,
    /// When the response headers arrived.
    pub response_time: SystemTime,
}

/// Current age of a stored response (RFC 9111 §4.2.3). The store keeps the initial age
/// computed once ([`initial_age`]) and adds the resident time per hit; this whole formula
/// is what the tests hold both to.
#[cfg(test)]
pub fn current_age(headers: &HeaderMap, timing: Timing, now: SystemTime) -> Duration {
    initial_age(headers, timing) + resident_time(timing, now)
}

/// The corrected initial age (RFC 9111 §4.2.3): what the response's age was on arrival.
pub fn initial_age(headers: &HeaderMap, timing: Timing) -> Duration {
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_delta_seconds)
        .unwrap_or(Duration::ZERO);
    let date = header_date(headers, &header::DATE).unwrap_or(timing.response_time);
    let apparent_age = timing
        .response_time
        .duration_since(date)
        .unwrap_or(Duration::ZERO);
    let response_delay = timing
        .response_time
        .duration_since(timing.request_time)
        .unwrap_or(Duration::ZERO);
    apparent_age.max(age_value + response_delay)
}

/// How long a response has been stored (RFC 9111 §4.2.3 `resident_time`).
pub fn resident_time(timing: Timing, now: SystemTime) -> Duration {
    now.duration_since(timing.response_time)
        .unwrap_or(Duration::ZERO)
}

/// Why a response is not stored (shown in `Cache-Status` as `detail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// Only GET responses are stored.
    Method,
    /// The request said `no-store`.
    RequestNoStore,
    /// The response said `no-store`.
    NoStore,
    /// The response is `private` (for one user).
    Private,
    /// The request carried `Authorization` and the response did not allow sharing it.
    Authorization,
    /// `Vary: *` never matches another request.
    VaryStar,
    /// `Set-Cookie` without the origin's explicit permission to share the response.
    SetCookie,
    /// The status is not one a cache understands or may store without explicit freshness.
    Status,
    /// Neither a freshness lifetime nor a validator: a stored copy could never be used.
    Useless,
}

impl NotStorable {
    /// Short token for `Cache-Status: …; detail=`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::RequestNoStore => "request-no-store",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::VaryStar => "vary-star",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::Status => "status",
            NotStorable::Useless => "no-freshness",
        }
    }
}

struct ReqView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

impl http_cache_semantics::RequestLike for ReqView<'_> {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        self.uri == other
    }
    fn method(&self) -> &Method {
        self.method
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

struct ResView<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
}

impl http_cache_semantics::ResponseLike for ResView<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// Decides whether a shared cache may store this response (RFC 9111 §3, §3.5, §5.2).
///
/// Set-Cookie: RFC 9111 does not forbid storing such responses, but a cookie served to
/// other users hijacks sessions (RFC 9111 §7.3, RFC 6265 §8). We store them only when
/// the origin said the response may be shared (`public`, `s-maxage`, or
/// `no-cache="Set-Cookie"`), and the stored copy never carries `Set-Cookie`.
pub fn storable(
    method: &Method,
    uri: &Uri,
    req_headers: &HeaderMap,
    status: StatusCode,
    res_headers: &HeaderMap,
) -> Result<(), NotStorable> {
    let req_cc = Directives::from_headers(req_headers);
    let res_cc = Directives::from_headers(res_headers);
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if req_cc.has("no-store") {
        return Err(NotStorable::RequestNoStore);
    }
    // must-understand (RFC 9111 §5.2.2.3): store only statuses we understand, and for
    // those, ignore the no-store that accompanies it for older caches.
    let must_understand = res_cc.has("must-understand");
    if must_understand && !UNDERSTOOD_STATUSES.contains(&status.as_u16()) {
        return Err(NotStorable::Status);
    }
    if res_cc.has("no-store") && !must_understand {
        return Err(NotStorable::NoStore);
    }
    if res_cc.has("private") {
        return Err(NotStorable::Private);
    }
    let shareable = res_cc.has("public") || res_cc.has("s-maxage");
    if req_headers.contains_key(header::AUTHORIZATION)
        && !(shareable || res_cc.has("must-revalidate"))
    {
        return Err(NotStorable::Authorization);
    }
    if vary_names(res_headers).is_none() {
        return Err(NotStorable::VaryStar);
    }
    if res_headers.contains_key(header::SET_COOKIE)
        && !(shareable
            || res_cc
                .field_names("no-cache")
                .iter()
                .any(|f| f == "set-cookie"))
    {
        return Err(NotStorable::SetCookie);
    }
    if !semantics_allow_storing(method, uri, req_headers, status, res_headers, &res_cc) {
        return Err(NotStorable::Status);
    }
    let has_validator =
        res_headers.contains_key(header::ETAG) || res_headers.contains_key(header::LAST_MODIFIED);
    let lifetime = freshness_lifetime(status, res_headers, &res_cc, SystemTime::now());
    if lifetime.is_zero() && !has_validator && !res_cc.has("stale-while-revalidate") {
        return Err(NotStorable::Useless);
    }
    Ok(())
}

/// The `http-cache-semantics` verdict (method, status, directives, Authorization).
/// With `must-understand`, it is asked without the `no-store` that accompanies it.
fn semantics_allow_storing(
    method: &Method,
    uri: &Uri,
    req_headers: &HeaderMap,
    status: StatusCode,
    res_headers: &HeaderMap,
    res_cc: &Directives,
) -> bool {
    let without_no_store;
    let lib_view = if res_cc.has("must-understand") {
        without_no_store = res_cc.without("no-store").into_headers(res_headers);
        &without_no_store
    } else {
        res_headers
    };
    let policy = http_cache_semantics::CachePolicy::new(
        &ReqView {
            method,
            uri,
            headers: req_headers,
        },
        &ResView {
            status,
            headers: lib_view,
        },
    );
    policy.is_storable()
}

/// Headers a cache must not store: hop-by-hop ones, the fields `Connection` names,
/// `Set-Cookie` (see [`storable`]), and fields named by `no-cache="…"`.
pub fn headers_to_store(headers: &HeaderMap, cc: &Directives) -> HeaderMap {
    let mut drop: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|f| f.trim().to_ascii_lowercase())
        .collect();
    drop.extend(cc.field_names("no-cache"));
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        let hop = matches!(
            n,
            "connection" | "keep-alive" | "te" | "transfer-encoding" | "upgrade" | "trailer"
        ) || n.starts_with("proxy-");
        if hop || n == "set-cookie" || drop.iter().any(|d| d == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Headers of a 304 that replace the stored ones (RFC 9111 §3.2, §4.3.4), except
/// those describing the body, which the 304 does not carry.
pub fn merge_not_modified(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let update = headers_to_store(not_modified, &Directives::from_headers(not_modified));
    let mut out = stored.clone();
    for name in update.keys() {
        if matches!(
            name.as_str(),
            "content-length" | "content-encoding" | "content-range" | "content-type"
        ) {
            continue;
        }
        out.remove(name);
        for value in update.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The fields named by `Vary`, lowercased; `None` for `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in value.to_str().unwrap_or("*").split(',').map(str::trim) {
            if name == "*" {
                return None;
            }
            if let Ok(n) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                names.push(n);
            }
        }
    }
    Some(names)
}

/// A request's value for one header, normalised for `Vary` matching (all lines
/// joined, whitespace around list members removed).
pub fn normalized_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if values.is_empty() {
        return None;
    }
    Some(split_list(&values.join(",")).join(","))
}

/// What the cache may do with a stored response for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usability {
    /// Fresh and acceptable to the client: serve it.
    Fresh,
    /// Stale, but the client accepts it (`max-stale`).
    StaleAccepted,
    /// Stale within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first. `forced` when the stored response was
    /// fresh but the request's directives did not allow using it.
    Revalidate {
        /// The request (not staleness) forced the validation.
        forced: bool,
    },
}

/// Applies request and response directives to a stored response (RFC 9111 §4,
/// §5.2.1, RFC 5861 §3).
pub fn usability(
    req_headers: &HeaderMap,
    req_cc: &Directives,
    res_cc: &Directives,
    lifetime: Duration,
    age: Duration,
) -> Usability {
    let fresh = age < lifetime;
    let pragma_no_cache = !req_headers.contains_key(header::CACHE_CONTROL)
        && req_headers
            .get_all(header::PRAGMA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.contains("no-cache")));
    let forced = |by_request: bool| Usability::Revalidate {
        forced: by_request && fresh,
    };
    if res_cc.no_cache_unqualified() {
        return forced(false);
    }
    if req_cc.has("no-cache") || pragma_no_cache {
        return forced(true);
    }
    if let Some(max_age) = req_cc.seconds("max-age") {
        if max_age.is_none_or(|m| age > m) {
            return forced(true);
        }
    }
    if let Some(min_fresh) = req_cc.seconds("min-fresh") {
        if min_fresh.is_none_or(|m| lifetime.saturating_sub(age) < m) {
            return forced(true);
        }
    }
    if fresh {
        return Usability::Fresh;
    }
    if res_cc.must_revalidate_when_stale() {
        return forced(false);
    }
    let staleness = age - lifetime;
    if req_cc.has("max-stale") {
        let within = match req_cc.value("max-stale") {
            None => true,
            Some(v) => parse_delta_seconds(v).is_some_and(|m| staleness <= m),
        };
        if within {
            return Usability::StaleAccepted;
        }
    }
    if let Some(Some(window)) = res_cc.seconds("stale-while-revalidate") {
        if staleness <= window {
            return Usability::StaleWhileRevalidate;
        }
    }
    forced(false)
}

/// Whether a stale response may be served because the origin failed (RFC 5861 §4):
/// `stale-if-error` on the response or the request covers the staleness, and nothing
/// demands revalidation.
pub fn stale_if_error(
    req_cc: &Directives,
    res_cc: &Directives,
    lifetime: Duration,
    age: Duration,
) -> bool {
    if res_cc.must_revalidate_when_stale() || res_cc.no_cache_unqualified() {
        return false;
    }
    let staleness = age.saturating_sub(lifetime);
    [req_cc, res_cc]
        .iter()
        .filter_map(|cc| cc.seconds("stale-if-error").flatten())
        .any(|window| staleness <= window)
}

/// Weak comparison of entity tags (RFC 9110 §8.8.3.2).
fn weak_eq(a: &str, b: &str) -> bool {
    a.trim().trim_start_matches("W/") == b.trim().trim_start_matches("W/")
}

/// Whether a client's conditional GET/HEAD is answered with 304 by this stored
/// response (RFC 9110 §13.1.2, §13.1.3, §13.2.2: `If-None-Match` wins over
/// `If-Modified-Since`).
pub fn client_not_modified(req_headers: &HeaderMap, stored: &HeaderMap) -> bool {
    let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
    if req_headers.contains_key(header::IF_NONE_MATCH) {
        return req_headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_list)
            .any(|tag| tag == "*" || etag.is_some_and(|e| weak_eq(e, tag)));
    }
    // The stored date is parsed only when the client sent one to compare it with.
    let Some(since) = header_date(req_headers, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    header_date(stored, &header::LAST_MODIFIED).is_some_and(|modified| modified <= since)
}

/// Whether a 304 describes the stored response (RFC 9111 §4.3.4): the same entity tag
/// when the 304 has one, else the same `Last-Modified` when both have one.
pub fn validators_match(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    let tag = |h: &HeaderMap| {
        h.get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match (tag(stored), tag(not_modified)) {
        (Some(a), Some(b)) => weak_eq(&a, &b),
        (None, Some(_)) => false,
        _ => match (
            header_date(stored, &header::LAST_MODIFIED),
            header_date(not_modified, &header::LAST_MODIFIED),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        },
    }
}

/// Headers a 304 keeps from the full response (RFC 9110 §15.4.5).
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// How to answer a `Range` request from a complete stored representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable single range (absent, several ranges, other unit, failed `If-Range`):
    /// send the whole representation with 200, which RFC 9110 §14.2 allows.
    Full,
    /// 206 with bytes `start..=end`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Evaluates `Range` and `If-Range` against a stored body of `len` bytes (RFC 9110 §14).
pub fn range_answer(req_headers: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(range) = req_headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(if_range) = req_headers.get(header::IF_RANGE) {
        if !if_range_matches(if_range, stored) {
            return RangeAnswer::Full;
        }
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            None => RangeAnswer::Full,
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        (first, last) => {
            let Some(start) = num(first) else {
                return RangeAnswer::Full;
            };
            let end = match last {
                "" => u64::MAX,
                l => match num(l) {
                    Some(e) if e >= start => e,
                    _ => return RangeAnswer::Full,
                },
            };
            if start >= len {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
    }
}

/// `If-Range` needs a strong validator match (RFC 9110 §13.1.5).
fn if_range_matches(if_range: &HeaderValue, stored: &HeaderMap) -> bool {
    let Ok(value) = if_range.to_str() else {
        return false;
    };
    let value = value.trim();
    if value.starts_with('"') {
        return stored
            .get(header::ETAG)
            .and_then(|e| e.to_str().ok())
            .is_some_and(|e| e.trim() == value);
    }
    if value.starts_with("W/") {
        return false;
    }
    match (
        httpdate::parse_http_date(value).ok(),
        header_date(stored, &header::LAST_MODIFIED),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
