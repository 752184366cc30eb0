#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The egress allowlist as a user of the explicit proxy sees it: every rule kind allowed
//! and denied, with curl and with a Rust client; CONNECT; SSRF through `dns.hosts`;
//! invalid hosts; loops; and upstream failures. Only 127.0.0.1 is ever dialled: names
//! mapped to other addresses must be refused before the proxy connects.

use outrider::testing::{
    curl, open_tunnel, proxy_get, raw_exchange, TcpEcho, TestProxy, Upstream, ERROR_HEADER,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What both clients saw for one URL.
#[derive(Debug)]
struct Seen {
    status: u16,
    error: String,
    body: String,
}

/// GETs `url` through the proxy with the Rust client and with curl; both must agree.
async fn both(proxy: &TestProxy, url: &str) -> Seen {
    let r = proxy_get(proxy.proxy_addr(), url).await;
    let c = curl(&["-x", &proxy.proxy_url(), url]).await;
    assert_eq!(
        r.status.as_u16(),
        c.status,
        "{url}: rust client and curl disagree; curl stderr: {}",
        c.stderr
    );
    let r_err = r.error_header();
    assert_eq!(
        r_err,
        c.header(ERROR_HEADER).unwrap_or_default(),
        "{url}: x-outrider-error differs"
    );
    Seen {
        status: c.status,
        error: r_err,
        body: r.text(),
    }
}

#[track_caller]
fn assert_allowed(seen: &Seen, url: &str) {
    assert_eq!(seen.status, 200, "{url} should pass: {seen:?}");
    assert!(seen.error.is_empty(), "{url}: {seen:?}");
    assert!(
        seen.body.contains("\"method\":\"GET\""),
        "{url}: not the upstream's echo: {seen:?}"
    );
}

#[track_caller]
fn assert_denied(seen: &Seen, url: &str, reason: &str) {
    assert_eq!(seen.status, 403, "{url} should be refused: {seen:?}");
    assert!(
        seen.error.contains(reason),
        "{url}: x-outrider-error {:?} does not say {reason:?}",
        seen.error
    );
}

fn base_config(up: u16) -> String {
    format!(
        r#"
outbound:
  egress:
    allow:
      - host: api.test
      - host: "*.wild.test"
      - host: ports.test
        ports: [{up}]
      - cidr: 127.0.0.1/32
dns:
  hosts:
    api.test: 127.0.0.1
    sub.api.test: 10.9.9.9
    a.wild.test: 127.0.0.1
    deep.a.wild.test: 127.0.0.1
    wild.test: 10.9.9.9
    evilwild.test: 10.9.9.9
    ports.test: 127.0.0.1
    other.test: 10.9.9.9
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_host_rule() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&base_config(up.port())).await;
    let p = up.port();
    for url in [
        format!("http://api.test:{p}/x"),
        format!("http://API.Test:{p}/x"),
        format!("http://api.test.:{p}/x"),
    ] {
        assert_allowed(&both(&proxy, &url).await, &url);
    }
    // An exact rule does not cover subdomains, nor other names.
    let url = format!("http://sub.api.test:{p}/");
    assert_denied(
        &both(&proxy, &url).await,
        &url,
        "no rule for host sub.api.test",
    );
    let url = format!("http://other.test:{p}/");
    assert_denied(
        &both(&proxy, &url).await,
        &url,
        "no rule for host other.test",
    );
    // Only one trailing dot is ignored.
    let r = proxy_get(proxy.proxy_addr(), &format!("http://api.test..:{p}/")).await;
    assert!(matches!(r.status.as_u16(), 400 | 403), "{r:?}");
    assert!(!r.error_header().is_empty(), "{r:?}");
    // Four allowed requests reached the upstream (two clients each); nothing else did.
    assert_eq!(up.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_rule_allows_subdomains_not_the_domain() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&base_config(up.port())).await;
    let p = up.port();
    for url in [
        format!("http://a.wild.test:{p}/"),
        format!("http://deep.a.wild.test:{p}/"),
        format!("http://A.WILD.TEST.:{p}/"),
    ] {
        assert_allowed(&both(&proxy, &url).await, &url);
    }
    let url = format!("http://wild.test:{p}/");
    assert_denied(
        &both(&proxy, &url).await,
        &url,
        "no rule for host wild.test",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_list_rule() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(&base_config(up.port())).await;
    let p = up.port();
    let url = format!("http://ports.test:{p}/");
    assert_allowed(&both(&proxy, &url).await, &url);
    let other = if p == 65535 { p - 1 } else { p + 1 };
    let url = format!("http://ports.test:{other}/");
    assert_denied(
        &both(&proxy, &url).await,
        &url,
        &format!("port {other} not allowed for ports.test"),
    );
    // No port in the URL means 80, which the rule does not list.
    let url = "http://ports.test/";
    assert_denied(
        &both(&proxy, url).await,
        url,
        "port 80 not allowed for ports.test",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_rule_and_ip_literals() {
    let up = Upstream::start().await;
    let p = up.port();
    let proxy = TestProxy::start(&format!(
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n        ports: [{p}]\n"
    ))
    .await;
    let url = format!("http://127.0.0.1:{p}/lit");
    assert_allowed(&both(&proxy, &url).await, &url);
    // Another loopback address, outside the CIDR: refused before any connect.
    let url = format!("http://127.0.0.2:{p}/");
    assert_denied(
        &both(&proxy, &url).await,
        &url,
        "no rule for address 127.0.0.2",
    );
    // The CIDR rule's port list applies too.
    let url = format!("http://127.0.0.1:{}/", p.wrapping_add(1).max(1));
    assert_eq!(both(&proxy, &url).await.status, 403, "{url}");
    // And without any CIDR rule an IP literal is refused.
    let proxy2 =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - host: api.test\n").await;
    let url = format!("http://127.0.0.1:{p}/");
    let seen = both(&proxy2, &url).await;
    assert_eq!(seen.status, 403, "{seen:?}");
    assert!(!seen.error.is_empty());
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_allowed_and_denied() {
    let up = Upstream::start().await;
    let echo = TcpEcho::start().await;
    let proxy = TestProxy::start(&format!(
        "outbound:\n  egress:\n    allow:\n      - host: api.test\n      - host: echo.test\n        ports: [{}]\n      - cidr: 127.0.0.1/32\n\
         dns:\n  hosts:\n    api.test: 127.0.0.1\n    echo.test: 127.0.0.1\n    other.test: 10.9.9.9\n",
        echo.addr.port()
    ))
    .await;
    // curl tunnels an HTTP request through CONNECT.
    let c = curl(&[
        "-p",
        "-x",
        &proxy.proxy_url(),
        &format!("http://api.test:{}/tunnelled", up.port()),
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert!(c.text().contains("/tunnelled"), "{}", c.text());

    // A raw CONNECT to a TCP echo: bytes go both ways.
    let target = format!("echo.test:{}", echo.addr.port());
    let mut s = open_tunnel(proxy.proxy_addr(), &target).await;
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut back = [0u8; 23];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping through the tunnel");
    drop(s);
    // The tunnel is logged at its close with bytes both ways.
    let rec = proxy
        .wait_log(|r| r["method"] == "CONNECT" && r["authority"] == target.as_str())
        .await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["bytes_in"], 23, "{rec}");
    assert_eq!(rec["bytes_out"], 23, "{rec}");

    // Denied: a name without a rule, and an allowed name on the wrong port.
    for (target, reason) in [
        (
            format!("other.test:{}", up.port()),
            "no rule for host other.test".to_owned(),
        ),
        (
            "echo.test:1".to_owned(),
            "port 1 not allowed for echo.test".to_owned(),
        ),
    ] {
        let c = curl(&["-p", "-x", &proxy.proxy_url(), &format!("http://{target}/")]).await;
        assert_eq!(c.status, 403, "{target}: {c:?}");
        assert!(
            c.header(ERROR_HEADER).unwrap_or_default().contains(&reason),
            "{target}: {c:?}"
        );
        let raw = raw_exchange(
            proxy.proxy_addr(),
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(raw.status, 403, "{raw:?}");
        assert!(
            raw.header(ERROR_HEADER)
                .unwrap_or_default()
                .contains(&reason),
            "{raw:?}"
        );
        let rec = proxy
            .wait_log(|r| r["method"] == "CONNECT" && r["authority"] == target.as_str())
            .await;
        assert_eq!(rec["decision"], "deny", "{rec}");
        assert_eq!(rec["status"], 403, "{rec}");
    }
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_names_resolving_to_private_addresses_are_refused() {
    let up = Upstream::start().await;
    let p = up.port();
    let names = [
        ("lo.test", "127.0.0.1"),
        ("ten.test", "10.1.2.3"),
        ("meta.test", "169.254.169.254"),
        ("mapped.test", "::ffff:127.0.0.1"),
    ];
    let mut yaml = String::from("outbound:\n  egress:\n    allow:\n");
    for (n, _) in names {
        yaml += &format!("      - host: {n}\n");
    }
    yaml += "dns:\n  hosts:\n";
    for (n, a) in names {
        yaml += &format!("    {n}: \"{a}\"\n");
    }
    let proxy = TestProxy::start(&yaml).await;
    for (n, _) in names {
        let url = format!("http://{n}:{p}/");
        let seen = both(&proxy, &url).await;
        assert_denied(&seen, &url, "resolved to a private address");
        assert!(seen.error.contains(n), "{seen:?}");
        // CONNECT gets the same check.
        let c = curl(&["-p", "-x", &proxy.proxy_url(), &url]).await;
        assert_eq!(c.status, 403, "CONNECT {url}: {c:?}");
    }
    assert_eq!(up.requests(), 0);
    assert_eq!(up.connections(), 0);

    // With a CIDR rule for the loopback address, the loopback name is allowed; the others
    // stay refused.
    let yaml = yaml.replace("    allow:\n", "    allow:\n      - cidr: 127.0.0.1/32\n");
    let proxy = TestProxy::start(&yaml).await;
    let url = format!("http://lo.test:{p}/");
    assert_allowed(&both(&proxy, &url).await, &url);
    for n in ["ten.test", "meta.test"] {
        let url = format!("http://{n}:{p}/");
        assert_denied(
            &both(&proxy, &url).await,
            &url,
            "resolved to a private address",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_hosts_are_refused() {
    let up = Upstream::start().await;
    let p = up.port();
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - host: \"*.test\"\n      - cidr: 127.0.0.1/32\n\
         dns:\n  hosts:\n    b.test: 127.0.0.1\n    good.test: 127.0.0.1\n",
    )
    .await;
    let long = "a".repeat(64);
    let too_long = format!("{}.test", ["abcdefghij"; 25].join("."));
    // Requests that an HTTP parser accepts, so the proxy's own checks must refuse them.
    let parsed = [
        format!("http://evil.test@b.test:{p}/"),
        format!("http://a..b.test:{p}/"),
        format!("http://.b.test:{p}/"),
        format!("http://{long}.test:{p}/"),
        format!("http://{too_long}:{p}/"),
        "http://b.test:0/".to_owned(),
    ];
    for url in &parsed {
        let raw = raw_exchange(
            proxy.proxy_addr(),
            format!("GET {url} HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(matches!(raw.status, 400 | 403), "{url}: {raw:?}");
        assert!(
            raw.header(ERROR_HEADER).is_some(),
            "{url}: no {ERROR_HEADER}: {raw:?}"
        );
    }
    // Shorthand IPv4 forms that libc's resolver reads as 127.0.0.1, which a CIDR rule for
    // 127.0.0.1/32 would allow if they were taken as that address: refused, saying why.
    for target in [
        format!("GET http://127.1:{p}/ HTTP/1.1"),
        format!("GET http://2130706433:{p}/ HTTP/1.1"),
        format!("GET http://0x7f.1:{p}/ HTTP/1.1"),
        format!("CONNECT 127.1:{p} HTTP/1.1"),
    ] {
        let raw = raw_exchange(
            proxy.proxy_addr(),
            format!("{target}\r\nHost: b.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(raw.status, 400, "{target}: {raw:?}");
        let why = raw.header(ERROR_HEADER).unwrap_or_default();
        assert!(why.contains("dotted-quad"), "{target}: {why}");
    }
    // Bytes that must never get through, whoever refuses them.
    let raw_cases: Vec<Vec<u8>> = vec![
        format!("GET http://b.test\0.evil:{p}/ HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("GET http://b.test%00.evil:{p}/ HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("GET http://a b.test:{p}/ HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("GET http://b.test\t:{p}/ HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("CONNECT b.test\0.evil:{p} HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("CONNECT evil.test@b.test:{p} HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("CONNECT a..b.test:{p} HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        format!("CONNECT {long}.test:{p} HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
        b"CONNECT b.test HTTP/1.1\r\nHost: b.test\r\n\r\n".to_vec(),
        b"GET http:///x HTTP/1.1\r\nHost: b.test\r\n\r\n".to_vec(),
        format!("GET http://b.test:{p}:{p}/ HTTP/1.1\r\nHost: b.test\r\n\r\n").into_bytes(),
    ];
    // Some of these never reach the proxy's code: hyper's parser answers a bare 400 itself
    // (no x-outrider-error). Those are listed, and each must still leave a log line.
    let mut bare = Vec::new();
    for req in &raw_cases {
        let raw = raw_exchange(proxy.proxy_addr(), req).await;
        let shown = String::from_utf8_lossy(req).escape_debug().to_string();
        assert!(matches!(raw.status, 400 | 403), "{shown}: {raw:?}");
        if raw.header(ERROR_HEADER).is_none() {
            bare.push(shown);
        }
    }
    eprintln!("refused by the HTTP parser without {ERROR_HEADER}: {bare:#?}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let refused_by_parser = proxy
        .log_lines()
        .await
        .into_iter()
        .filter(|l| {
            l["status"] == 400
                && l["decision"] == "deny"
                && l["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("malformed request refused by the HTTP parser"))
        })
        .count();
    assert_eq!(
        refused_by_parser,
        bare.len(),
        "every request the parser refused is logged"
    );
    // And every refusal, whoever made it, is logged as one: not as `allow` with an error.
    let lines = proxy.log_lines().await;
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l["status"] == 400 || l["status"] == 403)
        .collect();
    assert!(refused.len() >= raw_cases.len(), "{refused:#?}");
    for l in refused {
        assert_eq!(l["decision"], "deny", "{l}");
        assert!(l["reason"].as_str().is_some_and(|r| !r.is_empty()), "{l}");
    }
    assert_eq!(up.requests(), 0, "an invalid host reached the upstream");
    // The proxy is still serving.
    let ok = proxy_get(proxy.proxy_addr(), &format!("http://good.test:{p}/")).await;
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_the_proxy_itself_are_refused_as_a_loop() {
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n      - host: self.test\n\
         dns:\n  hosts:\n    self.test: 127.0.0.1\n",
    )
    .await;
    let pp = proxy.proxy_addr().port();
    let ap = proxy.admin_addr().port();
    for url in [
        format!("http://127.0.0.1:{pp}/"),
        format!("http://self.test:{pp}/"),
        format!("http://127.0.0.1:{ap}/metrics"),
    ] {
        let seen = both(&proxy, &url).await;
        assert_denied(&seen, &url, "loop");
    }
    let c = curl(&[
        "-p",
        "-x",
        &proxy.proxy_url(),
        &format!("http://127.0.0.1:{pp}/"),
    ])
    .await;
    assert_eq!(c.status, 403, "{c:?}");
    assert!(
        c.header(ERROR_HEADER).unwrap_or_default().contains("loop"),
        "{c:?}"
    );
    // An origin-form request addressed to the proxy as if it were the origin.
    let raw = raw_exchange(
        proxy.proxy_addr(),
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw.status, 400, "{raw:?}");
    assert!(
        raw.header(ERROR_HEADER)
            .is_some_and(|e| e.contains("send the absolute URL")),
        "{raw:?}"
    );
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502_and_504_with_a_reason() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  timeouts:\n    connect: 1s\n    response: 300ms\n  egress:\n    allow:\n\
         \x20     - cidr: 127.0.0.1/32\n      - host: nonexistent.invalid\n      - host: nothing-here.outrider-test.invalid\n",
    )
    .await;
    // Connection refused.
    let url = format!("http://127.0.0.1:{}/", closed_port());
    let seen = both(&proxy, &url).await;
    assert_eq!(seen.status, 502, "{seen:?}");
    assert!(!seen.error.is_empty(), "{seen:?}");
    let c = curl(&["-p", "-x", &proxy.proxy_url(), &url]).await;
    assert_eq!(c.status, 502, "CONNECT to a closed port: {c:?}");
    assert!(c.header(ERROR_HEADER).is_some(), "{c:?}");

    // An upstream that accepts and closes without answering.
    let rude = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude_addr = rude.local_addr().unwrap();
    let rude_task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = rude.accept().await else {
                return;
            };
            drop(s);
        }
    });
    let r = proxy_get(proxy.proxy_addr(), &format!("http://{rude_addr}/")).await;
    assert_eq!(r.status.as_u16(), 502, "{r:?}");
    assert!(!r.error_header().is_empty(), "{r:?}");
    rude_task.abort();

    // A response slower than outbound.timeouts.response.
    let url = format!("http://127.0.0.1:{}/slow?ms=3000", up.port());
    let started = std::time::Instant::now();
    let r = proxy_get(proxy.proxy_addr(), &url).await;
    assert_eq!(r.status.as_u16(), 504, "{r:?}");
    assert!(!r.error_header().is_empty(), "{r:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    // A name the resolver cannot find.
    let r = proxy_get(proxy.proxy_addr(), "http://nonexistent.invalid/").await;
    assert_eq!(r.status.as_u16(), 502, "{r:?}");
    assert!(r.error_header().contains("nonexistent.invalid"), "{r:?}");
    let c = curl(&[
        "-p",
        "-x",
        &proxy.proxy_url(),
        "http://nothing-here.outrider-test.invalid:8080/",
    ])
    .await;
    assert_eq!(c.status, 502, "{c:?}");
    assert!(c.header(ERROR_HEADER).is_some(), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_connect() {
    let tls = outrider::testing::TlsUpstream::start("secure.test").await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - host: secure.test\n      - cidr: 127.0.0.1/32\n\
         dns:\n  hosts:\n    secure.test: 127.0.0.1\n    insecure.test: 10.9.9.9\n",
    )
    .await;
    let dir = outrider::testing::TempDir::new("ca");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem).unwrap();
    let ca = ca.display().to_string();
    let url = format!("https://secure.test:{}/over-tls", tls.addr.port());
    let c = curl(&["--cacert", &ca, "-x", &proxy.proxy_url(), &url]).await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.text(), "tls ok /over-tls");
    let rec = proxy
        .wait_log(|r| r["method"] == "CONNECT" && r["status"] == 200)
        .await;
    assert_eq!(rec["authority"], format!("secure.test:{}", tls.addr.port()));
    assert!(
        rec["bytes_in"].as_u64().unwrap() > 0 && rec["bytes_out"].as_u64().unwrap() > 0,
        "{rec}"
    );

    // The same through the HTTPS_PROXY environment variable, as an app would use it.
    let out = tokio::process::Command::new("/usr/bin/curl")
        .args(["-sS", "--cacert", &ca, &url])
        .env("HTTPS_PROXY", proxy.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tls ok /over-tls");

    // Denied: CONNECT to a name without a rule.
    let c = curl(&[
        "--cacert",
        &ca,
        "-x",
        &proxy.proxy_url(),
        &format!("https://insecure.test:{}/", tls.addr.port()),
    ])
    .await;
    assert_eq!(c.status, 403, "{c:?}");
    assert!(
        c.header(ERROR_HEADER)
            .unwrap_or_default()
            .contains("no rule for host insecure.test"),
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_no_rule_names_is_refused_as_such_not_resolved() {
    // A CIDR rule for some other network must not turn every unlisted name into a DNS
    // query: the user should see "no rule for host", not an upstream (DNS) failure, and the
    // proxy should not look up names it is going to refuse (a DNS exfiltration channel).
    let proxy = TestProxy::start(
        "outbound:\n  timeouts:\n    connect: 1s\n  egress:\n    allow:\n      - host: api.test\n      - cidr: 10.20.0.0/16\n\
         dns:\n  hosts:\n    api.test: 10.20.0.1\n",
    )
    .await;
    let url = "http://never-resolves.invalid:8080/";
    let seen = both(&proxy, url).await;
    assert_denied(&seen, url, "no rule for host never-resolves.invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_etc_hosts_resolve() {
    // /etc/hosts maps localhost to loopback on every machine this runs on.
    let up = Upstream::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - host: localhost\n      - cidr: 127.0.0.1/32\n",
    )
    .await;
    let url = format!("http://localhost:{}/hosts-file", up.port());
    let seen = both(&proxy, &url).await;
    assert_allowed(&seen, &url);
    // And without the CIDR rule, localhost is a private address like any other.
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - host: localhost\n").await;
    let seen = both(&proxy, &url).await;
    assert_denied(&seen, &url, "resolved to a private address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_literals_need_an_ipv6_cidr_rule() {
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - cidr: \"::1/128\"\n      - host: six.test\n\
         dns:\n  hosts:\n    six.test: \"::1\"\n",
    )
    .await;
    // The proxy counts every loopback address on its own ports as itself (loop guard), so
    // the IPv6 upstream must not happen to get the same port number as one of them.
    let up = loop {
        let up = Upstream::start_on("[::1]:0").await;
        if ![proxy.proxy_addr().port(), proxy.admin_addr().port()].contains(&up.port()) {
            break up;
        }
    };
    let p = up.port();
    let url = format!("http://[::1]:{p}/six");
    let seen = both(&proxy, &url).await;
    assert_allowed(&seen, &url);
    let url = format!("http://six.test:{p}/six");
    assert_allowed(&both(&proxy, &url).await, &url);
    let rec = proxy
        .wait_log(|r| r["authority"] == format!("six.test:{p}"))
        .await;
    assert_eq!(rec["upstream"], format!("[::1]:{p}"), "{rec}");
    // An IPv4 CIDR rule does not cover it.
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let url = format!("http://[::1]:{p}/six");
    assert_denied(&both(&proxy, &url).await, &url, "no rule for address ::1");
}
