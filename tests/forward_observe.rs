#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What an operator sees: the access-log record and the metrics for a denied request,
//! report mode, and the admin endpoints. Metrics are process-wide (one recorder per test
//! binary), so these tests assert on deltas and label sets, and live in their own binary.

use outrider::testing::{
    admin_get, curl, metric_value, proxy_get, TestProxy, Upstream, ERROR_HEADER,
};

const DENY_4XX: &[(&str, &str)] = &[
    ("direction", "outbound"),
    ("decision", "deny"),
    ("status_class", "4xx"),
];

async fn metrics(proxy: &TestProxy) -> String {
    let (status, text) = admin_get(proxy.admin_addr(), "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_log_line_and_metrics() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - host: api.test\n      - cidr: 127.0.0.1/32\n\
         dns:\n  hosts:\n    api.test: 127.0.0.1\n    denied.test: 10.9.9.9\n",
    )
    .await;
    let before = metrics(&proxy).await;
    let r = proxy_get(
        proxy.proxy_addr(),
        &format!("http://denied.test:{}/secret?q=1", up.port()),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(
        r.error_header().contains("no rule for host denied.test"),
        "{r:?}"
    );
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        &format!("http://denied.test:{}/by-curl", up.port()),
    ])
    .await;
    assert_eq!(c.status, 403);
    let ok = proxy_get(
        proxy.proxy_addr(),
        &format!("http://api.test:{}/fine", up.port()),
    )
    .await;
    assert_eq!(ok.status, 200);

    let rec = proxy.wait_log(|r| r["path"] == "/secret?q=1").await;
    for field in [
        "timestamp",
        "client",
        "mode",
        "method",
        "authority",
        "path",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream",
        "decision",
        "reason",
    ] {
        assert!(
            rec.get(field).is_some(),
            "access-log record lacks {field}: {rec}"
        );
    }
    assert!(rec["timestamp"].as_str().unwrap().ends_with('Z'), "{rec}");
    assert!(
        rec["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{rec}"
    );
    assert_eq!(rec["mode"], "explicit");
    assert_eq!(rec["method"], "GET");
    assert_eq!(rec["authority"], format!("denied.test:{}", up.port()));
    assert_eq!(rec["status"], 403);
    assert_eq!(rec["decision"], "deny");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("no rule for host denied.test"),
        "{rec}"
    );
    assert!(
        rec["upstream"].is_null(),
        "a denied request dialled nothing: {rec}"
    );
    assert!(rec["duration_ms"].as_f64().unwrap() >= 0.0);

    let allowed = proxy.wait_log(|r| r["path"] == "/fine").await;
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["upstream"], up.addr.to_string());
    assert!(allowed["bytes_out"].as_u64().unwrap() > 0, "{allowed}");
    assert!(allowed.get("rule").is_some(), "{allowed}");

    let after = metrics(&proxy).await;
    let delta = metric_value(&after, "outrider_requests_total", DENY_4XX)
        - metric_value(&before, "outrider_requests_total", DENY_4XX);
    assert!(delta >= 2.0, "deny/4xx went up by {delta}:\n{after}");
    let denied = |t: &str| {
        metric_value(
            t,
            "outrider_egress_denied_total",
            &[("reason", "no_rule_for_host"), ("decision", "deny")],
        )
    };
    assert!(denied(&after) - denied(&before) >= 2.0, "{after}");
    for name in [
        "outrider_request_duration_seconds_bucket",
        "outrider_request_duration_seconds_count",
        "outrider_connections_total",
        "outrider_connections_open",
        "outrider_dns_lookups_total",
        "outrider_dns_failures_total",
        "outrider_bytes_in_total",
        "outrider_bytes_out_total",
        "outrider_upstream_connect_errors_total",
    ] {
        assert!(
            after.lines().any(|l| l.starts_with(name)),
            "/metrics lacks {name}:\n{after}"
        );
    }
    assert!(
        metric_value(&after, "outrider_connections_total", &[])
            - metric_value(&before, "outrider_connections_total", &[])
            >= 3.0
    );
    assert!(
        metric_value(&after, "outrider_dns_lookups_total", &[])
            > metric_value(&before, "outrider_dns_lookups_total", &[])
    );
    assert!(
        metric_value(
            &after,
            "outrider_request_duration_seconds_count",
            &[("direction", "outbound")]
        ) - metric_value(
            &before,
            "outrider_request_duration_seconds_count",
            &[("direction", "outbound")]
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_lets_traffic_pass_but_logs_and_counts_it() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    mode: report\n    allow:\n      - host: api.test\n        ports: [1]\n\
         dns:\n  hosts:\n    api.test: 127.0.0.1\n    unlisted.test: 127.0.0.1\n",
    )
    .await;
    let count =
        |t: &str| metric_value(t, "outrider_egress_denied_total", &[("decision", "report")]);
    let before = metrics(&proxy).await;
    // No rule names it, a rule names it on another port, an IP literal without a CIDR rule,
    // a name resolving to loopback: enforcement would deny each.
    let urls = [
        format!("http://unlisted.test:{}/r1", up.port()),
        format!("http://api.test:{}/r2", up.port()),
        format!("http://127.0.0.1:{}/r3", up.port()),
    ];
    for url in &urls {
        let r = proxy_get(proxy.proxy_addr(), url).await;
        assert_eq!(r.status, 200, "{url}: report mode must let it pass: {r:?}");
        assert!(r.header(ERROR_HEADER).is_none());
    }
    let c = curl(&[
        "-x",
        &proxy.proxy_url(),
        &format!("http://unlisted.test:{}/r4", up.port()),
    ])
    .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(up.requests(), 4);
    for path in ["/r1", "/r2", "/r3", "/r4"] {
        let rec = proxy.wait_log(|r| r["path"] == path).await;
        assert_eq!(rec["decision"], "report", "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert!(
            !rec["reason"].as_str().unwrap_or_default().is_empty(),
            "{rec}"
        );
    }
    let rec = proxy.wait_log(|r| r["path"] == "/r2").await;
    assert!(
        rec["reason"].as_str().unwrap().contains("not allowed"),
        "{rec}"
    );
    let after = metrics(&proxy).await;
    assert!(
        count(&after) - count(&before) >= 4.0,
        "report-mode denials not counted:\n{after}"
    );
    let report_2xx = &[
        ("direction", "outbound"),
        ("decision", "report"),
        ("status_class", "2xx"),
    ];
    assert!(
        metric_value(&after, "outrider_requests_total", report_2xx)
            - metric_value(&before, "outrider_requests_total", report_2xx)
            >= 4.0
    );

    // Invalid hosts are still refused in report mode.
    let r = proxy_get(
        proxy.proxy_addr(),
        &format!("http://a..b.test:{}/", up.port()),
    )
    .await;
    assert!(matches!(r.status.as_u16(), 400 | 403), "{r:?}");
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let proxy = TestProxy::start("outbound:\n  egress:\n    allow: []\n").await;
    let (s, body) = admin_get(proxy.admin_addr(), "/live").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = admin_get(proxy.admin_addr(), "/ready").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = admin_get(proxy.admin_addr(), "/metrics").await;
    assert_eq!(s, 200);
    assert!(body.contains("outrider_"), "{body}");
    let (s, _) = admin_get(proxy.admin_addr(), "/nope").await;
    assert_eq!(s, 404);
    // The admin port is not a proxy: an absolute-form request there is not forwarded.
    let c = curl(&[
        "-x",
        &format!("http://{}", proxy.admin_addr()),
        "http://127.0.0.1:1/",
    ])
    .await;
    assert_ne!(c.status, 200, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_counted() {
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n      - host: nonexistent.invalid\n",
    )
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let before = metrics(&proxy).await;
    let r = proxy_get(proxy.proxy_addr(), &format!("http://127.0.0.1:{closed}/")).await;
    assert_eq!(r.status, 502);
    let r = proxy_get(proxy.proxy_addr(), "http://nonexistent.invalid/").await;
    assert_eq!(r.status, 502);
    let after = metrics(&proxy).await;
    let d = |name: &str| metric_value(&after, name, &[]) - metric_value(&before, name, &[]);
    assert!(
        d("outrider_upstream_connect_errors_total") >= 1.0,
        "{after}"
    );
    assert!(d("outrider_dns_failures_total") >= 1.0, "{after}");
    let five = &[("direction", "outbound"), ("status_class", "5xx")];
    assert!(
        metric_value(&after, "outrider_requests_total", five)
            - metric_value(&before, "outrider_requests_total", five)
            >= 2.0
    );
    let rec = proxy
        .wait_log(|r| r["authority"] == "nonexistent.invalid")
        .await;
    assert_eq!(rec["status"], 502);
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("nonexistent.invalid")),
        "{rec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_host_refusals_are_counted_as_denials() {
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - host: \"*.test\"\n      - cidr: 127.0.0.1/32\n",
    )
    .await;
    let invalid = |t: &str| {
        metric_value(
            t,
            "outrider_egress_denied_total",
            &[("reason", "invalid_host"), ("decision", "deny")],
        )
    };
    let before = metrics(&proxy).await;
    let r = proxy_get(proxy.proxy_addr(), "http://a..b.test:8080/").await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!r.error_header().is_empty());
    let raw = outrider::testing::raw_exchange(
        proxy.proxy_addr(),
        b"CONNECT evil.test@b.test:443 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw.status, 400, "{raw:?}");
    let after = metrics(&proxy).await;
    assert!(
        invalid(&after) - invalid(&before) >= 2.0,
        "invalid-host refusals missing from outrider_egress_denied_total{{reason=\"invalid_host\"}}:\n{}",
        after
            .lines()
            .filter(|l| l.starts_with("outrider_egress_denied_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_host_refusals_log_the_requested_authority() {
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - host: \"*.test\"\n").await;
    let r = proxy_get(proxy.proxy_addr(), "http://a..b.test:8080/which-host").await;
    assert_eq!(r.status, 400, "{r:?}");
    let rec = proxy.wait_log(|r| r["path"] == "/which-host").await;
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid host"),
        "{rec}"
    );
    // Without the authority, an operator cannot tell which host a client was refused.
    assert_eq!(rec["authority"], "a..b.test:8080", "{rec}");
}

/// A response with no body to send (HEAD, 204, an empty 200) is complete when its head is
/// sent: its record carries no "cut off" error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_without_a_body_are_logged_as_complete() {
    let up = Upstream::start().await;
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let base = format!("http://127.0.0.1:{}", up.port());
    let proxy_url = proxy.proxy_url();
    for (args, path, status) in [
        (vec!["-I"], "/head", 200),
        (vec![], "/empty", 200),
        (vec![], "/no-content", 204),
    ] {
        let url = format!("{base}{path}");
        let mut all = vec!["-x", proxy_url.as_str(), url.as_str()];
        all.extend(args);
        assert_eq!(curl(&all).await.status, status, "{path}");
        let rec = proxy.wait_log(|r| r["path"] == path).await;
        assert_eq!(rec["status"], status, "{rec}");
        assert!(rec.get("error").is_none(), "{path}: {rec}");
    }
}

/// Userinfo in a URL or CONNECT target is refused, and what may be a password never
/// reaches the log: an access log travels further than the request did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_is_refused_and_its_password_never_logged() {
    let up = Upstream::start().await;
    let p = up.port();
    let proxy =
        TestProxy::start("outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n").await;
    let r = proxy_get(
        proxy.proxy_addr(),
        &format!("http://alice:s3cret@127.0.0.1:{p}/with-userinfo"),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error_header().contains("userinfo"), "{r:?}");
    let raw = outrider::testing::raw_exchange(
        proxy.proxy_addr(),
        format!("CONNECT alice:s3cret@127.0.0.1:{p} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(raw.status, 400, "{raw:?}");
    assert!(
        raw.header(ERROR_HEADER)
            .unwrap_or_default()
            .contains("userinfo"),
        "{raw:?}"
    );
    assert_eq!(
        up.requests(),
        0,
        "a request with userinfo reached the upstream"
    );

    let get = proxy.wait_log(|r| r["path"] == "/with-userinfo").await;
    assert_eq!(get["authority"], format!("***@127.0.0.1:{p}"), "{get}");
    assert_eq!(get["decision"], "deny", "{get}");
    let connect = proxy.wait_log(|r| r["method"] == "CONNECT").await;
    assert_eq!(
        connect["authority"],
        format!("***@127.0.0.1:{p}"),
        "{connect}"
    );
    for line in proxy.log_lines().await {
        assert!(
            !line.to_string().contains("s3cret"),
            "password logged: {line}"
        );
    }
}

/// `access_log.strip_query: true` logs each path without its query string, which may carry
/// tokens; the request itself goes upstream whole. (By default the query is logged: see
/// `denied_request_log_line_and_metrics`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_query_keeps_query_strings_out_of_the_log_only() {
    let up = Upstream::start().await;
    let proxy = TestProxy::start(
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\naccess_log:\n  strip_query: true\n",
    )
    .await;
    let r = proxy_get(
        proxy.proxy_addr(),
        &format!("http://127.0.0.1:{}/report?token=s3cret", up.port()),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // The upstream echoes the request: the query went on.
    assert!(r.text().contains("token=s3cret"), "{r:?}");
    let rec = proxy.wait_log(|l| l["path"] == "/report").await;
    assert_eq!(rec["status"], 200, "{rec}");
    for line in proxy.log_lines().await {
        assert!(!line.to_string().contains("s3cret"), "query logged: {line}");
    }
}
