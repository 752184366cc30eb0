//! Names that `dns.hosts` does not list go to the system resolver (hickory, with resolv.conf
//! and /etc/hosts). These tests run the real binary in a network namespace whose /etc/hosts
//! is its own (`ip netns exec` mounts `/etc/netns/<name>/hosts` over it), so a name resolves
//! through the same path as in production without touching the machine's files or the network.
//!
//! Run: `sudo -E cargo test --test netns_dns` (CI runs as root). Without root every test fails
//! saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::panic,
    reason = "a test reports an unexpected outcome by panicking"
)]

mod common;

use std::time::{Duration, Instant};

use common::netns::{self, Background, EtcOverlay, NetNs, Resp, PROXY_UID, PYTHON};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");

/// A resolv.conf naming the namespace's [DNS server](DNS_PY), quick to give up on it.
const LOCAL_RESOLVER: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

/// A DNS server on 127.0.0.1:53 (UDP) for the names given as `name=ipv4[,ipv4…][/ttl]`
/// arguments: an A record with that TTL (60 s when not given; each A query gets the next of a
/// list, as a CDN's rotating answers do), no AAAA record (an empty answer without an SOA, as
/// some servers send, so a resolver cannot cache the absence), `NXDOMAIN` for any other name,
/// and no answer at all for names whose first label starts with `silent`. Prints
/// `query <name> <type>` for each question.
const DNS_PY: &str = r#"
import socket, struct, sys
zone, ttl = {}, {}
for arg in sys.argv[1:]:
    name, value = arg.split("=")
    addrs, _, seconds = value.partition("/")
    zone[name], ttl[name] = addrs.split(","), int(seconds or 60)
asked = {}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    tid, flags = struct.unpack("!HH", data[:4])
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1:i + 1 + data[i]].decode())
        i += 1 + data[i]
    qtype = struct.unpack("!H", data[i + 1:i + 3])[0]
    question = data[12:i + 5]
    name = ".".join(labels).lower()
    print("query %s %d" % (name, qtype), flush=True)
    if name.startswith("silent"):
        continue
    answer = b""
    if name in zone and qtype == 1:
        n = asked.get(name, 0)
        asked[name] = n + 1
        ip = zone[name][n % len(zone[name])]
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl[name], 4) + socket.inet_aton(ip)
    rcode = 0 if name in zone else 3
    head = struct.pack("!HHHHHH", tid, 0x8580 | (flags & 0x0100) | rcode, 1, 1 if answer else 0, 0, 0)
    s.sendto(head + question + answer, peer)
"#;

/// Waits until the proxy in `ns` answers `/ready` on the admin port.
fn wait_ready(ns: &NetNs) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns
        .exec(
            "curl",
            &["-sf", "-o", "/dev/null", "http://127.0.0.1:15000/ready"],
        )
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the proxy did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The access-log records written to `path` so far.
fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A namespace with its own /etc/hosts, a static HTTP server on 127.0.0.1:8000 serving
/// `hello.txt`, and the proxy allowing `*.internal` there (and nothing else) in `mode`
/// (`enforce` or `report`).
struct World {
    ns: NetNs,
    _servers: Vec<Background>,
    /// The [DNS server](DNS_PY), when the namespace has one.
    dns: Option<Background>,
    _etc: EtcOverlay,
    dir: tempfile::TempDir,
}

impl World {
    fn new(hosts: &str, mode: &str) -> World {
        Self::with_dns(hosts, None, &[], mode)
    }

    /// With `dns`: the namespace's resolv.conf and the records of its [DNS server](DNS_PY);
    /// `allow`: more names to allow (on port 8000, like the rest).
    fn with_dns(hosts: &str, dns: Option<(&str, &[&str])>, allow: &[&str], mode: &str) -> World {
        let ns = NetNs::new("ordns");
        let etc = EtcOverlay::new(&ns, hosts, dns.map(|(resolv, _)| resolv));
        let dns = dns.map(|(_, records)| {
            let mut server = ns.spawn(PYTHON, &[&["-u", "-c", DNS_PY], records].concat());
            server.wait_for_line("ready", Duration::from_secs(10));
            server
        });
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("hello.txt"), "hello from the app\n").unwrap();
        let root_arg = root.to_str().unwrap();
        let mut web = ns.spawn(
            PYTHON,
            &["-u", "-m", "http.server", "8000", "--bind", "127.0.0.1"]
                .into_iter()
                .chain(["--directory", root_arg])
                .collect::<Vec<_>>(),
        );
        web.wait_for_line("Serving HTTP", Duration::from_secs(10));
        let config = dir.path().join("outrider.yaml");
        let log = dir.path().join("access.log");
        std::fs::write(
            &config,
            format!(
                "admin: {{ listen: 127.0.0.1:15000 }}\n\
                 outbound:\n  listen: 127.0.0.1:15001\n  egress:\n    mode: {mode}\n    allow:\n\
                 \x20     - host: \"*.internal\"\n        ports: [8000]\n\
                 {}\
                 \x20     - cidr: 127.0.0.1/32\n        ports: [8000]\n\
                 access_log: {{ output: {} }}\n",
                allow
                    .iter()
                    .map(|h| format!("      - host: {h}\n        ports: [8000]\n"))
                    .collect::<String>(),
                log.display()
            ),
        )
        .unwrap();
        let proxy = ns.spawn(OUTRIDER, &["run", "--config", config.to_str().unwrap()]);
        let w = World {
            ns,
            _servers: vec![web, proxy],
            dns,
            _etc: etc,
            dir,
        };
        wait_ready(&w.ns);
        w
    }

    /// The access log's last record, once one is written (the log is written behind).
    fn last_record(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = records(&self.dir.path().join("access.log")).pop() {
                return record;
            }
            assert!(Instant::now() < deadline, "no access-log record");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Reloads the proxy (SIGHUP) with one more allowed name, `name`, and waits until it
    /// applies.
    fn reload(&self, name: &str) {
        let path = self.dir.path().join("outrider.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap().replace(
            "access_log:",
            &format!("      - host: {name}\n        ports: [8000]\naccess_log:"),
        );
        std::fs::write(&path, yaml).unwrap();
        let pid = self._servers[1].pid().to_string();
        netns::run_ok(std::process::Command::new("kill").args(["-HUP", &pid]));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .ns
                .exec("curl", &["-s", "http://127.0.0.1:15000/config"]);
            if String::from_utf8_lossy(&out.stdout).contains(name) {
                return;
            }
            assert!(Instant::now() < deadline, "the reload was not applied");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The DNS server's `query <name> <type>` lines since the last call, up to the question
    /// for `<end>.internal`, a name it does not have, asked now through the proxy: so every
    /// question asked before it is in.
    fn questions(&mut self, end: &str) -> Vec<String> {
        let resp = self.get(&format!("http://{end}.internal:8000/hello.txt"));
        assert_eq!(resp.status, 502, "{}", resp.body);
        self.dns
            .as_mut()
            .unwrap()
            .lines_until(&format!("query {end}.internal "), Duration::from_secs(10))
    }

    /// `curl -i` through the explicit proxy, inside the namespace.
    fn get(&self, url: &str) -> Resp {
        Resp::parse(&self.ns.exec(
            "curl",
            &[
                "-s",
                "-i",
                "--max-time",
                "10",
                "--noproxy",
                "",
                "-x",
                "http://127.0.0.1:15001",
                url,
            ],
        ))
    }
}

#[test]
fn a_name_with_an_underscore_resolves_through_the_system_resolver() {
    // Underscores are common in internal names (and valid DNS); getaddrinfo, curl and the
    // peer proxies resolve them. hickory's string conversion ran IDNA and refused them.
    let w = World::new(
        "127.0.0.1 localhost\n127.0.0.1 my_svc.internal plain.internal\n",
        "enforce",
    );
    let resp = w.get("http://My_Svc.internal:8000/hello.txt");
    assert_eq!(
        resp.status,
        200,
        "x-outrider-error: {:?}\n{}",
        resp.header("x-outrider-error"),
        resp.body
    );
    assert_eq!(resp.body, "hello from the app\n");
    // The same path without an underscore, so that the test shows the resolver works here.
    let resp = w.get("http://plain.internal:8000/hello.txt");
    assert_eq!(resp.status, 200, "{}", resp.body);
    // A name the hosts file does not have is a 502 naming it, not a 200 from somewhere else:
    // the namespace has no route to any DNS server.
    let resp = w.get("http://missing_svc.internal:8000/hello.txt");
    assert_eq!(resp.status, 502, "{}", resp.body);
    let reason = resp.header("x-outrider-error").unwrap_or_default();
    assert!(reason.contains("missing_svc.internal"), "{reason:?}");
}

#[test]
fn a_dual_stack_name_is_reached_over_ipv4_when_ipv6_has_no_route() {
    // Public names often have an AAAA record where the workload has no IPv6 route (Docker's
    // default network, most clusters), and the resolver answers AAAA first, as getaddrinfo
    // does. curl tries the next address; the proxy dialled only the first, and every request
    // for such a name was a 502 "Network is unreachable". Here the namespace has no route
    // at all but loopback, so nothing can leave the machine.
    let hosts = "127.0.0.1 localhost\n\
                 2001:db8::5 dual.internal dual.other\n127.0.0.1 dual.internal dual.other\n";
    let w = World::new(hosts, "enforce");
    let resp = w.get("http://dual.internal:8000/hello.txt");
    assert_eq!(resp.status, 200, "{:?}", resp.header("x-outrider-error"));
    assert_eq!(resp.body, "hello from the app\n");
    let record = w.last_record();
    assert_eq!(record["upstream"], "127.0.0.1:8000", "{record}");
    assert_eq!(
        record["rule"], "allow[0] host *.internal + allow[1] cidr 127.0.0.1/32",
        "{record}"
    );

    // Report mode lets a denied name through to where it resolves: the same holds there.
    drop(w);
    let w = World::new(hosts, "report");
    let resp = w.get("http://dual.other:8000/hello.txt");
    assert_eq!(resp.status, 200, "{:?}", resp.header("x-outrider-error"));
    let record = w.last_record();
    assert_eq!(record["decision"], "report", "{record}");
    assert_eq!(record["upstream"], "127.0.0.1:8000", "{record}");
}

#[test]
fn short_names_resolve_in_the_search_domains_as_written_names_do_not() {
    // Kubernetes apps call services by short names (`web`, `api.ns2`) that resolve only under
    // resolv.conf's search domains. Every name was looked up as written, so through the
    // explicit proxy each was a 502.
    let resolv = "nameserver 127.0.0.1\n\
                  search ns1.svc.cluster.local svc.cluster.local\n\
                  options timeout:1 attempts:1 ndots:5\n";
    let records = [
        "web.ns1.svc.cluster.local=127.0.0.1",
        "api.ns2.svc.cluster.local=127.0.0.1",
        "pub.example=127.0.0.1",
        // Under ndots:5 glibc would take this one; only 127.0.0.1 is allowed.
        "pub.example.ns1.svc.cluster.local=127.0.0.2",
    ];
    let allow = [
        "web",
        "api.ns2",
        "pub.example",
        "nope",
        "silent.example",
        "silenthost",
    ];
    let mut w = World::with_dns(
        "127.0.0.1 localhost\n127.0.0.1 silenthost\n",
        Some((resolv, &records)),
        &allow,
        "enforce",
    );
    for url in [
        "http://web:8000/hello.txt",
        "http://api.ns2:8000/hello.txt",
        "http://pub.example:8000/hello.txt",
    ] {
        let resp = w.get(url);
        assert_eq!(
            resp.status,
            200,
            "{url}: {:?}\n{}",
            resp.header("x-outrider-error"),
            resp.body
        );
        assert_eq!(resp.body, "hello from the app\n", "{url}");
    }
    // A name no domain has is a 502 naming it.
    let resp = w.get("http://nope:8000/hello.txt");
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert!(resp
        .header("x-outrider-error")
        .unwrap_or_default()
        .contains("nope"));

    // A lookup that times out is not repeated under each search domain.
    let dns = w.dns.as_mut().unwrap();
    dns.lines_so_far();
    let resp = w.get("http://silent.example:8000/hello.txt");
    assert_eq!(resp.status, 502, "{}", resp.body);
    let queries = w.dns.as_mut().unwrap().lines_so_far();
    assert!(
        queries
            .iter()
            .any(|q| q.starts_with("query silent.example ")),
        "{queries:?}"
    );
    assert!(
        queries.iter().all(|q| !q.contains("svc.cluster.local")),
        "searched after a timeout: {queries:?}"
    );

    // A name the hosts file lists is answered from it, whatever the DNS server does.
    let resp = w.get("http://silenthost:8000/hello.txt");
    assert_eq!(
        resp.status,
        200,
        "{:?}\n{}",
        resp.header("x-outrider-error"),
        resp.body
    );
}

/// A transparent connection whose Host the proxy's cached answer lacks, because the app
/// resolved the name itself and got the next of a rotating record set (as CDNs answer): it
/// was refused as forged; the proxy asks the DNS server again first. A Host that no answer
/// gives is still refused.
/// A pod namespace with transparent capture (the iptables script applied, the proxy running
/// as its uid), routed to an `outside` namespace that holds the `203.0.113.<host>` addresses
/// given; resolv.conf is `resolv`, and `egress` is the `outbound.egress` section's body.
struct Pod {
    ns: NetNs,
    outside: NetNs,
    _link: netns::Veth,
    _etc: EtcOverlay,
    dir: tempfile::TempDir,
    _proxy: Background,
}

impl Pod {
    fn new(hosts: &[&str], resolv: &str, egress: &str) -> Pod {
        let outside = NetNs::new("ordns-out");
        let ns = NetNs::new("ordns-pod");
        let link = netns::link(&outside, &ns);
        for host in hosts {
            let ip = format!("203.0.113.{host}/32");
            outside.exec_ok("ip", &["addr", "add", &ip, "dev", &link.a_if]);
        }
        let via = link.a_ip.to_string();
        ns.exec_ok("ip", &["route", "add", "203.0.113.0/24", "via", &via]);
        let etc = EtcOverlay::new(&ns, "127.0.0.1 localhost\n", Some(resolv));
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let config = dir.path().join("outrider.yaml");
        std::fs::write(
            &config,
            format!(
                "admin: {{ listen: 127.0.0.1:15000 }}\n\
                 outbound:\n  listen: 127.0.0.1:15001\n  egress:\n{egress}\
                 access_log: {{ output: {} }}\n",
                dir.path().join("access.log").display()
            ),
        )
        .unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/outrider-iptables.sh");
        let mut apply = ns.command(script, &["apply"]);
        for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("OUTRIDER_")) {
            apply.env_remove(var);
        }
        netns::run_ok(&mut apply);
        let proxy = ns.spawn_as(
            PROXY_UID,
            OUTRIDER,
            &["run", "--config", config.to_str().unwrap()],
        );
        wait_ready(&ns);
        Pod {
            ns,
            outside,
            _link: link,
            _etc: etc,
            dir,
            _proxy: proxy,
        }
    }

    /// The access-log records so far.
    fn records(&self) -> Vec<serde_json::Value> {
        records(&self.dir.path().join("access.log"))
    }
}

#[test]
fn a_transparent_client_with_a_newer_answer_than_the_cache_is_not_taken_for_forged() {
    let pod = Pod::new(
        &["10", "11", "12"],
        LOCAL_RESOLVER,
        "    allow:\n      - host: cdn.test\n        ports: [8000]\n",
    );
    let mut web = pod
        .outside
        .spawn(PYTHON, &["-u", "-m", "http.server", "8000"]);
    web.wait_for_line("Serving HTTP", Duration::from_secs(10));
    let mut dns = pod.ns.spawn(
        PYTHON,
        &["-u", "-c", DNS_PY, "cdn.test=203.0.113.10,203.0.113.11"],
    );
    dns.wait_for_line("ready", Duration::from_secs(10));
    let pod = &pod.ns;

    // The app got 203.0.113.11 (the DNS server's second answer); the proxy's first lookup
    // gets 203.0.113.10.
    let status = |ip: &str| {
        let resolve = format!("cdn.test:8000:{ip}");
        let out = pod.exec_as(
            1000,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ]
            .into_iter()
            .chain([
                "--noproxy",
                "*",
                "--resolve",
                &resolve,
                "http://cdn.test:8000/",
            ])
            .collect::<Vec<_>>(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status("203.0.113.11"), "200", "the app's newer answer");
    assert_eq!(status("203.0.113.12"), "403", "an address no answer gives");
    // The app goes on with the address it got, for longer than the fresh answer is reused:
    // the proxy keeps it with the name's answer and asks no more. (It asked again each
    // second, and this server's next answer, the other address, had the app's connections
    // refused as forged.)
    dns.lines_so_far();
    for _ in 0..8 {
        assert_eq!(status("203.0.113.11"), "200", "the app's address, later");
        std::thread::sleep(Duration::from_millis(300));
    }
    let asked: Vec<String> = dns
        .lines_so_far()
        .into_iter()
        .filter(|l| l.starts_with("query cdn.test"))
        .collect();
    assert!(asked.is_empty(), "{asked:?}");
    // Forged Hosts in a loop: the fresh answer is reused for a second, so they cost the DNS
    // server about one question a second, not one each (twenty here).
    dns.lines_so_far();
    for _ in 0..20 {
        assert_eq!(status("203.0.113.12"), "403");
    }
    let asked = dns
        .lines_so_far()
        .iter()
        .filter(|l| l.starts_with("query cdn.test 1"))
        .count();
    assert!(asked < 10, "{asked} questions for 20 forged connections");
}

#[test]
fn a_name_in_etc_hosts_asks_no_dns_server() {
    // A DNS server that never answers, and a query timeout longer than curl waits: a name
    // the hosts file lists must not wait for it. (Its AAAA question went to the server, and
    // every request waited out the timeout.)
    let resolv = "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n";
    let mut w = World::with_dns(
        "127.0.0.1 localhost\n127.0.0.1 silent-file.test\n",
        Some((resolv, &[])),
        &["silent-file.test"],
        "enforce",
    );
    for _ in 0..3 {
        let resp = w.get("http://silent-file.test:8000/hello.txt");
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    let queries = w.dns.as_mut().unwrap().lines_so_far();
    assert!(
        queries.iter().all(|q| !q.contains("silent-file")),
        "{queries:?}"
    );
}

#[test]
fn a_name_is_asked_for_once_per_ttl_not_once_per_request() {
    // The proxy keeps a name's addresses for their TTL. Before, each request went through
    // hickory's cache, which cannot keep an empty AAAA answer that comes without an SOA (as
    // this server sends it): every request for the name asked the DNS server again.
    let records = ["kept.internal=127.0.0.1", "brief.internal=127.0.0.1/2"];
    let mut w = World::with_dns(
        "127.0.0.1 localhost\n",
        Some((LOCAL_RESOLVER, &records)),
        &[],
        "enforce",
    );
    for _ in 0..20 {
        let resp = w.get("http://kept.internal:8000/hello.txt");
        assert_eq!(resp.status, 200, "{:?}", resp.header("x-outrider-error"));
        assert_eq!(resp.body, "hello from the app\n");
    }
    let asked = w.questions("end1");
    let kept: Vec<_> = asked
        .iter()
        .filter(|q| q.starts_with("query kept.internal "))
        .collect();
    // One A and one AAAA question for twenty requests.
    assert_eq!(kept.len(), 2, "{asked:?}");

    // An answer is not kept past its TTL: a changed record set is seen when it expires.
    let brief = |asked: &[String]| {
        asked
            .iter()
            .filter(|q| q.as_str() == "query brief.internal 1")
            .count()
    };
    assert_eq!(w.get("http://brief.internal:8000/hello.txt").status, 200);
    assert_eq!(w.get("http://brief.internal:8000/hello.txt").status, 200);
    assert_eq!(brief(&w.questions("end2")), 1);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(w.get("http://brief.internal:8000/hello.txt").status, 200);
    assert_eq!(brief(&w.questions("end3")), 1);
}

#[test]
fn an_expired_answer_stands_in_while_the_dns_server_is_down() {
    // A DNS restart (CoreDNS rolling, a node-local cache bouncing) made every request for a
    // name whose answer had just expired a 502 until the server was back. Now the expired
    // answer stands in (RFC 8767), as Envoy's DNS cache keeps its hosts; a name the server
    // says is gone does not get one.
    let records = ["steady.internal=127.0.0.1/1", "gone.internal=127.0.0.1/1"];
    let mut w = World::with_dns(
        "127.0.0.1 localhost\n",
        Some((LOCAL_RESOLVER, &records)),
        &[],
        "enforce",
    );
    for url in [
        "http://steady.internal:8000/hello.txt",
        "http://gone.internal:8000/hello.txt",
    ] {
        let resp = w.get(url);
        assert_eq!(
            resp.status,
            200,
            "{url}: {:?}",
            resp.header("x-outrider-error")
        );
    }
    // The server goes away, both answers expire, and a reload comes (the answers carry
    // over).
    w.dns = None;
    std::thread::sleep(Duration::from_millis(1500));
    w.reload("reloaded.test");
    let resp = w.get("http://steady.internal:8000/hello.txt");
    assert_eq!(resp.status, 200, "{:?}", resp.header("x-outrider-error"));
    assert_eq!(resp.body, "hello from the app\n");
    let metrics = w.ns.exec("curl", &["-s", "http://127.0.0.1:15000/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outrider_dns_stale_answers_total") && l.ends_with(" 1")),
        "{metrics}"
    );

    // The server is back, without either name: a name it says does not exist is a 502.
    let mut server =
        w.ns.spawn(PYTHON, &["-u", "-c", DNS_PY, "other.internal=127.0.0.1"]);
    server.wait_for_line("ready", Duration::from_secs(10));
    w.dns = Some(server);
    let resp = w.get("http://gone.internal:8000/hello.txt");
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert!(resp
        .header("x-outrider-error")
        .unwrap_or_default()
        .contains("gone.internal"));
    // A stale answer stands for 30 s before the server is asked again: one request in that
    // time waits for a server that is down, not every one.
    assert_eq!(w.get("http://steady.internal:8000/hello.txt").status, 200);
    let asked = w.questions("end");
    assert!(
        asked.iter().all(|q| !q.contains("steady.internal")),
        "{asked:?}"
    );
}

#[test]
fn only_the_address_families_the_interfaces_have_are_asked_for() {
    // As getaddrinfo's AI_ADDRCONFIG: an IPv4-only pod asked for AAAA records too (twice the
    // DNS questions, a wait on servers that drop them, and a failed connect to each IPv6
    // address of a dual-stack name). Loopback and link-local addresses do not count.
    let records = [
        "lo.internal=127.0.0.1",
        "four.internal=127.0.0.1",
        "dual.internal=127.0.0.1",
        "six.internal=127.0.0.1",
    ];
    let mut w = World::with_dns(
        "127.0.0.1 localhost\n",
        Some((LOCAL_RESOLVER, &records)),
        &[],
        "enforce",
    );
    let types = |asked: &[String], name: &str| -> Vec<String> {
        let prefix = format!("query {name} ");
        let mut types: Vec<String> = asked
            .iter()
            .filter_map(|q| q.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        types.sort();
        types
    };
    // Only loopback: both, as getaddrinfo does.
    assert_eq!(w.get("http://lo.internal:8000/hello.txt").status, 200);
    assert_eq!(types(&w.questions("end1"), "lo.internal"), ["1", "28"]);

    // An IPv4 address (on a veth pair with both ends in the namespace: nothing leaves it),
    // and a link-local IPv6 one: A only.
    let net = netns::Subnet::unique();
    let v4 = format!("{}/24", net.v4(2));
    w.ns.exec_ok(
        "ip",
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
    );
    w.ns.exec_ok("ip", &["addr", "add", &v4, "dev", "d0"]);
    w.ns.exec_ok("ip", &["addr", "add", "fe80::2/64", "dev", "d0", "nodad"]);
    w.ns.exec_ok("ip", &["link", "set", "d0", "up"]);
    // No reload: the proxy looks at its interfaces again (at most once a second) when a
    // lookup goes to DNS, as an address may come after it started.
    let settle = || std::thread::sleep(Duration::from_millis(1100));
    settle();
    assert_eq!(w.get("http://four.internal:8000/hello.txt").status, 200);
    assert_eq!(types(&w.questions("end2"), "four.internal"), ["1"]);

    // And an IPv6 address: both.
    let v6 = format!("{}/64", net.v6(2));
    w.ns.exec_ok("ip", &["addr", "add", &v6, "dev", "d0", "nodad"]);
    settle();
    assert_eq!(w.get("http://dual.internal:8000/hello.txt").status, 200);
    assert_eq!(types(&w.questions("end3"), "dual.internal"), ["1", "28"]);

    // IPv6 alone: AAAA only (the server has none for the name, so the request fails).
    w.ns.exec_ok("ip", &["addr", "del", &v4, "dev", "d0"]);
    settle();
    assert_eq!(w.get("http://six.internal:8000/hello.txt").status, 502);
    assert_eq!(types(&w.questions("end4"), "six.internal"), ["28"]);
}

#[test]
fn dns_over_tcp_goes_to_the_resolv_conf_servers_and_nowhere_else() {
    // A resolver library asks again over TCP when the answer is too large for UDP (a
    // headless Service with many pods): the transparent capture sends that connection to the
    // proxy, which refused it as opaque TCP to an address no rule names, so large answers
    // failed to resolve in the app while small ones, over UDP, worked.
    let egress = "    allow:\n      - cidr: 203.0.113.80/32\n        ports: [80]\n";
    let pod = Pod::new(
        &["53", "54"],
        "nameserver 203.0.113.53\noptions timeout:1 attempts:1\n",
        egress,
    );
    let _resolver = netns::tag_server(&pod.outside, "203.0.113.53", 53, "resolver");
    let _other = netns::tag_server(&pod.outside, "203.0.113.54", 53, "other");
    let reply = netns::tcp_probe(&pod.ns, Some(1000), "203.0.113.53", 53);
    assert_eq!(reply.map(|r| r.tag), Ok("resolver".to_owned()));
    // Another server's port 53 is no way out: a tunnel over DNS to a server of one's own.
    let refused = netns::tcp_probe(&pod.ns, Some(1000), "203.0.113.54", 53);
    assert!(refused.is_err(), "{refused:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = pod.records();
        if records.len() >= 2 || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let of = |dst: &str| {
        records
            .iter()
            .find(|r| r["original_dst"] == dst)
            .unwrap_or_else(|| panic!("no record for {dst}: {records:?}"))
    };
    let allowed = of("203.0.113.53:53");
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(
        allowed["rule"], "dns server 203.0.113.53 (resolv.conf)",
        "{allowed}"
    );
    assert_eq!(of("203.0.113.54:53")["decision"], "deny");

    // Through the explicit listener, the resolver's port 53 takes a rule like any other
    // address: a client there does its own DNS, and where the proxy is its only way out, a
    // tunnel to the proxy's resolver would carry DNS exfiltration. Both were allowed.
    let explicit = |tunnel: bool| {
        let status = if tunnel {
            "%{http_connect}"
        } else {
            "%{http_code}"
        };
        let mut args = vec!["-s", "-o", "/dev/null", "--max-time", "10", "-w", status];
        args.extend(["--noproxy", "", "-x", "http://127.0.0.1:15001"]);
        if tunnel {
            args.push("-p");
        }
        args.push("http://203.0.113.53:53/");
        String::from_utf8_lossy(&pod.ns.exec("curl", &args).stdout).into_owned()
    };
    assert_eq!(explicit(true), "403", "CONNECT 203.0.113.53:53");
    assert_eq!(explicit(false), "403", "GET http://203.0.113.53:53/");

    // `allow_dns_servers: false` leaves it to the rules, as before.
    drop(pod);
    let pod = Pod::new(
        &["53"],
        "nameserver 203.0.113.53\n",
        &format!("    allow_dns_servers: false\n{egress}"),
    );
    let _resolver = netns::tag_server(&pod.outside, "203.0.113.53", 53, "resolver");
    let refused = netns::tcp_probe(&pod.ns, Some(1000), "203.0.113.53", 53);
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn an_address_of_the_proxy_itself_is_never_tried_as_the_next_one() {
    // `loop.test` on the proxy's own port: 192.0.2.1 (a local address the proxy does not
    // listen on) refuses, and the next address, 127.0.0.1, is the proxy's listener, which the
    // loop check on the first address does not see. Dialled, it gets the request back (the
    // client then gets the proxy's `400` to itself) or, for a tunnel, the proxy's own port.
    // (Every 127/8 and ::1 address counts as the proxy's own, hence the namespace.)
    let ns = NetNs::new("orloop");
    ns.exec_ok("ip", &["addr", "add", "192.0.2.1/32", "dev", "lo"]);
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (
        dir.path().join("outrider.yaml"),
        dir.path().join("access.log"),
    );
    std::fs::write(
        &config,
        format!(
            "admin: {{ listen: 127.0.0.1:15000 }}\n\
             outbound:\n  listen: 127.0.0.1:15001\n  egress:\n    allow:\n\
             \x20     - host: loop.test\n      - cidr: 192.0.2.1/32\n      - cidr: 127.0.0.1/32\n\
             dns:\n  hosts:\n    loop.test: [192.0.2.1, 127.0.0.1]\n\
             access_log: {{ output: {} }}\n",
            log.display()
        ),
    )
    .unwrap();
    let _proxy = ns.spawn(OUTRIDER, &["run", "--config", config.to_str().unwrap()]);
    wait_ready(&ns);
    let resp = Resp::parse(&ns.exec(
        "curl",
        &[
            "-s",
            "-i",
            "--max-time",
            "10",
            "-x",
            "http://127.0.0.1:15001",
            "http://loop.test:15001/",
        ],
    ));
    assert_eq!(resp.status, 502, "{}", resp.body);
    let error = resp.header("x-outrider-error").unwrap_or_default();
    assert!(error.contains("192.0.2.1:15001"), "{error}");
    // The same for a tunnel.
    let out = ns.exec(
        "curl",
        &[
            "-s",
            "-p",
            "-x",
            "http://127.0.0.1:15001",
            "--max-time",
            "10",
        ]
        .into_iter()
        .chain([
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "http://loop.test:15001/",
        ])
        .collect::<Vec<_>>(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
    // One record for each: any other would be the proxy's own request to itself.
    std::thread::sleep(Duration::from_millis(300));
    let records = records(&log);
    assert_eq!(records.len(), 2, "the proxy dialled itself: {records:#?}");
}
