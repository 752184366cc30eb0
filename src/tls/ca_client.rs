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
    let tls = tls_config(bundle, client_cert)?;
    let body = serde_json::to_vec(req).map_err(|e| FetchError::Local(e.to_string()))?;
    let unreachable = |reason: String| FetchError::Unreachable {
        url: ca_url.to_owned(),
        reason,
    };
    let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange(target, tls, body))
        .await
        .map_err(|_| format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))
        .and_then(|r| r)
        .map_err(unreachable)?;
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

/// Connect, TLS, one HTTP/1.1 request. Errors say which step failed.
async fn exchange(
    target: Target,
    tls: rustls::ClientConfig,
    body: Vec<u8>,
) -> Result<(http::StatusCode, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(target.server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn_task = tokio::spawn(conn);
    let req = http::Request::post(target.path.as_str())
        .header(http::header::HOST, target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("HTTP: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("reading the response: {e}"))?
        .to_bytes();
    conn_task.abort();
    Ok((status, bytes))
}
