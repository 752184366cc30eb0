//! Network namespaces for root-only tests: real interfaces, real iptables, real sockets, and
//! nothing left behind on the host.
//!
//! ```ignore
//! mod common;
//! use common::netns::{self, NetNs};
//!
//! netns::require_root(); // panics with a clear message when not root
//! let pod = NetNs::new("pod");
//! let outside = NetNs::new("outside");
//! let link = netns::link(&outside, &pod); // outside = 10.77.N.1, pod = 10.77.N.2 (and fd77:0:0:N::1/2)
//! let _server = netns::tag_server(&outside, &link.a_ip.to_string(), 8000, "server");
//! let reply = netns::tcp_probe(&pod, Some(netns::PROXY_UID), &link.a_ip.to_string(), 8000);
//! assert_eq!(reply.unwrap().tag, "server");
//! ```
//!
//! Every name (namespace, interface) and subnet is unique within the test process, and veth
//! ends are created directly inside the namespaces, so tests may run in parallel with each
//! other and with other test processes. Namespaces are deleted on drop, and background
//! processes are killed on drop; declare the namespace before the processes that run in it so
//! the processes go first.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// The uid that Outrider runs as and that the capture rules leave alone.
pub const PROXY_UID: u32 = 1337;

/// A python3 that every uid can run (pyenv shims under /root are not readable by uid 1337).
pub const PYTHON: &str = "/usr/bin/python3";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// True when the test runs as root (effective uid 0).
pub fn is_root() -> bool {
    // /proc/self/status has "Uid:\treal\teffective\tsaved\tfs"; reading it needs no unsafe code.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Panics unless the test runs as root: a root-only test must fail, never pass silently.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces and iptables); run it as root, \
         e.g. `sudo -E cargo test --test <name>` or in CI, which runs as root"
    );
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| spawn_failed(&format!("{cmd:?}"), &e));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spawn_failed(what: &str, err: &std::io::Error) -> ! {
    panic!("cannot start {what}: {err}")
}

/// True when `program` can be started (it is on PATH and runs `--version`).
pub fn has_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace with loopback up, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>`; panics (with a clear message) when not root.
    pub fn new(prefix: &str) -> NetNs {
        require_root();
        let name = format!("{prefix}-{}-{}", std::process::id(), next_id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        run_ok(&mut ns.command("ip", &["link", "set", "lo", "up"]));
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program args` inside the namespace, as root.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// A command that runs `program args` inside the namespace as `uid` (and the same gid, no
    /// supplementary groups), the way the sidecar runs as uid 1337.
    pub fn command_as(&self, uid: u32, program: &str, args: &[&str]) -> Command {
        let id = uid.to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "setpriv", "--reuid", &id])
            .args(["--regid", &id, "--clear-groups", "--", program])
            .args(args);
        cmd
    }

    /// Runs a command in the namespace and returns its output, whatever its exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(program, args);
        cmd.output()
            .unwrap_or_else(|e| spawn_failed(&format!("{cmd:?}"), &e))
    }

    /// Runs a command in the namespace, panics if it fails, and returns its stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        run_ok(&mut self.command(program, args))
    }

    /// Runs a command in the namespace as `uid` and returns its output.
    pub fn exec_as(&self, uid: u32, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command_as(uid, program, args);
        cmd.output()
            .unwrap_or_else(|e| spawn_failed(&format!("{cmd:?}"), &e))
    }

    /// Starts a command in the namespace in the background; it is killed on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Background {
        Background::start(self.command(program, args))
    }

    /// Starts a command in the namespace as `uid` in the background; it is killed on drop.
    pub fn spawn_as(&self, uid: u32, program: &str, args: &[&str]) -> Background {
        Background::start(self.command_as(uid, program, args))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Best effort: a failure here must not hide the test's own panic.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("warning: could not delete netns {}: {other:?}", self.name),
        }
    }
}

/// A background process whose stdout lines can be awaited; killed and reaped on drop.
pub struct Background {
    child: Child,
    lines: Receiver<String>,
    what: String,
}

impl Background {
    /// Starts `cmd` with stdout captured line by line; stderr goes to the test's stderr.
    pub fn start(mut cmd: Command) -> Background {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| spawn_failed(&what, &e));
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Background { child, lines, what }
    }

    /// Waits until a stdout line contains `needle`; panics after `timeout` or if the process
    /// exits first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        self.lines_until(needle, timeout).pop().unwrap_or_default()
    }

    /// The stdout lines up to and including the first that contains `needle`; panics as
    /// [`Background::wait_for_line`] does.
    pub fn lines_until(&mut self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{} printed no line with {needle:?} within {timeout:?}",
                        self.what
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "{} exited ({status:?}) before printing {needle:?}",
                        self.what
                    )
                }
            }
        }
    }

    /// The exit status, once the process has exited on its own within `timeout`.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The stdout lines printed since the last call (or since `ready`), without waiting.
    pub fn lines_so_far(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The process id (of the program itself: `ip netns exec` and `setpriv` exec into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Already exited is fine; the point is that nothing outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A /24 (and a /64) that no other link in this test process uses: 10.77.N.0/24 and
/// fd77:0:0:N::/64. Only ever configured inside namespaces the tests create.
#[derive(Clone, Copy, Debug)]
pub struct Subnet {
    n: u8,
}

impl Subnet {
    /// The next unused subnet (up to 250 per test process).
    pub fn unique() -> Subnet {
        let id = next_id();
        assert!(id < 250, "ran out of 10.77.N.0/24 test subnets");
        // Start at an offset from the pid so that parallel test processes tend to differ
        // too, which makes their packets easier to tell apart in a capture.
        let n = (std::process::id() % 5 * 50 + id) % 250 + 1;
        Subnet {
            n: u8::try_from(n).unwrap_or(1),
        }
    }

    /// 10.77.N.host
    pub fn v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.n, host)
    }

    /// fd77:0:0:N::host
    pub fn v6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, u16::from(self.n), 0, 0, 0, u16::from(host))
    }
}

/// The two ends of a veth pair, each in its own namespace.
#[derive(Clone, Debug)]
pub struct Veth {
    /// Interface name in namespace `a`.
    pub a_if: String,
    /// Interface name in namespace `b`.
    pub b_if: String,
    /// IPv4 address of the `a` end.
    pub a_ip: Ipv4Addr,
    /// IPv4 address of the `b` end.
    pub b_ip: Ipv4Addr,
    /// IPv6 address of the `a` end, when the pair has one.
    pub a_ip6: Option<Ipv6Addr>,
    /// IPv6 address of the `b` end, when the pair has one.
    pub b_ip6: Option<Ipv6Addr>,
}

/// Connects `a` and `b` with a veth pair carrying the given IPv4 addresses ("10.77.x.1/24").
pub fn veth_pair(a: &NetNs, a_cidr: &str, b: &NetNs, b_cidr: &str) -> Veth {
    let id = next_id();
    let (a_if, b_if) = (format!("ora{id}"), format!("orb{id}"));
    // Created directly inside both namespaces: the host never sees these interfaces.
    run_ok(
        Command::new("ip")
            .args(["link", "add", "name", &a_if, "netns", a.name()])
            .args(["type", "veth", "peer", "name", &b_if, "netns", b.name()]),
    );
    for (ns, ifname, cidr) in [(a, &a_if, a_cidr), (b, &b_if, b_cidr)] {
        ns.exec_ok("ip", &["addr", "add", cidr, "dev", ifname]);
        ns.exec_ok("ip", &["link", "set", ifname, "up"]);
    }
    let ip = |cidr: &str| -> Ipv4Addr {
        cidr.split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{cidr:?} is not an IPv4 CIDR"))
    };
    Veth {
        a_ip: ip(a_cidr),
        b_ip: ip(b_cidr),
        a_if,
        b_if,
        a_ip6: None,
        b_ip6: None,
    }
}

/// Connects `a` (.1) and `b` (.2) on a fresh [`Subnet`], IPv4 and IPv6.
pub fn link(a: &NetNs, b: &NetNs) -> Veth {
    let net = Subnet::unique();
    let mut veth = veth_pair(
        a,
        &format!("{}/24", net.v4(1)),
        b,
        &format!("{}/24", net.v4(2)),
    );
    for (ns, ifname, ip) in [(a, &veth.a_if, net.v6(1)), (b, &veth.b_if, net.v6(2))] {
        // nodad: the address is usable at once instead of after duplicate detection.
        ns.exec_ok(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                ifname,
                "nodad",
            ],
        );
    }
    veth.a_ip6 = Some(net.v6(1));
    veth.b_ip6 = Some(net.v6(2));
    veth
}

/// A TCP server (IPv6 sockets are IPv6-only) that answers each connection with one line
/// `<tag> orig=<original destination> peer=<client address>` and closes it.
/// The original destination comes from `SO_ORIGINAL_DST` (what an iptables REDIRECT
/// replaced), or is `none` when the connection has no conntrack entry.
const TAG_SERVER_PY: &str = r#"
import socket, struct, sys
host, port, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((host, port))
s.listen(64)
print("ready", flush=True)
SO_ORIGINAL_DST = 80
def original_dst(c):
    try:
        if fam == socket.AF_INET:
            port, addr = struct.unpack("!2xH4s8x", c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, addr), port)
        port, addr = struct.unpack("!2xH4x16s4x", c.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28))
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, addr), port)
    except OSError:
        return "none"
while True:
    c, peer = s.accept()
    with c:
        c.sendall(("%s orig=%s peer=%s\n" % (tag, original_dst(c), peer[0])).encode())
"#;

/// Connects, prints the first line the server sends, exits 1 with the error otherwise.
const PROBE_PY: &str = r#"
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    sys.stdout.write(data.decode())
except OSError as e:
    print("connect to %s:%s failed: %s" % (sys.argv[1], sys.argv[2], e), file=sys.stderr)
    sys.exit(1)
"#;

/// Starts a [tag server](TAG_SERVER_PY) on `host:port` inside `ns` and waits until it listens.
pub fn tag_server(ns: &NetNs, host: &str, port: u16, tag: &str) -> Background {
    let mut server = ns.spawn(PYTHON, &["-c", TAG_SERVER_PY, host, &port.to_string(), tag]);
    server.wait_for_line("ready", Duration::from_secs(10));
    server
}

/// What a tag server answered: which server took the connection and what it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagReply {
    /// The tag of the server that accepted the connection.
    pub tag: String,
    /// The original destination (`ip:port` or `[ip6]:port`), or `none`.
    pub orig: String,
    /// The client's address as the server saw it.
    pub peer: String,
}

/// Connects from inside `ns` (as `uid`, or root when `None`) to `host:port` and returns the
/// tag server's reply, or the client's error message.
pub fn tcp_probe(ns: &NetNs, uid: Option<u32>, host: &str, port: u16) -> Result<TagReply, String> {
    let port = port.to_string();
    let line = probe(ns, uid, &["-c", PROBE_PY, host, &port])?;
    let mut words = line.split(' ');
    let tag = words.next().unwrap_or_default().to_owned();
    let mut field = |key: &str| {
        words
            .next()
            .and_then(|w| w.strip_prefix(key))
            .map(str::to_owned)
            .ok_or_else(|| format!("unexpected reply {line:?}"))
    };
    let orig = field("orig=")?;
    let peer = field("peer=")?;
    Ok(TagReply { tag, orig, peer })
}

/// A UDP server that answers each datagram with `pong` and prints `got <peer address>`.
const UDP_ECHO_PY: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    print("got %s" % peer[0], flush=True)
    s.sendto(b"pong", peer)
"#;

/// Sends one datagram and prints the answer; exits 1 with the error (a send refused by the
/// local firewall fails at once with "Operation not permitted") or after 3 s of silence.
const UDP_PROBE_PY: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.connect((host, port))
    s.send(b"ping")
    sys.stdout.write(s.recv(100).decode())
except OSError as e:
    print("udp to %s:%s failed: %s" % (host, port, e), file=sys.stderr)
    sys.exit(1)
"#;

/// Starts a [UDP echo server](UDP_ECHO_PY) on `host:port` inside `ns`.
pub fn udp_echo_server(ns: &NetNs, host: &str, port: u16) -> Background {
    let mut server = ns.spawn(PYTHON, &["-c", UDP_ECHO_PY, host, &port.to_string()]);
    server.wait_for_line("ready", Duration::from_secs(10));
    server
}

/// Sends a datagram from inside `ns` (as `uid`, or root) to a [`udp_echo_server`]: its
/// answer, or the client's error.
pub fn udp_probe(ns: &NetNs, uid: Option<u32>, host: &str, port: u16) -> Result<String, String> {
    let port = port.to_string();
    probe(ns, uid, &["-c", UDP_PROBE_PY, host, &port])
}

/// An ICMP echo request on a raw socket (root only) and its reply; exits 1 with the error.
const PING_PY: &str = r#"
import os, socket, struct, sys
host = sys.argv[1]
v6 = ":" in host
# An identifier of its own: conntrack would take a repeated one for the earlier exchange.
ident = os.getpid() & 0xffff
def checksum(b):
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    packet = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + b"outrider"  # the kernel sums ICMPv6
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"outrider"
    packet = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
s.settimeout(3)
try:
    s.sendto(packet, (host, 0))
    while True:
        data = s.recv(2048)
        icmp = data if v6 else data[(data[0] & 15) * 4:]
        if icmp[0] == (129 if v6 else 0):
            print("echo reply")
            break
except OSError as e:
    print("ping %s failed: %s" % (host, e), file=sys.stderr)
    sys.exit(1)
"#;

/// Pings `host` from inside `ns` as root: `Ok` on an echo reply, else the error.
pub fn icmp_probe(ns: &NetNs, host: &str) -> Result<String, String> {
    probe(ns, None, &["-c", PING_PY, host])
}

/// Runs a probe script in `ns`: its stdout when it succeeds, its stderr when it fails.
fn probe(ns: &NetNs, uid: Option<u32>, args: &[&str]) -> Result<String, String> {
    let out = match uid {
        Some(uid) => ns.exec_as(uid, PYTHON, args),
        None => ns.exec(PYTHON, args),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A `curl -i` response: status, headers (names lower-cased), body.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn parse(out: &Output) -> Resp {
        let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
        assert!(
            out.status.success(),
            "curl failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Resp {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A request header as an echoing server saw it (its body has `name: value` lines).
    pub fn seen_header(&self, name: &str) -> Option<String> {
        self.body.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then(|| v.to_owned())
        })
    }
}

pub fn field<'a>(record: &'a serde_json::Value, key: &str) -> &'a str {
    record[key].as_str().unwrap_or("")
}

/// `/etc/netns/<ns>/`, which `ip netns exec` mounts over /etc's files; removed on drop.
pub struct EtcOverlay(std::path::PathBuf);

impl EtcOverlay {
    /// `hosts`, and `resolv.conf` when given (else the machine's shows through).
    pub fn new(ns: &NetNs, hosts: &str, resolv: Option<&str>) -> EtcOverlay {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns.name());
        let write = |name: &str, text: &str| {
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join(name), text))
                .unwrap_or_else(|e| panic!("cannot write {dir:?}/{name}: {e}"));
        };
        write("hosts", hosts);
        if let Some(text) = resolv {
            write("resolv.conf", text);
        }
        EtcOverlay(dir)
    }
}

impl Drop for EtcOverlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
