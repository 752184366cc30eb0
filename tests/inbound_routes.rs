//! The inbound listener as a reverse proxy, in-process: routes by path prefix, host and
//! header; forwarding headers; request ids; authorization of plaintext callers; a caller's
//! own `x-forwarded-client-cert` never reaches the app. (With real iptables redirection and
//! original destinations: tests/netns_transparent.rs; with mTLS identities: tests/netns_mesh.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outrider::testing::TestProxy;

/// An app that answers with its name and the request headers it saw, as JSON.
async fn app(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                            .collect();
                        let body = serde_json::json!({"app": name, "path": req.uri().path(), "headers": headers});
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            body.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn send(
    inbound: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path);
    // hyper's connection-level client adds no Host, and HTTP/1.1 needs one.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", inbound.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn inbound_config(api: SocketAddr, web: SocketAddr, canary: SocketAddr, authz: &str) -> String {
    format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: /api, headers: {{ x-canary: \"1\" }} }}\n      to: {canary}\n    - match: {{ path_prefix: /api }}\n      to: {api}\n    - match: {{ host: shop.local }}\n      to: {web}\n{authz}"
    )
}

#[tokio::test]
async fn routes_by_path_header_and_host_with_forwarding_headers() {
    let (api, web, canary) = (app("api").await, app("web").await, app("canary").await);
    let p = TestProxy::start(&inbound_config(api, web, canary, "")).await;
    let inbound = p.handle().inbound_addr.unwrap();

    let (s, _, body) = send(inbound, "GET", "/api/items", &[("host", "shop.local")]).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["app"], "api", "path prefix wins before host: first match");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(v["headers"]["forwarded"]
        .as_str()
        .unwrap()
        .contains("for=127.0.0.1"));
    let rid = v["headers"]["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(rid.len(), 32, "a request id is added when missing");

    let (_, _, body) = send(
        inbound,
        "GET",
        "/api/items",
        &[("host", "shop.local"), ("x-canary", "1")],
    )
    .await;
    assert!(body.contains("\"app\":\"canary\""), "{body}");

    let (_, _, body) = send(
        inbound,
        "GET",
        "/",
        &[
            ("host", "SHOP.local"),
            ("x-request-id", "given-id"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("forwarded", "for=10.0.0.1"),
            ("forwarded", "for=10.0.0.2"),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["app"], "web");
    // Two lines of a list header are one list: both earlier hops reach the app, in
    // order, before the caller's address.
    assert_eq!(
        v["headers"]["x-forwarded-for"],
        "10.0.0.1, 10.0.0.2, 127.0.0.1"
    );
    let forwarded = v["headers"]["forwarded"].as_str().unwrap();
    assert!(
        forwarded.starts_with("for=10.0.0.1, for=10.0.0.2, for=127.0.0.1;proto=http"),
        "{forwarded}"
    );
    assert_eq!(
        v["headers"]["x-request-id"], "given-id",
        "an existing request id is kept"
    );

    // No route and no original destination: 404 naming why.
    let (s, h, _) = send(inbound, "GET", "/", &[("host", "other.local")]).await;
    assert_eq!(s, 404);
    assert!(h["x-outrider-error"]
        .to_str()
        .unwrap()
        .contains("no inbound route"));

    let lines = p.log_lines().await;
    assert!(lines.iter().all(|l| l["direction"] == "inbound"));
    assert!(lines.iter().any(|l| l["request_id"] == "given-id"));
}

#[tokio::test]
async fn authorization_denies_what_no_rule_allows_and_xfcc_is_never_forwarded() {
    let (api, web, canary) = (app("api").await, app("web").await, app("canary").await);
    let authz = "  authorization:\n    - paths: [/api/]\n      methods: [GET]\n";
    let p = TestProxy::start(&inbound_config(api, web, canary, authz)).await;
    let inbound = p.handle().inbound_addr.unwrap();

    let forged = (
        "x-forwarded-client-cert",
        "URI=spiffe://cluster.local/ns/admin/sa/root",
    );
    let (s, _, body) = send(inbound, "GET", "/api/items", &[forged]).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["headers"].get("x-forwarded-client-cert").is_none(),
        "a caller cannot claim an identity: {body}"
    );

    let (s, h, _) = send(inbound, "POST", "/api/items", &[]).await;
    assert_eq!(s, 403);
    assert!(h["x-outrider-error"]
        .to_str()
        .unwrap()
        .contains("no authorization rule allows"));
    let (s, _, _) = send(inbound, "GET", "/admin", &[("host", "shop.local")]).await;
    assert_eq!(s, 403);

    // Paths that start with /api/ but that an app resolving dot segments (or decoding them
    // first) would serve as /admin.
    let sneaky = [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/..;/admin",
        "/api/x%2F..%2F..%2Fadmin",
    ];
    for path in sneaky {
        let (s, h, _) = send(inbound, "GET", path, &[]).await;
        assert_eq!(s, 403, "{path}");
        let reason = h["x-outrider-error"].to_str().unwrap();
        assert!(reason.contains("normal form"), "{path}: {reason}");
    }

    let lines = p.log_lines().await;
    let denied: Vec<_> = lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert_eq!(denied.len(), 2 + sneaky.len());
}

#[test]
fn strict_or_permissive_mtls_without_an_identity_is_a_config_error() {
    // Plaintext refused by a strict sidecar is shown in tests/mesh_proxy.rs; without an
    // identity there is nothing to terminate mTLS with, so the config names the key.
    for mode in ["strict", "permissive"] {
        let yaml = format!("inbound:\n  mtls: {mode}\n");
        let err = outrider::config::validate(outrider::config::Config::from_yaml(&yaml).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("inbound.mtls:"), "{err}");
        assert!(err.contains("identity"), "{err}");
    }
    let ok = "inbound:\n  mtls: disabled\n";
    assert!(outrider::config::validate(outrider::config::Config::from_yaml(ok).unwrap()).is_ok());
}

/// A WebSocket-style protocol switch through inbound: the app sees the `Upgrade` request
/// (not stripped as hop-by-hop), its `101` reaches the caller, and the two connections are
/// joined both ways. A path that authorization refuses is refused before any switch, and
/// a reload that stops allowing the path closes the joined connection (logged as denied,
/// with the bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_upgrades_reach_the_app_and_are_joined() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = outrider::testing::Upstream::start().await;
    let config = |allowed: &str| {
        format!(
            "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: 127.0.0.1:{}\n  \
             authorization:\n    - paths: [{allowed}]\n",
            up.port()
        )
    };
    let p = TestProxy::start(&config("/upgrade")).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let switch = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
    };
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(switch("/upgrade").as_bytes()).await.unwrap();
    let head = outrider::testing::read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for probe in [&b"hello"[..], b"second message"] {
        s.write_all(probe).await.unwrap();
        let mut back = vec![0u8; probe.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("no echo through the upgraded connection")
            .unwrap();
        assert_eq!(back, probe);
    }
    // Authorization applies before the switch.
    let mut other = tokio::net::TcpStream::connect(inbound).await.unwrap();
    other
        .write_all(switch("/elsewhere").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = other.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 403"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    // A reload that no longer allows /upgrade closes the joined connection.
    p.reload_with(&config("/elsewhere")).unwrap();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the upgraded connection was still open after a reload revoked its rule: {read:?}"
    );
    let rec = p.wait_log(|r| r["status"] == 101).await;
    assert_eq!(rec["direction"], "inbound", "{rec}");
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert!(
        rec["reason"].as_str().unwrap().contains("config reload"),
        "{rec}"
    );
    assert!(rec.get("rule").is_none(), "{rec}");
    assert!(rec["bytes_in"].as_u64().unwrap() >= 19, "{rec}");
}

#[tokio::test]
async fn connect_and_foreign_transfer_codings_are_refused_and_never_reach_the_app() {
    use tokio::io::AsyncWriteExt;
    let (api, web, canary) = (app("api").await, app("web").await, app("canary").await);
    let p = TestProxy::start(&inbound_config(api, web, canary, "")).await;
    let inbound = p.handle().inbound_addr.unwrap();

    // The host route would send shop.local to the web app, which answers anything 200.
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(b"CONNECT shop.local:443 HTTP/1.1\r\nHost: shop.local:443\r\n\r\n")
        .await
        .unwrap();
    let head = outrider::testing::read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{head}");
    assert!(
        head.contains("x-outrider-error: connect is not served on the inbound listener"),
        "{head}"
    );

    let rec = p.wait_log(|r| r["method"] == "CONNECT").await;
    assert_eq!(rec["direction"], "inbound", "{rec}");
    assert_eq!(rec["status"], 405, "{rec}");
    assert!(rec["upstream"].is_null(), "the app was dialled: {rec}");

    // A request body in another coding than chunked cannot be passed on as it is: 501.
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: shop.local\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let head = outrider::testing::read_head(&mut s).await.to_lowercase();
    assert!(head.starts_with("http/1.1 501"), "{head}");

    // OPTIONS with Max-Forwards: 0 is answered by the sidecar itself (RFC 9110 §7.6.2).
    let (status, headers, body) = send(
        inbound,
        "OPTIONS",
        "/",
        &[("host", "shop.local"), ("max-forwards", "0")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("allow"), "{headers:?}");
    assert!(body.is_empty(), "the app answered: {body}");

    // Only these are refused: the same host routes a GET to the web app.
    let (status, _, body) = send(inbound, "GET", "/", &[("host", "shop.local")]).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"app\":\"web\""), "{body}");
}

/// Sends `request` as written and reads the whole response (the request says
/// `Connection: close`, or is HTTP/1.0).
async fn raw(inbound: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("no response within 5 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_app_is_told_the_host_the_request_was_routed_on_and_no_other() {
    let (api, web, canary) = (app("api").await, app("web").await, app("canary").await);
    let p = TestProxy::start(&inbound_config(api, web, canary, "")).await;
    let inbound = p.handle().inbound_addr.unwrap();
    let app_saw = |resp: &str| -> serde_json::Value {
        assert!(
            resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
            "{resp}"
        );
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap()
    };

    // An absolute-form target is the host (RFC 9112 §3.2.2): it chose the web app's route,
    // and the app, which would have built its links from `evil.test`, is told so.
    let resp = raw(
        inbound,
        "GET http://shop.local/cart HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let v = app_saw(&resp);
    assert_eq!(v["app"], "web", "{v}");
    assert_eq!(v["headers"]["host"], "shop.local", "{v}");

    // HTTP/1.0 predates Host: served without one.
    let v = app_saw(&raw(inbound, "GET /api/x HTTP/1.0\r\n\r\n").await);
    assert_eq!(v["app"], "api", "{v}");

    // A missing, doubled or malformed Host is answered 400 by the sidecar, as nginx and
    // Envoy answer it; the route took the first of two, and an app may read the last.
    let refused = [
        ("GET / HTTP/1.1\r\n", "needs a host header"),
        (
            "GET / HTTP/1.1\r\nHost: shop.local\r\nHost: evil.test\r\n",
            "more than one host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: evil.test@shop.local\r\n",
            "invalid host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: shop.local/../admin\r\n",
            "invalid host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: shop.local:http\r\n",
            "port is not a number",
        ),
        (
            "GET http://u:pw@shop.local/ HTTP/1.1\r\nHost: shop.local\r\n",
            "userinfo",
        ),
    ];
    for (head, why) in refused {
        let resp = raw(inbound, &format!("{head}Connection: close\r\n\r\n")).await;
        let lower = resp.to_lowercase();
        assert!(lower.starts_with("http/1.1 400"), "{head:?}: {resp}");
        let error = lower
            .lines()
            .find_map(|l| l.strip_prefix("x-outrider-error: "))
            .unwrap_or_default();
        assert!(error.contains(why), "{head:?}: {error}");
        assert!(!resp.contains("\"app\""), "reached the app: {resp}");
    }
    let rec = p.wait_log(|r| r["status"] == 400).await;
    assert_eq!(rec["decision"], "deny", "{rec}");
    assert!(rec["upstream"].is_null(), "the app was dialled: {rec}");
}
