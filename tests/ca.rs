//! The mesh CA end to end: `ca init` files, tokens, and `POST /v1/sign` over real TLS on
//! 127.0.0.1, called the way a sidecar calls it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use outrider::tls::ca::{CaCommand, MeshCa, ROOT_CERT_FILE, ROOT_KEY_FILE, TOKEN_SECRET_FILE};
use outrider::tls::ca_client::{self, FetchError};
use outrider::tls::ca_server::{CaServer, ServeOptions, SignRequest, SignResponse};
use outrider::tls::{token, SpiffeId, TrustBundle};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const TD: &str = "mesh.test";

struct Ca {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    ca: Arc<MeshCa>,
    server: CaServer,
    url: String,
    bundle: TrustBundle,
}

async fn start_ca(max_ttl: Duration) -> Ca {
    start_ca_serving_for(max_ttl, ServeOptions::default().serving_ttl).await
}

async fn start_ca_serving_for(max_ttl: Duration, serving_ttl: Duration) -> Ca {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = Arc::new(MeshCa::init(&dir, TD, Duration::from_secs(3600 * 24 * 365)).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions {
        max_ttl,
        extra_dns: vec![],
        serving_ttl,
        also_trust: vec![],
    };
    let server = CaServer::start(ca.clone(), listener, &opts).unwrap();
    let url = format!("https://{}", server.local_addr());
    let bundle = TrustBundle::from_file(&dir.join(ROOT_CERT_FILE)).unwrap();
    Ca {
        _dir: tmp,
        dir,
        ca,
        server,
        url,
        bundle,
    }
}

/// A CSR that asks for `uri` and a DNS name, as a malicious or confused workload might.
fn csr_asking_for(uri: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn sign(
    ca: &Ca,
    csr: String,
    token: Option<String>,
    ttl: Option<u64>,
) -> Result<SignResponse, FetchError> {
    let req = SignRequest {
        csr,
        token,
        ttl_seconds: ttl,
    };
    ca_client::sign(&ca.url, &ca.bundle, &req, None).await
}

fn leaf(chain_pem: &str) -> Vec<u8> {
    let pem = chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn refused(r: Result<SignResponse, FetchError>) -> (u16, String, String) {
    match r {
        Err(FetchError::Refused {
            status,
            error,
            message,
        }) => (status, error, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn now() -> u64 {
    token::unix_seconds(SystemTime::now())
}

#[test]
fn init_writes_private_files_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    MeshCa::init(&dir, TD, Duration::from_secs(3600)).unwrap();
    for secret in [ROOT_KEY_FILE, TOKEN_SECRET_FILE] {
        let mode = std::fs::metadata(dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{secret} must be readable only by its owner"
        );
    }
    let root_before = std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap();
    let err = MeshCa::init(&dir, TD, Duration::from_secs(3600)).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap(),
        root_before
    );
    // A reloaded CA is the same CA.
    let loaded = MeshCa::load(&dir).unwrap();
    assert_eq!(loaded.root_pem().as_bytes(), root_before.as_slice());
    assert_eq!(loaded.trust_domain(), TD);
}

#[tokio::test]
async fn cli_init_refuses_existing_ca_and_bad_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ca");
    let init = || CaCommand::Init {
        trust_domain: TD.into(),
        out: out.clone(),
        root_ttl: Duration::from_secs(3600),
    };
    outrider::tls::run_ca(init()).await.unwrap();
    let err = outrider::tls::run_ca(init()).await.unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    let err = outrider::tls::run_ca(CaCommand::Token {
        dir: out.clone(),
        identity: "ns/shop/sa/../x".into(),
        ttl: Duration::from_secs(60),
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("not a SPIFFE ID"), "{err:#}");
    // `serve --also-trust` with a file that holds no root fails before serving.
    let not_pem = tmp.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let serve = |also_trust: std::path::PathBuf| CaCommand::Serve {
        dir: out.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        max_ttl: Duration::from_secs(3600),
        sans: vec![],
        also_trust: vec![also_trust],
    };
    let err = outrider::tls::run_ca(serve(not_pem)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("--also-trust")
            && format!("{err:#}").contains("no certificate in the bundle"),
        "{err:#}"
    );
    let err = outrider::tls::run_ca(serve(tmp.path().join("missing.pem")))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
    let ca = MeshCa::load(&out).unwrap();
    assert!(ca.identity("spiffe://other.test/ns/a/sa/b").is_err());
    assert_eq!(
        ca.identity("ns/shop/sa/web").unwrap().as_str(),
        "spiffe://mesh.test/ns/shop/sa/web"
    );
}

#[tokio::test]
async fn certificate_names_the_token_identity_whatever_the_csr_asks() {
    let ca = start_ca(Duration::from_secs(24 * 3600)).await;
    let web = ca.ca.identity("ns/shop/sa/web").unwrap();
    let token = ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap();
    // The CSR asks for another identity, a DNS name and CA powers.
    let csr = csr_asking_for("spiffe://mesh.test/ns/admin/sa/root");
    let resp = sign(&ca, csr, Some(token), Some(3600)).await.unwrap();
    assert_eq!(resp.spiffe_id, web.as_str());

    let der = leaf(&resp.chain);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("uri:{u}"),
            other => format!("other:{other:?}"),
        })
        .collect();
    assert_eq!(
        sans,
        vec![format!("uri:{web}")],
        "the only SAN is the token's identity"
    );
    assert!(!cert.is_ca(), "a workload certificate must not be a CA");
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    assert_eq!(
        resp.not_after,
        u64::try_from(cert.validity().not_after.timestamp()).unwrap()
    );
    // The chain ends with the mesh root, which verifies the leaf.
    assert!(resp.chain.ends_with(ca.ca.root_pem()));
    let (_, root) = x509_parser::parse_x509_certificate(ca.ca.root_der()).unwrap();
    cert.verify_signature(Some(root.public_key())).unwrap();
    assert!(cert
        .extensions()
        .iter()
        .all(|e| !matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_))));
    ca.server.shutdown().await;
}

#[tokio::test]
async fn token_for_a_with_csr_naming_b_gives_a_certificate_for_a_only() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let a = ca.ca.identity("ns/team-a/sa/app").unwrap();
    let b = ca.ca.identity("ns/team-b/sa/app").unwrap();
    let token = ca.ca.mint_token(&a, Duration::from_secs(600)).unwrap();
    let resp = sign(&ca, csr_asking_for(b.as_str()), Some(token), None)
        .await
        .unwrap();
    assert_eq!(resp.spiffe_id, a.as_str());
    let der = leaf(&resp.chain);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let text = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        text.contains(a.as_str()) && !text.contains(b.as_str()),
        "{text}"
    );
    ca.server.shutdown().await;
}

fn secret(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(TOKEN_SECRET_FILE))
        .unwrap()
        .trim_ascii()
        .to_vec()
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let web = ca.ca.identity("ns/shop/sa/web").unwrap();
    let csr = || csr_asking_for("spiffe://mesh.test/ns/shop/sa/web");

    // Expired: minted an hour ago for ten minutes.
    let expired = token::mint(
        &secret(&ca.dir),
        &web,
        Duration::from_secs(600),
        SystemTime::now() - Duration::from_secs(3600),
    )
    .unwrap();
    let (status, code, msg) = refused(sign(&ca, csr(), Some(expired), None).await);
    assert_eq!((status, code.as_str()), (401, "token_expired"), "{msg}");
    assert!(
        msg.contains("expired") && msg.contains(web.as_str()),
        "{msg}"
    );

    // Tampered: the claims are changed to another identity, the MAC kept.
    let good = ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let claims = String::from_utf8(B64.decode(parts[1]).unwrap()).unwrap();
    let forged = claims.replace("ns/shop/sa/web", "ns/kube-system/sa/admin");
    let tampered = format!("{}.{}.{}", parts[0], B64.encode(forged), parts[2]);
    let (status, code, _) = refused(sign(&ca, csr(), Some(tampered), None).await);
    assert_eq!((status, code.as_str()), (401, "token_invalid_signature"));

    // From another CA with the same trust domain.
    let other = tempfile::tempdir().unwrap();
    let other_ca = MeshCa::init(other.path(), TD, Duration::from_secs(3600)).unwrap();
    let foreign = other_ca.mint_token(&web, Duration::from_secs(600)).unwrap();
    let (status, code, _) = refused(sign(&ca, csr(), Some(foreign), None).await);
    assert_eq!((status, code.as_str()), (401, "token_invalid_signature"));

    // Garbage and unknown formats.
    let (status, code, _) = refused(sign(&ca, csr(), Some("not-a-token".into()), None).await);
    assert_eq!((status, code.as_str()), (400, "token_malformed"));
    let (status, code, _) = refused(sign(&ca, csr(), Some("jwt.abc.def".into()), None).await);
    assert_eq!((status, code.as_str()), (400, "token_unknown_version"));

    // No token and no client certificate.
    let (status, code, _) = refused(sign(&ca, csr(), None, None).await);
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));

    // A valid token does not rescue a CSR whose self-signature is broken.
    let good = ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap();
    let pem = csr();
    use rustls_pki_types::pem::PemObject as _;
    let mut der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01; // inside the signature
    let broken = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let (status, code, _) = refused(sign(&ca, broken, Some(good.clone()), None).await);
    assert_eq!((status, code.as_str()), (400, "bad_csr"));
    let (status, code, _) = refused(sign(&ca, "garbage".into(), Some(good.clone()), None).await);
    assert_eq!((status, code.as_str()), (400, "bad_csr"));

    // The token itself still works: refusals didn't burn it.
    assert!(sign(&ca, csr(), Some(good), None).await.is_ok());
    ca.server.shutdown().await;
}

/// The certificate the CA serves with, as a sidecar sees it: a verified TLS 1.3 handshake
/// (mesh root, the address's IP SAN), then the leaf's DER and expiry.
async fn serving_leaf(ca: &Ca) -> Result<(Vec<u8>, u64), String> {
    outrider::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca.root_der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = ca.server.local_addr();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap();
    Ok((der, not_after))
}

/// A CA runs for longer than the certificate it made for itself at start lives: it makes a
/// new one (a new key too) after two thirds of the lifetime, so sidecars can still reach it
/// to renew theirs once the first one has expired.
#[tokio::test]
async fn the_ca_serves_with_a_new_certificate_before_its_own_expires() {
    let ca = start_ca_serving_for(Duration::from_secs(3600), Duration::from_secs(3)).await;
    let web = ca.ca.identity("ns/shop/sa/web").unwrap();
    let token = || Some(ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap());
    let (first, first_expiry) = serving_leaf(&ca).await.unwrap();
    assert!(
        first_expiry <= now() + 3,
        "the test needs a short-lived serving certificate"
    );
    // The same certificate until two thirds of its lifetime.
    assert_eq!(serving_leaf(&ca).await.unwrap().0, first);

    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (second, second_expiry) = serving_leaf(&ca).await.unwrap();
    assert_ne!(
        second, first,
        "no new serving certificate after 2/3 of its lifetime"
    );
    assert!(second_expiry > first_expiry);
    let (_, old) = x509_parser::parse_x509_certificate(&first).unwrap();
    let (_, new) = x509_parser::parse_x509_certificate(&second).unwrap();
    assert_ne!(
        old.public_key().raw,
        new.public_key().raw,
        "the key was reused"
    );

    // Past the first certificate's expiry, a sidecar still gets its certificate signed.
    while now() <= first_expiry {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let signed = sign(&ca, csr_asking_for(web.as_str()), token(), None).await;
    assert!(signed.is_ok(), "{:?}", signed.err());
    ca.server.shutdown().await;
}

#[tokio::test]
async fn lifetime_is_capped_at_max_ttl() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let web = ca.ca.identity("ns/shop/sa/web").unwrap();
    let token = || Some(ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap());
    let csr = || csr_asking_for(web.as_str());

    let before = now();
    let long = sign(&ca, csr(), token(), Some(48 * 3600)).await.unwrap();
    assert!(
        long.not_after <= now() + 3600,
        "48h request must be cut to the 1h max-ttl"
    );
    assert!(long.not_after >= before + 3600 - 1);

    let short = sign(&ca, csr(), token(), Some(600)).await.unwrap();
    assert!(short.not_after >= before + 599 && short.not_after <= now() + 600);

    let default = sign(&ca, csr(), token(), None).await.unwrap();
    assert!(default.not_after >= before + 3599, "no ttl asked: max-ttl");
    ca.server.shutdown().await;
}

#[tokio::test]
async fn ca_is_reached_by_ip_or_localhost_and_only_with_the_mesh_root() {
    let ca = start_ca(Duration::from_secs(3600)).await;
    let port = ca.server.local_addr().port();
    let web = SpiffeId::parse("spiffe://mesh.test/ns/shop/sa/web").unwrap();
    let token = ca.ca.mint_token(&web, Duration::from_secs(600)).unwrap();
    // localhost is in the serving certificate...
    let req = SignRequest {
        csr: csr_asking_for(web.as_str()),
        token: Some(token),
        ttl_seconds: None,
    };
    let by_name = format!("https://localhost:{port}");
    assert!(ca_client::sign(&by_name, &ca.bundle, &req, None)
        .await
        .is_ok());
    // ...and a client that doesn't trust this mesh root refuses the CA.
    let other = tempfile::tempdir().unwrap();
    MeshCa::init(other.path(), TD, Duration::from_secs(3600)).unwrap();
    let wrong = TrustBundle::from_file(&other.path().join(ROOT_CERT_FILE)).unwrap();
    match ca_client::sign(&ca.url, &wrong, &req, None).await {
        Err(FetchError::Unreachable { reason, .. }) => assert!(reason.contains("TLS"), "{reason}"),
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    ca.server.shutdown().await;
}
