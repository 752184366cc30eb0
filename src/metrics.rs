//! Prometheus metrics: the recorder is installed once per process, and `/metrics` renders it.
//! Names are prefixed `outrider_`; the request counters are recorded by the access-log
//! guard so that logs and metrics count the same events.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::access_log::Record;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder (idempotent) and returns the handle `/metrics` renders from.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("outrider_request_duration_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    start_upkeep(handle.clone());
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!(
                        "a metrics recorder was already installed; /metrics will be empty"
                    );
                    None
                }
            }
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The recorder keeps each histogram sample (the request durations: one per request) in a
/// buffer until upkeep folds it into the buckets; rendering `/metrics` does it too, but a
/// proxy nobody scrapes would buffer every request it ever served (about 20 bytes each:
/// 8 MB per 400k requests, measured). A thread of its own, not a task: the recorder is
/// the process's, and outlives any one runtime (tests run several).
fn start_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("outrider-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread: histogram samples wait for /metrics to be read");
    }
}

fn describe() {
    metrics::describe_counter!(
        "outrider_requests_total",
        "Requests and tunnels, by direction, decision and status class"
    );
    metrics::describe_histogram!(
        "outrider_request_duration_seconds",
        "Time from request start to the end of the response or tunnel"
    );
    metrics::describe_counter!(
        "outrider_bytes_in_total",
        "Body bytes received from clients"
    );
    metrics::describe_counter!("outrider_bytes_out_total", "Body bytes sent to clients");
    metrics::describe_gauge!("outrider_connections_open", "Client connections open now");
    metrics::describe_counter!("outrider_connections_total", "Client connections accepted");
    metrics::describe_counter!(
        "outrider_worker_connections_total",
        "Client connections served, by worker thread"
    );
    metrics::describe_counter!(
        "outrider_connections_overflow_total",
        "Client connections closed on accept: the listener held clients.max_connections"
    );
    metrics::describe_counter!("outrider_dns_lookups_total", "Name lookups");
    metrics::describe_counter!("outrider_dns_failures_total", "Name lookups that failed");
    metrics::describe_counter!(
        "outrider_dns_stale_answers_total",
        "Expired answers used because the DNS server gave none (RFC 8767)"
    );
    metrics::describe_counter!(
        "outrider_upstream_connect_errors_total",
        "Upstream connects that failed or timed out"
    );
    metrics::describe_counter!(
        "outrider_egress_denied_total",
        "Egress denials (and report-mode would-be denials), by reason"
    );
    metrics::describe_counter!(
        "outrider_detect_timeouts_total",
        "Transparent connections treated as opaque TCP after the detection timeout"
    );
    metrics::describe_counter!(
        "outrider_access_log_dropped_total",
        "Access-log records dropped: the output failed (a full disk) or could not keep up"
    );
    // Touch the counters that a quiet proxy would otherwise not show at all.
    for name in [
        "outrider_access_log_dropped_total",
        "outrider_dns_lookups_total",
        "outrider_dns_failures_total",
        "outrider_dns_stale_answers_total",
        "outrider_upstream_connect_errors_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("outrider_connections_open").set(0.0);
}

const DIRECTIONS: [&str; 2] = ["outbound", "inbound"];
const DECISIONS: [&str; 3] = ["allow", "deny", "report"];
const CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The per-request metric handles, resolved once: looking a labelled metric up in the
/// registry on every request hashes its labels each time.
struct RequestHandles {
    requests: Vec<metrics::Counter>,
    duration: [metrics::Histogram; 2],
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
}

static REQUEST_HANDLES: OnceLock<RequestHandles> = OnceLock::new();

fn request_handles() -> &'static RequestHandles {
    REQUEST_HANDLES.get_or_init(|| {
        let mut requests = Vec::with_capacity(DIRECTIONS.len() * DECISIONS.len() * CLASSES.len());
        for direction in DIRECTIONS {
            for decision in DECISIONS {
                for class in CLASSES {
                    requests.push(metrics::counter!("outrider_requests_total", "direction" => direction, "decision" => decision, "status_class" => class));
                }
            }
        }
        RequestHandles {
            requests,
            duration: DIRECTIONS.map(|d| metrics::histogram!("outrider_request_duration_seconds", "direction" => d)),
            bytes_in: metrics::counter!("outrider_bytes_in_total"),
            bytes_out: metrics::counter!("outrider_bytes_out_total"),
        }
    })
}

/// Records one finished request or tunnel.
pub fn record_request(r: &Record) {
    let class = match r.status {
        0 => 0,
        100..=199 => 1,
        200..=299 => 2,
        300..=399 => 3,
        400..=499 => 4,
        _ => 5,
    };
    let dir = usize::from(r.direction == "inbound");
    let dec = match r.decision {
        "deny" => 1,
        "report" => 2,
        _ => 0,
    };
    // Handles are only resolved once a recorder exists; before that the macros are no-ops.
    if HANDLE.get().is_some_and(Option::is_some) {
        let h = request_handles();
        if let Some(c) = h
            .requests
            .get((dir * DECISIONS.len() + dec) * CLASSES.len() + class)
        {
            c.increment(1);
        }
        h.duration[dir].record(r.duration_ms / 1000.0);
        h.bytes_in.increment(r.bytes_in);
        h.bytes_out.increment(r.bytes_out);
    }
}

/// Counts an egress denial (or, in report mode, a would-be denial).
pub fn record_denial(code: &'static str, decision: &'static str) {
    metrics::counter!("outrider_egress_denied_total", "reason" => code, "decision" => decision)
        .increment(1);
}

/// The connection metric handles, resolved once as the request ones are: a lookup in the
/// registry hashes the key, twice per connection accepted and once per connection closed.
struct ConnectionHandles {
    total: metrics::Counter,
    open: metrics::Gauge,
}

static CONNECTION_HANDLES: OnceLock<ConnectionHandles> = OnceLock::new();

fn connection_handles() -> Option<&'static ConnectionHandles> {
    // Before a recorder exists the macros return no-op handles: resolve only after.
    HANDLE.get().is_some_and(Option::is_some).then(|| {
        CONNECTION_HANDLES.get_or_init(|| ConnectionHandles {
            total: metrics::counter!("outrider_connections_total"),
            open: metrics::gauge!("outrider_connections_open"),
        })
    })
}

/// Tracks one open client connection for the gauge; decrements on drop.
pub struct ConnectionGauge;

impl ConnectionGauge {
    /// Counts a connection that lives on after the one it came from closed (a CONNECT
    /// tunnel or an upgraded connection): open, but not a new accept.
    pub fn continued() -> Self {
        if let Some(h) = connection_handles() {
            h.open.increment(1.0);
        }
        Self
    }

    /// Counts a new connection.
    pub fn open() -> Self {
        if let Some(h) = connection_handles() {
            h.total.increment(1);
            h.open.increment(1.0);
        }
        Self
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        if let Some(h) = connection_handles() {
            h.open.decrement(1.0);
        }
    }
}
