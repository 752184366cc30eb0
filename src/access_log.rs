//! The access log: one JSON line per HTTP request or per tunnelled connection.
//!
//! A [`LogGuard`] is created when a request or connection starts and writes its record
//! when dropped, so a request whose client goes away mid-way, or a tunnel that is reset,
//! is still logged (ztunnel's pattern). Records are appended to a shared buffer that a
//! writer thread drains every few milliseconds (or sooner when it fills), so a slow disk
//! never blocks a proxy task and a busy proxy does not wake a thread per request. The guard
//! also records the request metrics, so the log and `/metrics` can never disagree.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// How long a record may wait in the buffer; short enough that a log tail looks live.
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// A buffer this full wakes the writer at once.
const WAKE_BYTES: usize = 256 * 1024;

/// Where records go. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl Shared {
    /// Writes out whatever is pending. Callers: the writer thread, and shutdown.
    fn drain(&self) {
        let batch = match self.pending.lock() {
            // A buffer with room, so that the next batch does not grow one from nothing.
            Ok(mut p) => std::mem::replace(&mut *p, Vec::with_capacity(64 * 1024)),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Ok(mut sink) = self.sink.lock() {
            if sink.write_all(&batch).and_then(|()| sink.flush()).is_err() {
                eprintln!("outrider: access log write failed");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.drain();
    }
}

impl AccessLog {
    /// Opens the output named by `access_log.output`: `stdout`, `stderr`, `off`, or a file
    /// path (appended to, created if missing).
    pub fn open(output: &str) -> std::io::Result<Self> {
        let sink: Box<dyn Write + Send> = match output {
            "off" => return Ok(Self { shared: None }),
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            wake: Condvar::new(),
            sink: Mutex::new(sink),
        });
        // The thread holds only a weak reference: when the last handle goes (a reload that
        // changed the output), it writes what is left and ends.
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&weak))?;
        Ok(Self {
            shared: Some(shared),
        })
    }

    /// Queues one record.
    pub fn write(&self, record: &Record) {
        let Some(shared) = &self.shared else { return };
        let Ok(mut pending) = shared.pending.lock() else {
            return;
        };
        let before = pending.len();
        record.write_json(&mut pending);
        pending.push(b'\n');
        if pending.len() >= WAKE_BYTES && before < WAKE_BYTES {
            shared.wake.notify_one();
        }
    }

    /// Whether records are written anywhere (`output: off` writes none).
    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Writes out every queued record now (at shutdown, so that none is lost).
    pub fn flush(&self) {
        if let Some(shared) = &self.shared {
            shared.drain();
        }
    }
}

fn write_loop(shared: &std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        if let Ok(pending) = s.pending.lock() {
            if pending.len() < WAKE_BYTES {
                let _ = s.wake.wait_timeout(pending, FLUSH_INTERVAL);
            }
        }
        s.drain();
    }
}

/// One access-log record. Field names are part of the product's contract.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// RFC 3339 UTC time the request or connection started.
    pub timestamp: String,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `explicit` or `transparent`.
    pub mode: &'static str,
    /// `http1`, `http2`, `connect`, `tls`, `tcp`.
    pub protocol: &'static str,
    /// The client's address.
    #[serde(serialize_with = "addr_text")]
    pub client: Option<SocketAddr>,
    /// The connection's original destination (transparent mode).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "addr_text")]
    pub original_dst: Option<SocketAddr>,
    /// Request method (borrowed for the standard ones: no allocation per request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<std::borrow::Cow<'static, str>>,
    /// Target `host:port`.
    pub authority: Option<String>,
    /// Request path and query (shares the request's bytes).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "path_text")]
    pub path: Option<http::uri::PathAndQuery>,
    /// TLS SNI seen in a ClientHello.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Response status sent to the client (0 when none was: cancelled or reset).
    pub status: u16,
    /// Body bytes from the client.
    pub bytes_in: u64,
    /// Body bytes to the client.
    pub bytes_out: u64,
    /// Milliseconds from start to the end of the response or connection.
    pub duration_ms: f64,
    /// The address the proxy dialled.
    #[serde(serialize_with = "addr_text")]
    pub upstream: Option<SocketAddr>,
    /// `allow`, `deny` or `report`.
    pub decision: &'static str,
    /// The rule that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<std::sync::Arc<str>>,
    /// Why it was denied (or would have been, in report mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An error after policy passed (upstream failure, client reset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Cache outcome, when the cache saw the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// The caller's verified SPIFFE ID (inbound mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<std::sync::Arc<str>>,
    /// The request id (inbound), as sent to the app.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "header_text"
    )]
    pub request_id: Option<http::HeaderValue>,
}

impl Record {
    /// The record as one JSON object: the bytes `serde_json` writes for it (a test holds
    /// the two to the same output), without serde's per-field machinery, which cost about
    /// a sixth of the explicit path's instructions per request with the log on.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = JsonObject { out, first: true };
        o.str("timestamp", &self.timestamp);
        o.str("direction", self.direction);
        o.str("mode", self.mode);
        o.str("protocol", self.protocol);
        o.addr("client", self.client);
        if self.original_dst.is_some() {
            o.addr("original_dst", self.original_dst);
        }
        if let Some(m) = &self.method {
            o.str("method", m);
        }
        match &self.authority {
            Some(a) => o.str("authority", a),
            None => o.null("authority"),
        }
        if let Some(p) = &self.path {
            o.str("path", p.as_str());
        }
        if let Some(s) = &self.sni {
            o.str("sni", s);
        }
        o.uint("status", u64::from(self.status));
        o.uint("bytes_in", self.bytes_in);
        o.uint("bytes_out", self.bytes_out);
        o.key("duration_ms");
        // Floats are rare enough here to leave to serde_json, which cannot fail on a Vec.
        let _ = serde_json::to_writer(&mut *o.out, &self.duration_ms);
        o.addr("upstream", self.upstream);
        o.str("decision", self.decision);
        let optional = [
            ("rule", self.rule.as_deref()),
            ("reason", self.reason.as_deref()),
            ("error", self.error.as_deref()),
            ("cache", self.cache),
            ("peer_identity", self.peer_identity.as_deref()),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                o.str(k, v);
            }
        }
        if let Some(id) = &self.request_id {
            o.str("request_id", &String::from_utf8_lossy(id.as_bytes()));
        }
        o.out.push(b'}');
    }
}

/// Writes one JSON object's members; keys are this module's own field names.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl JsonObject<'_> {
    fn key(&mut self, k: &str) {
        self.out.push(if self.first { b'{' } else { b',' });
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        // What JSON must escape: quote, backslash, control characters. Anything else is
        // copied; a string that needs escaping goes through serde_json.
        if v.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            let _ = serde_json::to_writer(&mut *self.out, v);
            return;
        }
        self.out.push(b'"');
        self.out.extend_from_slice(v.as_bytes());
        self.out.push(b'"');
    }

    fn null(&mut self, k: &str) {
        self.key(k);
        self.out.extend_from_slice(b"null");
    }

    fn uint(&mut self, k: &str, n: u64) {
        self.key(k);
        self.out
            .extend_from_slice(crate::net::text::Decimal::new(n).as_bytes());
    }

    fn addr(&mut self, k: &str, a: Option<SocketAddr>) {
        match a {
            Some(a) => self.str(k, crate::net::text::IpText::socket(a).as_str()),
            None => self.null(k),
        }
    }
}

fn path_text<S: serde::Serializer>(
    p: &Option<http::uri::PathAndQuery>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_str(p.as_str()),
        None => s.serialize_none(),
    }
}

fn addr_text<S: serde::Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(crate::net::text::IpText::socket(*a).as_str()),
        None => s.serialize_none(),
    }
}

fn header_text<S: serde::Serializer>(
    v: &Option<http::HeaderValue>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&String::from_utf8_lossy(v.as_bytes())),
        None => s.serialize_none(),
    }
}

/// Byte counters shared between a guard and the bodies or copy loops it watches.
#[derive(Debug, Default)]
pub struct Bytes {
    /// From the client.
    pub inbound: AtomicU64,
    /// To the client.
    pub outbound: AtomicU64,
}

/// Writes its record when dropped. See the module docs.
pub struct LogGuard {
    /// The record being filled in.
    pub record: Record,
    /// Byte counters.
    pub bytes: Arc<Bytes>,
    /// For a response streamed to the client: whether its body was sent whole. `None`
    /// when no body is being tracked (tunnels, refusals).
    pub response_complete: Option<bool>,
    start: Instant,
    /// The wall-clock start, read only when there is a log to write it to.
    started: Option<SystemTime>,
    log: AccessLog,
}

impl LogGuard {
    /// Starts a record now.
    pub fn start(log: AccessLog, record: Record) -> Self {
        let mut record = record;
        // The start time is formatted when the record is written, and only if it is; with
        // the log off it is not even read (a clock read is ~1 % of a request's CPU).
        let started = log.shared.is_some().then(SystemTime::now);
        if record.decision.is_empty() {
            record.decision = "allow";
        }
        Self {
            record,
            bytes: Arc::new(Bytes::default()),
            response_complete: None,
            start: Instant::now(),
            started,
            log,
        }
    }
}

impl LogGuard {
    /// Notes an error; the record is written when the guard drops.
    pub fn fail(&mut self, error: String) {
        self.record.error = Some(error);
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let r = &mut self.record;
        r.duration_ms = (self.start.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        r.bytes_in = self.bytes.inbound.load(Ordering::Relaxed);
        r.bytes_out = self.bytes.outbound.load(Ordering::Relaxed);
        if r.error.is_none() && matches!(r.protocol, "http1" | "http2") {
            if r.status == 0 {
                r.error = Some("cancelled: client went away before the response".into());
            } else if self.response_complete == Some(false) {
                r.error = Some("response cut off: the client went away mid-body".into());
            }
        }
        crate::metrics::record_request(r);
        // Read at the start exactly when there is a log.
        if let Some(started) = self.started {
            r.timestamp = humantime::format_rfc3339_millis(started).to_string();
            self.log.write(r);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let v6: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        let r = Record {
            client: Some("10.0.0.7:50123".parse().unwrap()),
            upstream: Some(v6),
            ..Record::default()
        };
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["client"], "10.0.0.7:50123");
        assert_eq!(j["upstream"], "[2001:db8::1]:8443");
        // Absent: `original_dst` is left out, `client` and `upstream` are null.
        assert!(j.get("original_dst").is_none());
        let j = serde_json::to_value(Record::default()).unwrap();
        assert!(j["client"].is_null() && j["upstream"].is_null(), "{j}");
    }

    #[test]
    fn the_hand_written_json_is_what_serde_writes() {
        let full = Record {
            timestamp: "2026-11-22T13:01:15.716Z".into(),
            direction: "inbound",
            mode: "transparent",
            protocol: "http1",
            client: Some(
                "[fe80::1%3]:4000"
                    .parse()
                    .unwrap_or("[::1]:4000".parse().unwrap()),
            ),
            original_dst: Some("10.1.2.3:8080".parse().unwrap()),
            method: Some("PURGE".to_string().into()),
            authority: Some("h\u{e9}st\"x\\y:1".into()),
            path: Some(http::uri::PathAndQuery::from_static("/a?b=c%22d")),
            sni: Some("tab\there".into()),
            status: 503,
            bytes_in: u64::MAX,
            bytes_out: 0,
            duration_ms: 12345.678,
            upstream: Some("127.0.0.1:1".parse().unwrap()),
            decision: "report",
            rule: Some("allow[0] host *.example.com".into()),
            reason: Some("line\nbreak \u{1}".into()),
            error: Some("upstream reset".into()),
            cache: Some("hit"),
            peer_identity: Some("spiffe://td/ns/a/sa/b".into()),
            request_id: Some(http::HeaderValue::from_bytes(b"id-\xff").unwrap()),
        };
        let mut records = vec![Record::default(), full.clone()];
        for d in [0.0, 1.0, 0.908, 1e-7, 3.5e21] {
            records.push(Record {
                duration_ms: d,
                ..full.clone()
            });
        }
        for r in &records {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            let theirs = serde_json::to_vec(r).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
    }
}
