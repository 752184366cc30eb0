//! Workload identity and mesh mTLS end to end: sidecars get certificates from a real CA on
//! 127.0.0.1, then handshake with each other over real sockets with the rustls configs the
//! proxy uses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use outrider::tls::ca::{MeshCa, ROOT_CERT_FILE, ROOT_KEY_FILE};
use outrider::tls::ca_server::{CaServer, ServeOptions};
use outrider::tls::{
    client_config, peer_spiffe_id, server_config, IdentityConfig, SpiffeId, TrustBundle,
    WorkloadIdentity, MESH_ALPN,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const TD: &str = "mesh.test";

struct Mesh {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    ca: Arc<MeshCa>,
    server: Option<CaServer>,
    addr: SocketAddr,
}

impl Mesh {
    async fn new() -> Mesh {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = Arc::new(MeshCa::init(&dir, TD, Duration::from_secs(3600 * 24)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = CaServer::start(ca.clone(), listener, &ServeOptions::default()).unwrap();
        let addr = server.local_addr();
        Mesh {
            tmp,
            dir,
            ca,
            server: Some(server),
            addr,
        }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_file(&self.dir.join(ROOT_CERT_FILE)).unwrap()
    }

    /// The `identity:` config a sidecar for `who` (ns/…/sa/…) gets, with its token on disk.
    fn config(&self, who: &str, cert_ttl: Option<&str>) -> IdentityConfig {
        let id = self.ca.identity(who).unwrap();
        let token = self.ca.mint_token(&id, Duration::from_secs(600)).unwrap();
        let token_file = self
            .tmp
            .path()
            .join(format!("token-{}", who.replace('/', "-")));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        IdentityConfig {
            id: id.to_string(),
            ca_url: format!("https://{}", self.addr),
            ca_bundle: self.dir.join(ROOT_CERT_FILE),
            token_file,
            cert_ttl: cert_ttl.map(str::to_owned),
        }
    }

    async fn identity(&self, who: &str, cert_ttl: Option<&str>) -> WorkloadIdentity {
        let id = WorkloadIdentity::start(&self.config(who, cert_ttl)).unwrap();
        tokio::time::timeout(Duration::from_secs(10), id.ready())
            .await
            .expect("no certificate within 10s");
        id
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mesh server: greets each client with the SPIFFE ID it verified, then echoes. Handshake
/// errors go to `errors`.
struct EchoServer {
    addr: SocketAddr,
    errors: mpsc::UnboundedReceiver<String>,
}

async fn echo_server(cfg: Arc<rustls::ServerConfig>) -> EchoServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, errors) = mpsc::unbounded_channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(e.to_string());
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                assert_eq!(conn.alpn_protocol(), Some(MESH_ALPN));
                let peer = peer_spiffe_id(conn)
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                tls.write_all(format!("{peer}\n").as_bytes()).await.unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    EchoServer { addr, errors }
}

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects and reads the server's greeting: the client's identity as the server saw it.
async fn connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<(Conn, String)> {
    let tcp = TcpStream::connect(addr).await?;
    // Mesh verification ignores the name; any valid name will do.
    let name = ServerName::try_from("sidecar.mesh.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tls.read(&mut b).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok((tls, String::from_utf8(line).unwrap()))
}

async fn echo(conn: &mut Conn, msg: &str) -> String {
    conn.write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    conn.read_exact(&mut buf).await.unwrap();
    String::from_utf8(buf).unwrap()
}

fn server_cert(conn: &Conn) -> Vec<u8> {
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn next_error(server: &mut EchoServer) -> String {
    tokio::time::timeout(Duration::from_secs(5), server.errors.recv())
        .await
        .expect("the server reported no handshake error")
        .unwrap()
}

#[tokio::test]
async fn mesh_peers_handshake_and_see_each_others_identity() {
    let mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", None).await;
    let web = mesh.identity("ns/shop/sa/web", None).await;
    assert!(api.is_ready() && web.is_ready());
    assert!(api
        .current_chain_pem()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    let server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    let expected = Some(vec![api.id().clone()]);
    let (mut conn, client_seen_by_server) = connect(
        client_config(&web, &mesh.bundle(), expected).unwrap(),
        server.addr,
    )
    .await
    .unwrap();
    assert_eq!(client_seen_by_server, "spiffe://mesh.test/ns/shop/sa/web");
    assert_eq!(peer_spiffe_id(conn.get_ref().1), Some(api.id().clone()));
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(MESH_ALPN));
    assert_eq!(
        conn.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(echo(&mut conn, "hello").await, "hello");
}

#[tokio::test]
async fn client_refuses_a_server_that_is_not_the_expected_identity() {
    let mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", None).await;
    let web = mesh.identity("ns/shop/sa/web", None).await;
    let server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    let expected = Some(vec![SpiffeId::parse(
        "spiffe://mesh.test/ns/shop/sa/payments",
    )
    .unwrap()]);
    let err = connect(
        client_config(&web, &mesh.bundle(), expected).unwrap(),
        server.addr,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("not one of the expected identities"),
        "{err}"
    );
}

#[tokio::test]
async fn server_refuses_a_client_certificate_from_another_ca() {
    let mesh = Mesh::new().await;
    // Same trust domain, different root: only the chain tells them apart.
    let rogue_mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", None).await;
    let rogue = rogue_mesh.identity("ns/shop/sa/web", None).await;
    let mut server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    // The rogue client trusts our root, so only the server's check can stop it.
    let result = connect(
        client_config(&rogue, &mesh.bundle(), None).unwrap(),
        server.addr,
    )
    .await;
    assert!(
        result.is_err(),
        "the server must not greet a client from another CA"
    );
    let err = next_error(&mut server).await;
    // Both roots have the same name, so webpki finds "the" issuer and its signature fails.
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
    // And the rogue server is refused by our client.
    let web = mesh.identity("ns/shop/sa/web", None).await;
    let rogue_server = echo_server(server_config(&rogue, &rogue_mesh.bundle()).unwrap()).await;
    let err = connect(
        client_config(&web, &mesh.bundle(), None).unwrap(),
        rogue_server.addr,
    )
    .await
    .unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", None).await;
    let mut server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    // A sidecar whose CA is unreachable has no certificate yet.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = mesh.config("ns/shop/sa/web", None);
    cfg.ca_url = format!("https://{closed}");
    let certless = WorkloadIdentity::start(&cfg).unwrap();
    assert!(!certless.is_ready());
    assert!(certless.current_chain_pem().is_none());
    let result = connect(
        client_config(&certless, &mesh.bundle(), None).unwrap(),
        server.addr,
    )
    .await;
    assert!(
        result.is_err(),
        "the server must not greet a client without a certificate"
    );
    let err = next_error(&mut server).await;
    assert!(
        err.contains("NoCertificatesPresented") || err.contains("certificate"),
        "{err}"
    );
}

/// A certificate for `id` signed by the mesh root that expired an hour ago.
fn expired_identity(mesh: &Mesh, id: &str) -> WorkloadIdentity {
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(mesh.dir.join(ROOT_KEY_FILE)).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(mesh.ca.root_pem(), root_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(7200)).into();
    params.not_after = (now - Duration::from_secs(3600)).into();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let chain = format!("{}{}", cert.pem(), mesh.ca.root_pem());
    WorkloadIdentity::from_pem(&chain, &key.serialize_pem(), mesh.bundle()).unwrap()
}

#[tokio::test]
async fn expired_certificates_are_refused_both_ways() {
    let mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", None).await;
    let web = mesh.identity("ns/shop/sa/web", None).await;
    let stale = expired_identity(&mesh, "spiffe://mesh.test/ns/shop/sa/old");
    assert_eq!(stale.id().as_str(), "spiffe://mesh.test/ns/shop/sa/old");
    assert!(!stale.is_ready(), "an expired certificate is not ready");

    let mut server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    let result = connect(
        client_config(&stale, &mesh.bundle(), None).unwrap(),
        server.addr,
    )
    .await;
    assert!(
        result.is_err(),
        "the server must not greet a client with an expired certificate"
    );
    let err = next_error(&mut server).await;
    assert!(err.to_lowercase().contains("expired"), "{err}");

    let stale_server = echo_server(server_config(&stale, &mesh.bundle()).unwrap()).await;
    let err = connect(
        client_config(&web, &mesh.bundle(), None).unwrap(),
        stale_server.addr,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn renewal_swaps_certificates_without_dropping_open_connections() {
    let mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", Some("4s")).await;
    let web = mesh.identity("ns/shop/sa/web", None).await;
    // Renewals authenticate with the current certificate: the short-lived token isn't needed.
    std::fs::remove_file(mesh.config("ns/shop/sa/api", None).token_file).unwrap();

    let server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    let client = client_config(&web, &mesh.bundle(), Some(vec![api.id().clone()])).unwrap();
    let (mut long_lived, _) = connect(client.clone(), server.addr).await.unwrap();
    let first_cert = server_cert(&long_lived);
    let first_chain = api.current_chain_pem().unwrap();

    eventually(
        Duration::from_secs(9),
        "two renewals of a 4s certificate",
        || api.stats().issued >= 3,
    )
    .await;
    assert_eq!(api.stats().failures, 0, "{:?}", api.stats().last_error);
    assert_ne!(api.current_chain_pem().unwrap(), first_chain);

    // The connection opened with the first certificate still works…
    assert_eq!(echo(&mut long_lived, "still here").await, "still here");
    // …and new handshakes get the renewed certificate.
    let (mut fresh, seen) = connect(client, server.addr).await.unwrap();
    assert_eq!(seen, web.id().as_str());
    assert_ne!(server_cert(&fresh), first_cert);
    assert_eq!(peer_spiffe_id(fresh.get_ref().1), Some(api.id().clone()));
    assert_eq!(echo(&mut fresh, "new").await, "new");
}

#[tokio::test]
async fn ca_outage_keeps_the_current_certificate_and_retries_until_it_is_back() {
    let mut mesh = Mesh::new().await;
    let api = mesh.identity("ns/shop/sa/api", Some("15s")).await;
    let web = mesh.identity("ns/shop/sa/web", None).await;
    let chain = api.current_chain_pem().unwrap();

    mesh.server.take().unwrap().shutdown().await;
    // Renewal is due at ~2/3 of 15s; then it fails and backs off.
    eventually(Duration::from_secs(14), "two failed renewals", || {
        api.stats().failures >= 2
    })
    .await;
    let stats = api.stats();
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("unreachable"),
        "{stats:?}"
    );
    assert_eq!(
        api.current_chain_pem().unwrap(),
        chain,
        "the current certificate is kept"
    );
    assert!(api.is_ready());
    // Still serving mesh traffic with it.
    let server = echo_server(server_config(&api, &mesh.bundle()).unwrap()).await;
    let client = client_config(&web, &mesh.bundle(), None).unwrap();
    let (mut conn, _) = connect(client, server.addr).await.unwrap();
    assert_eq!(echo(&mut conn, "ok").await, "ok");

    // The CA comes back on the same address; the retry picks it up.
    let listener = TcpListener::bind(mesh.addr).await.unwrap();
    mesh.server =
        Some(CaServer::start(mesh.ca.clone(), listener, &ServeOptions::default()).unwrap());
    eventually(
        Duration::from_secs(10),
        "a renewal after the CA is back",
        || api.stats().issued >= 2,
    )
    .await;
    assert_ne!(api.current_chain_pem().unwrap(), chain);
    assert_eq!(api.stats().last_error, None);
}

#[tokio::test]
async fn a_token_for_another_identity_never_makes_the_sidecar_ready() {
    let mesh = Mesh::new().await;
    let mut cfg = mesh.config("ns/shop/sa/web", None);
    cfg.id = "spiffe://mesh.test/ns/shop/sa/admin".into();
    let id = WorkloadIdentity::start(&cfg).unwrap();
    eventually(Duration::from_secs(5), "a failed request", || {
        id.stats().failures >= 1
    })
    .await;
    assert!(!id.is_ready());
    let err = id.stats().last_error.unwrap();
    assert!(err.contains("token is for another identity"), "{err}");
}

#[test]
fn identity_config_errors_name_the_key() {
    let good = serde_json::json!({
        "id": "spiffe://cluster.local/ns/shop/sa/web",
        "ca_url": "https://10.0.0.1:15012",
        "ca_bundle": "/etc/outrider/ca.pem",
        "token_file": "/var/run/outrider/token",
        "cert_ttl": "24h",
    });
    let cfg: IdentityConfig = serde_json::from_value(good.clone()).unwrap();
    cfg.validate("identity").unwrap();

    let with = |key: &str, value: &str| {
        let mut v = good.clone();
        v[key] = value.into();
        serde_json::from_value::<IdentityConfig>(v)
            .unwrap()
            .validate("identity")
            .unwrap_err()
    };
    assert_eq!(
        with("id", "x"),
        "identity.id: \"x\" is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"
    );
    assert!(with("ca_url", "http://ca:15012").starts_with("identity.ca_url:"));
    assert!(with("cert_ttl", "soon").starts_with("identity.cert_ttl:"));
    assert!(with("token_file", "").starts_with("identity.token_file:"));

    let mut unknown = good;
    unknown["ca_urll"] = "https://x".into();
    let err = serde_json::from_value::<IdentityConfig>(unknown).unwrap_err();
    assert!(err.to_string().contains("ca_urll"), "{err}");
}

#[tokio::test]
async fn expiry_gauge_follows_the_current_certificate() {
    // The only recorder in this test binary; gauges are labelled by identity, so other tests
    // running alongside don't disturb the line checked here.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let mesh = Mesh::new().await;
    let id = mesh.identity("ns/metrics/sa/probe", Some("4s")).await;
    let line = |not_after: u64| {
        format!(
            "outrider_identity_cert_expiry_timestamp_seconds{{identity=\"spiffe://mesh.test/ns/metrics/sa/probe\"}} {not_after}"
        )
    };
    let first = id.not_after().unwrap();
    assert!(
        metrics.render().contains(&line(first)),
        "{}",
        metrics.render()
    );
    eventually(Duration::from_secs(6), "a renewal", || {
        id.stats().issued >= 2
    })
    .await;
    let renewed = id.not_after().unwrap();
    assert!(renewed > first);
    assert!(
        metrics.render().contains(&line(renewed)),
        "{}",
        metrics.render()
    );
}

/// A second CA, on a new root, for the rotation tests.
struct NewRoot {
    ca: Arc<MeshCa>,
    old_root: String,
    new_root: String,
}

impl Mesh {
    /// Step 1 of a root rotation: a new CA and both roots in the bundle. Returns it and a
    /// sidecar that holds a 15 s certificate from the old root, with a bundle of both roots.
    async fn new_root(&self) -> (NewRoot, IdentityConfig, WorkloadIdentity) {
        let new_dir = self.tmp.path().join("ca-new");
        let ca = Arc::new(MeshCa::init(&new_dir, TD, Duration::from_secs(3600 * 24)).unwrap());
        let old_root = std::fs::read_to_string(self.dir.join(ROOT_CERT_FILE)).unwrap();
        let new_root = std::fs::read_to_string(new_dir.join(ROOT_CERT_FILE)).unwrap();
        let both = self.tmp.path().join("both.pem");
        std::fs::write(&both, format!("{old_root}{new_root}")).unwrap();
        let mut cfg = self.config("ns/shop/sa/api", Some("15s"));
        cfg.ca_bundle = both;
        let api = WorkloadIdentity::start(&cfg).unwrap();
        tokio::time::timeout(Duration::from_secs(10), api.ready())
            .await
            .expect("no certificate within 10s");
        let chain = api.current_chain_pem().unwrap();
        assert!(chain.ends_with(&old_root), "{chain}");
        let roots = NewRoot {
            ca,
            old_root,
            new_root,
        };
        (roots, cfg, api)
    }

    /// Stops the CA and starts `ca` at the same address.
    async fn restart_ca(&mut self, ca: &Arc<MeshCa>, opts: ServeOptions) {
        self.server.take().unwrap().shutdown().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.server = Some(CaServer::start(ca.clone(), listener, &opts).unwrap());
    }
}

#[tokio::test]
async fn after_the_ca_moves_to_a_new_root_certificates_from_the_old_one_renew_there() {
    // Step 2 of a root rotation: every sidecar trusts both roots, and the CA restarts on the
    // new one. Renewals authenticate with the current certificate, from the old root; a CA
    // that trusted only its own root refused them, and the sidecars' certificates ran out.
    let mut mesh = Mesh::new().await;
    let (roots, cfg, api) = mesh.new_root().await;
    let chain = api.current_chain_pem().unwrap();
    // The bootstrap token is long gone by then.
    std::fs::remove_file(&cfg.token_file).unwrap();

    // On the new root alone, the renewal (due at ~2/3 of 15 s) is refused in the handshake,
    // and the sidecar says so, and what to do: it said "CA unreachable: connection error".
    mesh.restart_ca(&roots.ca, ServeOptions::default()).await;
    eventually(Duration::from_secs(14), "a refused renewal", || {
        api.stats().failures >= 1
    })
    .await;
    assert_eq!(api.current_chain_pem().unwrap(), chain);
    let err = api.stats().last_error.unwrap();
    for want in [
        "refused the certificate being renewed in the TLS handshake",
        "--also-trust",
        "with the bootstrap token: identity.token_file",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    // Each root has a name of its own (its key id), so the CA's alert says what happened: the
    // issuer is unknown to it. Under one shared name it was `DecryptError`, a signature that
    // did not verify against the new root's key.
    assert!(err.contains("(alert UnknownCA)"), "{err}");

    // With `ca serve --also-trust <old root>`, the retry gets a certificate from the new root.
    let old = rustls_pki_types::CertificateDer::from_pem_slice(roots.old_root.as_bytes()).unwrap();
    let opts = ServeOptions {
        also_trust: vec![old],
        ..ServeOptions::default()
    };
    mesh.restart_ca(&roots.ca, opts).await;
    eventually(
        Duration::from_secs(10),
        "a renewal from the new root",
        || api.stats().issued >= 2,
    )
    .await;
    let renewed = api.current_chain_pem().unwrap();
    assert!(renewed.ends_with(&roots.new_root), "{renewed}");
}

#[tokio::test]
async fn a_renewal_refused_in_the_handshake_falls_back_to_the_token() {
    // The CA moved to the new root without `--also-trust`, and a new token for the sidecar,
    // from the new CA, is in its token file (as a token controller writes it). The refused
    // renewal looked like an outage, so the sidecar retried with its certificate until that
    // expired; now it tries the token at once.
    let mut mesh = Mesh::new().await;
    let (roots, cfg, api) = mesh.new_root().await;
    let id = roots.ca.identity("ns/shop/sa/api").unwrap();
    let token = roots.ca.mint_token(&id, Duration::from_secs(600)).unwrap();
    std::fs::write(&cfg.token_file, token).unwrap();
    mesh.restart_ca(&roots.ca, ServeOptions::default()).await;
    eventually(Duration::from_secs(14), "a renewal with the token", || {
        api.stats().issued >= 2
    })
    .await;
    let stats = api.stats();
    assert_eq!(stats.failures, 0, "{stats:?}");
    let renewed = api.current_chain_pem().unwrap();
    assert!(renewed.ends_with(&roots.new_root), "{renewed}");
}
