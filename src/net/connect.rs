//! Upstream connections. The proxy dials only addresses the egress policy checked (the
//! Host header keeps the name), so nothing here ever resolves a name.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    /// The mesh mTLS handshake with the peer's sidecar failed (wrong CA, wrong identity).
    #[error("mTLS to mesh peer {addr} failed: {source}")]
    Mtls {
        /// The address.
        addr: SocketAddr,
        /// The TLS error.
        source: io::Error,
    },
    /// This workload has no certificate yet (the CA has not answered), so it cannot speak
    /// mTLS; nothing is sent in plaintext instead.
    #[error("no workload certificate yet for mTLS to mesh peer {0}")]
    NoCertificate(SocketAddr),
    /// Each of a name's addresses failed (in the order tried; see [`super::attempts`]).
    #[error("{}", every_message(.0))]
    Every(Vec<ConnectError>),
}

fn every_message(errors: &[ConnectError]) -> String {
    let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}

impl ConnectError {
    /// The same error again (for each request that shared one dial); an OS error keeps its
    /// kind and message.
    pub fn copy(&self) -> ConnectError {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            ConnectError::Timeout(a) => ConnectError::Timeout(*a),
            ConnectError::Io { addr, source } => ConnectError::Io {
                addr: *addr,
                source: io(source),
            },
            ConnectError::Mtls { addr, source } => ConnectError::Mtls {
                addr: *addr,
                source: io(source),
            },
            ConnectError::NoCertificate(a) => ConnectError::NoCertificate(*a),
            ConnectError::Every(all) => ConnectError::Every(all.iter().map(Self::copy).collect()),
        }
    }

    /// One error for the failures of several attempts: the only one, or all of them.
    pub fn every(mut errors: Vec<ConnectError>) -> ConnectError {
        match errors.len() {
            1 => errors.remove(0),
            _ => ConnectError::Every(errors),
        }
    }

    /// Whether it is a timeout (every attempt timed out): a 504, where others are 502s.
    pub fn is_timeout(&self) -> bool {
        match self {
            ConnectError::Timeout(_) => true,
            ConnectError::Every(all) => !all.is_empty() && all.iter().all(Self::is_timeout),
            _ => false,
        }
    }
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

/// Mesh mTLS for outbound connections: destinations in `networks` are other sidecars,
/// reached with TLS 1.3 and this workload's certificate.
#[derive(Clone)]
pub struct MeshClient {
    /// The mesh client config (our identity, the mesh roots, SPIFFE checks).
    pub tls: Arc<rustls::ClientConfig>,
    /// CIDRs that are in the mesh.
    pub networks: Arc<Vec<IpNet>>,
    /// Client configs that also require the peer to have one of the expected identities,
    /// for the destinations they cover (first match wins).
    pub expected: Arc<Vec<(IpNet, Arc<rustls::ClientConfig>)>>,
    /// Whether the workload has a certificate yet: without one, mesh connects fail fast
    /// instead of handshaking with nothing to present.
    pub has_cert: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl MeshClient {
    /// Whether `addr` is a mesh destination.
    pub fn covers(&self, addr: SocketAddr) -> bool {
        self.networks.iter().any(|n| n.contains(&addr.ip()))
    }

    /// Wraps a connection to a mesh peer in mTLS.
    pub async fn handshake(
        &self,
        addr: SocketAddr,
        tcp: TcpStream,
    ) -> Result<MaybeTls, ConnectError> {
        // The peer is checked by its SPIFFE ID, not by name: the server name is only a label.
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = self
            .expected
            .iter()
            .find(|(net, _)| net.contains(&addr.ip()))
            .map_or(&self.tls, |(_, cfg)| cfg);
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        match connector.connect(name, tcp).await {
            Ok(tls) => Ok(MaybeTls::Tls(Box::new(tls))),
            Err(source) => {
                metrics::counter!("outrider_upstream_connect_errors_total").increment(1);
                Err(ConnectError::Mtls { addr, source })
            }
        }
    }
}

/// Dials `addr`, wrapping it in mesh mTLS when the destination is in the mesh.
pub async fn connect_maybe_mesh(
    addr: SocketAddr,
    timeout: Duration,
    mesh: Option<&MeshClient>,
) -> Result<MaybeTls, ConnectError> {
    let mesh = mesh.filter(|m| m.covers(addr));
    // Without a certificate there is nothing to present: fail before even connecting, so
    // the peer never sees a connection that could pass for plaintext.
    if mesh.is_some_and(|m| !(m.has_cert)()) {
        metrics::counter!("outrider_upstream_connect_errors_total").increment(1);
        return Err(ConnectError::NoCertificate(addr));
    }
    let started = tokio::time::Instant::now();
    let tcp = connect(addr, timeout).await?;
    match mesh {
        // The connect timeout covers the mTLS handshake too (as Envoy's does): a peer that
        // accepts and never answers the ClientHello must not hold the caller forever.
        Some(m) => tokio::time::timeout_at(started + timeout, m.handshake(addr, tcp))
            .await
            .unwrap_or_else(|_| {
                metrics::counter!("outrider_upstream_connect_errors_total").increment(1);
                Err(ConnectError::Timeout(addr))
            }),
        None => Ok(MaybeTls::Plain(tcp)),
    }
}

/// An upstream connection: plain TCP, or mTLS to another sidecar.
pub enum MaybeTls {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mesh mTLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// Whether this is a mesh mTLS connection.
    pub fn is_mesh(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Registers the socket with the runtime of the calling thread, in place of the one it
    /// was registered with (a TLS session on it stays as it is). The socket is `dup`ed and
    /// the copy registered here; the old descriptor leaves its runtime and is closed. Four
    /// system calls, so for a connection that changes worker for good, not per request.
    pub fn reregister(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        let tcp = match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_mut().0,
        };
        // The copy shares the open file, and with it `O_NONBLOCK`, which `from_std` needs.
        let copy = std::net::TcpStream::from(tcp.as_fd().try_clone_to_owned()?);
        *tcp = TcpStream::from_std(copy)?;
        Ok(())
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that echoes what it reads.
    async fn echo() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// [`echo`] in TLS, with a certificate for `echo.test`, and the client configuration
    /// that trusts it.
    async fn tls_echo() -> (SocketAddr, tokio_rustls::TlsConnector) {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        crate::tls::install_crypto_provider();
        let ck = rcgen::generate_simple_self_signed(vec!["echo.test".to_owned()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, tokio_rustls::TlsConnector::from(Arc::new(client)))
    }

    /// A connection made on one worker's runtime and taken over by another serves on
    /// there once re-registered, after the first runtime (and its I/O driver) is gone;
    /// a TLS one with its session. Without the re-registration its I/O fails.
    #[tokio::test]
    async fn a_connection_reregistered_on_another_runtime_outlives_the_first() {
        let (tls_addr, connector) = tls_echo().await;
        let plain_addr = echo().await;
        for tls in [false, true] {
            let connector = connector.clone();
            let addr = if tls { tls_addr } else { plain_addr };
            // The other worker: a thread with a runtime of its own, gone once it has dialled
            // (this runtime goes on meanwhile: it serves the handshake).
            let (dialled, io) = tokio::sync::oneshot::channel();
            let other = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let io = rt.block_on(async move {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    if !tls {
                        return MaybeTls::Plain(tcp);
                    }
                    let name = rustls_pki_types::ServerName::try_from("echo.test").unwrap();
                    MaybeTls::Tls(Box::new(connector.connect(name, tcp).await.unwrap()))
                });
                drop(rt);
                let _ = dialled.send(io);
            });
            let mut io = io.await.unwrap();
            tokio::task::spawn_blocking(move || other.join().unwrap())
                .await
                .unwrap();
            io.reregister().unwrap();
            io.write_all(b"ping").await.unwrap();
            io.flush().await.unwrap();
            let mut back = [0u8; 4];
            io.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"ping", "tls: {tls}");
        }
    }
}
