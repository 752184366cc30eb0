//! Mesh mTLS through the proxy itself, in-process: sidecar A's outbound wraps a request to a
//! mesh destination in mTLS with its CA-issued identity; sidecar B's inbound terminates it,
//! authorizes A's SPIFFE ID and passes it to the app in `x-forwarded-client-cert`. Plaintext
//! to a strict B is refused; a sidecar from another CA cannot talk to B.
//! (Across network namespaces with real iptables: tests/netns_mesh.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use outrider::config::{validate, Config};
use outrider::server::{Server, ServerHandle};
use outrider::tls::ca::{MeshCa, ROOT_CERT_FILE};
use outrider::tls::ca_server::{CaServer, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "mesh.test";

struct Ca {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    /// The `ca_bundle` sidecars are given: the root's own file unless a test says otherwise.
    bundle: PathBuf,
    ca: Arc<MeshCa>,
    addr: SocketAddr,
    _server: CaServer,
}

impl Ca {
    async fn new() -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = Arc::new(MeshCa::init(&dir, TD, Duration::from_secs(86400)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = CaServer::start(ca.clone(), listener, &ServeOptions::default()).unwrap();
        let addr = server.local_addr();
        Ca {
            tmp,
            bundle: dir.join(ROOT_CERT_FILE),
            dir,
            ca,
            addr,
            _server: server,
        }
    }

    /// The `identity:` YAML for `who`, with its bootstrap token written to disk.
    fn identity_yaml(&self, who: &str) -> String {
        let id = self.ca.identity(who).unwrap();
        let token = self.ca.mint_token(&id, Duration::from_secs(600)).unwrap();
        let token_file = self
            .tmp
            .path()
            .join(format!("token-{}", who.replace('/', "-")));
        std::fs::write(&token_file, token).unwrap();
        format!(
            "identity:\n  id: {id}\n  ca_url: https://{}\n  ca_bundle: {}\n  token_file: {}\n",
            self.addr,
            self.bundle.display(),
            token_file.display()
        )
    }
}

struct Sidecar {
    handle: ServerHandle,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    async fn start(yaml: &str, original_dst: Option<SocketAddr>) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let yaml = format!(
            "admin: {{ listen: 127.0.0.1:0 }}\n{yaml}access_log: {{ output: {} }}\n",
            log.display()
        );
        let compiled = validate(Config::from_yaml(&yaml).unwrap()).unwrap();
        let mut server = Server::bind(compiled, None).await.unwrap();
        if let Some(od) = original_dst {
            server = server.with_orig_dst(Arc::new(move |_s: &TcpStream| Some(od)));
        }
        let handle = server.handle();
        tokio::spawn(server.run());
        // Ready only once the identity has its first certificate.
        for _ in 0..200 {
            if handle.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            handle.is_ready(),
            "sidecar never became ready (no certificate?)"
        );
        Sidecar {
            handle,
            log,
            _dir: dir,
        }
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The app behind B: answers with the caller identity header it was given.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap_or("").to_string())
                        .unwrap_or_else(|| "none".into());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(format!(
                        "caller={xfcc}"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sidecar B: strict mTLS inbound in front of the app, allowing ns/a GETs on /api/.
async fn sidecar_b(ca: &Ca, app: SocketAddr) -> Sidecar {
    let yaml = format!(
        "outbound: {{ listen: 127.0.0.1:0 }}\ninbound:\n  listen: 127.0.0.1:0\n  mtls: strict\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n  authorization:\n    - from: [\"spiffe://{TD}/ns/a/*\"]\n      paths: [/api/]\n      methods: [GET]\n{}",
        ca.identity_yaml("ns/b/sa/b")
    );
    Sidecar::start(&yaml, None).await
}

/// A sidecar whose outbound connections all "were going to" `dest`, a mesh destination.
async fn sidecar_client(ca: &Ca, who: &str, dest: SocketAddr) -> Sidecar {
    sidecar_client_expecting(ca, who, dest, "").await
}

/// The same, with extra `mesh:` keys (such as expected identities).
async fn sidecar_client_expecting(
    ca: &Ca,
    who: &str,
    dest: SocketAddr,
    mesh_extra: &str,
) -> Sidecar {
    let yaml = format!(
        "outbound:\n  listen: 127.0.0.1:0\n  egress:\n    allow:\n      - cidr: 127.0.0.0/8\nmesh:\n  networks: [127.0.0.0/8]\n{mesh_extra}{}",
        ca.identity_yaml(who)
    );
    Sidecar::start(&yaml, Some(dest)).await
}

async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_calls_b_over_mtls_and_b_sees_a_identity() {
    let ca = Ca::new().await;
    let b = sidecar_b(&ca, app().await).await;
    let b_inbound = b.handle.inbound_addr.unwrap();
    let a = sidecar_client(&ca, "ns/a/sa/web", b_inbound).await;

    let resp = raw(
        a.handle.outbound_addr,
        "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains(&format!("caller=URI=spiffe://{TD}/ns/a/sa/web")),
        "{resp}"
    );

    // A forged identity header from the calling app is replaced, not passed on.
    let resp = raw(
        a.handle.outbound_addr,
        "GET /api/items HTTP/1.1\r\nHost: b.test\r\nx-forwarded-client-cert: URI=spiffe://mesh.test/ns/admin/sa/root\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.contains(&format!("caller=URI=spiffe://{TD}/ns/a/sa/web")),
        "{resp}"
    );

    // Authorization by path and method.
    let resp = raw(a.handle.outbound_addr, "POST /api/items HTTP/1.1\r\nHost: b.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains(
            "no authorization rule allows spiffe://mesh.test/ns/a/sa/web to POST /api/items"
        ),
        "{resp}"
    );
    let resp = raw(
        a.handle.outbound_addr,
        "GET /admin HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = b.log_lines();
    assert!(lines
        .iter()
        .any(|l| l["peer_identity"] == format!("spiffe://{TD}/ns/a/sa/web") && l["status"] == 200));
    assert!(lines
        .iter()
        .any(|l| l["decision"] == "deny" && l["method"] == "POST"));
}

#[tokio::test]
async fn another_identity_is_denied_by_authorization() {
    let ca = Ca::new().await;
    let b = sidecar_b(&ca, app().await).await;
    let other = sidecar_client(&ca, "ns/other/sa/x", b.handle.inbound_addr.unwrap()).await;
    let resp = raw(
        other.handle.outbound_addr,
        "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("ns/other/sa/x"), "{resp}");
}

#[tokio::test]
async fn plaintext_to_a_strict_sidecar_is_refused() {
    let ca = Ca::new().await;
    let b = sidecar_b(&ca, app().await).await;
    let resp = raw(
        b.handle.inbound_addr.unwrap(),
        "GET /api/items HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.is_empty(),
        "strict mTLS must not answer plaintext: {resp}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(b.log_lines().iter().any(|l| l["decision"] == "deny"
        && l["reason"]
            .as_str()
            .unwrap_or("")
            .contains("plaintext refused")));
}

#[tokio::test]
async fn a_sidecar_from_another_ca_cannot_reach_b() {
    let ca = Ca::new().await;
    let rogue_ca = Ca::new().await; // same trust domain name, different root
    let b = sidecar_b(&ca, app().await).await;
    let rogue = sidecar_client(&rogue_ca, "ns/a/sa/web", b.handle.inbound_addr.unwrap()).await;
    let resp = raw(
        rogue.handle.outbound_addr,
        "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains("mTLS to mesh peer"), "{resp}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !b.log_lines().iter().any(|l| l["status"] == 200),
        "nothing may reach B's app"
    );
}

#[tokio::test]
async fn admin_shows_the_certificate_and_the_expiry_metric() {
    let ca = Ca::new().await;
    let b = sidecar_b(&ca, app().await).await;
    let certs = raw(
        b.handle.admin_addr,
        "GET /certs HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        certs.contains(&format!("spiffe://{TD}/ns/b/sa/b")),
        "{certs}"
    );
    assert!(certs.contains("BEGIN CERTIFICATE"), "{certs}");
    let metrics = raw(
        b.handle.admin_addr,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        metrics.contains("outrider_identity_cert_expiry_timestamp_seconds"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_destination_with_expected_identities_must_present_one_of_them() {
    let ca = Ca::new().await;
    let b = sidecar_b(&ca, app().await).await;
    let b_inbound = b.handle.inbound_addr.unwrap();
    let request = "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n";

    let expects_b = format!(
        "  identities:\n    - cidr: 127.0.0.1/32\n      ids: [\"spiffe://{TD}/ns/b/sa/b\"]\n"
    );
    let a = sidecar_client_expecting(&ca, "ns/a/sa/web", b_inbound, &expects_b).await;
    let resp = raw(a.handle.outbound_addr, request).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // B is a genuine mesh member, but not the service this client expects there.
    let expects_other = format!("  identities:\n    - cidr: 127.0.0.1/32\n      ids: [\"spiffe://{TD}/ns/db/sa/postgres\"]\n");
    let a2 = sidecar_client_expecting(&ca, "ns/a/sa/web", b_inbound, &expects_other).await;
    let resp = raw(a2.handle.outbound_addr, request).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains("mTLS to mesh peer"), "{resp}");
}

#[tokio::test]
async fn a_mesh_peer_that_never_answers_the_handshake_is_a_504() {
    // A "peer" that accepts the connection and never answers the ClientHello. The
    // connect timeout covers the mTLS handshake; the response timeout (a minute here)
    // must not be what ends it, nor may the caller wait forever.
    let ca = Ca::new().await;
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let yaml = format!(
        "outbound:\n  listen: 127.0.0.1:0\n  timeouts: {{ connect: 500ms, response: 60s }}\n  egress:\n    allow:\n      - cidr: 127.0.0.0/8\nmesh:\n  networks: [127.0.0.0/8]\n{}",
        ca.identity_yaml("ns/a/sa/web")
    );
    let a = Sidecar::start(&yaml, Some(dest)).await;
    let resp = raw(
        a.handle.outbound_addr,
        "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(resp.contains("timed out"), "{resp}");
    held.abort();
}

/// A gRPC call across the mesh: the app's HTTP/2 (prior knowledge, to B's address) goes
/// from A to B in HTTP/2 inside mTLS, and from B to an HTTP/2-only app; its trailers come
/// back, B authorizes each stream on its own path, and the app sees A's identity.
#[tokio::test]
async fn a_grpc_call_crosses_the_mesh_in_http2_with_its_trailers() {
    use outrider::testing::{grpc_call, h2_client, text_body as body, GrpcApp};
    let ca = Ca::new().await;
    let app = GrpcApp::start().await;
    let yaml = format!(
        "outbound: {{ listen: 127.0.0.1:0 }}\ninbound:\n  listen: 127.0.0.1:0\n  mtls: strict\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {}\n  authorization:\n    - from: [\"spiffe://{TD}/ns/a/*\"]\n      paths: [/pkg.Greeter/]\n      methods: [POST]\n{}",
        app.addr,
        ca.identity_yaml("ns/b/sa/b")
    );
    let b = Sidecar::start(&yaml, None).await;
    let b_inbound = b.handle.inbound_addr.unwrap();
    let a = sidecar_client(&ca, "ns/a/sa/web", b_inbound).await;
    let mut send = h2_client(TcpStream::connect(a.handle.outbound_addr).await.unwrap()).await;
    let r = grpc_call(&mut send, "b.test", "/pkg.Greeter/Hello", body("hi")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "path=/pkg.Greeter/Hello te=trailers len=2", "{r:?}");
    assert_eq!(r.trailer("grpc-status"), Some("0"), "{r:?}");
    let r = grpc_call(&mut send, "b.test", "/pkg.Admin/Drop", body("x")).await;
    assert_eq!(r.status, 403, "{r:?}");

    let seen = app.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert_eq!(
        seen[0].xfcc.as_deref(),
        Some(format!("URI=spiffe://{TD}/ns/a/sa/web").as_str())
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = b.log_lines();
    let served = lines
        .iter()
        .find(|l| l["path"] == "/pkg.Greeter/Hello")
        .expect("B logged the call");
    assert_eq!(served["protocol"], "http2", "{served}");
    assert_eq!(
        served["peer_identity"],
        format!("spiffe://{TD}/ns/a/sa/web")
    );
    assert!(lines
        .iter()
        .any(|l| l["path"] == "/pkg.Admin/Drop" && l["decision"] == "deny"));
}

/// A caller that stops part-way through the mTLS handshake (here right after its
/// ClientHello) is cut off after `clients.idle_timeout` and logged; before, it held the
/// connection for ever.
#[tokio::test]
async fn a_handshake_that_stalls_is_cut_off() {
    let ca = Ca::new().await;
    let app = app().await;
    let yaml = format!(
        "outbound: {{ listen: 127.0.0.1:0 }}\ninbound:\n  listen: 127.0.0.1:0\n  mtls: strict\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\nclients: {{ idle_timeout: 1s }}\n{}",
        ca.identity_yaml("ns/b/sa/b")
    );
    let b = Sidecar::start(&yaml, None).await;

    // A real ClientHello offering the mesh protocol, from a client that then goes quiet.
    outrider::tls::install_crypto_provider();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"outrider-mesh".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("b.mesh.test").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let mut s = TcpStream::connect(b.handle.inbound_addr.unwrap())
        .await
        .unwrap();
    s.write_all(&hello).await.unwrap();

    // The server's flight comes first; then the close.
    let closed = outrider::testing::read_until_closed(&mut s, Duration::from_secs(15)).await;
    assert!(
        closed.is_some(),
        "a caller stalled mid-handshake still held its connection after 15 s"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        b.log_lines().iter().any(|l| l["decision"] == "deny"
            && l["reason"]
                .as_str()
                .unwrap_or("")
                .contains("mTLS handshake not finished within 1s")),
        "{:?}",
        b.log_lines()
    );
}

/// A pooled mTLS connection to another sidecar is let go a second before that sidecar would
/// close it, so that a request is never sent on a connection the peer is closing that
/// instant (lost, and a 502 for a POST). B's `clients.idle_timeout` is 3 s, A's the default
/// 30 s: A learns B's from B's `Keep-Alive: timeout=3` (before, it took B's to be its own,
/// and sent on for 29 s). A request 2.5 s after the last goes on a new connection to B (B's
/// log shows another client port); one 0.3 s after reuses the connection.
#[tokio::test]
async fn a_pooled_connection_to_a_peer_is_let_go_before_the_peer_closes_it() {
    let ca = Ca::new().await;
    let app = app().await;
    let b = Sidecar::start(
        &format!(
            "outbound: {{ listen: 127.0.0.1:0 }}\ninbound:\n  listen: 127.0.0.1:0\n  mtls: strict\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\nclients: {{ idle_timeout: 3s }}\n{}",
            ca.identity_yaml("ns/b/sa/b")
        ),
        None,
    )
    .await;
    let a = Sidecar::start(
        &format!(
            "outbound:\n  listen: 127.0.0.1:0\n  egress:\n    allow:\n      - cidr: 127.0.0.0/8\nmesh:\n  networks: [127.0.0.0/8]\n{}",
            ca.identity_yaml("ns/a/sa/web")
        ),
        Some(b.handle.inbound_addr.unwrap()),
    )
    .await;
    let get = |path: &'static str| {
        let outbound = a.handle.outbound_addr;
        async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n");
            let resp = raw(outbound, &req).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
        }
    };
    get("/first").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    get("/soon-after").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    get("/later").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client_of = |path: &str| {
        b.log_lines()
            .into_iter()
            .find(|l| l["path"] == path)
            .map(|l| l["client"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no record for {path}"))
    };
    assert_eq!(client_of("/first"), client_of("/soon-after"), "reused");
    assert_ne!(
        client_of("/soon-after"),
        client_of("/later"),
        "a connection idle for 2.5 s was sent on, though the peer closes it at 3 s"
    );
}

/// The value of the metric line that starts with `series` on the sidecar's admin port.
async fn metric(sidecar: &Sidecar, series: &str) -> Option<f64> {
    let text = raw(
        sidecar.handle.admin_addr,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A certificate's SHA-256 fingerprint, lower-case hex, from its PEM.
fn fingerprint(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits (up to 30 s: the bundle file is looked at every 5 s) until `cond` holds.
async fn within_30s<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_root_is_rotated_without_restarting_a_sidecar() {
    // A root is rotated as Istio's and Linkerd's are: every sidecar first trusts both roots,
    // then the CA issues from the new one, then the old one is taken out. The bundle was read
    // once, at start, so each step meant restarting every pod of the mesh.
    let (mut old, mut new) = (Ca::new().await, Ca::new().await);
    let pem = |ca: &Ca| std::fs::read_to_string(ca.dir.join(ROOT_CERT_FILE)).unwrap();
    let (old_root, new_root) = (pem(&old), pem(&new));
    let files = tempfile::tempdir().unwrap();
    let (bundle_a, bundle_b) = (files.path().join("a.pem"), files.path().join("b.pem"));
    std::fs::write(&bundle_a, &old_root).unwrap();
    std::fs::write(&bundle_b, &new_root).unwrap();
    // B already has a certificate from the new root; A, from the old one.
    new.bundle = bundle_b.clone();
    let b = Sidecar::start(
        &format!(
            "outbound: {{ listen: 127.0.0.1:0 }}\ninbound:\n  listen: 127.0.0.1:0\n  mtls: strict\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {}\n{}",
            app().await,
            new.identity_yaml("ns/rotation/sa/b")
        ),
        None,
    )
    .await;
    let b_inbound = b.handle.inbound_addr.unwrap();
    old.bundle = bundle_a.clone();
    let a = sidecar_client(&old, "ns/a/sa/a", b_inbound).await;
    let get = "GET /api/items HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    let resp = raw(a.handle.outbound_addr, get).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    let roots_b = "outrider_identity_trust_roots{identity=\"spiffe://mesh.test/ns/rotation/sa/b\"}";
    assert_eq!(metric(&b, roots_b).await, Some(1.0));

    // Step 1: both roots in every bundle file, as a ConfigMap update writes them.
    let both = format!("{old_root}{new_root}");
    std::fs::write(&bundle_a, &both).unwrap();
    std::fs::write(&bundle_b, &both).unwrap();
    within_30s(
        "A never reached B with both roots in the bundles",
        || async {
            raw(a.handle.outbound_addr, get)
                .await
                .starts_with("HTTP/1.1 200")
        },
    )
    .await;
    assert_eq!(metric(&b, roots_b).await, Some(2.0));
    // `/certs` says which roots those are, as Envoy's does: an operator compares fingerprints.
    let certs = raw(
        b.handle.admin_addr,
        "GET /certs HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (_, body) = certs.split_once("\r\n\r\n").unwrap();
    let certs: serde_json::Value = serde_json::from_str(body).unwrap();
    let shown: Vec<&str> = certs["trust_roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(shown, [fingerprint(&old_root), fingerprint(&new_root)]);
    let root = &certs["trust_roots"][0];
    assert!(root["subject"].as_str().unwrap().contains("CN="), "{root}");
    assert!(
        root["not_after"].as_i64().unwrap() > 1_700_000_000,
        "{root}"
    );

    // A bundle file that cannot be used (written half, emptied by mistake) keeps the roots
    // in use: a new caller with a certificate from the old root still gets in.
    let errors_b =
        "outrider_identity_trust_bundle_errors_total{identity=\"spiffe://mesh.test/ns/rotation/sa/b\"}";
    std::fs::write(
        &bundle_b,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    )
    .unwrap();
    within_30s("B never noticed the broken bundle", || async {
        metric(&b, errors_b).await == Some(1.0)
    })
    .await;
    assert_eq!(metric(&b, roots_b).await, Some(2.0));
    let c = sidecar_client(&old, "ns/a/sa/c", b_inbound).await;
    let resp = raw(c.handle.outbound_addr, get).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // So does a file that is gone, and it is reported once, not at each look every 5 s.
    std::fs::remove_file(&bundle_b).unwrap();
    within_30s("B never noticed the bundle is gone", || async {
        metric(&b, errors_b).await == Some(2.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(metric(&b, errors_b).await, Some(2.0));
    assert_eq!(metric(&b, roots_b).await, Some(2.0));

    // Last step: the old root taken out. A new handshake with its certificates is refused.
    std::fs::write(&bundle_b, &new_root).unwrap();
    within_30s("B never dropped the old root", || async {
        metric(&b, roots_b).await == Some(1.0)
    })
    .await;
    let d = sidecar_client(&old, "ns/a/sa/d", b_inbound).await;
    let resp = raw(d.handle.outbound_addr, get).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
}
