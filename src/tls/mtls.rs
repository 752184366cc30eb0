//! Mesh mTLS: rustls configs whose certificates follow the workload identity across renewals
//! and whose verifiers accept only peers with a SPIFFE identity from our mesh.
//!
//! Verification is webpki's full chain check against the mesh root first, then the SPIFFE check:
//! the peer's leaf has exactly one URI SAN, a SPIFFE ID in our trust domain (and, for a client
//! dialing a server, one of the identities it expects). Host names play no part.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::identity::WorkloadIdentity;
use super::spiffe::SpiffeId;

/// The ALPN protocol both ends of a mesh connection offer.
pub const MESH_ALPN: &[u8] = b"outrider-mesh";

/// The mesh roots a peer's certificate must chain to. Clones share one set of roots, which
/// [`TrustBundle::replace`] swaps for all of them: the configs built from a bundle verify each
/// new handshake against the roots current then, so a root is added or taken out (a root
/// rotation) without a restart and without touching open connections.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Arc<ArcSwap<Roots>>,
}

/// One set of roots: the store handshakes are verified against, and the certificates it was
/// made from, which the store no longer has, for the admin API to show.
#[derive(Debug)]
struct Roots {
    store: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
}

/// A root certificate as the admin API's `/certs` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootInfo {
    /// The subject, as an RFC 4514 string.
    pub subject: String,
    /// SHA-256 of the DER certificate, lower-case hex: `openssl x509 -fingerprint -sha256`.
    pub sha256: String,
    /// When it expires, unix seconds.
    pub not_after: i64,
}

/// Why a trust bundle can't be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle file can't be read.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// No certificate in the PEM, or one that isn't a usable root.
    #[error("{0}: {1}")]
    Invalid(String, String),
}

impl TrustBundle {
    /// Reads PEM root certificates; `source` names them in errors.
    pub fn from_pem(pem: &[u8], source: &str) -> Result<TrustBundle, BundleError> {
        let mut roots = RootCertStore::empty();
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| BundleError::Invalid(source.to_owned(), format!("bad PEM: {e}")))?;
            roots.add(cert.clone()).map_err(|e| {
                BundleError::Invalid(source.to_owned(), format!("not a usable root: {e}"))
            })?;
            certs.push(cert);
        }
        if roots.is_empty() {
            return Err(BundleError::Invalid(
                source.to_owned(),
                "no certificate in the bundle".into(),
            ));
        }
        Ok(TrustBundle {
            roots: Arc::new(ArcSwap::from_pointee(Roots {
                store: Arc::new(roots),
                certs,
            })),
        })
    }

    /// Reads a PEM bundle file.
    pub fn from_file(path: &std::path::Path) -> Result<TrustBundle, BundleError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| BundleError::Io(shown.clone(), e))?;
        Self::from_pem(&pem, &shown)
    }

    /// The current roots, for building other rustls configs (e.g. the client that talks to
    /// the CA, built per request).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.load().store.clone()
    }

    /// The current roots' certificates.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.roots.load().certs.clone()
    }

    /// The current roots, described for the admin API.
    pub fn describe(&self) -> Vec<RootInfo> {
        self.roots
            .load()
            .certs
            .iter()
            .map(|der| {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
                let sha256 = super::token::hex(digest.as_ref());
                // `from_pem` added each one to a RootCertStore, which parsed it.
                let parsed = x509_parser::parse_x509_certificate(der).ok();
                RootInfo {
                    subject: parsed
                        .as_ref()
                        .map_or_else(String::new, |(_, c)| c.subject().to_string()),
                    sha256,
                    not_after: parsed.map_or(0, |(_, c)| c.validity().not_after.timestamp()),
                }
            })
            .collect()
    }

    /// Makes `other`'s roots this bundle's, and every clone's.
    pub fn replace(&self, other: &TrustBundle) {
        self.roots.store(other.roots.load_full());
    }
}

/// Why a peer's certificate is not a mesh identity; carried in rustls' error.
#[derive(thiserror::Error)]
pub(crate) enum PeerIdError {
    #[error("peer certificate cannot be parsed")]
    Parse,
    #[error("peer certificate has {0} URI SANs; a mesh identity has exactly one SPIFFE ID")]
    UriCount(usize),
    #[error("peer URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("peer identity {0} is outside trust domain {1}")]
    TrustDomain(String, String),
    #[error("peer identity {0} is not one of the expected identities")]
    Unexpected(String),
}

// rustls prints the inner error with Debug; make that the readable sentence.
impl std::fmt::Debug for PeerIdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn reject(e: PeerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The one SPIFFE ID in a certificate's SANs, if it has exactly one URI SAN and it is one.
pub(crate) fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, PeerIdError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| PeerIdError::Parse)?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(PeerIdError::Parse),
    };
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| PeerIdError::NotSpiffe(e.to_string())),
        _ => Err(PeerIdError::UriCount(uris.len())),
    }
}

fn check_peer(
    der: &[u8],
    trust_domain: &str,
    expected: Option<&[SpiffeId]>,
) -> Result<SpiffeId, PeerIdError> {
    let id = spiffe_id_of(der)?;
    if id.trust_domain() != trust_domain {
        return Err(PeerIdError::TrustDomain(
            id.to_string(),
            trust_domain.to_owned(),
        ));
    }
    if let Some(expected) = expected {
        if !expected.contains(&id) {
            return Err(PeerIdError::Unexpected(id.to_string()));
        }
    }
    Ok(id)
}

/// The SPIFFE ID of the peer of an established connection, as verified during the handshake.
///
/// `None` when the peer sent no certificate or its certificate has no single SPIFFE ID (which
/// the mesh verifiers never let through).
pub fn peer_spiffe_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Hands every new handshake the identity's current certificate.
#[derive(Debug)]
pub(crate) struct CurrentCert(pub(crate) Arc<ArcSwapOption<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates for a mesh server: webpki chain against the bundle's current
/// roots, then the SPIFFE ID.
#[derive(Debug)]
struct MeshClientVerifier {
    bundle: TrustBundle,
    provider: Arc<CryptoProvider>,
    /// webpki's verifier for the roots it was built from, rebuilt when they change.
    built: ArcSwap<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
    trust_domain: String,
}

impl MeshClientVerifier {
    fn new(
        bundle: &TrustBundle,
        provider: Arc<CryptoProvider>,
        trust_domain: String,
    ) -> Result<Self, rustls::Error> {
        let roots = bundle.roots();
        let inner = webpki_client_verifier(&roots, &provider)?;
        Ok(Self {
            bundle: bundle.clone(),
            provider,
            built: ArcSwap::from_pointee((roots, inner)),
            trust_domain,
        })
    }

    /// The verifier for the current roots: a pointer comparison per handshake, a rebuild
    /// after the bundle changed.
    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = self.bundle.roots();
        let built = self.built.load();
        if Arc::ptr_eq(&built.0, &roots) {
            return Ok(built.1.clone());
        }
        let inner = webpki_client_verifier(&roots, &self.provider)?;
        self.built.store(Arc::new((roots, inner.clone())));
        Ok(inner)
    }
}

fn webpki_client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(format!("mesh client verifier: {e}")))
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    // The roots' names as hints would have to outlive a swap; mesh clients have one
    // certificate and ignore hints, and TLS makes them optional.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .current()?
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, &self.trust_domain, None).map_err(reject)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a mesh server's certificate: webpki chain (server-auth usage, validity) against the
/// mesh root, then the SPIFFE ID. The TLS server name is ignored: mesh certificates name
/// workloads, not hosts.
#[derive(Debug)]
struct MeshServerVerifier {
    bundle: TrustBundle,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
    expected: Option<Vec<SpiffeId>>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_peer(end_entity, &self.trust_domain, self.expected.as_deref()).map_err(reject)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side of mesh mTLS: TLS 1.3 only, ALPN [`MESH_ALPN`], the identity's current
/// certificate (renewals apply to new handshakes; open connections are untouched), and a
/// mandatory client certificate from `bundle`'s roots with a SPIFFE ID in our trust domain.
///
/// Which peers may call what is authorization's business; read the caller with
/// [`peer_spiffe_id`].
pub fn server_config(
    identity: &WorkloadIdentity,
    bundle: &TrustBundle,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    super::install_crypto_provider();
    let provider = provider();
    let verifier = MeshClientVerifier::new(
        bundle,
        provider.clone(),
        identity.id().trust_domain().to_owned(),
    )?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentCert(identity.cert_store())));
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // No resumption: every connection verifies the peer's current certificate.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The client side of mesh mTLS: TLS 1.3 only, ALPN [`MESH_ALPN`], presents the identity's
/// current certificate, and accepts a server whose certificate chains to `bundle` and carries a
/// SPIFFE ID in our trust domain — and, when `expected` is given, one of those IDs.
///
/// The server name passed to `connect` is not checked (use any name or the IP).
pub fn client_config(
    identity: &WorkloadIdentity,
    bundle: &TrustBundle,
    expected: Option<Vec<SpiffeId>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    super::install_crypto_provider();
    let provider = provider();
    let verifier = MeshServerVerifier {
        bundle: bundle.clone(),
        provider: provider.clone(),
        trust_domain: identity.id().trust_domain().to_owned(),
        expected,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentCert(identity.cert_store())));
    cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // A resumed session skips verification, and `expected` may differ per destination.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}
