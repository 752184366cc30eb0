//! Root-only tests of `iptables/outrider-iptables.sh` against real iptables, each inside a fresh
//! network namespace so the host's tables are never touched.
//!
//! Run: `sudo -E cargo test --test iptables_rules` (CI runs as root). Without root every test
//! fails with a message saying so. Each test runs once per iptables flavour installed
//! (iptables-nft, iptables-legacy) and fails if neither is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;
use std::process::Output;

use common::netns::{self, EtcOverlay, NetNs, TagReply, PROXY_UID};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/outrider-iptables.sh");

/// Every variable the script reads, so the caller's environment cannot leak into a test.
const SCRIPT_ENV: &[&str] = &[
    "OUTRIDER_PROXY_UID",
    "OUTRIDER_OUTBOUND_PORT",
    "OUTRIDER_INBOUND_PORT",
    "OUTRIDER_ADMIN_PORT",
    "OUTRIDER_EXCLUDE_OUTBOUND_PORTS",
    "OUTRIDER_EXCLUDE_INBOUND_PORTS",
    "OUTRIDER_EXCLUDE_OUTBOUND_CIDRS",
    "OUTRIDER_EXCLUDE_INBOUND_CIDRS",
    "OUTRIDER_IPTABLES",
    "OUTRIDER_IP6TABLES",
    "OUTRIDER_NO_IPV6",
    "OUTRIDER_BLOCK_UNCAPTURED",
    "OUTRIDER_ALLOW_UDP_PORTS",
    "OUTRIDER_DNS_SERVERS",
];

/// One iptables flavour: the IPv4 and IPv6 commands.
#[derive(Clone, Copy, Debug)]
struct Flavour {
    v4: &'static str,
    v6: &'static str,
}

/// The installed flavours; panics when there is none, so the tests cannot pass vacuously.
fn flavours() -> Vec<Flavour> {
    netns::require_root();
    let found: Vec<Flavour> = [
        Flavour {
            v4: "iptables-nft",
            v6: "ip6tables-nft",
        },
        Flavour {
            v4: "iptables-legacy",
            v6: "ip6tables-legacy",
        },
    ]
    .into_iter()
    .filter(|f| netns::has_program(f.v4))
    .collect();
    assert!(
        !found.is_empty(),
        "neither iptables-nft nor iptables-legacy is installed (apt-get install iptables)"
    );
    found
}

/// Runs the script in `ns` with `env` set (and no other OUTRIDER_* variable).
fn script(ns: &NetNs, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = ns.command(SCRIPT, args);
    for var in SCRIPT_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run outrider-iptables.sh")
}

fn script_ok(ns: &NetNs, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = script(ns, env, args);
    assert!(
        out.status.success(),
        "outrider-iptables.sh {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `<cmd>-save -t nat` without comment lines and packet counters, to compare snapshots.
fn nat_snapshot(ns: &NetNs, cmd: &str) -> String {
    snapshot(ns, cmd, "nat")
}

/// `<cmd>-save -t <table>` without comment lines and packet counters.
fn snapshot(ns: &NetNs, cmd: &str, table: &str) -> String {
    ns.exec_ok(&format!("{cmd}-save"), &["-t", table])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The nat rules (as `-S` prints them) that mention an Outrider chain.
fn outrider_rules(ns: &NetNs, cmd: &str) -> Vec<String> {
    ns.exec_ok(cmd, &["-t", "nat", "-S"])
        .lines()
        .filter(|l| l.contains("OUTRIDER_"))
        .map(str::to_owned)
        .collect()
}

/// Rules and chains that belong to someone else and must survive apply and remove.
fn add_foreign_rules(ns: &NetNs, f: Flavour) {
    for cmd in [f.v4, f.v6] {
        ns.exec_ok(cmd, &["-t", "nat", "-N", "SOMEONE_ELSE"]);
        ns.exec_ok(
            cmd,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "-j",
                "SOMEONE_ELSE",
            ],
        );
        ns.exec_ok(
            cmd,
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "RETURN",
            ],
        );
    }
}

const C: &str = "-m comment --comment outrider";

/// The rules expected after applying with the flags and environment of `apply_twice_...`.
fn expected_rules(v6: bool) -> Vec<String> {
    let (lo, cidr_out, cidr_in) = if v6 {
        ("::1/128", "fd00:77::/32", None)
    } else {
        ("127.0.0.0/8", "169.254.169.254/32", Some("10.9.0.0/16"))
    };
    let mut rules = vec![
        "-N OUTRIDER_INBOUND".to_owned(),
        "-N OUTRIDER_OUTPUT".to_owned(),
        format!("-A PREROUTING -p tcp {C} -j OUTRIDER_INBOUND"),
        format!("-A OUTPUT -p tcp {C} -j OUTRIDER_OUTPUT"),
        format!("-A OUTRIDER_INBOUND -i lo {C} -j RETURN"),
        format!("-A OUTRIDER_INBOUND -p tcp -m tcp --dport 15000 {C} -j RETURN"),
        format!("-A OUTRIDER_INBOUND -p tcp -m tcp --dport 22 {C} -j RETURN"),
    ];
    if let Some(cidr) = cidr_in {
        rules.push(format!("-A OUTRIDER_INBOUND -s {cidr} {C} -j RETURN"));
    }
    rules.extend([
        format!("-A OUTRIDER_INBOUND -p tcp {C} -j REDIRECT --to-ports 15006"),
        format!("-A OUTRIDER_OUTPUT -m owner --uid-owner 4242 {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -o lo {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -d {lo} {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -p tcp -m tcp --dport 15000 {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -p tcp -m tcp --dport 5432 {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -p tcp -m tcp --dport 8000:8100 {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -d {cidr_out} {C} -j RETURN"),
        format!("-A OUTRIDER_OUTPUT -p tcp {C} -j REDIRECT --to-ports 15001"),
    ]);
    rules
}

/// Apply twice leaves exactly one set of rules (with the uid exclusion, the redirects and every
/// exclusion from flags and environment, IPv4 and IPv6 CIDRs in their own family), and remove
/// restores the nat table exactly, keeping other people's rules.
#[test]
fn apply_twice_installs_one_ruleset_and_remove_restores_the_table() {
    for f in flavours() {
        let ns = NetNs::new("or-rules");
        add_foreign_rules(&ns, f);
        let before = (nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6));

        // Some settings from flags, some from the environment: both must reach the rules.
        let env = [
            ("OUTRIDER_PROXY_UID", "4242"),
            ("OUTRIDER_EXCLUDE_INBOUND_PORTS", "22"),
            ("OUTRIDER_EXCLUDE_INBOUND_CIDRS", "10.9.0.0/16"),
        ];
        let args = [
            "apply",
            "--iptables-cmd",
            f.v4,
            "--exclude-outbound-ports",
            "5432, 8000:8100",
            "--exclude-outbound-cidrs=169.254.169.254/32,fd00:77::/32",
        ];
        script_ok(&ns, &env, &args);
        script_ok(&ns, &env, &args);

        for (cmd, v6) in [(f.v4, false), (f.v6, true)] {
            let rules = outrider_rules(&ns, cmd);
            assert_eq!(
                rules,
                expected_rules(v6),
                "{cmd}: rules after applying twice"
            );
            for rule in rules.iter().filter(|r| r.starts_with("-A ")) {
                assert!(rule.contains(C), "{cmd}: rule not tagged outrider: {rule}");
            }
        }

        script_ok(&ns, &[], &["remove", "--iptables-cmd", f.v4]);
        let after = (nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6));
        assert_eq!(
            after, before,
            "{f:?}: nat table after remove differs from before apply"
        );
        assert!(
            before.0.contains("SOMEONE_ELSE"),
            "the foreign rules are part of the comparison"
        );

        // Removing again is a no-op, not an error.
        script_ok(&ns, &[], &["remove", "--iptables-cmd", f.v4]);
        assert_eq!((nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6)), before);
    }
}

/// Defaults: uid 1337, ports 15001/15006/15000, the flavour from OUTRIDER_IPTABLES, and
/// --no-ipv6 leaves the IPv6 table alone.
#[test]
fn defaults_and_no_ipv6() {
    for f in flavours() {
        let ns = NetNs::new("or-defaults");
        add_foreign_rules(&ns, f);
        let v6_before = nat_snapshot(&ns, f.v6);

        script_ok(&ns, &[("OUTRIDER_IPTABLES", f.v4)], &["apply", "--no-ipv6"]);
        let rules = outrider_rules(&ns, f.v4);
        for expected in [
            format!("-A OUTRIDER_OUTPUT -m owner --uid-owner {PROXY_UID} {C} -j RETURN"),
            format!("-A OUTRIDER_OUTPUT -p tcp {C} -j REDIRECT --to-ports 15001"),
            format!("-A OUTRIDER_INBOUND -p tcp {C} -j REDIRECT --to-ports 15006"),
            format!("-A OUTRIDER_OUTPUT -p tcp -m tcp --dport 15000 {C} -j RETURN"),
        ] {
            assert!(
                rules.contains(&expected),
                "{}: missing {expected:?} in {rules:#?}",
                f.v4
            );
        }
        assert_eq!(
            nat_snapshot(&ns, f.v6),
            v6_before,
            "--no-ipv6 must not touch {}",
            f.v6
        );

        script_ok(
            &ns,
            &[("OUTRIDER_IPTABLES", f.v4)],
            &["remove", "--no-ipv6"],
        );
        assert!(
            outrider_rules(&ns, f.v4).is_empty(),
            "{}: rules left after remove",
            f.v4
        );
    }
}

/// print shows the rules apply installs and changes nothing; a bad flag fails before any change.
#[test]
fn print_changes_nothing_and_bad_input_is_refused() {
    for f in flavours() {
        let ns = NetNs::new("or-print");
        add_foreign_rules(&ns, f);
        let before = (nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6));
        let args = ["--iptables-cmd", f.v4, "--exclude-outbound-ports", "5432"];

        let printed = script_ok(&ns, &[], &[&["print"], &args[..]].concat());
        assert_eq!(
            (nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6)),
            before,
            "print changed rules"
        );

        script_ok(&ns, &[], &[&["apply"], &args[..]].concat());
        let installed: Vec<String> = outrider_rules(&ns, f.v4)
            .into_iter()
            .filter(|r| r.starts_with("-A OUTRIDER_"))
            .collect();
        let ipv4_printed: Vec<&str> = printed
            .split("# IPv6")
            .next()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("-A OUTRIDER_"))
            .collect();
        // iptables -S lists OUTRIDER_INBOUND before OUTRIDER_OUTPUT; compare as sets of lines.
        let mut a = installed.clone();
        let mut b: Vec<String> = ipv4_printed.iter().map(|s| (*s).to_owned()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "print must show exactly what apply installs");
        script_ok(&ns, &[], &["remove", "--iptables-cmd", f.v4]);

        for bad in [
            &["--exclude-outbound-ports", "70000"][..],
            &["--exclude-inbound-cidrs", "10.0.0.0/8,not-a-cidr"][..],
            &["--proxy-uid", "proxy"][..],
            &["--allow-udp-ports", "53,dns"][..],
            &["--dns-servers", "10.0.0.2,resolver"][..],
            &["--no-such-flag", "1"][..],
        ] {
            let out = script(
                &ns,
                &[],
                &[&["apply", "--iptables-cmd", f.v4], bad].concat(),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "apply {bad:?} should fail");
            assert!(
                stderr.contains(bad[0]),
                "error for {bad:?} should name the flag: {stderr}"
            );
        }
        assert_eq!(
            (nat_snapshot(&ns, f.v4), nat_snapshot(&ns, f.v6)),
            before,
            "refused apply changed rules"
        );
    }
}

fn reply(r: Result<TagReply, String>) -> TagReply {
    r.expect("the connection should succeed")
}

/// Real traffic between a "pod" and an "outside" namespace: the app's connections land on
/// 15001 with the original destination recoverable, the proxy uid's go straight out, loopback
/// and excluded ports and CIDRs are left alone, and inbound connections land on 15006.
#[test]
fn captured_traffic_reaches_the_proxy_ports() {
    for f in flavours() {
        let outside = NetNs::new("or-out");
        let pod = NetNs::new("or-pod");
        let link = netns::link(&outside, &pod);
        let (server, pod_ip) = (link.a_ip.to_string(), link.b_ip.to_string());
        let (server6, pod_ip6) = (
            link.a_ip6.unwrap().to_string(),
            link.b_ip6.unwrap().to_string(),
        );

        // A second outside address whose /32 is excluded from capture.
        let [a, b, c, _] = link.a_ip.octets();
        let excluded = Ipv4Addr::new(a, b, c, 3).to_string();
        outside.exec_ok(
            "ip",
            &["addr", "add", &format!("{excluded}/24"), "dev", &link.a_if],
        );

        let _servers = [
            netns::tag_server(&outside, &server, 8000, "server"),
            netns::tag_server(&outside, &excluded, 8000, "excluded-cidr"),
            netns::tag_server(&outside, &server, 8001, "server"),
            netns::tag_server(&outside, &server6, 8000, "server6"),
            netns::tag_server(&pod, "127.0.0.1", 15001, "outbound"),
            netns::tag_server(&pod, "::1", 15001, "outbound6"),
            netns::tag_server(&pod, "0.0.0.0", 15006, "inbound"),
            netns::tag_server(&pod, "::", 15006, "inbound6"),
            netns::tag_server(&pod, "0.0.0.0", 8080, "app"),
            netns::tag_server(&pod, "0.0.0.0", 2222, "sshd"),
        ];

        // Without the rules everything goes where it was sent: what follows is the rules' doing.
        assert_eq!(
            reply(netns::tcp_probe(&pod, None, &server, 8000)).tag,
            "server"
        );
        assert_eq!(
            reply(netns::tcp_probe(&outside, None, &pod_ip, 8080)).tag,
            "app"
        );

        script_ok(
            &pod,
            &[
                ("OUTRIDER_EXCLUDE_INBOUND_PORTS", "2222"),
                ("OUTRIDER_EXCLUDE_OUTBOUND_CIDRS", &format!("{excluded}/32")),
            ],
            &[
                "apply",
                "--iptables-cmd",
                f.v4,
                "--exclude-outbound-ports",
                "8001",
            ],
        );

        // The app (root here, and any other uid) is captured; the original destination survives.
        for uid in [None, Some(1000)] {
            let got = reply(netns::tcp_probe(&pod, uid, &server, 8000));
            assert_eq!(got.tag, "outbound", "{f:?} uid {uid:?}: {got:?}");
            assert_eq!(
                got.orig,
                format!("{server}:8000"),
                "{f:?}: original destination"
            );
        }
        let got = reply(netns::tcp_probe(&pod, None, &server6, 8000));
        assert_eq!(got.tag, "outbound6", "{f:?}: IPv6 capture: {got:?}");
        assert_eq!(got.orig, format!("[{server6}]:8000"));

        // The proxy's own connection goes straight to the server: no loop.
        let got = reply(netns::tcp_probe(&pod, Some(PROXY_UID), &server, 8000));
        assert_eq!(
            (got.tag.as_str(), got.peer.as_str()),
            ("server", pod_ip.as_str()),
            "{f:?}"
        );
        assert_eq!(
            reply(netns::tcp_probe(&pod, Some(PROXY_UID), &server6, 8000)).tag,
            "server6"
        );

        // Excluded port, excluded CIDR and loopback are left alone (the last is the proxy
        // forwarding an inbound request to the app on 127.0.0.1:8080).
        assert_eq!(
            reply(netns::tcp_probe(&pod, None, &excluded, 8000)).tag,
            "excluded-cidr",
            "{f:?}"
        );
        assert_eq!(
            reply(netns::tcp_probe(&pod, None, &server, 8001)).tag,
            "server",
            "{f:?}"
        );
        for uid in [None, Some(PROXY_UID)] {
            assert_eq!(
                reply(netns::tcp_probe(&pod, uid, "127.0.0.1", 8080)).tag,
                "app",
                "{f:?}"
            );
        }

        // Inbound: captured to 15006 with the app's port recoverable; excluded port untouched.
        let got = reply(netns::tcp_probe(&outside, None, &pod_ip, 8080));
        assert_eq!(got.tag, "inbound", "{f:?}: {got:?}");
        assert_eq!(got.orig, format!("{pod_ip}:8080"));
        assert_eq!(got.peer, server, "the caller's address is preserved");
        assert_eq!(
            reply(netns::tcp_probe(&outside, None, &pod_ip, 2222)).tag,
            "sshd",
            "{f:?}"
        );
        let got = reply(netns::tcp_probe(&outside, None, &pod_ip6, 8080));
        assert_eq!(got.tag, "inbound6", "{f:?}: IPv6 inbound: {got:?}");
        assert_eq!(got.orig, format!("[{pod_ip6}]:8080"));

        // After remove, traffic flows directly again.
        script_ok(&pod, &[], &["remove", "--iptables-cmd", f.v4]);
        assert_eq!(
            reply(netns::tcp_probe(&pod, None, &server, 8000)).tag,
            "server",
            "{f:?}"
        );
        assert_eq!(
            reply(netns::tcp_probe(&outside, None, &pod_ip, 8080)).tag,
            "app",
            "{f:?}"
        );
    }
}

/// Both tables of both families, to show that a refused apply changed nothing.
fn all_tables(ns: &NetNs, f: Flavour) -> [String; 4] {
    [
        snapshot(ns, f.v4, "nat"),
        snapshot(ns, f.v6, "nat"),
        snapshot(ns, f.v4, "filter"),
        snapshot(ns, f.v6, "filter"),
    ]
}

/// With `--block-uncaptured`, what the nat rules do not send through the proxy (UDP, ICMP) is
/// refused at once instead of going to any address the allowlist denies, over IPv4 and IPv6;
/// DNS, the proxy's own traffic, captured and excluded TCP, and replies on an excluded inbound
/// port still work. Applying without the flag takes the rejections away again, and remove
/// restores the filter table exactly, other people's rules included.
#[test]
fn block_uncaptured_rejects_what_the_proxy_does_not_capture() {
    for f in flavours() {
        let outside = NetNs::new("or-bout");
        let pod = NetNs::new("or-bpod");
        let link = netns::link(&outside, &pod);
        let (server, pod_ip) = (link.a_ip.to_string(), link.b_ip.to_string());
        let server6 = link.a_ip6.unwrap().to_string();
        let mut udp = netns::udp_echo_server(&outside, &server, 9999);
        let mut udp6 = netns::udp_echo_server(&outside, &server6, 9999);
        let _servers = [
            netns::udp_echo_server(&outside, &server, 53),
            netns::udp_echo_server(&outside, &server6, 53),
            netns::tag_server(&outside, &server, 8000, "server"),
            netns::tag_server(&outside, &server, 8001, "server"),
            netns::tag_server(&pod, "127.0.0.1", 15001, "outbound"),
            netns::tag_server(&pod, "::1", 15001, "outbound6"),
            netns::tag_server(&pod, "0.0.0.0", 15006, "inbound"),
            netns::tag_server(&pod, "0.0.0.0", 2222, "sshd"),
        ];
        for cmd in [f.v4, f.v6] {
            pod.exec_ok(cmd, &["-N", "SOMEONE_ELSE"]);
            pod.exec_ok(cmd, &["-A", "OUTPUT", "-p", "sctp", "-j", "SOMEONE_ELSE"]);
        }
        let filter_before = (
            snapshot(&pod, f.v4, "filter"),
            snapshot(&pod, f.v6, "filter"),
        );
        // The pod's resolver, which DNS may reach; the IPv6 server is not one.
        let _etc = EtcOverlay::new(
            &pod,
            "127.0.0.1 localhost\n",
            Some(&format!("nameserver {server}\n")),
        );
        let app = Some(1000);
        let flags = [
            "--iptables-cmd",
            f.v4,
            "--exclude-inbound-ports",
            "2222",
            "--exclude-outbound-ports",
            "8001",
        ];

        // Capture alone leaves UDP and ICMP to go anywhere: what follows is the flag's doing.
        script_ok(&pod, &[], &[&["apply"], &flags[..]].concat());
        for host in [&server, &server6] {
            assert_eq!(
                netns::udp_probe(&pod, app, host, 9999).as_deref(),
                Ok("pong")
            );
            assert!(netns::icmp_probe(&pod, host).is_ok(), "{f:?}: ping {host}");
        }
        let blocking = [&["apply", "--block-uncaptured"], &flags[..]].concat();
        script_ok(&pod, &[], &blocking);
        script_ok(&pod, &[], &blocking);
        for cmd in [f.v4, f.v6] {
            let jumps = pod.exec_ok(cmd, &["-S", "OUTPUT"]);
            assert_eq!(
                jumps.matches("-j OUTRIDER_EGRESS").count(),
                1,
                "{cmd}: one jump after applying twice: {jumps}"
            );
        }
        let (_, _) = (udp.lines_so_far(), udp6.lines_so_far());

        // The app's UDP and ICMP, whatever its uid, fail at once and never reach the server.
        for host in [&server, &server6] {
            for uid in [app, None] {
                let err = netns::udp_probe(&pod, uid, host, 9999).unwrap_err();
                assert!(
                    err.contains("not permitted"),
                    "{f:?}: UDP from uid {uid:?} to {host}: {err}"
                );
            }
            let err = netns::icmp_probe(&pod, host).unwrap_err();
            assert!(err.contains("not permitted"), "{f:?}: ping {host}: {err}");
        }
        // DNS goes out to the resolver resolv.conf names, and to no other server: UDP 53 to any
        // address was a way out the allowlist could not see. The proxy's own UDP goes out, over
        // IPv6 too, whose neighbour discovery (its cache emptied first) the rules let through.
        pod.exec_ok("ip", &["-6", "neigh", "flush", "all"]);
        for host in [&server6, &server] {
            assert_eq!(
                netns::udp_probe(&pod, Some(PROXY_UID), host, 9999).as_deref(),
                Ok("pong"),
                "{f:?}: the proxy's UDP to {host}"
            );
        }
        assert_eq!(
            netns::udp_probe(&pod, app, &server, 53).as_deref(),
            Ok("pong"),
            "{f:?}: DNS to the resolver"
        );
        let err = netns::udp_probe(&pod, app, &server6, 53).unwrap_err();
        assert!(err.contains("not permitted"), "{f:?}: DNS elsewhere: {err}");
        // `--dns-servers any` allows it anywhere, as before.
        script_ok(
            &pod,
            &[],
            &[&blocking[..], &["--dns-servers", "any"][..]].concat(),
        );
        assert_eq!(
            netns::udp_probe(&pod, app, &server6, 53).as_deref(),
            Ok("pong"),
            "{f:?}: DNS with --dns-servers any"
        );
        script_ok(&pod, &[], &blocking);
        assert_eq!(udp.lines_so_far(), [format!("got {pod_ip}")], "{f:?}");
        assert_eq!(udp6.lines_so_far().len(), 1, "{f:?}: only the proxy's");

        // TCP: captured as before, the excluded port goes straight out, inbound is captured,
        // and the excluded inbound port answers its callers (replies of accepted connections).
        let captured = reply(netns::tcp_probe(&pod, app, &server, 8000));
        assert_eq!(captured.tag, "outbound", "{f:?}: {captured:?}");
        let captured = reply(netns::tcp_probe(&pod, app, &server6, 8000));
        assert_eq!(captured.tag, "outbound6", "{f:?}: {captured:?}");
        assert_eq!(
            reply(netns::tcp_probe(&pod, app, &server, 8001)).tag,
            "server"
        );
        assert_eq!(
            reply(netns::tcp_probe(&outside, None, &pod_ip, 8080)).tag,
            "inbound"
        );
        assert_eq!(
            reply(netns::tcp_probe(&outside, None, &pod_ip, 2222)).tag,
            "sshd"
        );

        // An apply without the flag takes the rejections away; remove restores the table.
        script_ok(&pod, &[], &[&["apply"], &flags[..]].concat());
        assert_eq!(
            netns::udp_probe(&pod, app, &server, 9999).as_deref(),
            Ok("pong")
        );
        assert_eq!(
            (
                snapshot(&pod, f.v4, "filter"),
                snapshot(&pod, f.v6, "filter")
            ),
            filter_before,
            "{f:?}: filter table after an apply without --block-uncaptured"
        );
        script_ok(
            &pod,
            &[("OUTRIDER_BLOCK_UNCAPTURED", "1")],
            &[&["apply"], &flags[..]].concat(),
        );
        assert!(
            netns::udp_probe(&pod, app, &server, 9999).is_err(),
            "{f:?}: from the environment"
        );
        script_ok(&pod, &[], &["remove", "--iptables-cmd", f.v4]);
        assert_eq!(
            (
                snapshot(&pod, f.v4, "filter"),
                snapshot(&pod, f.v6, "filter")
            ),
            filter_before,
            "{f:?}: filter table after remove"
        );
        assert!(filter_before.0.contains("SOMEONE_ELSE"));
    }
}

/// `--block-uncaptured` must not leave IPv6 unchecked without saying so: when IPv6 rules
/// cannot be installed on a kernel that has IPv6, apply fails before changing anything, and
/// goes on only with an explicit `--no-ipv6`.
#[test]
fn block_uncaptured_refuses_to_leave_ipv6_unchecked() {
    for f in flavours() {
        let ns = NetNs::new("or-b6");
        let before = all_tables(&ns, f);
        let no_v6 = [
            "--iptables-cmd",
            f.v4,
            "--ip6tables-cmd",
            "/nonexistent/ip6tables",
        ];

        let out = script(
            &ns,
            &[],
            &[&["apply", "--block-uncaptured"], &no_v6[..]].concat(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{f:?}: apply should fail: {stderr}");
        assert!(
            stderr.contains("--block-uncaptured") && stderr.contains("--no-ipv6"),
            "{f:?}: the error names the flag and the way out: {stderr}"
        );
        assert_eq!(
            all_tables(&ns, f),
            before,
            "{f:?}: the refused apply changed rules"
        );

        // Capture alone still goes on with IPv4 and a note, as it always has.
        let out = script(&ns, &[], &[&["apply"], &no_v6[..]].concat());
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("skipping IPv6"));

        script_ok(
            &ns,
            &[],
            &[&["apply", "--block-uncaptured", "--no-ipv6"], &no_v6[..]].concat(),
        );
        assert!(ns
            .exec_ok(f.v4, &["-S", "OUTPUT"])
            .contains("-j OUTRIDER_EGRESS"));
        script_ok(&ns, &[], &["remove", "--iptables-cmd", f.v4, "--no-ipv6"]);
        assert_eq!(all_tables(&ns, f), before, "{f:?}: after remove");
    }
}

/// `--dns-servers auto` (the default) lets DNS reach the `nameserver`s of resolv.conf and no
/// other address; behind systemd-resolved's stub (a VM's usual resolv.conf), also the servers
/// the stub forwards to, from its own file, or the VM's DNS would stop at the stub. A
/// resolv.conf that names only another local resolver gets a note saying what to add.
#[test]
fn dns_servers_come_from_resolv_conf_and_the_systemd_resolved_stubs_upstreams() {
    let dns_rules = |out: &Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("--dport 53"))
            .map(|l| l.split(" -p udp").next().unwrap_or_default().to_owned())
            .collect()
    };
    let pod = NetNs::new("or-dns");
    let resolv_conf = |text: &str| EtcOverlay::new(&pod, "127.0.0.1 localhost\n", Some(text));
    let _etc =
        resolv_conf("nameserver 10.96.0.10\nnameserver fe80::53%eth0\nsearch svc.cluster.local\n");
    let out = script(&pod, &[], &["print", "--block-uncaptured"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        dns_rules(&out),
        [
            "-A OUTRIDER_EGRESS -d 10.96.0.10",
            "-A OUTRIDER_EGRESS -d fe80::53"
        ]
    );
    let out = script(
        &pod,
        &[],
        &["print", "--block-uncaptured", "--dns-servers", "any"],
    );
    // One rule for each family, to any address.
    assert_eq!(
        dns_rules(&out),
        ["-A OUTRIDER_EGRESS", "-A OUTRIDER_EGRESS"]
    );

    // systemd-resolved: its upstream file, in a mount namespace of its own so that the
    // machine's /run is not touched.
    let _etc = resolv_conf("nameserver 127.0.0.53\n");
    let shell = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/resolve && \
         printf 'nameserver 10.0.0.2\\nnameserver fd00::2\\n' > /run/systemd/resolve/resolv.conf && \
         exec {SCRIPT} print --block-uncaptured"
    );
    let mut cmd = pod.command(
        "unshare",
        &["--mount", "--propagation", "private", "sh", "-c", &shell],
    );
    for var in SCRIPT_ENV {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run outrider-iptables.sh");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        dns_rules(&out),
        [
            "-A OUTRIDER_EGRESS -d 127.0.0.53",
            "-A OUTRIDER_EGRESS -d 10.0.0.2",
            "-A OUTRIDER_EGRESS -d fd00::2"
        ]
    );
    assert!(out.stderr.is_empty(), "{out:?}");

    // Another local resolver: its upstreams are not known here, and the note says so.
    let _etc = resolv_conf("nameserver 127.0.0.1\n");
    let out = script(&pod, &[], &["print", "--block-uncaptured"]);
    assert!(out.status.success(), "{out:?}");
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("--dns-servers"), "{note}");
}
