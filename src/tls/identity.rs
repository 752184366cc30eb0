//! The workload side of mesh identity: a key made in-process, a certificate from the mesh CA,
//! renewed at about 2/3 of its life, swapped in place for new handshakes.
//!
//! The first request carries the bootstrap token from `identity.token_file`; renewals present
//! the current certificate instead (the token is usually short-lived), and fall back to the
//! token if the CA refuses that.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::ca_client::{self, FetchError};
use super::ca_server::{SignRequest, SignResponse};
use super::spiffe::SpiffeId;
use super::token::unix_seconds;

pub use super::mtls::{client_config, peer_spiffe_id, server_config, TrustBundle, MESH_ALPN};

/// The `identity:` section of the config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// This workload's SPIFFE ID; the token must be for the same ID.
    pub id: String,
    /// The CA's base URL, `https://host:15012`.
    pub ca_url: String,
    /// PEM file with the mesh root: verifies the CA and every mesh peer.
    pub ca_bundle: PathBuf,
    /// File holding the bootstrap token; re-read on each use, so it may be rotated.
    pub token_file: PathBuf,
    /// Requested certificate lifetime, e.g. `24h`; the CA may shorten it. Default: the CA's max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_ttl: Option<String>,
}

impl IdentityConfig {
    /// Checks the values; errors name the key under `path` (e.g. `identity.id: …`).
    pub fn validate(&self, path: &str) -> Result<(), String> {
        SpiffeId::parse(&self.id).map_err(|_| {
            format!(
                "{path}.id: {:?} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)",
                self.id
            )
        })?;
        match self.ca_url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
            _ => {
                return Err(format!(
                    "{path}.ca_url: {:?} is not an https:// URL",
                    self.ca_url
                ))
            }
        }
        if self.ca_bundle.as_os_str().is_empty() {
            return Err(format!(
                "{path}.ca_bundle: must name the mesh root PEM file"
            ));
        }
        if self.token_file.as_os_str().is_empty() {
            return Err(format!(
                "{path}.token_file: must name the bootstrap token file"
            ));
        }
        if let Some(ttl) = &self.cert_ttl {
            match humantime::parse_duration(ttl) {
                Ok(d) if d >= Duration::from_secs(1) => {}
                _ => {
                    return Err(format!(
                        "{path}.cert_ttl: {ttl:?} is not a duration of at least 1s (like \"24h\")"
                    ))
                }
            }
        }
        Ok(())
    }

    fn requested_ttl(&self) -> Option<Duration> {
        self.cert_ttl
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
    }
}

/// Why an identity can't start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The config doesn't validate.
    #[error("{0}")]
    Config(String),
    /// The trust bundle can't be read.
    #[error("identity.ca_bundle: {0}")]
    Bundle(#[from] super::mtls::BundleError),
    /// A fixed certificate/key pair is unusable.
    #[error("identity certificate: {0}")]
    Cert(String),
}

/// Counters a user can read to see how renewal is going.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityStats {
    /// Certificates obtained since start.
    pub issued: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// The most recent failure, cleared by a success.
    pub last_error: Option<String>,
}

/// The current certificate and what's known about it.
struct Current {
    chain_pem: String,
    not_after: u64,
}

/// What the bundle file held at the last look, good or bad, or why it could not be read.
type LastRead = Mutex<Result<Vec<u8>, String>>;

struct Shared {
    id: SpiffeId,
    bundle: TrustBundle,
    /// Where the bundle is read from (none for a fixed identity), and what was read there
    /// last: a file is parsed, and a bad or missing one warned about, once per content.
    bundle_file: Option<(PathBuf, LastRead)>,
    // What rustls resolvers read; swapped together with `current`.
    certified: Arc<ArcSwapOption<CertifiedKey>>,
    current: ArcSwapOption<Current>,
    issued: watch::Sender<u64>,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// This workload's mesh identity. Dropping it stops renewal.
pub struct WorkloadIdentity {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("id", &self.shared.id.as_str())
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl Drop for WorkloadIdentity {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// How often the bundle file is looked at for a change: a Kubernetes ConfigMap or Secret
/// volume is updated in place within about a minute of its object, with no signal to anyone.
const BUNDLE_RECHECK: Duration = Duration::from_secs(5);

// Retry backoff: doubles from BACKOFF_MIN up to BACKOFF_MAX.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A uniform random number in [0, 1).
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

impl WorkloadIdentity {
    /// Validates `cfg`, reads the bundle, and starts obtaining and renewing the certificate in
    /// the background (needs a Tokio runtime). Await [`WorkloadIdentity::ready`] before serving.
    pub fn start(cfg: &IdentityConfig) -> Result<WorkloadIdentity, IdentityError> {
        super::install_crypto_provider();
        cfg.validate("identity").map_err(IdentityError::Config)?;
        let id = SpiffeId::parse(&cfg.id).map_err(|e| IdentityError::Config(e.to_string()))?;
        let pem = std::fs::read(&cfg.ca_bundle)
            .map_err(|e| super::mtls::BundleError::Io(cfg.ca_bundle.display().to_string(), e))?;
        let bundle = TrustBundle::from_pem(&pem, &cfg.ca_bundle.display().to_string())?;
        let mut shared = Shared::new(id, bundle);
        shared.bundle_file = Some((cfg.ca_bundle.clone(), Mutex::new(Ok(pem))));
        shared.count_roots();
        let shared = Arc::new(shared);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            IdentityError::Config("identity: must start inside a Tokio runtime".into())
        })?;
        let renew = runtime.spawn(renew_loop(shared.clone(), cfg.clone()));
        let watch = runtime.spawn(watch_bundle(shared.clone()));
        Ok(WorkloadIdentity {
            shared,
            tasks: vec![renew, watch],
        })
    }

    /// Reads the bundle file again and, if it changed and holds usable roots, makes them the
    /// ones every new mesh handshake (and the next request to the CA) is verified against.
    /// `Ok(true)`: new roots in use; `Ok(false)`: nothing to do (unchanged, or a fixed
    /// identity); an error leaves the roots as they were. With `force`, content that was
    /// already refused is tried and reported again (a reload asked for by the operator).
    pub fn reload_bundle(&self, force: bool) -> Result<bool, super::mtls::BundleError> {
        self.shared.reload_bundle(force)
    }

    /// A fixed identity from a PEM chain (leaf first) and PEM private key, never renewed: for
    /// certificates managed outside Outrider, and for tests.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        bundle: TrustBundle,
    ) -> Result<WorkloadIdentity, IdentityError> {
        super::install_crypto_provider();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| IdentityError::Cert(format!("key: {e}")))?;
        let (certified, not_after, id) =
            certified_key(chain_pem, key).map_err(IdentityError::Cert)?;
        let shared = Arc::new(Shared::new(id, bundle));
        shared.install(certified, chain_pem.to_owned(), not_after);
        Ok(WorkloadIdentity {
            shared,
            tasks: Vec::new(),
        })
    }

    /// This workload's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.shared.id
    }

    /// The mesh roots.
    pub fn bundle(&self) -> &TrustBundle {
        &self.shared.bundle
    }

    /// Whether a certificate is held and has not expired.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Waits until the first certificate is obtained (returns at once if one is held).
    pub async fn ready(&self) {
        let mut rx = self.shared.issued.subscribe();
        let shared = self.shared.clone();
        // The sender lives in `shared`, so the channel can't close while we wait.
        let _ = rx.wait_for(|_| shared.current.load().is_some()).await;
    }

    /// The current chain, PEM (leaf first), for the admin `/certs` page.
    pub fn current_chain_pem(&self) -> Option<String> {
        self.shared
            .current
            .load()
            .as_ref()
            .map(|c| c.chain_pem.clone())
    }

    /// When the current certificate expires, unix seconds.
    pub fn not_after(&self) -> Option<u64> {
        self.shared.current.load().as_ref().map(|c| c.not_after)
    }

    /// How renewal is going.
    pub fn stats(&self) -> IdentityStats {
        IdentityStats {
            issued: *self.shared.issued.borrow(),
            failures: self.shared.failures.load(Ordering::Relaxed),
            last_error: self.shared.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// The slot rustls resolvers read the certificate from.
    pub(crate) fn cert_store(&self) -> Arc<ArcSwapOption<CertifiedKey>> {
        self.shared.certified.clone()
    }
}

impl Shared {
    fn new(id: SpiffeId, bundle: TrustBundle) -> Shared {
        Shared {
            id,
            bundle,
            bundle_file: None,
            certified: Arc::new(ArcSwapOption::empty()),
            current: ArcSwapOption::empty(),
            issued: watch::Sender::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    fn reload_bundle(&self, force: bool) -> Result<bool, super::mtls::BundleError> {
        use super::mtls::BundleError;
        let Some((path, seen)) = &self.bundle_file else {
            return Ok(false);
        };
        let shown = path.display().to_string();
        let errors = || {
            metrics::counter!("outrider_identity_trust_bundle_errors_total", "identity" => self.id.to_string())
                .increment(1);
        };
        // What was read last, or why it could not be: each is reported once, not at every look.
        let read = std::fs::read(path).map_err(|e| e.to_string());
        {
            let Ok(mut seen) = seen.lock() else {
                return Ok(false);
            };
            if *seen == read && !force {
                return Ok(false);
            }
            seen.clone_from(&read);
        }
        let pem = read.map_err(|e| {
            errors();
            BundleError::Io(shown.clone(), std::io::Error::other(e))
        })?;
        let bundle = TrustBundle::from_pem(&pem, &shown).inspect_err(|_| errors())?;
        let (before, after) = (self.bundle.roots().len(), bundle.roots().len());
        self.bundle.replace(&bundle);
        self.count_roots();
        tracing::info!(bundle = %shown, roots_before = before, roots = after,
            "identity: mesh trust bundle read; new handshakes are verified against it");
        Ok(true)
    }

    /// `outrider_identity_trust_roots`: how many roots new handshakes are verified against,
    /// so that each step of a root rotation can be seen to have reached every sidecar.
    fn count_roots(&self) {
        metrics::gauge!("outrider_identity_trust_roots", "identity" => self.id.to_string())
            .set(self.bundle.roots().len() as f64);
    }

    fn is_ready(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| c.not_after > unix_seconds(SystemTime::now()))
    }

    fn install(&self, certified: Arc<CertifiedKey>, chain_pem: String, not_after: u64) {
        self.certified.store(Some(certified));
        self.current.store(Some(Arc::new(Current {
            chain_pem,
            not_after,
        })));
        self.issued.send_modify(|n| *n += 1);
        metrics::gauge!("outrider_identity_cert_expiry_timestamp_seconds", "identity" => self.id.to_string())
            .set(not_after as f64);
    }

    fn fail(&self, e: &FetchError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
        metrics::counter!("outrider_identity_cert_requests_total", "result" => "error")
            .increment(1);
    }
}

/// Builds the rustls key from a chain and key, checking they match and the leaf is a SPIFFE ID.
fn certified_key(
    chain_pem: &str,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<CertifiedKey>, u64, SpiffeId), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("chain is not PEM: {e}"))?;
    let leaf = chain.first().ok_or("the chain has no certificate")?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("leaf: {e}"))?;
    let not_after = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    let id = super::mtls::spiffe_id_of(leaf).map_err(|e| format!("leaf: {e}"))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("key and certificate: {e}"))?;
    Ok((Arc::new(certified), not_after, id))
}

/// Obtains a certificate, then renews it at ~2/3 of its life, forever.
async fn renew_loop(shared: Arc<Shared>, cfg: IdentityConfig) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let wait = match obtain(&shared, &cfg).await {
            Ok(lifetime) => {
                backoff = BACKOFF_MIN;
                // Jitter spreads a fleet's renewals so they don't hit the CA at once.
                lifetime
                    .mul_f64(0.6 + 0.1 * random_unit())
                    .max(Duration::from_millis(100))
            }
            Err(e) => {
                shared.fail(&e);
                let wait = backoff.mul_f64(0.8 + 0.4 * random_unit());
                tracing::warn!(identity = %shared.id, error = %e, retry_in_ms = wait.as_millis() as u64,
                    still_valid = shared.is_ready(), "identity: certificate request failed; keeping the current certificate");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Looks at the bundle file every [`BUNDLE_RECHECK`] and takes in a changed one. A file that
/// cannot be read or used (half-written, or emptied by mistake) leaves the roots in use as
/// they are: a sidecar that dropped its roots would refuse every peer.
async fn watch_bundle(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(BUNDLE_RECHECK).await;
        if let Err(e) = shared.reload_bundle(false) {
            tracing::warn!(identity = %shared.id, error = %e,
                "identity: the mesh trust bundle cannot be used; keeping the roots in use");
        }
    }
}

/// A fresh key (it never leaves this process) and a CSR naming our identity.
fn new_key_and_csr(id: &SpiffeId) -> Result<(rcgen::KeyPair, String), FetchError> {
    let local = |e: rcgen::Error| FetchError::Local(format!("making a key and CSR: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(local)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into().map_err(local)?)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(local)?;
    Ok((key, csr))
}

/// One attempt: new key, CSR, sign request. Returns the new certificate's remaining lifetime.
async fn obtain(shared: &Shared, cfg: &IdentityConfig) -> Result<Duration, FetchError> {
    let (key, csr) = new_key_and_csr(&shared.id)?;
    let resp = request(shared, cfg, csr).await?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let (certified, not_after, id) =
        certified_key(&resp.chain, key_der).map_err(FetchError::BadResponse)?;
    if id != shared.id {
        return Err(FetchError::WrongIdentity {
            got: id.to_string(),
            want: shared.id.to_string(),
        });
    }
    shared.install(certified, resp.chain, not_after);
    metrics::counter!("outrider_identity_cert_requests_total", "result" => "ok").increment(1);
    if let Ok(mut last) = shared.last_error.lock() {
        *last = None;
    }
    tracing::info!(identity = %id, serial = %resp.serial, not_after, "identity: obtained certificate");
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(not_after);
    Ok(expiry.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Asks the CA to sign `csr`: with the certificate we hold while it's valid (the bootstrap
/// token is usually short-lived), otherwise, or if the CA refuses that, with the token.
async fn request(
    shared: &Shared,
    cfg: &IdentityConfig,
    csr: String,
) -> Result<SignResponse, FetchError> {
    let mut req = SignRequest {
        csr,
        token: None,
        ttl_seconds: cfg.requested_ttl().map(|t| t.as_secs()),
    };
    let mut refused = None;
    if shared.is_ready() {
        if let Some(cert) = shared.certified.load_full() {
            match ca_client::sign(&cfg.ca_url, &shared.bundle, &req, Some(cert)).await {
                Err(
                    e @ FetchError::Refused {
                        status: 400 | 401, ..
                    },
                )
                | Err(e @ FetchError::CertificateRefused { .. }) => {
                    tracing::info!(identity = %shared.id, error = %e, "identity: CA refused a renewal by certificate; trying the token");
                    refused = Some(e);
                }
                other => return other,
            }
        }
    }
    let by_token = match std::fs::read_to_string(&cfg.token_file) {
        Ok(token) => {
            req.token = Some(token.trim().to_owned());
            ca_client::sign(&cfg.ca_url, &shared.bundle, &req, None).await
        }
        Err(e) => Err(FetchError::Local(format!(
            "identity.token_file {}: {e}",
            cfg.token_file.display()
        ))),
    };
    // After a refused renewal, the reason for that refusal is what the operator must see:
    // the token is usually long expired or gone by then.
    match (by_token, refused) {
        (Err(token), Some(renewal)) => Err(FetchError::TokenToo {
            renewal: Box::new(renewal),
            token: Box::new(token),
        }),
        (result, _) => result,
    }
}
