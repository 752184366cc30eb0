//! Mesh identity end to end, as root, in network namespaces: a mesh CA (`outrider ca serve`)
//! and pods with real capture rules (`iptables/outrider-iptables.sh apply`) and the real
//! `outrider` binary as uid 1337. A's app calls B's app by B's pod IP with plain `curl`; the
//! kernel sends it through A's sidecar, which wraps it in mTLS to B's sidecar, which checks
//! A's certificate, authorizes A's SPIFFE ID and hands the request to B's app.
//!
//! ```text
//!   namespace "net": bridge 10.77.N.1/24, outrider ca serve :15012 (root)
//!      ├── pod A 10.77.N.2  sidecar ns/a/sa/web              curl as uid 1000
//!      ├── pod B 10.77.N.3  sidecar ns/b/sa/api (strict)     app 127.0.0.1:8080, echo 127.0.0.1:9000
//!      ├── pod C 10.77.N.4  sidecar ns/c/sa/other            (only where a test needs it)
//!      ├── rogue 10.77.N.5  no sidecar: plaintext clients and hand-made TLS clients
//!      └── pod D 10.77.N.6  impostor: sidecar "ns/a/sa/web" from another CA (:15013)
//! ```
//!
//! Each test builds its own world (unique namespace names), so they run in parallel.
//!
//! Every address exists only inside the namespaces. Run: `sudo -E cargo test --test
//! netns_mesh` (CI runs as root); without root every test fails saying so. The in-process
//! version of these checks is `tests/mesh_proxy.rs`; token binding is in `tests/ca.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::netns::{self, field, Background, NetNs, Resp, Subnet, PROXY_UID, PYTHON};
use serde_json::Value;

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/outrider-iptables.sh");
const TD: &str = "cluster.test";
/// The apps' and clients' uid: captured like any uid but the proxy's.
const APP_UID: u32 = 1000;
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const CA_PORT: u16 = 15012;

/// B's apps. `http` answers every request with `method:`, `path:` and the request headers,
/// one per line, and appends `METHOD PATH xfcc=VALUE` to a log file; `echo` answers each line
/// a client sends with `echo: <line>`.
const APP_PY: &str = r#"
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
mode, port = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        xfcc = self.headers.get("x-forwarded-client-cert", "none")
        with lock, open(sys.argv[3], "a") as f:
            f.write("%s %s xfcc=%s\n" % (self.command, self.path, xfcc))
        lines = ["app: b", "method: " + self.command, "path: " + self.path]
        lines += ["%s: %s" % (k.lower(), v) for k, v in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True
    def server_bind(self):
        # HTTPServer.server_bind does a reverse DNS lookup; nothing may leave the namespaces.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", port

def echo(c):
    with c:
        f = c.makefile("rb")
        for line in f:
            c.sendall(b"echo: " + line)

if mode == "http":
    srv = Server(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    srv.serve_forever()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// A's app under load for `seconds`: each round one HTTP GET on a new connection (must be 200
/// and show `want` as the caller), one new TCP connection to the echo port (a new mTLS
/// handshake between the sidecars each time), and one line on a TCP connection opened at the
/// start and kept for the whole run (one mTLS session across every renewal). Prints
/// `DONE {json}` at the end.
const LOAD_PY: &str = r#"
import http.client, json, socket, sys, time
host, http_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, want = float(sys.argv[4]), sys.argv[5]
end = time.time() + seconds
res = {"http_ok": 0, "tcp_ok": 0, "long_ok": 0, "fail": 0, "errors": []}
def failed(what):
    res["fail"] += 1
    if len(res["errors"]) < 10:
        res["errors"].append("%s: %s" % (time.strftime("%H:%M:%S"), what))
def line(f):
    data = b""
    while not data.endswith(b"\n"):
        chunk = f.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
long = socket.create_connection((host, tcp_port), timeout=10)
i = 0
print("started", flush=True)
while time.time() < end:
    i += 1
    try:
        c = http.client.HTTPConnection(host, http_port, timeout=10)
        c.request("GET", "/api/load/%d" % i)
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        c.close()
        if r.status == 200 and want in body:
            res["http_ok"] += 1
        else:
            failed("http %d %s %s" % (r.status, r.getheader("x-outrider-error"), body[:200]))
    except Exception as e:
        failed("http %r" % e)
    try:
        with socket.create_connection((host, tcp_port), timeout=10) as s:
            s.sendall(b"ping %d\n" % i)
            data = line(s)
        if data == b"echo: ping %d\n" % i:
            res["tcp_ok"] += 1
        else:
            failed("tcp got %r" % data)
    except Exception as e:
        failed("tcp %r" % e)
    try:
        long.sendall(b"long %d\n" % i)
        data = line(long)
        if data == b"echo: long %d\n" % i:
            res["long_ok"] += 1
        else:
            failed("long-lived tcp got %r" % data)
    except Exception as e:
        failed("long-lived tcp %r" % e)
    time.sleep(0.05)
print("DONE " + json.dumps(res), flush=True)
"#;

/// A mesh client made by hand: TLS 1.3 with the mesh ALPN and the given certificate and key,
/// one `GET path`. Prints `response:<bytes>` or `error:<what>`.
const TLS_CLIENT_PY: &str = r#"
import socket, ssl, sys
host, port, cert, key, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["outrider-mesh"])
ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n" % path).encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    print("response:" + data.decode(errors="replace"))
except OSError as e:
    print("error:%r" % e)
"#;

/// Opens a TCP connection (not HTTP, not TLS), sends `hello\n`, prints `got:<what came back
/// before the close or the first newline>` or `error:<what>`.
const SAY_HELLO_PY: &str = r#"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        c.sendall(b"hello\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    print("got:" + data.decode(errors="replace").strip())
except OSError as e:
    print("error:%s" % e)
"#;

/// What a world looks like.
#[derive(Clone, Copy)]
struct Opts {
    /// `identity.cert_ttl` of every sidecar and the CA's `--max-ttl` (None: CA default, 24h).
    cert_ttl: Option<&'static str>,
    /// Whether pod C (ns/c/sa/other) exists.
    with_c: bool,
    /// Whether pod D exists: an impostor claiming A's identity, ns/a/sa/web, with a certificate
    /// from another CA (same trust domain), served by a second `ca serve` on :15013.
    impostor: bool,
}

/// One pod: its sidecar and apps (dropped first), then its namespace.
struct Pod {
    sidecar: Option<Background>,
    apps: Vec<Background>,
    id: String,
    /// Whether its identity comes from the other CA.
    foreign: bool,
    ip: Ipv4Addr,
    config: PathBuf,
    log: PathBuf,
    ns: NetNs,
}

/// Everything a test needs; fields drop in order, so processes go before their namespaces.
struct World {
    a: Pod,
    b: Pod,
    c: Option<Pod>,
    d: Option<Pod>,
    rogue: NetNs,
    ca: Option<Background>,
    ca2: Option<Background>,
    net: NetNs,
    subnet: String,
    ca_ip: Ipv4Addr,
    ca_dir: PathBuf,
    other_ca: PathBuf,
    app_log: PathBuf,
    opts: Opts,
    dir: tempfile::TempDir,
}

impl World {
    fn new(opts: Opts) -> World {
        netns::require_root();
        let dir = tempfile::Builder::new()
            .prefix("outrider-mesh-")
            .tempdir()
            .unwrap();
        // Traversable by uid 1337 (config, bundle, token) and the app's uid (its log).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca_dir = dir.path().join("ca");
        ca_init(&ca_dir);
        // The CA directory is private; sidecars get a copy of the root, as in a deployment.
        std::fs::copy(ca_dir.join("root.pem"), dir.path().join("root.pem")).unwrap();
        // Another root for the same trust domain (its root certificate even has the same name).
        let other_ca = dir.path().join("other-ca");
        ca_init(&other_ca);
        // The impostor trusts both roots, so it can verify B and only B can refuse it.
        let both = [&other_ca, &ca_dir]
            .map(|d| std::fs::read_to_string(d.join("root.pem")).unwrap())
            .concat();
        std::fs::write(dir.path().join("both-roots.pem"), both).unwrap();

        let net = NetNs::new("omesh-net");
        let s = Subnet::unique();
        let subnet = format!("{}/24", s.v4(0));
        let ca_ip = s.v4(1);
        net.exec_ok("ip", &["link", "add", "br0", "type", "bridge"]);
        net.exec_ok("ip", &["addr", "add", &format!("{ca_ip}/24"), "dev", "br0"]);
        net.exec_ok("ip", &["link", "set", "br0", "up"]);
        let attach = |prefix: &str, host: u8| -> (NetNs, Ipv4Addr) {
            let ns = NetNs::new(prefix);
            let port = format!("v-{}", &prefix[prefix.len() - 1..]);
            netns::run_ok(
                Command::new("ip")
                    .args(["link", "add", "name", &port, "netns", net.name()])
                    .args(["type", "veth", "peer", "name", "eth0", "netns", ns.name()]),
            );
            net.exec_ok("ip", &["link", "set", &port, "master", "br0"]);
            net.exec_ok("ip", &["link", "set", &port, "up"]);
            let ip = s.v4(host);
            ns.exec_ok("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.exec_ok("ip", &["link", "set", "eth0", "up"]);
            (ns, ip)
        };
        let (a_ns, a_ip) = attach("omesh-a", 2);
        let (b_ns, b_ip) = attach("omesh-b", 3);
        let c_ns = opts.with_c.then(|| attach("omesh-c", 4));
        let d_ns = opts.impostor.then(|| attach("omesh-d", 6));
        let (rogue, _) = attach("omesh-r", 5);

        let app_log = dir.path().join("app-b.log");
        std::fs::write(&app_log, "").unwrap();
        std::os::unix::fs::chown(&app_log, Some(APP_UID), Some(APP_UID)).unwrap();

        let mut w = World {
            a: Pod::placeholder(a_ns, a_ip, "ns/a/sa/web", dir.path()),
            b: Pod::placeholder(b_ns, b_ip, "ns/b/sa/api", dir.path()),
            c: c_ns.map(|(ns, ip)| Pod::placeholder(ns, ip, "ns/c/sa/other", dir.path())),
            d: d_ns.map(|(ns, ip)| {
                let mut d = Pod::placeholder(ns, ip, "ns/a/sa/web", dir.path());
                d.foreign = true;
                d.config = dir.path().join("d.yaml");
                d.log = dir.path().join("d-access.log");
                d
            }),
            rogue,
            ca: None,
            ca2: None,
            net,
            subnet,
            ca_ip,
            ca_dir,
            other_ca,
            app_log,
            opts,
            dir,
        };
        w.start_ca();
        if opts.impostor {
            w.start_ca2();
        }

        let app_log = w.app_log.to_str().unwrap().to_owned();
        for (mode, port) in [("http", APP_PORT), ("echo", ECHO_PORT)] {
            let port = port.to_string();
            let mut app =
                w.b.ns
                    .spawn_as(APP_UID, PYTHON, &["-c", APP_PY, mode, &port, &app_log]);
            app.wait_for_line("ready", Duration::from_secs(10));
            w.b.apps.push(app);
        }
        for who in w.pods() {
            let token = w.mint_token(w.pod(who));
            let token_file = w.dir.path().join(format!("token-{who}"));
            std::fs::write(&token_file, token).unwrap();
            std::os::unix::fs::chown(&token_file, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let log = w.pod(who).log.clone();
            std::fs::write(&log, "").unwrap();
            std::os::unix::fs::chown(&log, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
            let mut apply = w.pod(who).ns.command(SCRIPT, &["apply"]);
            for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("OUTRIDER_")) {
                apply.env_remove(var);
            }
            netns::run_ok(&mut apply);
            w.write_config(who, "strict");
            w.start_sidecar(who);
        }
        for who in w.pods() {
            w.wait_ready(who);
        }
        w
    }

    /// The pods with a sidecar in this world.
    fn pods(&self) -> Vec<&'static str> {
        let mut pods = vec!["a", "b"];
        if self.c.is_some() {
            pods.push("c");
        }
        if self.d.is_some() {
            pods.push("d");
        }
        pods
    }

    fn pod(&self, who: &str) -> &Pod {
        match who {
            "a" => &self.a,
            "b" => &self.b,
            "c" => self.c.as_ref().expect("this world has no pod C"),
            "d" => self.d.as_ref().expect("this world has no pod D"),
            _ => panic!("no pod {who}"),
        }
    }

    fn pod_mut(&mut self, who: &str) -> &mut Pod {
        match who {
            "a" => &mut self.a,
            "b" => &mut self.b,
            "c" => self.c.as_mut().expect("this world has no pod C"),
            "d" => self.d.as_mut().expect("this world has no pod D"),
            _ => panic!("no pod {who}"),
        }
    }

    fn ca_url(&self) -> String {
        format!("https://{}:{CA_PORT}", self.ca_ip)
    }

    /// The other CA, for the impostor, on :15013 next to the real one.
    fn start_ca2(&mut self) {
        let dir = self.other_ca.to_str().unwrap();
        let mut cmd = self.net.command(
            OUTRIDER,
            &["ca", "serve", "--dir", dir, "--listen", "0.0.0.0:15013"],
        );
        cmd.env("OUTRIDER_LOG", "warn");
        self.ca2 = Some(Background::start(cmd));
    }

    /// `outrider ca serve` in the "net" namespace; returns once it accepts connections.
    fn start_ca(&mut self) {
        let dir = self.ca_dir.to_str().unwrap();
        let mut args = vec!["ca", "serve", "--dir", dir, "--listen", "0.0.0.0:15012"];
        if let Some(ttl) = self.opts.cert_ttl {
            args.extend(["--max-ttl", ttl]);
        }
        let mut cmd = self.net.command(OUTRIDER, &args);
        cmd.env("OUTRIDER_LOG", "warn");
        self.ca = Some(Background::start(cmd));
        let url = self.ca_url();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ca_reachable() {
            assert!(Instant::now() < deadline, "the CA never listened on {url}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the CA accepts TCP connections (a TCP connect only: an HTTP probe would be
    /// logged by the CA as a bad request).
    fn ca_reachable(&self) -> bool {
        let script = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()";
        let ip = self.ca_ip.to_string();
        let port = CA_PORT.to_string();
        self.net
            .exec(PYTHON, &["-c", script, &ip, &port])
            .status
            .success()
    }

    fn mint_token(&self, pod: &Pod) -> String {
        let identity = pod
            .id
            .trim_start_matches(&format!("spiffe://{TD}/"))
            .to_owned();
        let dir = if pod.foreign {
            self.other_ca.to_str().unwrap()
        } else {
            self.ca_dir.to_str().unwrap()
        };
        let out = netns::run_ok(Command::new(OUTRIDER).args([
            "ca",
            "token",
            "--dir",
            dir,
            "--identity",
            &identity,
            "--ttl",
            "1h",
        ]));
        out.trim().to_owned()
    }

    fn write_config(&self, who: &str, mtls: &str) {
        let pod = self.pod(who);
        let subnet = &self.subnet;
        let ttl = self
            .opts
            .cert_ttl
            .map(|t| format!("  cert_ttl: {t}\n"))
            .unwrap_or_default();
        let yaml = format!(
            r#"admin:
  listen: 127.0.0.1:15000
outbound:
  listen: 127.0.0.1:15001
  egress:
    allow:
      - cidr: {subnet}
inbound:
  listen: 0.0.0.0:15006
  mtls: {mtls}
  authorization:
    - from: ["spiffe://{TD}/ns/a/*"]
      ports: [{APP_PORT}]
      paths: ["/api/"]
      methods: [GET]
    - from: ["spiffe://{TD}/ns/c/sa/other"]
      ports: [{APP_PORT}]
      paths: ["/public/"]
      methods: [GET]
    - from: ["spiffe://{TD}/ns/a/*"]
      ports: [{ECHO_PORT}]
    - ports: [{APP_PORT}]
      paths: ["/open/"]
      methods: [GET]
mesh:
  networks: [{subnet}]
identity:
  id: {id}
  ca_url: {ca_url}
  ca_bundle: {bundle}
  token_file: {token}
{ttl}access_log:
  output: {log}
"#,
            id = pod.id,
            ca_url = if pod.foreign {
                format!("https://{}:15013", self.ca_ip)
            } else {
                self.ca_url()
            },
            bundle = self
                .dir
                .path()
                .join(if pod.foreign {
                    "both-roots.pem"
                } else {
                    "root.pem"
                })
                .display(),
            token = self.dir.path().join(format!("token-{who}")).display(),
            log = pod.log.display(),
        );
        std::fs::write(&pod.config, yaml).unwrap();
    }

    fn start_sidecar(&mut self, who: &str) {
        let pod = self.pod_mut(who);
        let config = pod.config.to_str().unwrap().to_owned();
        let mut cmd = pod
            .ns
            .command_as(PROXY_UID, OUTRIDER, &["run", "--config", &config]);
        cmd.env("OUTRIDER_LOG", "warn");
        pod.sidecar = Some(Background::start(cmd));
    }

    /// Waits for `/ready` (only once the sidecar holds a certificate). The admin port is never
    /// captured, so root can poll it from inside the pod.
    fn wait_ready(&self, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ready(who) {
            assert!(
                Instant::now() < deadline,
                "sidecar {who} did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ready(&self, who: &str) -> bool {
        self.admin(who, "/ready").status.success()
    }

    fn admin(&self, who: &str, path: &str) -> Output {
        let url = format!("http://127.0.0.1:15000{path}");
        self.pod(who)
            .ns
            .exec("curl", &["-fsS", "--max-time", "5", &url])
    }

    /// The sidecar's current certificate: (not_after, chain PEM), from admin `/certs`.
    fn certs(&self, who: &str) -> (u64, String) {
        let out = self.admin(who, "/certs");
        assert!(out.status.success(), "/certs of {who} failed: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["spiffe_id"], self.pod(who).id.as_str(), "{v}");
        (
            v["not_after"].as_u64().unwrap_or_else(|| panic!("{v}")),
            v["chain_pem"].as_str().unwrap_or_default().to_owned(),
        )
    }

    fn metrics(&self, who: &str) -> String {
        let out = self.admin(who, "/metrics");
        assert!(out.status.success(), "/metrics of {who} failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `curl -i` from a pod as the app's uid, with no proxy settings: captured by iptables.
    fn curl_from(&self, who: &str, args: &[&str]) -> Output {
        self.curl_in(&self.pod(who).ns, Some(APP_UID), args)
    }

    fn curl_in(&self, ns: &NetNs, uid: Option<u32>, args: &[&str]) -> Output {
        let mut all = vec!["-sS", "-i", "--max-time", "10"];
        all.extend_from_slice(args);
        let mut cmd = match uid {
            Some(uid) => ns.command_as(uid, "curl", &all),
            None => ns.command("curl", &all),
        };
        without_proxy_env(&mut cmd);
        cmd.output().unwrap()
    }

    fn b_url(&self, path: &str) -> String {
        format!("http://{}:{APP_PORT}{path}", self.b.ip)
    }

    /// What B's app was asked: `METHOD PATH xfcc=VALUE` lines.
    fn app_saw(&self) -> String {
        std::fs::read_to_string(&self.app_log).unwrap()
    }

    fn log_lines(&self, who: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.pod(who).log)
            .unwrap()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
            .collect()
    }

    /// Waits for the access-log record of `who` that `pred` picks.
    fn wait_log(&self, who: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.log_lines(who);
            if let Some(found) = lines.iter().find(|l| pred(l)) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no access-log record of {who} for {what}; the log has:\n{}",
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts [`LOAD_PY`] in A as the app's uid against B for `seconds`.
    fn start_load(&self, seconds: f64) -> Background {
        let b_ip = self.b.ip.to_string();
        let (http, tcp) = (APP_PORT.to_string(), ECHO_PORT.to_string());
        let secs = format!("{seconds:.1}");
        let want = format!("x-forwarded-client-cert: URI={}", self.a.id);
        let mut load = self.a.ns.spawn_as(
            APP_UID,
            PYTHON,
            &["-c", LOAD_PY, &b_ip, &http, &tcp, &secs, &want],
        );
        load.wait_for_line("started", Duration::from_secs(10));
        load
    }

    /// The hand-made mesh client in the rogue namespace, presenting `cert`/`key`.
    fn tls_client(&self, cert: &Path, key: &Path, path: &str) -> String {
        let b_ip = self.b.ip.to_string();
        let port = APP_PORT.to_string();
        let out = self.rogue.exec(
            PYTHON,
            &[
                "-c",
                TLS_CLIENT_PY,
                &b_ip,
                &port,
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
                path,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    }
}

impl Pod {
    fn placeholder(ns: NetNs, ip: Ipv4Addr, id: &str, dir: &Path) -> Pod {
        let short = id.split('/').nth(1).unwrap_or("x").to_owned();
        Pod {
            sidecar: None,
            apps: Vec::new(),
            id: format!("spiffe://{TD}/{id}"),
            foreign: false,
            ip,
            config: dir.join(format!("{short}.yaml")),
            log: dir.join(format!("{short}-access.log")),
            ns,
        }
    }
}

fn ca_init(dir: &Path) {
    netns::run_ok(Command::new(OUTRIDER).args([
        "ca",
        "init",
        "--trust-domain",
        TD,
        "--out",
        dir.to_str().unwrap(),
    ]));
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A workload certificate for `id` made here with the root key in `ca_dir` (what a CA would
/// issue), valid from `from` to `until` seconds relative to now. Returns (cert, key) files.
fn issue_by_hand(ca_dir: &Path, id: &str, from: i64, until: i64, out: &Path) -> (PathBuf, PathBuf) {
    let root_pem = std::fs::read_to_string(ca_dir.join("root.pem")).unwrap();
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_file, key_file) = (out.with_extension("pem"), out.with_extension("key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file)
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether the bytes hold a TLS handshake record carrying a ClientHello: 0x16 0x03 0x0X, a
/// two-byte length, then handshake type 1.
fn has_client_hello(bytes: &[u8]) -> bool {
    bytes
        .windows(6)
        .any(|w| w[0] == 0x16 && w[1] == 0x03 && w[2] <= 0x04 && w[5] == 0x01)
}

#[test]
fn mesh_traffic_on_the_wire_is_tls_and_b_sees_a_identity() {
    let w = World::new(Opts {
        cert_ttl: None,
        with_c: false,
        impostor: false,
    });
    // Capture on B's veth: everything between the pods crosses it.
    let pcap = w.dir.path().join("b.pcap");
    let pcap_s = pcap.to_str().unwrap().to_owned();
    let mut tcpdump = w.b.ns.spawn(
        "sh",
        &[
            "-c",
            &format!(
                "exec tcpdump -i eth0 --immediate-mode -U -n -s 0 -Z root -w {pcap_s} tcp 2>&1"
            ),
        ],
    );
    tcpdump.wait_for_line("listening on", Duration::from_secs(10));

    let secret_path = "/api/secret-path-4f1d";
    let resp = Resp::parse(&w.curl_from(
        "a",
        &[
            "-H",
            "x-canary: plaintext-canary-77",
            // A forged identity from the calling app must not reach B's app.
            "-H",
            &format!("x-forwarded-client-cert: URI=spiffe://{TD}/ns/admin/sa/root"),
            &w.b_url(secret_path),
        ],
    ));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.seen_header("path").as_deref(), Some(secret_path));
    assert_eq!(
        resp.seen_header("x-forwarded-client-cert"),
        Some(format!("URI={}", w.a.id)),
        "B's app must see A's SPIFFE ID, and only it:\n{}",
        resp.body
    );
    let record = w.wait_log("b", "the mesh request", |r| field(r, "path") == secret_path);
    assert_eq!(field(&record, "peer_identity"), w.a.id, "{record}");

    // Control: plaintext HTTP sent by uid 1337 (not captured in A) crosses the same wire; the
    // capture must show it, or the check above would prove nothing. Strict B refuses it.
    let control = w.curl_in(
        &w.a.ns,
        Some(PROXY_UID),
        &[&w.b_url("/api/control-plaintext-93")],
    );
    assert!(
        !String::from_utf8_lossy(&control.stdout).contains("HTTP/1.1 200"),
        "strict B answered plaintext: {control:?}"
    );

    // Packets reach the file one by one (-U, --immediate-mode); the control is sent last.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !contains(&std::fs::read(&pcap).unwrap(), b"/api/control-plaintext-93")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(tcpdump);
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(
        contains(&bytes, b"/api/control-plaintext-93"),
        "the capture ({} bytes) does not even show plaintext sent in the clear",
        bytes.len()
    );
    for leak in [
        secret_path.as_bytes(),
        b"plaintext-canary-77",
        b"ns/admin/sa/root",
    ] {
        assert!(
            !contains(&bytes, leak),
            "{:?} crossed the wire between the pods in the clear",
            String::from_utf8_lossy(leak)
        );
    }
    assert!(
        has_client_hello(&bytes),
        "no TLS ClientHello record on the wire"
    );
    assert!(
        contains(&bytes, b"outrider-mesh"),
        "the ClientHello does not offer the mesh ALPN"
    );
}

#[test]
fn identity_path_and_method_authorization() {
    let w = World::new(Opts {
        cert_ttl: None,
        with_c: true,
        impostor: false,
    });
    let c_id = w.c.as_ref().unwrap().id.clone();
    let cases: [(&str, &[&str], &str, u16); 6] = [
        // A (ns/a/*) may GET /api/.
        ("a", &[], "/api/items", 200),
        // ...but not POST it, nor GET other paths, nor C's /public/.
        ("a", &["-X", "POST", "-d", "x=1"], "/api/items", 403),
        ("a", &[], "/admin/users", 403),
        ("a", &[], "/public/info", 403),
        // C may GET /public/ only.
        ("c", &[], "/public/info", 200),
        ("c", &[], "/api/items", 403),
    ];
    for (who, extra, path, want) in cases {
        let url = w.b_url(path);
        let mut args = extra.to_vec();
        args.push(&url);
        let resp = Resp::parse(&w.curl_from(who, &args));
        let caller = w.pod(who).id.clone();
        assert_eq!(
            resp.status, want,
            "{who} {extra:?} {path}: {:?}\n{}",
            resp.headers, resp.body
        );
        if want == 200 {
            assert_eq!(
                resp.seen_header("x-forwarded-client-cert"),
                Some(format!("URI={caller}")),
                "{}",
                resp.body
            );
        } else {
            let reason = resp
                .header("x-outrider-error")
                .unwrap_or_else(|| panic!("403 without x-outrider-error: {:?}", resp.headers));
            assert!(
                reason.contains(&caller) && reason.contains(path),
                "x-outrider-error {reason:?} should name {caller} and {path}"
            );
        }
    }
    assert!(c_id.ends_with("ns/c/sa/other"));
    let saw = w.app_saw();
    assert_eq!(
        saw.lines().collect::<Vec<_>>(),
        vec![
            format!("GET /api/items xfcc=URI={}", w.a.id),
            format!("GET /public/info xfcc=URI={c_id}"),
        ],
        "only the allowed requests may reach B's app"
    );

    // Plain TCP is authorized by identity and port: A may reach the echo port, C may not (its
    // connection is closed without an answer, and B logs who it was).
    let say_hello = |who: &str| -> String {
        let out = w.pod(who).ns.exec_as(
            APP_UID,
            PYTHON,
            &[
                "-c",
                SAY_HELLO_PY,
                &w.b.ip.to_string(),
                &ECHO_PORT.to_string(),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(say_hello("a"), "got:echo: hello");
    assert_eq!(say_hello("c"), "got:");
    let tcp_denied = w.wait_log("b", "C's refused TCP connection", |r| {
        field(r, "decision") == "deny" && field(r, "peer_identity") == c_id && r["method"].is_null()
    });
    assert!(
        field(&tcp_denied, "reason").contains(&format!("port {ECHO_PORT}")),
        "{tcp_denied}"
    );

    let denied = w.wait_log("b", "the denied POST", |r| {
        field(r, "decision") == "deny" && field(r, "method") == "POST"
    });
    assert_eq!(field(&denied, "peer_identity"), w.a.id, "{denied}");
}

#[test]
fn strict_refuses_plaintext_and_permissive_serves_it() {
    let mut w = World::new(Opts {
        cert_ttl: None,
        with_c: false,
        impostor: false,
    });
    let forged = format!("x-forwarded-client-cert: URI={}", w.a.id);
    // Strict: a plaintext client (no sidecar) gets nothing; B's app sees nothing.
    let out = w.curl_in(&w.rogue, None, &["-H", &forged, &w.b_url("/open/strict")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && !text.contains("HTTP/"),
        "strict B answered a plaintext client: {text}"
    );
    let record = w.wait_log("b", "the refused plaintext", |r| {
        field(r, "decision") == "deny" && field(r, "reason").contains("plaintext refused")
    });
    assert_eq!(field(&record, "direction"), "inbound", "{record}");
    // The mesh caller is served.
    let resp = Resp::parse(&w.curl_from("a", &[&w.b_url("/api/strict")]));
    assert_eq!(resp.status, 200, "{}", resp.body);

    // Permissive: the same plaintext request is served, without any caller identity (the
    // forged header is dropped); authorization still applies to it.
    w.write_config("b", "permissive");
    w.b.sidecar = None;
    w.start_sidecar("b");
    w.wait_ready("b");
    let resp = Resp::parse(&w.curl_in(
        &w.rogue,
        None,
        &["-H", &forged, &w.b_url("/open/permissive")],
    ));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.seen_header("x-forwarded-client-cert"),
        None,
        "{}",
        resp.body
    );
    let resp = Resp::parse(&w.curl_in(&w.rogue, None, &[&w.b_url("/api/permissive")]));
    assert_eq!(resp.status, 403, "{}", resp.body);
    assert!(
        resp.header("x-outrider-error")
            .unwrap_or_default()
            .contains("unauthenticated"),
        "{:?}",
        resp.headers
    );
    // ...and mesh callers still get mTLS and their identity.
    let resp = Resp::parse(&w.curl_from("a", &[&w.b_url("/api/permissive-mesh")]));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.seen_header("x-forwarded-client-cert"),
        Some(format!("URI={}", w.a.id))
    );

    let saw = w.app_saw();
    assert!(!saw.contains("/open/strict"), "{saw}");
    assert!(saw.contains("GET /open/permissive xfcc=none"), "{saw}");
    assert!(!saw.contains("/api/permissive "), "{saw}");
}

#[test]
fn foreign_and_expired_certificates_are_refused() {
    let w = World::new(Opts {
        cert_ttl: None,
        with_c: false,
        impostor: true,
    });
    let other_ca = w.other_ca.clone();
    let id = w.a.id.clone();
    let d = w.dir.path();
    let good = issue_by_hand(&w.ca_dir, &id, -60, 3600, &d.join("good"));
    let foreign = issue_by_hand(&other_ca, &id, -60, 3600, &d.join("foreign"));
    let expired = issue_by_hand(&w.ca_dir, &id, -7200, -3600, &d.join("expired"));

    // Control: the hand-made client with a certificate from the mesh CA is served, so a
    // refusal below is about the certificate and nothing else.
    let out = w.tls_client(&good.0, &good.1, "/api/tls-good");
    assert!(out.starts_with("response:HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("x-forwarded-client-cert: URI={id}")),
        "{out}"
    );

    // Another root with the same trust domain and name: its signature does not verify. An
    // expired certificate from the right root: refused for its validity.
    for (what, (cert, key), why) in [
        ("foreign", &foreign, "invalid peer certificate"),
        ("expired", &expired, "expired"),
    ] {
        let before = w
            .log_lines("b")
            .iter()
            .filter(|r| field(r, "reason").contains("mTLS handshake refused"))
            .count();
        let path = format!("/api/tls-{what}");
        let out = w.tls_client(cert, key, &path);
        assert!(
            !out.contains("HTTP/1.1"),
            "B answered a client with a {what} certificate: {out}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let refusal = loop {
            let refusals: Vec<Value> = w
                .log_lines("b")
                .into_iter()
                .filter(|r| field(r, "reason").contains("mTLS handshake refused"))
                .collect();
            if refusals.len() > before {
                break refusals[before].clone();
            }
            assert!(
                Instant::now() < deadline,
                "B logged no refused handshake for the {what} certificate"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(field(&refusal, "decision"), "deny", "{refusal}");
        assert!(field(&refusal, "reason").contains(why), "{refusal}");
        eprintln!("{what}: client saw {out}; B logged {refusal}");
        assert!(
            !w.app_saw().contains(&path),
            "a request with a {what} certificate reached B's app"
        );
    }

    // A whole sidecar with A's name but a certificate from the other CA (it trusts both roots,
    // so it accepts B and only B's check can stop it): its app gets an error, B's app nothing.
    let d_ip = w.pod("d").ip.to_string();
    let resp = Resp::parse(&w.curl_from("d", &[&w.b_url("/api/impostor")]));
    eprintln!("impostor: {} {:?}", resp.status, resp.headers);
    assert_eq!(resp.status, 502, "{:?}\n{}", resp.headers, resp.body);
    assert!(
        resp.header("x-outrider-error").is_some(),
        "{:?}",
        resp.headers
    );
    let refusal = w.wait_log("b", "the impostor's handshake", |r| {
        field(r, "client").starts_with(&format!("{d_ip}:"))
    });
    assert_eq!(field(&refusal, "decision"), "deny", "{refusal}");
    assert!(
        field(&refusal, "reason").contains("mTLS handshake refused"),
        "{refusal}"
    );
    assert!(!w.app_saw().contains("/api/impostor"), "{}", w.app_saw());
}

/// Reads `outrider_identity_cert_expiry_timestamp_seconds` from a metrics page.
fn expiry_metric(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with("outrider_identity_cert_expiry_timestamp_seconds"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `outrider_identity_cert_requests_total{result="error"}`, 0 when absent.
fn cert_request_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("outrider_identity_cert_requests_total") && l.contains("result=\"error\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn certificates_renew_under_continuous_traffic_without_losing_a_request() {
    let w = World::new(Opts {
        cert_ttl: Some("30s"),
        with_c: false,
        impostor: false,
    });
    let (a0, _) = w.certs("a");
    let now = now_unix();
    assert!(
        a0 <= now + 31,
        "cert_ttl 30s gave a certificate valid until {a0} (now {now})"
    );
    let seconds = 70.0;
    let mut load = w.start_load(seconds);
    let mut seen: [BTreeSet<u64>; 2] = [BTreeSet::new(), BTreeSet::new()];
    let mut chains: [BTreeSet<String>; 2] = [BTreeSet::new(), BTreeSet::new()];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        for (i, who) in ["a", "b"].into_iter().enumerate() {
            let (not_after, chain) = w.certs(who);
            seen[i].insert(not_after);
            chains[i].insert(chain);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let done = load.wait_for_line("DONE ", Duration::from_secs(60));
    let res: Value = serde_json::from_str(done.trim_start_matches("DONE ")).unwrap();
    eprintln!("load across renewals: {res}; not_after seen: {seen:?}");
    assert_eq!(res["fail"], 0, "requests failed across renewals: {res}");
    assert!(res["http_ok"].as_u64().unwrap() >= 100, "{res}");
    assert!(res["tcp_ok"].as_u64().unwrap() >= 100, "{res}");
    assert!(res["long_ok"].as_u64().unwrap() >= 100, "{res}");
    for (i, who) in ["a", "b"].into_iter().enumerate() {
        assert!(
            seen[i].len() >= 3 && chains[i].len() >= 3,
            "{who}'s certificate should have been renewed at least twice in {seconds}s: {:?}",
            seen[i]
        );
        let metric = expiry_metric(&w.metrics(who)).expect("no expiry metric");
        let last = *seen[i].iter().max().unwrap();
        assert!(
            metric >= last as f64 && metric > a0 as f64,
            "{who}: the expiry metric {metric} does not follow the renewed certificate ({last})"
        );
    }
}

#[test]
fn ca_down_does_not_stop_traffic_and_renewal_resumes() {
    let mut w = World::new(Opts {
        cert_ttl: Some("30s"),
        with_c: false,
        impostor: false,
    });
    let (a0, _) = w.certs("a");
    let (b0, _) = w.certs("b");
    // Stop the CA: nothing can be issued or renewed now.
    w.ca = None;
    assert!(!w.ca_reachable(), "the CA still answers");
    // Traffic until shortly before the first certificate runs out: the renewals due at ~2/3
    // of the lifetime fail in that window.
    let seconds = a0.min(b0) as f64 - now_unix() as f64 - 4.0;
    assert!(seconds >= 15.0, "only {seconds}s of certificate left");
    let mut load = w.start_load(seconds);
    let done = load.wait_for_line("DONE ", Duration::from_secs_f64(seconds + 60.0));
    let res: Value = serde_json::from_str(done.trim_start_matches("DONE ")).unwrap();
    eprintln!("load with the CA down for {seconds}s: {res}");
    assert_eq!(
        res["fail"], 0,
        "requests failed while the CA was down: {res}"
    );
    assert!(res["http_ok"].as_u64().unwrap() >= 20, "{res}");
    assert!(res["tcp_ok"].as_u64().unwrap() >= 20, "{res}");
    assert!(res["long_ok"].as_u64().unwrap() >= 20, "{res}");
    for (who, first) in [("a", a0), ("b", b0)] {
        assert!(
            w.ready(who),
            "{who} stopped being ready while its certificate is valid"
        );
        assert_eq!(
            w.certs(who).0,
            first,
            "{who} got a certificate with the CA down?"
        );
        let errors = cert_request_errors(&w.metrics(who));
        assert!(
            errors >= 1.0,
            "{who} never tried to renew while the CA was down (errors {errors})"
        );
    }

    // A sidecar that starts while the CA is down has no certificate: it must not say ready,
    // and its app's calls into the mesh must fail with a reason, never go out in plaintext.
    w.a.sidecar = None;
    w.start_sidecar("a");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!w.ready("a"), "A says ready without a certificate");
    let a_ip = w.a.ip.to_string();
    let out = w.curl_from("a", &[&w.b_url("/api/without-certificate")]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    eprintln!("A without a certificate: {text}");
    assert!(!text.contains(" 200 "), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    let plaintext_from_a: Vec<Value> = w
        .log_lines("b")
        .into_iter()
        .filter(|r| {
            field(r, "client").starts_with(&format!("{a_ip}:"))
                && field(r, "reason").contains("plaintext")
        })
        .collect();
    assert!(
        plaintext_from_a.is_empty(),
        "A without a certificate fell back to plaintext: {plaintext_from_a:?}"
    );
    assert!(!w.app_saw().contains("/api/without-certificate"));

    // The CA comes back: both sidecars get certificates on their own and traffic flows.
    w.start_ca();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (who, first) in [("a", a0), ("b", b0)] {
        loop {
            if w.ready(who) && w.certs(who).0 > first {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{who} did not get a new certificate after the CA came back"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let resp = Resp::parse(&w.curl_from("a", &[&w.b_url("/api/after-ca-outage")]));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        resp.seen_header("x-forwarded-client-cert"),
        Some(format!("URI={}", w.a.id))
    );
}
