//! Upstream connections. The proxy dials only addresses the egress policy checked: the
//! pooled HTTP client gets request URIs whose authority is that IP (the Host header keeps
//! the name), so its pool is keyed by checked address and its connector never resolves.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an upstream connection failed; maps to 502 (refused, reset, unreachable) or 504 (timeout).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect did not finish in time.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// Refused, unreachable, reset.
    #[error("connect to {addr} failed: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The URI given to the connector carried no IP address (a bug upstream of here).
    #[error("upstream URI {0} has no checked address")]
    NoAddress(String),
}

/// Dials `addr` with a timeout, TCP_NODELAY on, and counts failures.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let result = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout(addr)),
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Ok(Ok(stream)) => Ok(stream),
    };
    match result {
        Ok(stream) => {
            // Latency matters more than packet count for proxied request/response traffic.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Err(e) => {
            metrics::counter!("outrider_upstream_connect_errors_total").increment(1);
            Err(e)
        }
    }
}

/// The pooled client's connector: dials the IP in the URI, never resolves a name.
#[derive(Clone, Debug)]
pub struct CheckedConnector {
    /// Connect timeout.
    pub timeout: Duration,
}

impl tower_service::Service<Uri> for CheckedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            let addr = uri_addr(&uri).ok_or_else(|| ConnectError::NoAddress(uri.to_string()))?;
            connect(addr, timeout).await.map(TokioIo::new)
        })
    }
}

/// The socket address in a URI whose host is an IP literal.
fn uri_addr(uri: &Uri) -> Option<SocketAddr> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = host.parse().ok()?;
    Some(SocketAddr::new(ip, uri.port_u16().unwrap_or(80)))
}
