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

use crate::episode::{Episode, Tell};
use crate::net::text::{push_socket, Decimal, IpText, Rfc3339Millis};

/// How long a record may wait in the buffer; short enough that a log tail looks live.
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// A buffer this full wakes the writer at once.
const WAKE_BYTES: usize = 256 * 1024;

/// Where records go. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    /// `access_log.strip_query`: paths are written without their query string.
    strip_query: bool,
}

struct Shared {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    sink: Mutex<Sink>,
    /// The file written to, when the output is one: reopened on request (log rotation).
    path: Option<std::path::PathBuf>,
    /// Queued bytes past which records are dropped rather than queued ([`MAX_PENDING`]).
    max_pending: usize,
    /// Records dropped because the queue was full, not yet reported.
    overflowed: AtomicU64,
}

/// How much may wait for an output that blocks (a pipe nobody reads, a hung network
/// mount) before records are dropped and counted: the queue must not grow the proxy
/// without bound. About 100,000 records.
const MAX_PENDING: usize = 32 * 1024 * 1024;

/// Where batches go, and whether writing them has been failing.
struct Sink {
    out: Box<dyn Write + Send>,
    /// While writes fail (a full disk): the records dropped since the failures began.
    failing: Episode,
    /// When the operator was last told of records dropped for a full queue.
    overflow_told: Option<Instant>,
}

/// How often the operator is reminded of records dropped for a full queue.
const REPEAT: Duration = Duration::from_secs(10);

impl Sink {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            failing: Episode::default(),
            overflow_told: None,
        }
    }

    /// Tells the operator, at most every 10 s, that records were dropped because the output
    /// could not keep up; `dropped` counts them since the last time.
    fn overflowed(&mut self, dropped: &AtomicU64) {
        let now = Instant::now();
        if self
            .overflow_told
            .is_some_and(|told| now.duration_since(told) < REPEAT)
        {
            return;
        }
        let n = dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(
                dropped = n,
                "access log output too slow: records were dropped while 32 MiB of them waited"
            );
            self.overflow_told = Some(now);
        }
    }

    /// Writes one batch of whole records. A batch that fails is dropped and counted: the
    /// proxy serves on without its log rather than stall. The operator hears once when
    /// failures begin, every 10 s while they last, and once when they end, not once per
    /// batch (50 lines a second under load).
    fn write(&mut self, batch: &[u8]) {
        match self.out.write_all(batch).and_then(|()| self.out.flush()) {
            Ok(()) => {
                if let Some(dropped) = self.failing.end() {
                    tracing::info!(dropped, "access log writes work again");
                }
            }
            Err(e) => {
                let records = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                metrics::counter!("outrider_access_log_dropped_total").increment(records);
                match self.failing.hit(records) {
                    Tell::Begins => {
                        tracing::error!(error = %e, "access log write failed; records are dropped until writes work again")
                    }
                    Tell::Lasts(dropped) => {
                        tracing::error!(error = %e, dropped, "access log writes still failing");
                    }
                    Tell::Nothing => {}
                }
            }
        }
    }
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
            sink.write(&batch);
            if self.overflowed.load(Ordering::Relaxed) > 0 {
                sink.overflowed(&self.overflowed);
            }
        }
    }

    fn new(
        sink: Box<dyn Write + Send>,
        path: Option<std::path::PathBuf>,
        max_pending: usize,
    ) -> Self {
        Self {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            wake: Condvar::new(),
            sink: Mutex::new(Sink::new(sink)),
            path,
            max_pending,
            overflowed: AtomicU64::new(0),
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
        let (sink, path): (Box<dyn Write + Send>, _) = match output {
            "off" => {
                return Ok(Self {
                    shared: None,
                    strip_query: false,
                })
            }
            "stdout" => (Box::new(std::io::stdout()), None),
            "stderr" => (Box::new(std::io::stderr()), None),
            path => (Box::new(append_to(path.as_ref())?), Some(path.into())),
        };
        Self::start(Shared::new(sink, path, MAX_PENDING))
    }

    /// Starts the writer thread for `shared`.
    fn start(shared: Shared) -> std::io::Result<Self> {
        let shared = Arc::new(shared);
        // The thread holds only a weak reference: when the last handle goes (a reload that
        // changed the output), it writes what is left and ends.
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&weak))?;
        Ok(Self {
            shared: Some(shared),
            strip_query: false,
        })
    }

    /// The same log, writing paths without their query string when `on` (query strings
    /// may carry tokens and personal data; Squid's `strip_query_terms` does the same).
    pub fn stripping_query(mut self, on: bool) -> Self {
        self.strip_query = on;
        self
    }

    /// Queues one record.
    pub fn write(&self, record: &Record) {
        let Some(shared) = &self.shared else { return };
        let Ok(mut pending) = shared.pending.lock() else {
            return;
        };
        let before = pending.len();
        if before >= shared.max_pending {
            drop(pending);
            shared.overflowed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("outrider_access_log_dropped_total").increment(1);
            return;
        }
        record.write_json_with(&mut pending, self.strip_query);
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

    /// Reopens a file output by its path, after log rotation moved the file away: what was
    /// queued goes to the old file, what follows to the new one. Returns the path reopened,
    /// or `None` for stdout, stderr and off. On error the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<Option<&std::path::Path>> {
        let Some((shared, path)) = self
            .shared
            .as_ref()
            .and_then(|s| Some((s, s.path.as_deref()?)))
        else {
            return Ok(None);
        };
        let file = append_to(path)?;
        shared.drain();
        if let Ok(mut sink) = shared.sink.lock() {
            sink.out = Box::new(file);
        }
        Ok(Some(path))
    }
}

/// A log file opened for appending, created if missing.
fn append_to(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
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
    /// When the request or connection started; written as RFC 3339 UTC with
    /// milliseconds. Read only when the log is on.
    #[serde(serialize_with = "time_text")]
    pub timestamp: Option<SystemTime>,
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
        self.write_json_with(out, false);
    }

    /// [`Record::write_json`], with `path` written without its query when `strip_query`.
    pub fn write_json_with(&self, out: &mut Vec<u8>, strip_query: bool) {
        // Room for a usual record up front, so that the pushes below never grow the buffer.
        out.reserve(512);
        let mut o = JsonObject { out };
        // Keys are written with their punctuation (`key!`); `timestamp` is always first.
        o.raw(b"{\"timestamp\":");
        match self.timestamp {
            Some(t) => o.plain_bytes(Rfc3339Millis::new(t).as_bytes()),
            None => o.raw(b"null"),
        }
        // The proxy's own words (`&'static str`) and numbers need no escaping.
        o.raw(key!("direction"));
        o.plain(self.direction);
        o.raw(key!("mode"));
        o.plain(self.mode);
        o.raw(key!("protocol"));
        o.plain(self.protocol);
        o.raw(key!("client"));
        o.addr(self.client);
        if self.original_dst.is_some() {
            o.raw(key!("original_dst"));
            o.addr(self.original_dst);
        }
        if let Some(m) = &self.method {
            o.raw(key!("method"));
            o.str(m);
        }
        o.raw(key!("authority"));
        match &self.authority {
            Some(a) => o.str(a),
            None => o.raw(b"null"),
        }
        if let Some(p) = &self.path {
            o.raw(key!("path"));
            o.str(if strip_query { p.path() } else { p.as_str() });
        }
        if let Some(s) = &self.sni {
            o.raw(key!("sni"));
            o.str(s);
        }
        o.raw(key!("status"));
        o.uint(u64::from(self.status));
        o.raw(key!("bytes_in"));
        o.uint(self.bytes_in);
        o.raw(key!("bytes_out"));
        o.uint(self.bytes_out);
        o.raw(key!("duration_ms"));
        o.millis(self.duration_ms);
        o.raw(key!("upstream"));
        o.addr(self.upstream);
        o.raw(key!("decision"));
        o.plain(self.decision);
        let optional: [(&[u8], Option<&str>); 5] = [
            (key!("rule"), self.rule.as_deref()),
            (key!("reason"), self.reason.as_deref()),
            (key!("error"), self.error.as_deref()),
            (key!("cache"), self.cache),
            (key!("peer_identity"), self.peer_identity.as_deref()),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                o.raw(k);
                o.str(v);
            }
        }
        if let Some(id) = &self.request_id {
            o.raw(key!("request_id"));
            o.str(&String::from_utf8_lossy(id.as_bytes()));
        }
        o.out.push(b'}');
    }
}

/// A member's key with its punctuation, `,"name":`, as one constant: one copy per key.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}
use key;

/// Writes one JSON object's members.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
}

impl JsonObject<'_> {
    fn raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// A string that may need escaping (anything from a request or a config).
    fn str(&mut self, v: &str) {
        // A string that needs escaping goes through serde_json; the rest is copied.
        if needs_escape(v.as_bytes()) {
            let _ = serde_json::to_writer(&mut *self.out, v);
            return;
        }
        self.plain(v);
    }

    /// A string known to need no escaping: the proxy's own words and numbers.
    fn plain(&mut self, v: &str) {
        self.plain_bytes(v.as_bytes());
    }

    fn plain_bytes(&mut self, v: &[u8]) {
        self.out.push(b'"');
        self.out.extend_from_slice(v);
        self.out.push(b'"');
    }

    fn uint(&mut self, n: u64) {
        self.raw(Decimal::new(n).as_bytes());
    }

    /// A duration in milliseconds, as serde_json writes the `f64`: the shortest text that
    /// reads back as it. `LogGuard` gives whole microseconds, and for those (below 10^15,
    /// where an `f64` holds every one apart) that text is the milliseconds, a dot and the
    /// microseconds without their trailing zeros (`12.0`, `0.908`); written here, not by
    /// serde's float formatter (about 160 instructions a record). Anything else goes to
    /// serde_json, which cannot fail on a `Vec`.
    fn millis(&mut self, ms: f64) {
        let micros = (ms * 1000.0).round();
        let whole = ms.is_sign_positive() && micros < 1e15 && micros / 1000.0 == ms;
        if !whole {
            let _ = serde_json::to_writer(&mut *self.out, &ms);
            return;
        }
        // Exact: a whole number below 10^15.
        let micros = micros as u64;
        self.raw(Decimal::new(micros / 1000).as_bytes());
        let frac = micros % 1000;
        let digits = [
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let len = match frac {
            0 => 2,
            _ if frac.is_multiple_of(100) => 2,
            _ if frac.is_multiple_of(10) => 3,
            _ => 4,
        };
        self.raw(&digits[..len]);
    }

    fn addr(&mut self, a: Option<SocketAddr>) {
        match a {
            // Digits, dots, colons, brackets and `%`: nothing to escape.
            Some(a) => {
                self.out.push(b'"');
                push_socket(self.out, a);
                self.out.push(b'"');
            }
            None => self.raw(b"null"),
        }
    }
}

/// Whether JSON must escape anything in `b`: a quote, a backslash or a control character.
/// Eight bytes at a time (the usual bit tricks for "some byte is zero" and "some byte is
/// below n"), since every path and authority in the log is scanned.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w);
        let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
        if below_space
            || has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&c| c < 0x20 || c == b'"' || c == b'\\')
}

fn time_text<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(Rfc3339Millis::new(*t).as_str()),
        None => s.serialize_none(),
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
        Some(a) => s.serialize_str(IpText::socket(*a).as_str()),
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
    log: AccessLog,
}

impl LogGuard {
    /// Starts a record now.
    pub fn start(log: AccessLog, record: Record) -> Self {
        let mut record = record;
        // The start time is formatted when the record is written, and only if it is; with
        // the log off it is not even read (a clock read is ~1 % of a request's CPU).
        record.timestamp = log.shared.is_some().then(SystemTime::now);
        if record.decision.is_empty() {
            record.decision = "allow";
        }
        Self {
            record,
            bytes: Arc::new(Bytes::default()),
            response_complete: None,
            start: Instant::now(),
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
        // A no-op with the log off.
        self.log.write(r);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::UNIX_EPOCH;

    /// An output that blocks (a pipe nobody reads) does not grow the queue past its bound:
    /// records beyond it are dropped and counted, and whole records, never parts, reach the
    /// output once it moves again.
    #[test]
    fn a_blocked_output_bounds_the_queue_and_drops_whole_records() {
        type Gate = Arc<(Mutex<bool>, Condvar)>;
        struct Blocked(Gate, Arc<Mutex<Vec<u8>>>);
        impl Write for Blocked {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                self.1.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate: Gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Blocked(gate.clone(), out.clone());
        let log = AccessLog::start(Shared::new(Box::new(sink), None, 4096)).unwrap();
        let shared = log.shared.clone().unwrap();
        let record = |status| Record {
            status,
            ..Record::default()
        };
        // The writer takes the first record and blocks on the output.
        log.write(&record(200));
        while !shared.pending.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..1000 {
            log.write(&record(201));
        }
        let queued = shared.pending.lock().unwrap().len();
        assert!(queued < 4096 + 512, "the queue grew to {queued} bytes");
        let dropped = shared.overflowed.load(Ordering::Relaxed);
        assert!(dropped > 900, "only {dropped} of 1,000 records dropped");

        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        log.flush();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, 1 + 1000 - dropped, "{text}");
        assert_eq!(shared.overflowed.load(Ordering::Relaxed), 0, "reported");
    }

    /// A reopen that cannot open the path loses nothing: the file in use stays in use.
    #[test]
    fn a_failed_reopen_keeps_writing_to_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let (sub, moved) = (dir.path().join("logs"), dir.path().join("moved"));
        std::fs::create_dir(&sub).unwrap();
        let log = AccessLog::open(sub.join("access.log").to_str().unwrap()).unwrap();
        let record = |status| Record {
            status,
            ..Record::default()
        };
        log.write(&record(201));
        std::fs::rename(&sub, &moved).unwrap();
        assert!(
            log.reopen().is_err(),
            "the directory is gone: nothing to open"
        );
        log.write(&record(202));
        log.flush();
        let text = std::fs::read_to_string(moved.join("access.log")).unwrap();
        assert!(
            text.contains("\"status\":201") && text.contains("\"status\":202"),
            "{text}"
        );
        assert!(AccessLog::open("stdout")
            .unwrap()
            .reopen()
            .unwrap()
            .is_none());
    }

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
    fn every_byte_json_must_escape_is_found_wherever_it_is() {
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        // Each byte value at each position of strings across the 8-byte chunk boundaries,
        // amid filler that sits next to the special ones (space, '#', '[', ']', DEL, UTF-8).
        for len in 1..=20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    for fill in [b' ', b'#', b']', 0x7f, 0xc3, 0xff] {
                        let mut v = vec![fill; len];
                        v[at] = b;
                        assert_eq!(needs_escape(&v), escaped(b), "byte {b:#x} at {at} of {len}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn durations_are_written_as_serde_writes_them() {
        let written = |ms: f64| {
            let mut out = Vec::new();
            JsonObject { out: &mut out }.millis(ms);
            String::from_utf8(out).unwrap()
        };
        // Whole microseconds, as `LogGuard` rounds them: every one up to 3 ms, each
        // digit at each power of ten up to 10^16 µs, and a spread in between.
        let mut micros: Vec<u64> = (0..=3000).collect();
        for p in 0..=16 {
            for d in 1..=9 {
                micros.push(d * 10u64.pow(p));
                micros.push(d * 10u64.pow(p) - 1);
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            micros.push(x >> (x % 50 + 14));
        }
        let mut durations: Vec<f64> = micros.iter().map(|&n| n as f64 / 1000.0).collect();
        let elapsed = [
            0u64,
            1,
            499,
            500,
            999_999,
            1_234_567_891,
            86_400_000_000_000,
        ];
        for nanos in elapsed {
            let elapsed = Duration::from_nanos(nanos);
            durations.push((elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0);
        }
        // Not whole microseconds, or odd: serde_json's own text.
        durations.extend([-0.0, -1.5, 1e-7, 0.0005, 3.5e21, f64::NAN, f64::INFINITY]);
        for d in durations {
            assert_eq!(written(d), serde_json::to_string(&d).unwrap(), "{d:?}");
        }
    }

    #[test]
    fn the_hand_written_json_is_what_serde_writes() {
        let full = Record {
            timestamp: Some(UNIX_EPOCH + Duration::from_millis(1_795_352_475_716)),
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
