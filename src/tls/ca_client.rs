//! The workload's client for the CA's `POST /v1/sign`, over TLS verified against the mesh root.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::ServerName;

use super::ca_server::{ErrorBody, SignRequest, SignResponse};
use super::mtls::TrustBundle;

// A CA that doesn't answer within this is treated as down; the caller retries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 256 * 1024;

/// Why a certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Something on this side (key generation, reading the token file).
    #[error("{0}")]
    Local(String),
    /// The CA could not be reached or the TLS/HTTP exchange broke.
    #[error("CA {url} unreachable: {reason}")]
    Unreachable {
        /// The CA URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The CA answered with an error.
    #[error("CA refused ({status} {error}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The CA's error code.
        error: String,
        /// The CA's explanation.
        message: String,
    },
    /// The CA ended the TLS handshake over the certificate this sidecar presented: it does not
    /// chain to the roots the CA trusts (typically a CA moved to a new root without
    /// `--also-trust`), or it was refused outright.
    #[error("CA {url} refused the certificate being renewed in the TLS handshake (alert {alert}): if the CA moved to a new root, start it with --also-trust <old root.pem>")]
    CertificateRefused {
        /// The CA URL.
        url: String,
        /// The TLS alert the CA sent.
        alert: String,
    },
    /// A renewal was refused and the bootstrap token did not get a certificate either.
    #[error("{renewal}; with the bootstrap token: {token}")]
    TokenToo {
        /// Why the renewal by certificate failed.
        renewal: Box<FetchError>,
        /// Why the request with the token failed.
        token: Box<FetchError>,
    },
    /// The CA's answer is not a usable certificate.
    #[error("CA response unusable: {0}")]
    BadResponse(String),
    /// The certificate is for another identity than `identity.id` (the token is for someone else).
    #[error("the CA issued a certificate for {got}, but identity.id is {want}: the token is for another identity")]
    WrongIdentity {
        /// What the certificate says.
        got: String,
        /// What the config says.
        want: String,
    },
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Where the CA is, from its URL.
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    path: String,
    authority: String,
}

impl Target {
    fn parse(ca_url: &str) -> Result<Target, FetchError> {
        let local = |what: String| FetchError::Local(format!("CA URL {ca_url:?}: {what}"));
        let uri: http::Uri = ca_url.parse().map_err(|e| local(format!("{e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| local("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|e| local(format!("{e}")))?;
        Ok(Target {
            port: uri.port_u16().unwrap_or(443),
            server_name,
            path: format!("{}/v1/sign", uri.path().trim_end_matches('/')),
            authority: uri
                .authority()
                .map_or_else(|| host.clone(), |a| a.to_string()),
            host,
        })
    }
}

/// TLS to the CA: its certificate must chain to the mesh root and name the URL's host.
fn tls_config(
    bundle: &TrustBundle,
    client_cert: Option<Arc<CertifiedKey>>,
) -> Result<rustls::ClientConfig, FetchError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Local(e.to_string()))?
        .with_root_certificates(bundle.roots());
    let mut tls = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(Fixed(cert))),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Sends one `POST /v1/sign` to the CA at `ca_url` (`https://host:port`), verifying the CA's
/// certificate against `bundle`. `client_cert` authenticates a renewal; `req.token` a bootstrap.
pub async fn sign(
    ca_url: &str,
    bundle: &TrustBundle,
    req: &SignRequest,
    client_cert: Option<Arc<CertifiedKey>>,
) -> Result<SignResponse, FetchError> {
    let target = Target::parse(ca_url)?;
    let body = serde_json::to_vec(req).map_err(|e| FetchError::Local(e.to_string()))?;
    let unreachable = |reason: String| FetchError::Unreachable {
        url: ca_url.to_owned(),
        reason,
    };
    let presents_cert = client_cert.is_some();
    let tls = tls_config(bundle, client_cert)?;
    let (status, bytes) =
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(target, tls, body)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(Broken::CertRefused(alert))) if presents_cert => {
                return Err(FetchError::CertificateRefused {
                    url: ca_url.to_owned(),
                    alert: format!("{alert:?}"),
                })
            }
            Ok(Err(Broken::CertRefused(alert))) => {
                return Err(unreachable(format!("TLS alert {alert:?}")))
            }
            Ok(Err(Broken::Step(reason))) => return Err(unreachable(reason)),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )))
            }
        };
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| FetchError::BadResponse(e.to_string()));
    }
    let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
        error: "unknown".into(),
        message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
    });
    Err(FetchError::Refused {
        status: status.as_u16(),
        error: err.error,
        message: err.message,
    })
}

/// How an exchange with the CA broke.
enum Broken {
    /// The CA sent a TLS alert about the client certificate. In TLS 1.3 the client's side of
    /// the handshake is done before the server has checked that certificate, so the alert
    /// arrives as the response is read, where hyper reports only "connection error".
    CertRefused(rustls::AlertDescription),
    /// Anything else, with the step that failed and the whole chain of causes.
    Step(String),
}

impl Broken {
    fn at(step: &str, e: &(dyn std::error::Error + 'static)) -> Broken {
        let mut text = format!("{step}: {e}");
        let mut cur = Some(e);
        while let Some(err) = cur {
            // io::Error's `source()` skips the error it wraps, so that one is looked at first.
            let wrapped = err
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            for layer in [Some(err), wrapped].into_iter().flatten() {
                if let Some(rustls::Error::AlertReceived(alert)) = layer.downcast_ref() {
                    if refuses_cert(*alert) {
                        return Broken::CertRefused(*alert);
                    }
                }
            }
            cur = err.source();
            if let Some(next) = cur {
                let next = next.to_string();
                if !text.ends_with(&next) {
                    text = format!("{text}: {next}");
                }
            }
        }
        Broken::Step(text)
    }
}

/// The alerts a TLS server sends when it does not accept the client's certificate. Our side of
/// the handshake is over by then, so `DecryptError` is about our chain: a root of the same name
/// as ours whose signature does not verify it, as after a CA moved to a new root.
fn refuses_cert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::DecryptError
    )
}

/// Connect, TLS, one HTTP/1.1 request. Errors say which step failed.
async fn exchange(
    target: Target,
    tls: rustls::ClientConfig,
    body: Vec<u8>,
) -> Result<(http::StatusCode, Bytes), Broken> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| Broken::at("connect", &e))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(target.server_name, tcp)
        .await
        .map_err(|e| Broken::at("TLS", &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Broken::at("HTTP", &e))?;
    let conn_task = tokio::spawn(conn);
    let req = http::Request::post(target.path.as_str())
        .header(http::header::HOST, target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Broken::at("HTTP", &e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Broken::at("HTTP", &e))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| Broken::Step(format!("reading the response: {e}")))?
        .to_bytes();
    conn_task.abort();
    Ok((status, bytes))
}
