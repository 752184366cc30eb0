//! The one place that turns a proxy error into what the client sees: a status, the
//! `x-outrider-error` header naming the reason, and a short body. Never a bare error page,
//! never another tenant's internals.

use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::net::connect::ConnectError;
use crate::net::dns::DnsError;
use crate::policy::egress::Deny;

/// The header that names why the proxy refused or failed a request.
pub const ERROR_HEADER: &str = "x-outrider-error";

/// Anything that stops a request, tagged by where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Egress policy said no.
    #[error("{0}")]
    Denied(Deny),
    /// The client's request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Inbound authorization said no.
    #[error("{0}")]
    Unauthorized(String),
    /// No inbound route matches and there is no original destination to fall back on.
    #[error("no inbound route matches and the connection has no original destination")]
    NoRoute,
    /// The listener does not serve this method (`CONNECT` on the inbound listener).
    #[error("{0}")]
    MethodNotAllowed(&'static str),
    /// The request uses something the proxy cannot pass on faithfully (a transfer coding
    /// other than chunked).
    #[error("{0}")]
    NotImplemented(String),
    /// The client stopped sending its request body.
    #[error("{0}")]
    ClientTimeout(String),
    /// The request is addressed to the proxy itself.
    #[error("loop: request addressed to the proxy itself ({0})")]
    Loop(String),
    /// Name resolution failed.
    #[error("{0}")]
    Dns(DnsError),
    /// The upstream connect failed.
    #[error("{0}")]
    Connect(ConnectError),
    /// The upstream took too long to answer.
    #[error("upstream {0} did not respond in time")]
    ResponseTimeout(String),
    /// The cache phase reported an upstream failure with its status.
    #[error("{reason}")]
    Gateway {
        /// 502 or 504.
        status: StatusCode,
        /// What went wrong.
        reason: String,
    },
    /// The upstream failed mid-way (reset, protocol error).
    #[error("upstream {0} failed: {1}")]
    Upstream(String, String),
}

impl ProxyError {
    /// The status the client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Denied(Deny::InvalidHost(_)) | ProxyError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Denied(_) | ProxyError::Loop(_) | ProxyError::Unauthorized(_) => {
                StatusCode::FORBIDDEN
            }
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Dns(_) | ProxyError::Upstream(..) => StatusCode::BAD_GATEWAY,
            ProxyError::Connect(e) if e.is_timeout() => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Gateway { status, .. } => *status,
        }
    }

    /// Whether the request was refused (logged as `deny`, with the reason) rather than
    /// failed on the way: a policy decision, or a request the proxy will not pass on, as
    /// one that the HTTP parser refuses is logged. (A malformed request logged as `allow`
    /// with an error read as let through.)
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            ProxyError::Denied(_)
                | ProxyError::Loop(_)
                | ProxyError::Unauthorized(_)
                | ProxyError::BadRequest(_)
                | ProxyError::MethodNotAllowed(_)
                | ProxyError::NotImplemented(_)
        )
    }

    /// The response for the client.
    pub fn response(&self) -> Response<Body> {
        let reason = self.to_string();
        let mut resp = Response::new(body::full(format!("outrider: {reason}\n")));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(ERROR_HEADER, header_safe(&reason));
        resp
    }
}

/// A header value from text that may carry client-supplied bytes: anything outside
/// visible ASCII is escaped, so a crafted Host cannot inject a header line.
pub fn header_safe(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .flat_map(|c| {
            if (' '..='~').contains(&c) {
                vec![c]
            } else {
                c.escape_default().collect()
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("error"))
}
