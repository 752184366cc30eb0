//! Shared HTTP cache (RFC 9111, with RFC 5861 stale extensions and RFC 9211
//! `Cache-Status`) for the outbound path.
//!
//! The forward path calls [`HttpCache::handle`] with the request and an [`Upstream`];
//! the cache decides whether to answer from storage, revalidate, collapse the request
//! onto one already in flight, or fetch, and it stores and invalidates as it goes.
//!
//! - `policy`: the RFC rules as pure functions (freshness, age, storability, Vary,
//!   conditionals, ranges).
//! - `store`: bounded storage (moka, weighed in bytes, TinyLFU).
//! - `flow`: the phases of one request.
//! - `respond`: responses built from stored objects, and `Cache-Status`.
//! - `collapse`, `tee`: request collapsing and the body that streams while it stores.

mod collapse;
mod flow;
mod policy;
mod respond;
mod store;
mod tee;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::body::Body;

/// `outbound.cache` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Whether responses are cached at all (default false).
    pub enabled: bool,
    /// Memory bound of stored objects, in bytes (default 64 MiB).
    pub max_bytes: u64,
    /// Larger responses stream through uncached (default 1 MiB).
    pub max_object_bytes: u64,
    /// Hosts never cached: exact names, or `*.suffix` for subdomains of `suffix`.
    pub bypass_hosts: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            max_bytes: 64 * 1024 * 1024,
            max_object_bytes: 1024 * 1024,
            bypass_hosts: Vec::new(),
        }
    }
}

impl CacheConfig {
    /// Checks the values; errors name the key under `path` (e.g. `outbound.cache`).
    pub fn validate(&self, path: &str) -> Result<(), String> {
        if self.max_bytes == 0 {
            return Err(format!("{path}.max_bytes: must be greater than 0"));
        }
        if self.max_object_bytes == 0 {
            return Err(format!("{path}.max_object_bytes: must be greater than 0"));
        }
        if self.max_object_bytes > self.max_bytes {
            return Err(format!(
                "{path}.max_object_bytes: must be at most max_bytes ({})",
                self.max_bytes
            ));
        }
        if self.max_object_bytes > u64::from(u32::MAX) {
            return Err(format!(
                "{path}.max_object_bytes: must be at most {} (4 GiB)",
                u32::MAX
            ));
        }
        for (i, host) in self.bypass_hosts.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !valid {
                return Err(format!(
                    "{path}.bypass_hosts[{i}]: {host:?} is not a host name or \"*.suffix\""
                ));
            }
        }
        Ok(())
    }
}

/// Sends a request upstream. The proxy implements this: egress policy already
/// passed, connections pooled.
pub trait Upstream: Send + Sync + 'static {
    /// Sends `req` (absolute-form URI, hop-by-hop headers removed) to the origin.
    fn send(
        &self,
        req: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, UpstreamError>>;
}

/// A request extension that puts the request in its own cache key space. The proxy sets it
/// to the destination address when it could not verify that the request's Host belongs to
/// that destination (transparent traffic allowed by a CIDR rule, between sidecars too): such
/// responses are cached, but only ever served to requests for the same Host at the same
/// destination, so one client cannot plant a response for a name it does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheScope(pub String);

/// The upstream could not produce a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream failed ({status}): {reason}")]
pub struct UpstreamError {
    /// 502 (bad gateway) or 504 (timeout).
    pub status: http::StatusCode,
    /// What went wrong, for the client and the log.
    pub reason: String,
}

/// What the cache did with a request (the access log's `cache` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from storage without contacting the origin.
    Hit,
    /// Fetched from the origin (and stored if allowed).
    Miss,
    /// Served a stale stored response (`max-stale`, `stale-while-revalidate`,
    /// `stale-if-error`).
    Stale,
    /// Validated with the origin, which answered 304; served from storage.
    Revalidated,
    /// Caching disabled or the host is in `bypass_hosts`: the cache did nothing.
    Bypass,
    /// The request or response may not be cached (method, `no-store`, `private`, …).
    Uncacheable,
}

impl CacheOutcome {
    /// Counts a hit, miss or stale answer. The handles are resolved on first use (the hit
    /// path looked its counter up in the registry on every request); a process installs its
    /// recorder at start-up, before any request reaches the cache.
    fn count(self) {
        static HANDLES: std::sync::OnceLock<[metrics::Counter; 3]> = std::sync::OnceLock::new();
        let i = match self {
            CacheOutcome::Hit => 0,
            CacheOutcome::Miss => 1,
            CacheOutcome::Stale => 2,
            _ => return,
        };
        let h = HANDLES.get_or_init(|| {
            [
                "outrider_cache_hits_total",
                "outrider_cache_misses_total",
                "outrider_cache_stale_total",
            ]
            .map(|name| metrics::counter!(name))
        });
        h[i].increment(1);
    }

    /// The access log's value: `hit`, `miss`, `stale`, `revalidated`, `bypass`, `uncacheable`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::Uncacheable => "uncacheable",
        }
    }
}

/// Bypass list compiled once: exact names and `.suffix` matchers.
struct HostMatcher {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

impl HostMatcher {
    fn new(hosts: &[String]) -> Self {
        let norm = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
        let (wild, exact): (Vec<&String>, Vec<&String>) =
            hosts.iter().partition(|h| h.starts_with("*."));
        HostMatcher {
            exact: exact.iter().map(|h| norm(h)).collect(),
            suffixes: wild.iter().map(|h| norm(&h[1..])).collect(),
        }
    }

    fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.exact.contains(&host) || self.suffixes.iter().any(|s| host.ends_with(s))
    }
}

struct Inner {
    enabled: bool,
    max_object_bytes: usize,
    bypass: HostMatcher,
    store: store::Store,
    collapser: Arc<collapse::Collapser>,
}

/// The process-wide shared cache. Cheap to clone.
#[derive(Clone)]
pub struct HttpCache {
    inner: Arc<Inner>,
}

type Handled = (Result<http::Response<Body>, UpstreamError>, CacheOutcome);

impl HttpCache {
    /// Builds the cache from validated config.
    pub fn new(cfg: &CacheConfig) -> Self {
        HttpCache {
            inner: Arc::new(Inner {
                enabled: cfg.enabled,
                max_object_bytes: usize::try_from(cfg.max_object_bytes).unwrap_or(usize::MAX),
                bypass: HostMatcher::new(&cfg.bypass_hosts),
                // A disabled cache stores nothing: give it no room, so its bookkeeping costs no memory.
                store: store::Store::new(if cfg.enabled { cfg.max_bytes } else { 0 }),
                collapser: Arc::default(),
            }),
        }
    }

    /// The whole cache phase for one request: lookup, serve fresh / revalidate /
    /// collapse / fetch, store, invalidate. Requests that are not cacheable (or whose
    /// host is bypassed) go straight to `upstream`. Every response that went through
    /// the cache carries a `Cache-Status` header.
    pub async fn handle(
        &self,
        req: http::Request<Body>,
        upstream: Arc<dyn Upstream>,
    ) -> (Result<http::Response<Body>, UpstreamError>, CacheOutcome) {
        let handled = flow::handle(&self.inner, req, upstream).await;
        handled.1.count();
        handled
    }

    /// Drops every stored response (admin `POST /cache/purge`); returns how many.
    pub fn purge_all(&self) -> usize {
        self.inner.store.purge_all()
    }

    /// Drops the stored responses (all variants) of one absolute URL; returns how many.
    pub fn purge_url(&self, url: &str) -> usize {
        match url
            .parse::<http::Uri>()
            .ok()
            .as_ref()
            .and_then(store::primary_key)
        {
            Some(key) => self.inner.store.purge_key(&key),
            None => 0,
        }
    }

    /// Bytes currently stored, as weighed against `max_bytes`.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.store.stored_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bypass_matches_exact_hosts_and_subdomains_of_wildcards() {
        let m = HostMatcher::new(&["api.example.com".into(), "*.example.org".into()]);
        assert!(m.matches("api.example.com"));
        assert!(m.matches("API.example.com."));
        assert!(!m.matches("x.api.example.com"));
        assert!(m.matches("a.example.org"));
        assert!(m.matches("a.b.example.org"));
        assert!(
            !m.matches("example.org"),
            "*.suffix does not match the suffix itself"
        );
        assert!(!m.matches("badexample.org"));
    }

    #[test]
    fn outcome_names_for_the_access_log() {
        let all = [
            CacheOutcome::Hit,
            CacheOutcome::Miss,
            CacheOutcome::Stale,
            CacheOutcome::Revalidated,
            CacheOutcome::Bypass,
            CacheOutcome::Uncacheable,
        ];
        let names: Vec<&str> = all.iter().map(CacheOutcome::as_str).collect();
        assert_eq!(
            names,
            [
                "hit",
                "miss",
                "stale",
                "revalidated",
                "bypass",
                "uncacheable"
            ]
        );
    }
}
