//! Bounded in-memory storage of responses: one moka entry per URL holding that URL's
//! variants (selected by `Vary`), weighed in bytes so the whole store stays under
//! `max_bytes`, with TinyLFU admission and eviction.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::{StatusCode, Uri};
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;

use super::policy::{self, Directives, Timing};

/// At most this many variants are kept per URL; the oldest goes first.
const MAX_VARIANTS: usize = 8;
/// Rough per-object overhead (key, struct, header map) counted against `max_bytes`.
const OVERHEAD_BYTES: u64 = 256;

/// One stored response.
#[derive(Debug)]
pub struct StoredResponse {
    /// Final status (never 206 or 304).
    pub status: StatusCode,
    /// Headers as stored: hop-by-hop and `Set-Cookie` removed, `Date` always present.
    pub headers: HeaderMap,
    /// The complete body.
    pub body: Bytes,
    /// Request/response times for `Age`.
    pub timing: Timing,
    /// Freshness lifetime computed when stored.
    pub lifetime: Duration,
    /// The corrected initial age (RFC 9111 §4.2.3), computed when stored: parsing `Date`
    /// on every hit was a tenth of a hit's instructions.
    initial_age: Duration,
    /// The response's `Cache-Control`.
    pub cc: Directives,
    /// Secondary key: the request's values of the fields named by `Vary`.
    pub vary: Vec<(HeaderName, Option<String>)>,
}

impl StoredResponse {
    /// Builds a stored response, computing its lifetime and `Vary` key.
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        timing: Timing,
        req_headers: &HeaderMap,
    ) -> Self {
        let cc = Directives::from_headers(&headers);
        let lifetime = policy::freshness_lifetime(status, &headers, &cc, timing.response_time);
        let initial_age = policy::initial_age(&headers, timing);
        let vary = policy::vary_names(&headers)
            .unwrap_or_default()
            .into_iter()
            .map(|n| {
                let v = policy::normalized_value(req_headers, &n);
                (n, v)
            })
            .collect();
        StoredResponse {
            status,
            headers,
            body,
            timing,
            lifetime,
            initial_age,
            cc,
            vary,
        }
    }

    /// Current age (RFC 9111 §4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + policy::resident_time(self.timing, now)
    }

    /// Whether this variant was selected by a request with these headers.
    pub fn matches(&self, req_headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| policy::normalized_value(req_headers, name) == *value)
    }

    fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() as u64 + headers as u64 + OVERHEAD_BYTES
    }
}

type Variants = Arc<Vec<Arc<StoredResponse>>>;

/// The storage: URL key → variants.
#[derive(Clone)]
pub struct Store {
    cache: Cache<String, Variants>,
}

impl Store {
    /// A store holding at most `max_bytes` (weighed) bytes.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &String, v: &Variants| {
                let total: u64 = v.iter().map(|o| o.weight()).sum();
                u32::try_from(total).unwrap_or(u32::MAX)
            })
            .eviction_listener(|_key, v: Variants, cause| {
                if cause == RemovalCause::Size || cause == RemovalCause::Expired {
                    metrics::counter!("outrider_cache_evictions_total").increment(v.len() as u64);
                }
            })
            .support_invalidation_closures()
            .build();
        Store { cache }
    }

    /// The most recent variant matching the request, if any.
    pub async fn lookup(&self, key: &str, req_headers: &HeaderMap) -> Option<Arc<StoredResponse>> {
        let variants = self.cache.get(key).await?;
        variants
            .iter()
            .filter(|v| v.matches(req_headers))
            .max_by_key(|v| v.timing.response_time)
            .cloned()
    }

    /// Stores a response, replacing the variant the same request would have selected.
    pub async fn put(&self, key: String, obj: Arc<StoredResponse>, req_headers: HeaderMap) {
        self.cache
            .entry(key)
            .and_compute_with(|existing| {
                let mut variants: Vec<Arc<StoredResponse>> = existing
                    .map(|e| e.into_value().iter().cloned().collect())
                    .unwrap_or_default();
                variants.retain(|v| !v.matches(&req_headers));
                variants.push(obj);
                if variants.len() > MAX_VARIANTS {
                    variants.sort_by_key(|v| v.timing.response_time);
                    variants.remove(0);
                }
                std::future::ready(Op::Put(Arc::new(variants)))
            })
            .await;
        self.settle().await;
    }

    /// Drops every variant of a URL.
    pub async fn invalidate(&self, key: &str) {
        self.cache.invalidate(key).await;
        self.settle().await;
    }

    /// Applies pending evictions so the weighed size is within bounds, and publishes it.
    async fn settle(&self) {
        self.cache.run_pending_tasks().await;
        metrics::gauge!("outrider_cache_stored_bytes").set(self.cache.weighted_size() as f64);
    }

    fn settle_later(&self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            rt.spawn(async move { store.settle().await });
        }
    }

    /// Drops everything; returns how many responses were stored.
    pub fn purge_all(&self) -> usize {
        let count = self.cache.iter().map(|(_, v)| v.len()).sum();
        self.cache.invalidate_all();
        self.settle_later();
        count
    }

    /// Drops one URL's variants; returns how many there were.
    pub fn purge_key(&self, key: &str) -> usize {
        let count = self
            .cache
            .iter()
            .filter(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.len())
            .sum();
        if count > 0 {
            let key = key.to_string();
            if self
                .cache
                .invalidate_entries_if(move |k, _| *k == key)
                .is_err()
            {
                return 0;
            }
            self.settle_later();
        }
        count
    }

    /// Weighed bytes currently stored.
    pub fn stored_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }
}

/// The primary cache key of an absolute URI: scheme and host lowercased, default
/// port dropped, path and query kept. `None` for a URI without scheme or host.
pub fn primary_key(uri: &Uri) -> Option<String> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut key = origin_with_room(uri, pq.len() + 1)?;
    // An empty path is "/": `http://a.test?q=1` and `http://a.test/?q=1` are one URL.
    if !pq.starts_with('/') {
        key.push('/');
    }
    key.push_str(pq);
    Some(key)
}

/// `scheme://host[:port]` of an absolute URI, normalised like [`primary_key`].
pub fn origin(uri: &Uri) -> Option<String> {
    origin_with_room(uri, 0)
}

/// The origin in a string with `room` bytes to spare, built without `format!`: the key is
/// made for every request the cache sees, and formatting it was a tenth of a cache hit's
/// instructions.
fn origin_with_room(uri: &Uri, room: usize) -> Option<String> {
    let scheme = uri.scheme_str()?;
    let host = uri.host()?;
    let mut s = String::with_capacity(scheme.len() + 3 + host.len() + 6 + room);
    s.push_str(scheme);
    s.push_str("://");
    s.push_str(host);
    s.make_ascii_lowercase();
    if let Some(p) = uri.port_u16() {
        let default = (p == 80 && scheme.eq_ignore_ascii_case("http"))
            || (p == 443 && scheme.eq_ignore_ascii_case("https"));
        if !default {
            s.push(':');
            s.push_str(crate::net::text::Decimal::new(u64::from(p)).as_str());
        }
    }
    Some(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn primary_key_normalises_scheme_host_and_default_port() {
        let key = |s: &str| primary_key(&s.parse::<Uri>().unwrap());
        assert_eq!(
            key("HTTP://Example.COM:80/a?b=1").as_deref(),
            Some("http://example.com/a?b=1")
        );
        assert_eq!(
            key("http://example.com").as_deref(),
            Some("http://example.com/")
        );
        assert_eq!(
            key("http://example.com:8080/").as_deref(),
            Some("http://example.com:8080/")
        );
        assert_eq!(
            key("http://example.com?b=1").as_deref(),
            Some("http://example.com/?b=1"),
            "an empty path is /"
        );
        assert_eq!(key("/relative"), None);
    }

    #[test]
    fn a_stored_age_is_the_whole_formula_computed_per_hit() {
        use std::time::UNIX_EPOCH;
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
        let timing = Timing {
            request_time: at(0),
            response_time: at(2),
        };
        let mut h = HeaderMap::new();
        h.insert(
            http::header::DATE,
            http::HeaderValue::from_str(&httpdate::fmt_http_date(at(0))).unwrap(),
        );
        h.insert(http::header::AGE, http::HeaderValue::from_static("30"));
        let obj = StoredResponse::new(
            StatusCode::OK,
            h.clone(),
            Bytes::new(),
            timing,
            &HeaderMap::new(),
        );
        for later in [2, 3, 60, 3600] {
            assert_eq!(
                obj.age(at(later)),
                policy::current_age(&h, timing, at(later)),
                "{later}"
            );
        }
        assert_eq!(obj.age(at(12)), Duration::from_secs(42));
    }
}
