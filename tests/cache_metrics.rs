//! The cache's Prometheus metrics: names and what increments them. Its own test binary
//! because it installs the process-wide metrics recorder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cache_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use outrider::cache::{CacheConfig, HttpCache};
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

impl Captured {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let mut map = self.0.lock().unwrap();
        map.entry(key.name().to_string()).or_default().clone()
    }
    fn counter(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |v| v.load(Ordering::SeqCst))
    }
    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.counter(name))
    }
}

impl Recorder for Captured {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn hits_misses_stale_revalidations_evictions_and_stored_bytes_are_exported() {
    let captured = Captured::default();
    metrics::set_global_recorder(captured.clone()).unwrap();
    let o = origin(|req, _| {
        if req.headers().contains_key("if-none-match") {
            return resp(304, &[("etag", "\"e\"")], "");
        }
        let cc = [
            ("cache-control", "max-age=10"),
            ("age", "20"),
            ("etag", "\"e\""),
        ];
        resp(200, &cc, &"m".repeat(2000))
    })
    .await;
    let c = HttpCache::new(&CacheConfig {
        enabled: true,
        max_bytes: 16 * 1024,
        max_object_bytes: 4 * 1024,
        ..CacheConfig::default()
    });
    let up = upstream();
    get(&c, &up, &o.url("/m"), &[]).await;
    assert_eq!(captured.counter("outrider_cache_misses_total"), 1);
    get(&c, &up, &o.url("/m"), &[("cache-control", "max-stale")]).await;
    assert_eq!(captured.counter("outrider_cache_stale_total"), 1);
    get(&c, &up, &o.url("/m"), &[]).await;
    assert_eq!(captured.counter("outrider_cache_revalidations_total"), 1);
    // The 304 refreshed the Age, so the copy is fresh now.
    let g = get(&c, &up, &o.url("/m"), &[]).await;
    assert_eq!(g.text().len(), 2000);
    assert_eq!(captured.counter("outrider_cache_hits_total"), 1);
    for i in 0..40 {
        get(&c, &up, &o.url(&format!("/fill/{i}")), &[]).await;
    }
    assert!(captured.counter("outrider_cache_evictions_total") > 0);
    let gauge = captured.gauge("outrider_cache_stored_bytes");
    assert!(gauge > 0.0 && gauge <= 16.0 * 1024.0, "gauge {gauge}");
    assert_eq!(gauge as u64, c.stored_bytes());
}
