//! Transparent capture end to end, as root, in two network namespaces: the real capture rules
//! from `iptables/outrider-iptables.sh apply` and the real `outrider` binary (uid 1337) in a
//! "pod" namespace with its clients and app, and servers in an "outside" namespace reached
//! over a veth pair. Nothing here needs proxy settings: every client is plain `curl` or a
//! socket, run as an ordinary uid, and the kernel's REDIRECT sends it through the sidecar.
//!
//! Addressing (all of it exists only inside the namespaces):
//!
//! ```text
//!   outside                                        pod
//!   10.77.N.1  echo :7000 :7001, banner :2525  <-veth->  10.77.N.2  app 127.0.0.1:8080 (uid 1000)
//!   203.0.113.10  "allowed"  http :80, https :443          outrider (uid 1337), curl (uid 1000)
//!   203.0.113.20  "other"    http :80, https :443          route 203.0.113.0/24 via 10.77.N.1
//!   fd77:0:0:N::1  echo :7000 (IPv6)                       fd77:0:0:N::2
//! ```
//!
//! The 203.0.113.0/24 documentation range counts as public for the egress policy, so name
//! rules (Host, SNI) apply there; the private 10.77.N.1 is reached through a CIDR rule. Names
//! map to addresses through the config's `dns.hosts`, so no DNS query leaves the proxy.
//!
//! Run: `sudo -E cargo test --test netns_transparent` (CI runs as root). Without root every
//! test fails saying so. The in-process version of these checks is `tests/transparent_seam.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::panic,
    reason = "a test reports an unexpected outcome by panicking"
)]

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::netns::{self, field, Background, NetNs, Resp, Veth, PROXY_UID, PYTHON};
use serde_json::Value;

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/outrider-iptables.sh");
/// The uid of the app and of every client in the pod: captured like any uid but the proxy's.
const APP_UID: u32 = 1000;
/// The "allowed" server: `allowed.test` resolves here and a host rule allows it.
const ALLOWED_IP: &str = "203.0.113.10";
/// The "other" server: `other.test` and `denied.test` resolve here and no rule names them.
const OTHER_IP: &str = "203.0.113.20";
/// Ports on the outside's private address: echo allowed by the CIDR rule, echo not allowed,
/// and a server-first banner (a configured server-first port, allowed by the CIDR rule).
const ECHO_ALLOWED: u16 = 7000;
const ECHO_DENIED: u16 = 7001;
const BANNER_PORT: u16 = 2525;
/// The app in the pod, reached from outside through the inbound listener.
const APP_PORT: u16 = 8080;

/// The outside's servers (and the pod's app). `http`/`https` answer every GET with their tag,
/// the peer address, the path and the request headers, one per line; `echo` answers the
/// first line a client sends with `<tag>: <line>`.
const SERVERS_PY: &str = r#"
import socket, socketserver, ssl, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
mode, host, port, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        lines = [tag, "peer: " + self.client_address[0], "path: " + self.path]
        lines += ["%s: %s" % (k, v) for k, v in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    def server_bind(self):
        # HTTPServer.server_bind does a reverse DNS lookup; nothing may leave the namespaces.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = host, port

def echo(c):
    with c:
        c.settimeout(5)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(tag.encode() + b": " + data)

if mode in ("http", "https"):
    srv = Server((host, port), Handler)
    if mode == "https":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[5], sys.argv[6])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("ready", flush=True)
    srv.serve_forever()
else:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Sends `hello\n` (client speaks first, not HTTP or TLS: opaque TCP), prints what comes back
/// until the server closes. Exit 0 whatever the server did; the output says what happened.
const SAY_HELLO_PY: &str = r#"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        c.sendall(b"hello\n")
        data = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    print("got:" + data.decode(errors="replace").strip())
except OSError as e:
    print("error:%s" % e)
"#;

/// The whole setup: fields drop in order, so processes go before the namespaces they run in.
struct World {
    procs: Vec<Background>,
    sidecar: Background,
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    cacert: PathBuf,
    link: Veth,
    pod: NetNs,
    outside: NetNs,
}

impl World {
    fn new() -> World {
        netns::require_root();
        let outside = NetNs::new("ortr-out");
        let pod = NetNs::new("ortr-pod");
        let link = wire(&outside, &pod);

        // Readable (and the log writable) by uid 1337 and the app's uid.
        let dir = tempfile::Builder::new()
            .prefix("outrider-netns-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (cacert, cert, key) = write_tls_files(dir.path());
        let log = dir.path().join("access.log");
        std::fs::write(&log, "").unwrap();
        std::os::unix::fs::chown(&log, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let config = dir.path().join("outrider.yaml");
        let outside_ip6 = link.a_ip6.expect("link() gives both ends an IPv6 address");
        std::fs::write(&config, config_yaml(link.a_ip, outside_ip6, &log)).unwrap();

        let mut procs = outside_servers(&outside, &link, &cert, &key);
        // The app listens on loopback only: from outside it is reachable through the sidecar
        // or not at all.
        procs.push(server(
            &pod,
            Some(APP_UID),
            &["http", "127.0.0.1", &APP_PORT.to_string(), "app"],
        ));

        let mut apply = pod.command(SCRIPT, &["apply"]);
        for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("OUTRIDER_")) {
            apply.env_remove(var);
        }
        netns::run_ok(&mut apply);

        let config_arg = config.to_str().unwrap().to_owned();
        let sidecar = pod.spawn_as(PROXY_UID, OUTRIDER, &["run", "--config", &config_arg]);
        let world = World {
            procs,
            sidecar,
            _dir: dir,
            config,
            log,
            cacert,
            link,
            pod,
            outside,
        };
        world.wait_ready();
        world
    }

    fn pod_ip(&self) -> Ipv4Addr {
        self.link.b_ip
    }

    fn outside_ip(&self) -> Ipv4Addr {
        self.link.a_ip
    }

    /// The admin port is never captured, so root can poll it from inside the pod.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.pod.exec(
                "curl",
                &["-fsS", "--max-time", "2", "http://127.0.0.1:15000/ready"],
            );
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outrider (pid {}) did not become ready: {}",
                self.sidecar.pid(),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `curl -i` from the pod as the app's uid, with no proxy settings at all.
    fn curl(&self, args: &[&str]) -> Output {
        let mut base = vec!["-sS", "-i", "--max-time", "10"];
        base.extend_from_slice(args);
        let mut cmd = self.pod.command_as(APP_UID, "curl", &base);
        without_proxy_env(&mut cmd);
        cmd.output().unwrap()
    }

    /// Runs a python client in the pod as the app's uid and returns its stdout.
    fn py(&self, script: &str, args: &[&str]) -> String {
        let mut all = vec!["-c", script];
        all.extend_from_slice(args);
        let out = self.pod.exec_as(APP_UID, PYTHON, &all);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn log_lines(&self) -> Vec<Value> {
        // Only complete lines: the writer may be mid-way through the last one.
        std::fs::read_to_string(&self.log)
            .unwrap()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect()
    }

    /// Waits for the access-log record that `pred` picks (records are written when a request
    /// or connection ends, by a writer thread).
    fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.log_lines();
            if let Some(found) = lines.iter().find(|l| pred(l)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no access-log record for {what}; the log has:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The config the sidecar was started with.
    fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// Writes `yaml` as the config, sends SIGHUP, and waits until the admin API's effective
    /// config shows it applied (`applied` on that JSON).
    fn reload(&self, yaml: &str, applied: impl Fn(&str) -> bool) {
        std::fs::write(&self.config, yaml).unwrap();
        let pid = self.sidecar.pid().to_string();
        netns::run_ok(Command::new("kill").args(["-HUP", &pid]));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.pod.exec(
                "curl",
                &["-fsS", "--max-time", "2", "http://127.0.0.1:15000/config"],
            );
            if applied(&String::from_utf8_lossy(&out.stdout)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reload was not applied within 10 s (is the config valid?)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The sidecar's Prometheus text.
    fn metrics(&self) -> String {
        self.pod.exec_ok(
            "curl",
            &["-fsS", "--max-time", "5", "http://127.0.0.1:15000/metrics"],
        )
    }
}

fn without_proxy_env(cmd: &mut Command) {
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
}

/// The veth pair (outside = a, pod = b), the two "internet" addresses on the outside end, and
/// the pod's route to them.
fn wire(outside: &NetNs, pod: &NetNs) -> Veth {
    // a = outside (10.77.N.1), b = pod (10.77.N.2).
    let link = netns::link(outside, pod);
    for ip in [ALLOWED_IP, OTHER_IP] {
        outside.exec_ok(
            "ip",
            &["addr", "add", &format!("{ip}/24"), "dev", &link.a_if],
        );
    }
    pod.exec_ok(
        "ip",
        &[
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            &link.a_ip.to_string(),
        ],
    );
    link
}

/// The outside's servers: `allowed` and `other` over HTTP and HTTPS, the echo servers on the
/// private address (IPv4 and IPv6), and the server-first banner.
fn outside_servers(outside: &NetNs, link: &Veth, cert: &Path, key: &Path) -> Vec<Background> {
    let mut procs = Vec::new();
    let outside_ip = link.a_ip.to_string();
    let outside_ip6 = link.a_ip6.unwrap().to_string();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for (ip, tag) in [(ALLOWED_IP, "allowed"), (OTHER_IP, "other")] {
        procs.push(server(outside, None, &["http", ip, "80", tag]));
        procs.push(server(outside, None, &["https", ip, "443", tag, cert, key]));
    }
    procs.push(server(
        outside,
        None,
        &["echo", &outside_ip, &ECHO_ALLOWED.to_string(), "echo7000"],
    ));
    procs.push(server(
        outside,
        None,
        &["echo", &outside_ip, &ECHO_DENIED.to_string(), "echo7001"],
    ));
    procs.push(server(
        outside,
        None,
        &["echo", &outside_ip6, &ECHO_ALLOWED.to_string(), "echo6"],
    ));
    procs.push(netns::tag_server(
        outside,
        &outside_ip,
        BANNER_PORT,
        "banner",
    ));
    procs
}

/// Starts one of [`SERVERS_PY`]'s servers and waits until it listens.
fn server(ns: &NetNs, uid: Option<u32>, args: &[&str]) -> Background {
    let mut all = vec!["-c", SERVERS_PY];
    all.extend_from_slice(args);
    let mut bg = match uid {
        Some(uid) => ns.spawn_as(uid, PYTHON, &all),
        None => ns.spawn(PYTHON, &all),
    };
    bg.wait_for_line("ready", Duration::from_secs(10));
    bg
}

/// A certificate for every test name (so that only the proxy can make a TLS request fail),
/// generated now; returns (CA file for curl, certificate, key).
fn write_tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let names = ["allowed.test", "other.test", "denied.test"].map(str::to_owned);
    let certified = rcgen::generate_simple_self_signed(names.to_vec()).unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    // The self-signed certificate is its own trust anchor.
    (cert.clone(), cert, key)
}

fn config_yaml(outside_ip: Ipv4Addr, outside_ip6: Ipv6Addr, log: &Path) -> String {
    format!(
        r#"admin:
  listen: 127.0.0.1:15000
outbound:
  listen: 127.0.0.1:15001
  egress:
    mode: enforce
    allow:
      - host: allowed.test
        ports: [80, 443]
      - cidr: {outside_ip}/32
        ports: [{ECHO_ALLOWED}, {BANNER_PORT}]
      - cidr: {outside_ip6}/128
        ports: [{ECHO_ALLOWED}]
  detect:
    # Long enough that a server-first protocol on an unconfigured port would visibly stall.
    timeout: 8s
    server_first_ports: [{BANNER_PORT}]
inbound:
  listen: 0.0.0.0:15006
  mtls: disabled
dns:
  hosts:
    allowed.test: {ALLOWED_IP}
    other.test: {OTHER_IP}
    denied.test: {OTHER_IP}
access_log:
  output: {}
"#,
        log.display()
    )
}

#[test]
fn outbound_http_goes_through_the_sidecar_and_a_denied_host_gets_403() {
    let w = World::new();
    let url = "http://allowed.test/allowed-path";
    let resolve = format!("allowed.test:80:{ALLOWED_IP}");
    let resp = Resp::parse(&w.curl(&["--resolve", &resolve, url]));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(resp.body.starts_with("allowed\n"), "{}", resp.body);
    let via = resp.seen_header("via").unwrap_or_default();
    assert!(
        via.contains("outrider"),
        "the server saw no `Via: ... outrider` (via {via:?}):\n{}",
        resp.body
    );
    let record = w.wait_log("the allowed request", |r| {
        field(r, "path") == "/allowed-path"
    });
    assert_eq!(field(&record, "direction"), "outbound", "{record}");
    assert_eq!(field(&record, "mode"), "transparent", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{ALLOWED_IP}:80"),
        "{record}"
    );
    assert_eq!(record["status"], 200, "{record}");

    // other.test is a real server that would answer 200, but no rule names it.
    let resolve = format!("other.test:80:{OTHER_IP}");
    let resp = Resp::parse(&w.curl(&["--resolve", &resolve, "http://other.test/denied-path"]));
    assert_eq!(resp.status, 403, "{}", resp.body);
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(
        reason.contains("other.test"),
        "x-outrider-error: {reason:?}"
    );
    let record = w.wait_log("the denied request", |r| field(r, "path") == "/denied-path");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert_eq!(field(&record, "mode"), "transparent", "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{OTHER_IP}:80"),
        "{record}"
    );
}

#[test]
fn tls_is_allowed_and_denied_by_sni() {
    let w = World::new();
    let cacert = w.cacert.to_str().unwrap();
    let resolve = format!("allowed.test:443:{ALLOWED_IP}");
    let resp = Resp::parse(&w.curl(&[
        "--cacert",
        cacert,
        "--resolve",
        &resolve,
        "https://allowed.test/tls-allowed",
    ]));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(resp.body.starts_with("allowed\n"), "{}", resp.body);
    let record = w.wait_log("the allowed TLS connection", |r| {
        field(r, "sni") == "allowed.test"
    });
    assert_eq!(field(&record, "protocol"), "tls", "{record}");
    assert_eq!(field(&record, "mode"), "transparent", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{ALLOWED_IP}:443"),
        "{record}"
    );

    // The server behind denied.test has a valid certificate for it: only the proxy can say no.
    let resolve = format!("denied.test:443:{OTHER_IP}");
    let out = w.curl(&[
        "--cacert",
        cacert,
        "--resolve",
        &resolve,
        "https://denied.test/tls-denied",
    ]);
    assert!(
        !out.status.success(),
        "TLS to a name with no rule succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let record = w.wait_log("the denied TLS connection", |r| {
        field(r, "sni") == "denied.test"
    });
    assert_eq!(field(&record, "protocol"), "tls", "{record}");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert!(field(&record, "reason").contains("denied.test"), "{record}");
}

/// An explicit client's CONNECT names an allowed host while the TLS inside asks (SNI) for
/// another: checked like a transparent connection with that SNI, so that an allowed name's
/// server (a CDN front) cannot carry traffic for a denied one.
#[test]
fn connect_tunnels_are_checked_on_the_sni_inside() {
    let w = World::new();
    let cacert = w.cacert.to_str().unwrap();
    let proxy = "http://127.0.0.1:15001";
    let out = w.curl(&[
        "--cacert",
        cacert,
        "-x",
        proxy,
        "https://allowed.test/connect-allowed",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("\nallowed\n")
            && stdout.contains("/connect-allowed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = w.wait_log("the allowed CONNECT", |r| {
        field(r, "method") == "CONNECT" && field(r, "sni") == "allowed.test"
    });
    assert_eq!(field(&record, "decision"), "allow", "{record}");

    // CONNECT allowed.test:443, then a ClientHello for denied.test (curl's --connect-to
    // does exactly this). The allowed server holds a certificate for denied.test too, so
    // without the check the request would be answered.
    let out = w.curl(&[
        "--cacert",
        cacert,
        "-x",
        proxy,
        "--connect-to",
        "denied.test:443:allowed.test:443",
        "https://denied.test/fronted",
    ]);
    assert!(
        !out.status.success(),
        "a fronted request got through: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let record = w.wait_log("the fronted CONNECT", |r| {
        field(r, "method") == "CONNECT" && field(r, "sni") == "denied.test"
    });
    assert_eq!(field(&record, "authority"), "allowed.test:443", "{record}");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    let reason = field(&record, "reason");
    assert!(
        reason.contains("SNI denied.test") && reason.contains("no rule for host denied.test"),
        "{record}"
    );

    // The same ClientHello sent only after the detection timeout (8 s here) has passed: the
    // check has no fail-open deadline for a server that stays silent, as TLS servers do.
    let late = r#"
import socket, ssl, sys, time
s = socket.create_connection(("127.0.0.1", 15001), timeout=30)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1024)
time.sleep(9)
ctx = ssl.create_default_context(cafile=sys.argv[1])
try:
    with ctx.wrap_socket(s, server_hostname="denied.test") as t:
        t.sendall(b"GET /late-fronted HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
        print("answered: %r" % t.recv(200))
except (OSError, ssl.SSLError) as e:
    print("refused: %r" % e)
"#;
    let said = w.py(late, &[cacert]);
    assert!(
        said.starts_with("refused"),
        "a late fronted ClientHello got through: {said}"
    );
    let first_client = field(&record, "client");
    let late = w.wait_log("the late fronted CONNECT", |r| {
        field(r, "sni") == "denied.test" && field(r, "client") != first_client
    });
    assert_eq!(field(&late, "decision"), "deny", "{late}");
}

/// rustls's ClientHello for `name`, as the one TLS record a client sends.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    assert_eq!(out[0], 0x16, "a handshake record");
    let len = usize::from(u16::from_be_bytes([out[3], out[4]]));
    assert_eq!(out.len(), 5 + len, "one record");
    out
}

/// The same handshake message split into records at the given offsets into its payload, as
/// TLS allows (RFC 8446 §5.1) and TLS servers accept.
fn split_records(record: &[u8], cuts: &[usize]) -> Vec<u8> {
    let payload = &record[5..];
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([payload.len()].iter()) {
        out.extend_from_slice(&record[..3]);
        out.extend_from_slice(&u16::try_from(end - start).unwrap().to_be_bytes());
        out.extend_from_slice(&payload[start..end]);
        start = end;
    }
    out
}

/// A ClientHello split across TLS records is put together before its SNI is checked. Read
/// from its first record alone it had no SNI, so `CONNECT allowed.test:443` carried a TLS
/// session for denied.test (the server, like every TLS server, joins the records).
#[test]
fn a_client_hello_split_across_records_is_checked_on_its_sni() {
    let w = World::new();
    // Sends the hex ClientHello into a CONNECT tunnel to allowed.test:443 and says how many
    // bytes the server's answer had before the tunnel closed (0: the proxy closed it).
    let send = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", 15001), timeout=10)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
s.sendall(bytes.fromhex(sys.argv[1]))
try:
    print("answered %d" % len(s.recv(5)))
except OSError as e:
    print("error %r" % e)
"#;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // The denied name, split three ways: refused, as the same hello in one
    // record is (before the fix the server answered it).
    let denied = split_records(&client_hello("denied.test"), &[2, 60]);
    assert_eq!(w.py(send, &[&hex(&denied)]), "answered 0");
    let record = w.wait_log("the split denied hello", |r| {
        field(r, "method") == "CONNECT" && field(r, "sni") == "denied.test"
    });
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    let reason = field(&record, "reason");
    assert!(
        reason.contains("SNI denied.test") && reason.contains("no rule for host denied.test"),
        "{record}"
    );
    // The allowed name, split: the server answers (a split hello is no reason to refuse).
    let allowed = split_records(&client_hello("allowed.test"), &[1, 40]);
    assert_eq!(w.py(send, &[&hex(&allowed)]), "answered 5");
    let record = w.wait_log("the split allowed hello", |r| {
        field(r, "method") == "CONNECT" && field(r, "sni") == "allowed.test"
    });
    assert_eq!(field(&record, "decision"), "allow", "{record}");
}

/// Plain HTTP inside a CONNECT is served request by request: each Host (HTTP/2:
/// `:authority`) is checked against the address the CONNECT dialled, as on a redirected
/// connection, and each request is logged. Spliced as bytes, `CONNECT allowed.test:80`
/// then `Host: denied.test` would be answered by allowed.test's server (a shared host, a
/// CDN): domain fronting without TLS.
#[test]
fn plain_http_inside_a_connect_is_checked_request_by_request() {
    let w = World::new();
    let proxy = "http://127.0.0.1:15001";
    let tunnel = ["-p", "--suppress-connect-headers", "-x", proxy];
    let mut args = tunnel.to_vec();
    args.push("http://allowed.test/tunnelled-http");
    let resp = Resp::parse(&w.curl(&args));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(resp.body.starts_with("allowed\n"), "{}", resp.body);
    let record = w.wait_log("the tunnelled request", |r| {
        field(r, "path") == "/tunnelled-http"
    });
    assert_eq!(field(&record, "mode"), "explicit", "{record}");
    assert_eq!(field(&record, "protocol"), "http1", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{ALLOWED_IP}:80"),
        "{record}"
    );

    // CONNECT allowed.test:80, then a request for denied.test through it.
    let mut args = tunnel.to_vec();
    args.extend([
        "--connect-to",
        "denied.test:80:allowed.test:80",
        "http://denied.test/fronted-http",
    ]);
    let resp = Resp::parse(&w.curl(&args));
    assert_eq!(
        resp.status, 403,
        "a fronted request got through:\n{}",
        resp.body
    );
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(
        reason.contains("no rule for host denied.test"),
        "x-outrider-error: {reason:?}"
    );
    let record = w.wait_log("the fronted request", |r| {
        field(r, "path") == "/fronted-http"
    });
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert_eq!(field(&record, "authority"), "denied.test", "{record}");
    let connect = w.wait_log("the CONNECT it came through", |r| {
        field(r, "method") == "CONNECT" && field(r, "client") == field(&record, "client")
    });
    assert_eq!(field(&connect, "authority"), "allowed.test:80", "{connect}");

    // The same in HTTP/2 with prior knowledge: the stream is refused on its `:authority`.
    let mut args = tunnel.to_vec();
    args.extend([
        "--http2-prior-knowledge",
        "--connect-to",
        "denied.test:80:allowed.test:80",
        "http://denied.test/fronted-h2",
    ]);
    let resp = Resp::parse(&w.curl(&args));
    assert_eq!(
        resp.status, 403,
        "a fronted HTTP/2 stream got through:\n{}",
        resp.body
    );
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(
        reason.contains("no rule for host denied.test"),
        "x-outrider-error: {reason:?}"
    );
    let record = w.wait_log("the fronted stream", |r| field(r, "path") == "/fronted-h2");
    assert_eq!(field(&record, "protocol"), "http2", "{record}");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
}

/// A CONNECT tunnel admitted on the SNI inside it is checked again on that SNI after a
/// reload: a reload that still allows the CONNECT's host but no longer the SNI's closes it.
/// (Otherwise a tunnel fronted through an allowed name would outlive the revocation of the
/// name it really carries.)
#[test]
fn a_reload_closes_a_connect_tunnel_whose_sni_it_no_longer_allows() {
    let w = World::new();
    // `other.test` on the allowed server's address, and a rule for it: a CONNECT to
    // allowed.test carrying a ClientHello for other.test is then allowed.
    let base = w.config_text().replace(
        &format!("other.test: {OTHER_IP}"),
        &format!("other.test: {ALLOWED_IP}"),
    );
    let rule = "      - host: allowed.test\n        ports: [80, 443]\n";
    assert!(base.contains(rule));
    let both = base.replace(
        rule,
        &format!("{rule}      - host: other.test\n        ports: [443]\n"),
    );
    // In the effective config, "other.test" is a dns.hosts key, and with the rule a host too.
    let named = |c: &str| c.matches("\"other.test\"").count();
    w.reload(&both, |c| named(c) == 2);

    // Holds the tunnel open after the handshake (the server waits for a request), until the
    // proxy closes it.
    let hold = r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", 15001), timeout=30)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    chunk = s.recv(1024)
    if not chunk:
        break
    head += chunk
print("connect: %s" % head.split(b"\r\n")[0].decode(), flush=True)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    t = ctx.wrap_socket(s, server_hostname="other.test")
    print("handshake done", flush=True)
    while t.recv(4096):
        pass
except (OSError, ssl.SSLError) as e:
    print("error: %r" % e, flush=True)
print("closed", flush=True)
"#;
    let mut client = w.pod.spawn_as(APP_UID, PYTHON, &["-c", hold]);
    let said = client.wait_for_line("connect:", Duration::from_secs(10));
    assert!(said.contains(" 200"), "{said}");
    client.wait_for_line("handshake done", Duration::from_secs(10));

    // allowed.test is still allowed; other.test no longer is.
    w.reload(&base, |c| named(c) == 1);
    client.wait_for_line("closed", Duration::from_secs(10));
    let record = w.wait_log("the revoked tunnel", |r| {
        field(r, "method") == "CONNECT" && field(r, "sni") == "other.test"
    });
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    let reason = field(&record, "reason");
    assert!(
        reason.contains("config reload") && reason.contains("other.test"),
        "{record}"
    );
}

#[test]
fn forged_host_and_sni_are_refused_and_logged_as_forged() {
    let w = World::new();
    // allowed.test is allowed, but here it is sent to the other server's address.
    let resolve = format!("allowed.test:80:{OTHER_IP}");
    let resp = Resp::parse(&w.curl(&["--resolve", &resolve, "http://allowed.test/forged-host"]));
    assert_eq!(
        resp.status, 403,
        "a forged Host reached a server:\n{}",
        resp.body
    );
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(reason.contains("forged"), "x-outrider-error: {reason:?}");
    let record = w.wait_log("the forged Host", |r| field(r, "path") == "/forged-host");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert!(field(&record, "reason").contains("forged"), "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{OTHER_IP}:80"),
        "{record}"
    );

    // The other server's certificate is valid for allowed.test too: only the proxy can refuse.
    let resolve = format!("allowed.test:443:{OTHER_IP}");
    let out = w.curl(&[
        "--cacert",
        w.cacert.to_str().unwrap(),
        "--resolve",
        &resolve,
        "https://allowed.test/forged-sni",
    ]);
    assert!(
        !out.status.success(),
        "a forged SNI reached a server: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let record = w.wait_log("the forged SNI", |r| {
        field(r, "sni") == "allowed.test" && field(r, "original_dst") == format!("{OTHER_IP}:443")
    });
    assert_eq!(field(&record, "protocol"), "tls", "{record}");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert!(field(&record, "reason").contains("forged"), "{record}");
}

#[test]
fn opaque_tcp_is_allowed_and_denied_by_cidr() {
    let w = World::new();
    let ip = w.outside_ip().to_string();
    let allowed = w.py(SAY_HELLO_PY, &[&ip, &ECHO_ALLOWED.to_string()]);
    assert_eq!(allowed, "got:echo7000: hello", "allowed opaque TCP");
    let record = w.wait_log("the allowed TCP connection", |r| {
        field(r, "original_dst") == format!("{ip}:{ECHO_ALLOWED}")
    });
    assert_eq!(field(&record, "protocol"), "tcp", "{record}");
    assert_eq!(field(&record, "mode"), "transparent", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    assert!(field(&record, "rule").contains("cidr"), "{record}");

    // A real echo server listens on 7001 too; the CIDR rule does not allow the port.
    let denied = w.py(SAY_HELLO_PY, &[&ip, &ECHO_DENIED.to_string()]);
    assert!(
        !denied.contains("echo7001"),
        "opaque TCP to a port no rule allows got through: {denied}"
    );
    let record = w.wait_log("the denied TCP connection", |r| {
        field(r, "original_dst") == format!("{ip}:{ECHO_DENIED}")
    });
    assert_eq!(field(&record, "protocol"), "tcp", "{record}");
    assert_eq!(field(&record, "decision"), "deny", "{record}");
}

#[test]
fn ipv6_connections_are_captured_both_ways() {
    let w = World::new();
    // The capture script installs ip6tables rules too (REDIRECT to [::1]:15001 outbound and
    // to the pod's own IPv6 address on 15006 inbound), so IPv6 connections must go through
    // the sidecar like IPv4 ones instead of being refused.
    let outside6 = w.link.a_ip6.unwrap();
    let pod6 = w.link.b_ip6.unwrap();
    let outbound = w.py(
        SAY_HELLO_PY,
        &[&outside6.to_string(), &ECHO_ALLOWED.to_string()],
    );
    let url = format!("http://[{pod6}]:{APP_PORT}/inbound-v6");
    let mut cmd = w
        .outside
        .command("curl", &["-sS", "-i", "--max-time", "10", &url]);
    without_proxy_env(&mut cmd);
    let inbound = cmd.output().unwrap();
    let inbound_text = String::from_utf8_lossy(&inbound.stdout).into_owned()
        + &String::from_utf8_lossy(&inbound.stderr);
    assert!(
        outbound == "got:echo6: hello" && inbound_text.contains("\napp\n"),
        "IPv6 capture: outbound to [{outside6}]:{ECHO_ALLOWED} (allowed by a CIDR rule) got \
         {outbound:?}; inbound to {url} got {inbound_text:?}"
    );
    let record = w.wait_log("the IPv6 outbound connection", |r| {
        field(r, "original_dst") == format!("[{outside6}]:{ECHO_ALLOWED}")
    });
    assert_eq!(field(&record, "protocol"), "tcp", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    let record = w.wait_log("the IPv6 inbound request", |r| {
        field(r, "path") == "/inbound-v6"
    });
    assert_eq!(field(&record, "direction"), "inbound", "{record}");
}

#[test]
fn server_first_protocol_works_on_a_configured_port() {
    let w = World::new();
    let ip = w.outside_ip().to_string();
    // The client only reads (5 s socket timeout); detection would wait 8 s for a first byte
    // that never comes, so the banner arrives only if the port skips detection.
    let reply = netns::tcp_probe(&w.pod, Some(APP_UID), &ip, BANNER_PORT)
        .unwrap_or_else(|e| panic!("no banner from the server-first port: {e}"));
    assert_eq!(reply.tag, "banner");
    // The server saw the sidecar's own connection from the pod, not a redirected one.
    assert_eq!(reply.peer, w.pod_ip().to_string());
    assert_eq!(reply.orig, "none");
    let record = w.wait_log("the server-first connection", |r| {
        field(r, "original_dst") == format!("{ip}:{BANNER_PORT}")
    });
    assert_eq!(field(&record, "protocol"), "tcp", "{record}");
    assert_eq!(field(&record, "decision"), "allow", "{record}");
    let metrics = w.metrics();
    let timeouts = metrics
        .lines()
        .find(|l| l.starts_with("outrider_detect_timeouts_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("0");
    assert_eq!(
        timeouts, "0",
        "detection waited on a server-first port:\n{metrics}"
    );
}

#[test]
fn inbound_connections_reach_the_app_through_the_sidecar() {
    let w = World::new();
    let url = format!("http://{}:{APP_PORT}/inbound-path", w.pod_ip());
    let mut cmd = w
        .outside
        .command("curl", &["-sS", "-i", "--max-time", "10", &url]);
    without_proxy_env(&mut cmd);
    let resp = Resp::parse(&cmd.output().unwrap());
    assert_eq!(resp.status, 200, "{}", resp.body);
    // The app listens on 127.0.0.1 only, so only the sidecar can have brought this here.
    assert!(resp.body.starts_with("app\n"), "{}", resp.body);
    let outside_ip = w.outside_ip().to_string();
    assert_eq!(
        resp.seen_header("x-forwarded-for").as_deref(),
        Some(outside_ip.as_str()),
        "the app saw no x-forwarded-for naming the caller:\n{}",
        resp.body
    );
    let record = w.wait_log("the inbound request", |r| {
        field(r, "path") == "/inbound-path"
    });
    assert_eq!(field(&record, "direction"), "inbound", "{record}");
    assert_eq!(field(&record, "mode"), "transparent", "{record}");
    assert_eq!(
        field(&record, "original_dst"),
        format!("{}:{APP_PORT}", w.pod_ip()),
        "{record}"
    );
    assert_eq!(record["status"], 200, "{record}");
}

/// An app that listens on the pod's address alone (a server bound to its hostname) is not
/// on 127.0.0.1, where inbound traffic goes by default; `inbound.app_host: original` sends it
/// to the address the caller connected to instead, as Istio does since 1.10. An app on
/// loopback alone then stays out of reach, from outside as it was meant to be, over plain TCP
/// too.
#[test]
fn app_host_original_reaches_an_app_on_the_pod_address_and_not_one_on_loopback() {
    let mut w = World::new();
    let pod_ip = w.pod_ip().to_string();
    w.procs.push(server(
        &w.pod,
        Some(APP_UID),
        &["http", &pod_ip, "8081", "pod-address-app"],
    ));
    w.procs.push(server(
        &w.pod,
        Some(APP_UID),
        &["echo", &pod_ip, "8082", "pod-address-echo"],
    ));
    let get = |port: u16, path: &str| {
        let url = format!("http://{pod_ip}:{port}{path}");
        let mut cmd = w
            .outside
            .command("curl", &["-sS", "-i", "--max-time", "10", &url]);
        without_proxy_env(&mut cmd);
        Resp::parse(&cmd.output().unwrap())
    };

    // By default the sidecar looks for it on 127.0.0.1: nothing there.
    let resp = get(8081, "/before");
    assert_eq!(resp.status, 502, "{}", resp.body);

    let config = w.config_text().replace(
        "  mtls: disabled\n",
        "  mtls: disabled\n  app_host: original\n",
    );
    w.reload(&config, |applied| {
        applied.contains("\"app_host\": \"original\"")
    });

    let resp = get(8081, "/after");
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert!(resp.body.starts_with("pod-address-app\n"), "{}", resp.body);
    let record = w.wait_log("the request to the pod address", |r| {
        field(r, "path") == "/after"
    });
    assert_eq!(
        field(&record, "upstream"),
        format!("{pod_ip}:8081"),
        "{record}"
    );
    // Opaque TCP goes the same way.
    let said = w
        .outside
        .exec_ok(PYTHON, &["-c", SAY_HELLO_PY, &pod_ip, "8082"]);
    assert_eq!(said.trim(), "got:pod-address-echo: hello", "{said}");
    // The loopback-only app is no longer reachable from outside at all.
    let resp = get(APP_PORT, "/loopback-only");
    assert_eq!(resp.status, 502, "{}", resp.body);
}

/// Another host connecting to the pod on one of the sidecar's own ports (here the outbound
/// proxy's, 15001) is redirected to the inbound listener like any inbound connection; the
/// sidecar must not hand it to its own loopback-only listener, which would lend the pod's
/// egress rights to anyone who can reach the pod.
#[test]
fn the_sidecars_own_ports_are_not_reachable_from_outside_through_inbound() {
    let w = World::new();
    let proxy = format!("http://{}:15001", w.pod_ip());
    let resolve = format!("allowed.test:80:{ALLOWED_IP}");
    let mut cmd = w.outside.command(
        "curl",
        &[
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-x",
            &proxy,
            "--resolve",
            &resolve,
            "http://allowed.test/borrowed-egress",
        ],
    );
    without_proxy_env(&mut cmd);
    let out = cmd.output().unwrap();
    let resp = Resp::parse(&out);
    assert_eq!(
        resp.status, 403,
        "a host outside the pod used the sidecar's outbound proxy:\n{}",
        resp.body
    );
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(reason.contains("loop"), "x-outrider-error: {reason:?}");
    let outbound_records = w
        .log_lines()
        .into_iter()
        .filter(|r| field(r, "direction") == "outbound" && field(r, "path") == "/borrowed-egress")
        .count();
    assert_eq!(
        outbound_records, 0,
        "the request reached the outbound proxy"
    );

    // The same as a CONNECT whose first byte comes late, so that the inbound side's
    // detection gives up and passes the connection on as opaque TCP.
    let script = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 15001), timeout=20)
s.sendall(b"C")
time.sleep(8.5)
s.sendall(b"ONNECT " + sys.argv[2].encode() + b":80 HTTP/1.1\r\nHost: x\r\n\r\n")
try:
    print(repr(s.recv(200)))
except OSError as e:
    print("error %r" % e)
"#;
    let out = w.outside.exec(
        PYTHON,
        &["-c", script, &w.pod_ip().to_string(), "allowed.test"],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains(" 200 "),
        "a host outside the pod opened a CONNECT tunnel with the pod's egress: {said}"
    );
    let record = w.wait_log("the refused pass-through", |r| {
        field(r, "direction") == "inbound" && field(r, "protocol") == "tcp"
    });
    assert_eq!(field(&record, "decision"), "deny", "{record}");
    assert!(field(&record, "reason").contains("loop"), "{record}");
}

#[test]
fn the_sidecars_own_upstream_connections_are_not_captured_again() {
    let w = World::new();
    let resolve = format!("allowed.test:80:{ALLOWED_IP}");
    let resp = Resp::parse(&w.curl(&["--resolve", &resolve, "http://allowed.test/no-loop"]));
    assert_eq!(resp.status, 200, "{}", resp.body);
    // The server was reached directly from the pod's address, by exactly one hop.
    assert_eq!(
        resp.seen_header("peer").as_deref(),
        Some(w.pod_ip().to_string().as_str())
    );
    assert_eq!(resp.seen_header("via").as_deref(), Some("1.1 outrider"));
    w.wait_log("the request", |r| field(r, "path") == "/no-loop");
    // A marker request after it: once its record is in, a looped copy of the first would be too.
    Resp::parse(&w.curl(&["--resolve", &resolve, "http://allowed.test/marker"]));
    w.wait_log("the marker request", |r| field(r, "path") == "/marker");
    let records: Vec<Value> = w
        .log_lines()
        .into_iter()
        .filter(|r| field(r, "path") == "/no-loop")
        .collect();
    assert_eq!(
        records.len(),
        1,
        "one request, several records: {records:?}"
    );
    assert_eq!(
        field(&records[0], "client").split(':').next(),
        Some(w.pod_ip().to_string().as_str()),
        "the request came from the app, not from the sidecar: {}",
        records[0]
    );
}
