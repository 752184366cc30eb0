//! Test support (feature `test-support`): an in-process proxy on ephemeral ports with its
//! access log in a temp file, the real binary as a child process, a real hyper upstream
//! that counts requests and connections, a proxy client speaking absolute-form HTTP/1.1,
//! raw-socket requests, a `curl` wrapper, and an HTTP/2-only app with its gRPC-style client.
//!
//! Panics are this module's error handling: a helper that cannot do its job fails the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    clippy::needless_pass_by_value
)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{self, Config};
use crate::server::{Server, ServerHandle};

/// The header the proxy names its refusals and failures in.
pub const ERROR_HEADER: &str = "x-outrider-error";

mod grpc;
mod servers;
pub use grpc::*;
pub use servers::*;
// ---------------------------------------------------------------------------------------
// Temp dirs (tempfile is only a dev-dependency, so the library side makes its own).

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "outrider-{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Config handling.

/// Parses the test's YAML and points the listeners at `127.0.0.1:0` and the access log at
/// `log`. Returns the config as JSON text (JSON is YAML), ready to be written to a file.
pub fn prepare_config(yaml: &str, log: &Path) -> (Config, String) {
    let mut cfg = Config::from_yaml(yaml)
        .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{yaml}"));
    cfg.admin.listen = "127.0.0.1:0".into();
    cfg.outbound.listen = "127.0.0.1:0".into();
    if let Some(i) = cfg.inbound.as_mut() {
        i.listen = "127.0.0.1:0".into();
    }
    cfg.access_log.output = log.display().to_string();
    let text = serde_json::to_string_pretty(&cfg).unwrap();
    (cfg, text)
}

// ---------------------------------------------------------------------------------------
// The in-process proxy.

/// A proxy running in this process on ephemeral ports.
pub struct TestProxy {
    handle: ServerHandle,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Builds and starts a proxy from YAML (listeners and access log are filled in).
    pub async fn start(yaml: &str) -> Self {
        let dir = TempDir::new("proxy");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("outrider.yaml");
        let (cfg, text) = prepare_config(yaml, &log_path);
        std::fs::write(&config_path, text).unwrap();
        let compiled =
            config::validate(cfg).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{yaml}"));
        let server = Server::bind(compiled, Some(config_path.clone()))
            .await
            .unwrap();
        let handle = server.handle();
        let task = tokio::spawn(server.run());
        // `run` marks itself ready once its accept loops are spawned.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Self {
            handle,
            dir,
            config_path,
            log_path,
            task: Some(task),
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.handle.outbound_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.handle.admin_addr
    }

    /// `http://127.0.0.1:PORT`, for curl's `-x`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every access-log record so far, after giving the writer thread a moment.
    pub async fn log_lines(&self) -> Vec<serde_json::Value> {
        tokio::time::sleep(Duration::from_millis(150)).await;
        read_log(&self.log_path)
    }

    /// Waits (up to 5 s) for a record that satisfies `pred`, and returns it.
    pub async fn wait_log(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_log_file(&self.log_path, pred).await
    }

    /// Rewrites the config file from YAML (listeners and log filled in as at start) and
    /// reloads it, as SIGHUP does.
    pub fn reload_with(&self, yaml: &str) -> Result<(), String> {
        self.write_config(yaml);
        self.handle.reload()
    }

    /// Writes raw text to the config file (for invalid configs).
    pub fn write_config_raw(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Writes the config file from YAML without reloading.
    pub fn write_config(&self, yaml: &str) {
        let (_, text) = prepare_config(yaml, &self.log_path);
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub fn reload(&self) -> Result<(), String> {
        self.handle.reload()
    }

    /// Starts draining and waits for `run` to return.
    pub async fn shutdown(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Parses a JSON-lines file, skipping a partial last line.
pub fn read_log(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (up to 5 s) for a record in `path` that satisfies `pred`.
pub async fn wait_log_file(
    path: &Path,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(r) = read_log(path).into_iter().find(|r| pred(r)) {
            return r;
        }
        if Instant::now() > deadline {
            panic!(
                "no matching access-log record in {}; records:\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The real binary.

/// `outrider run --config FILE` as a child process, on ephemeral ports.
pub struct BinProxy {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl BinProxy {
    /// Starts `bin` (pass `env!("CARGO_BIN_EXE_outrider")`) and waits for "outrider ready".
    pub fn start(bin: &str, yaml: &str) -> Self {
        Self::start_under(&[], bin, yaml)
    }

    /// Like [`BinProxy::start`], run through a wrapper that execs it (e.g. `prlimit … --`),
    /// so that the child's pid is still the proxy's.
    pub fn start_under(wrapper: &[&str], bin: &str, yaml: &str) -> Self {
        let dir = TempDir::new("bin");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("outrider.yaml");
        let (_, text) = prepare_config(yaml, &log_path);
        std::fs::write(&config_path, text).unwrap();
        let (program, args) = match wrapper.split_first() {
            Some((w, rest)) => (*w, [rest, &[bin]].concat()),
            None => (bin, Vec::new()),
        };
        let mut child = Command::new(program)
            .args(args)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("OUTRIDER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (proxy_addr, admin_addr) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("outrider ready") => {
                    let field = |name: &str| -> SocketAddr {
                        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                        let rest = &line[start..];
                        let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
                        rest[..end].parse().unwrap()
                    };
                    break (field("outbound"), field("admin"));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "outrider did not report ready; stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            }
        };
        Self {
            child,
            proxy_addr,
            admin_addr,
            config_path,
            log_path,
            stderr,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle` (up to 5 s); returns whether it did.
    pub fn wait_stderr(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Rewrites the config file from YAML, as a user would before SIGHUP.
    pub fn write_config(&self, yaml: &str) {
        let (_, text) = prepare_config(yaml, &self.log_path);
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// Waits for the child to exit (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for BinProxy {
    fn drop(&mut self) {
        // Only our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Clients.

/// A response read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn error_header(&self) -> String {
        self.header(ERROR_HEADER).unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The upstream's echo, parsed.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?} {}", self.status, self.text()))
    }
}

/// The request body type the client sends.
pub type ClientBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One HTTP/1.1 connection to the proxy, sending absolute-form requests on it (keep-alive).
pub struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<ClientBody>,
    conn: tokio::task::JoinHandle<()>,
}

impl ProxyClient {
    pub async fn connect(proxy: SocketAddr) -> Self {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, conn }
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(&mut self, req: Request<ClientBody>) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// GET an absolute URL through the proxy, with extra headers; reads the whole body.
    pub async fn get_with(&mut self, url: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(full_body(Bytes::new())).unwrap();
        let resp = self
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("GET {url} through the proxy: {e}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, url: &str) -> Resp {
        self.get_with(url, &[]).await
    }

    /// Whether the connection is still usable.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed() && !self.conn.is_finished()
    }
}

impl Drop for ProxyClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// GET through the proxy on a fresh connection.
pub async fn proxy_get(proxy: SocketAddr, url: &str) -> Resp {
    ProxyClient::connect(proxy).await.get(url).await
}

/// A request body of `total` bytes, generated in 64 KiB chunks as it is sent.
pub fn generated_body(total: u64) -> ClientBody {
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = usize::try_from((total - sent).min(chunk.len() as u64)).unwrap();
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n))),
                sent + n as u64,
            ))
        }
    });
    StreamBody::new(stream).boxed()
}

/// A raw exchange's answer: the status line's code and the head's text.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub head: String,
    pub all: String,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Reads from `s` until the peer closes it (or resets it); returns what was read, or
/// `None` if it was still open after `within`.
pub async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}

/// Reads one response head off `s` as sent, byte by byte so that nothing after it (a
/// body, or the bytes of a tunnel or upgraded connection) is consumed. Fails the test if
/// the peer closes first or 5 s pass.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("no response head within 5 s")
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a `CONNECT` tunnel through the proxy at `proxy` to `target` (`host:port`) and
/// checks that it was answered 200.
pub async fn open_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Writes raw bytes to `addr` and reads until the peer closes (or 5 s pass). Status 0 means
/// no HTTP response came back (connection closed).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    // Until the peer closes, or one whole response (head plus Content-Length body) is in.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if let Some(len) = len {
                    if buf.len() >= end + 4 + len {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let all = String::from_utf8_lossy(&buf).into_owned();
    let head = all.split("\r\n\r\n").next().unwrap_or("").to_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    RawResp { status, head, all }
}

// ---------------------------------------------------------------------------------------
// curl.

/// What curl got: the final response's status, headers and body, plus its exit code.
#[derive(Debug)]
pub struct CurlOut {
    pub exit: i32,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl CurlOut {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs `/usr/bin/curl -sS <args>` with proxy variables cleared; panics if curl is missing.
pub async fn curl(args: &[&str]) -> CurlOut {
    let bin = Path::new("/usr/bin/curl");
    assert!(
        bin.exists(),
        "/usr/bin/curl is required by these tests and is missing"
    );
    let dir = TempDir::new("curl");
    let head_file = dir.path().join("head");
    let body_file = dir.path().join("body");
    let out = tokio::process::Command::new(bin)
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(&head_file)
        .arg("-o")
        .arg(&body_file)
        .args(["-w", "%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .unwrap();
    let heads = std::fs::read_to_string(&head_file).unwrap_or_default();
    // With -p, the CONNECT response comes first: keep the last header block.
    let last = heads
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap_or("");
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    CurlOut {
        exit: out.status.code().unwrap_or(-1),
        // The last response's status line (a refused CONNECT leaves -w's code at 000).
        status: last
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            }),
        headers,
        body: std::fs::read(&body_file).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Admin.

/// GET a path on an admin listener; returns status and body text.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    admin_request(admin, http::Method::GET, path).await
}

/// POST (with no body) to a path on an admin listener; returns status and body text.
pub async fn admin_post(admin: SocketAddr, path: &str) -> (u16, String) {
    admin_request(admin, http::Method::POST, path).await
}

async fn admin_request(admin: SocketAddr, method: http::Method, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, ClientBody>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", admin.to_string())
        .body(full_body(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of one Prometheus sample line `name{labels} value`, where every `label="v"`
/// in `labels` must appear; sums matching lines. 0 when absent.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split(['{', ' ']).next().unwrap_or("");
            metric == name
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}
