//! `outrider ca serve`: the CA's HTTPS endpoint, `POST /v1/sign`.
//!
//! Request `{"csr": "<PEM>", "token": "…", "ttl_seconds": N}`, response
//! `{"spiffe_id": "…", "chain": "<PEM leaf + root>", "not_after": <unix>, "serial": "…"}`.
//! The identity comes from the token; a request without a token is a renewal and gets the
//! identity of the mesh certificate the caller presented in the TLS handshake. Errors are JSON
//! `{"error": "<code>", "message": "<sentence>"}` with 400 (bad input) or 401 (not authorized).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::ca::{CaError, MeshCa, SignError};
use super::spiffe::SpiffeId;
use super::token::TokenError;

// A CSR is well under a kilobyte; anything much bigger is not a sign request.
const MAX_BODY: usize = 64 * 1024;
// The CA's own serving certificate: made at start, and made again by the running CA once two
// thirds of this have passed (see `ServingCert`).
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
// After a failed attempt to make a new serving certificate, the next one waits this long.
const SERVING_CERT_RETRY: Duration = Duration::from_secs(60);

/// Settings for [`CaServer::start`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest certificate lifetime handed out.
    pub max_ttl: Duration,
    /// Extra DNS names for the serving certificate, besides `localhost` and the listen IPs.
    pub extra_dns: Vec<String>,
    /// Lifetime of the serving certificate; a new one is made after two thirds of it.
    pub serving_ttl: Duration,
    /// Roots besides the CA's own whose certificates may renew themselves: the previous root
    /// during a root rotation, so that sidecars holding its certificates get ones from the new
    /// root when they renew, instead of being refused until their token is renewed too.
    pub also_trust: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_ttl: Duration::from_secs(24 * 3600),
            extra_dns: Vec::new(),
            serving_ttl: SERVING_CERT_TTL,
            also_trust: Vec::new(),
        }
    }
}

/// The request body of `POST /v1/sign`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SignRequest {
    /// PEM PKCS#10 CSR; only its public key is used.
    pub csr: String,
    /// Bootstrap token; absent for a renewal authenticated by the caller's current certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Requested lifetime; capped at the server's max-ttl. Absent: max-ttl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// The response body of a successful `POST /v1/sign`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SignResponse {
    /// The identity in the certificate.
    pub spiffe_id: String,
    /// Leaf then root, PEM.
    pub chain: String,
    /// Expiry, unix seconds.
    pub not_after: u64,
    /// Serial number, hex.
    pub serial: String,
}

/// The body of every error response.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// A stable code: `token_expired`, `token_invalid_signature`, `token_malformed`,
    /// `token_unknown_version`, `token_wrong_trust_domain`, `unauthenticated`, `bad_request`,
    /// `bad_csr`, `not_found`, `method_not_allowed`, `internal`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// A running CA endpoint. Dropping it without [`CaServer::shutdown`] leaves it serving until the
/// runtime stops.
#[derive(Debug)]
pub struct CaServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    ca: Arc<MeshCa>,
    max_ttl: Duration,
}

impl CaServer {
    /// Makes a serving certificate for the listener's addresses and starts serving on it.
    pub fn start(
        ca: Arc<MeshCa>,
        listener: TcpListener,
        opts: &ServeOptions,
    ) -> Result<CaServer, CaError> {
        super::install_crypto_provider();
        let addr = listener.local_addr().map_err(|source| CaError::Io {
            path: "listener".into(),
            source,
        })?;
        let serving = ServingCert::new(
            ca.clone(),
            serving_ips(addr.ip()),
            opts.extra_dns.clone(),
            opts.serving_ttl,
        )?;
        let tls = tls_config(&ca, Arc::new(serving), &opts.also_trust)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let state = Arc::new(State {
            ca,
            max_ttl: opts.max_ttl,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, acceptor, state, stopped));
        Ok(CaServer { addr, stop, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, gives in-flight requests a moment, closes the listener.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "CA accept loop ended abnormally");
        }
    }
}

/// The CA's serving certificate. A CA can run for longer than the certificate it made at
/// start lives, and sidecars must still reach it to renew theirs: the first handshake after
/// two thirds of the lifetime makes a new certificate (a new key too), and handshakes
/// already done keep theirs.
#[derive(Debug)]
struct ServingCert {
    ca: Arc<MeshCa>,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
    ttl: Duration,
    /// The certificate, and when to make the next one.
    current: arc_swap::ArcSwap<(Arc<rustls::sign::CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    fn new(
        ca: Arc<MeshCa>,
        ips: Vec<IpAddr>,
        dns: Vec<String>,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let first = Self::issue(&ca, &ips, &dns, ttl)?;
        Ok(ServingCert {
            ca,
            ips,
            dns,
            ttl,
            current: arc_swap::ArcSwap::from_pointee(first),
        })
    }

    fn issue(
        ca: &MeshCa,
        ips: &[IpAddr],
        dns: &[String],
        ttl: Duration,
    ) -> Result<(Arc<rustls::sign::CertifiedKey>, SystemTime), CaError> {
        let made = SystemTime::now();
        let (chain, key) = ca.serving_cert(ips, dns, ttl)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                CaError::Corrupt {
                    path: "serving certificate".into(),
                    reason: e.to_string(),
                }
            })?;
        Ok((Arc::new(certified), made + ttl * 2 / 3))
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let current = self.current.load();
        if SystemTime::now() < current.1 {
            return Some(current.0.clone());
        }
        // Two handshakes at the same moment may both make one; the later one stays.
        let next = match Self::issue(&self.ca, &self.ips, &self.dns, self.ttl) {
            Ok(next) => {
                tracing::info!(renew_at = ?next.1, "CA serving certificate renewed");
                next
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a new CA serving certificate; keeping the current one");
                (current.0.clone(), SystemTime::now() + SERVING_CERT_RETRY)
            }
        };
        let certified = next.0.clone();
        self.current.store(Arc::new(next));
        Some(certified)
    }
}

fn tls_config(
    ca: &MeshCa,
    serving: Arc<ServingCert>,
    also_trust: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let bad = |reason: String| CaError::Corrupt {
        path: super::ca::ROOT_CERT_FILE.into(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.root_der().clone())
        .map_err(|e| bad(e.to_string()))?;
    for root in also_trust {
        roots.add(root.clone()).map_err(|e| CaError::Corrupt {
            path: "--also-trust".into(),
            reason: format!("not a usable root: {e}"),
        })?;
    }
    // A client certificate is optional: bootstrap requests have none, renewals show the
    // certificate being renewed.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The IPs to name in the serving certificate: the listen IP, or for a wildcard listen, loopback
/// and every interface address.
fn serving_ips(listen: IpAddr) -> Vec<IpAddr> {
    if !listen.is_unspecified() {
        return vec![listen];
    }
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let ip = a.address.as_ref().and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) = ip {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    ips
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(serve_conn(tcp, peer, acceptor.clone(), state.clone()));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        conns.shutdown().await;
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "CA: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "CA: TLS handshake timed out");
            return;
        }
    };
    // The identity of the certificate the caller presented, already chain-verified by rustls.
    let cert_id = super::mtls::peer_spiffe_id(tls.get_ref().1)
        .filter(|id| id.trust_domain() == state.ca.trust_domain());
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let cert_id = cert_id.clone();
        async move { Ok::<_, Infallible>(handle(&state, req, peer, cert_id).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "CA connection ended with an error");
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A refused request: the status, a stable code and a sentence, as sent to the caller.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Refusal {
        let (status, code) = match &e {
            TokenError::Malformed(_) => (StatusCode::BAD_REQUEST, "token_malformed"),
            TokenError::UnknownVersion(_) => (StatusCode::BAD_REQUEST, "token_unknown_version"),
            TokenError::BadSignature => (StatusCode::UNAUTHORIZED, "token_invalid_signature"),
            TokenError::Expired { .. } => (StatusCode::UNAUTHORIZED, "token_expired"),
            TokenError::WrongTrustDomain(..) => {
                (StatusCode::UNAUTHORIZED, "token_wrong_trust_domain")
            }
            TokenError::Random => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Refusal::new(status, code, e.to_string())
    }
}

async fn handle(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    cert_id: Option<SpiffeId>,
) -> Response<Full<Bytes>> {
    match sign(state, req, peer, cert_id).await {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(r) => {
            tracing::warn!(%peer, status = r.status.as_u16(), error = r.code, reason = %r.message, "CA refused to sign");
            let body = ErrorBody {
                error: r.code.to_owned(),
                message: r.message,
            };
            json(r.status, &body)
        }
    }
}

/// The whole of `POST /v1/sign`: read, authenticate, issue, log.
async fn sign(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    cert_id: Option<SpiffeId>,
) -> Result<SignResponse, Refusal> {
    let sign = read_request(req).await?;
    let (id, via) = authenticate(state, &sign, cert_id)?;
    let ttl = match sign.ttl_seconds {
        Some(s) => Duration::from_secs(s).min(state.max_ttl),
        None => state.max_ttl,
    };
    match state.ca.issue(&sign.csr, &id, ttl) {
        Ok(issued) => {
            tracing::info!(%peer, identity = %id, serial = %issued.serial, not_after = issued.not_after, via = %via, "CA issued a certificate");
            Ok(SignResponse {
                spiffe_id: id.to_string(),
                chain: issued.chain_pem,
                not_after: issued.not_after,
                serial: issued.serial,
            })
        }
        Err(e @ SignError::Ttl) => Err(Refusal::bad_request(e.to_string())),
        Err(e @ SignError::Csr(_)) => {
            let msg = format!("{e} (identity {id})");
            Err(Refusal::new(StatusCode::BAD_REQUEST, "bad_csr", msg))
        }
        Err(e @ SignError::Cert(_)) => {
            tracing::error!(%peer, identity = %id, error = %e, "CA failed to sign");
            let msg = "the CA failed to sign; see its log";
            Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                msg,
            ))
        }
    }
}

async fn read_request(req: Request<Incoming>) -> Result<SignRequest, Refusal> {
    if req.uri().path() != "/v1/sign" {
        let msg = format!("no such endpoint {}: use POST /v1/sign", req.uri().path());
        return Err(Refusal::new(StatusCode::NOT_FOUND, "not_found", msg));
    }
    if req.method() != Method::POST {
        let msg = "use POST /v1/sign";
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            msg,
        ));
    }
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Refusal::bad_request(format!("cannot read the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| Refusal::bad_request(format!("the body is not a sign request: {e}")))
}

/// Whom to issue for: the token's identity, or for a renewal without a token, the identity of
/// the verified mesh certificate the caller presented. Returns the identity and how it was
/// established, for the log.
fn authenticate(
    state: &State,
    sign: &SignRequest,
    cert_id: Option<SpiffeId>,
) -> Result<(SpiffeId, String), Refusal> {
    match (&sign.token, cert_id) {
        (Some(token), _) => {
            let claims = state.ca.check_token(token)?;
            Ok((claims.sub, format!("token {}", claims.jti)))
        }
        (None, Some(id)) => Ok((id, "renewal with current certificate".to_owned())),
        (None, None) => {
            let msg = "no token and no mesh client certificate: send a bootstrap token";
            Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                msg,
            ))
        }
    }
}
