//! Protocol detection for transparent connections, from the client's first bytes:
//! HTTP/1 request line, HTTP/2 prior-knowledge preface, TLS ClientHello (with its SNI),
//! else opaque TCP. The bytes read are kept and replayed ([`Rewind`]) untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface.
    Http2,
    /// A TLS ClientHello, with its SNI and whether it is mesh mTLS.
    Tls(Hello),
    /// Anything else, or nothing within the timeout.
    Tcp {
        /// Whether detection gave up waiting (counted in metrics).
        timed_out: bool,
    },
}

impl Protocol {
    /// The name in logs.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls(_) => "tls",
            Protocol::Tcp { .. } => "tcp",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Enough for any ClientHello a real client sends; larger ones are treated as SNI-less.
const MAX_PEEK: usize = 16 * 1024;

/// Reads from `io` until the protocol is known, the peek limit is reached, or `timeout`
/// passes; returns the protocol and the bytes read.
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    detect_until(io, tokio::time::sleep(timeout)).await
}

/// [`detect`] that gives up when `give_up` resolves instead of after a fixed time
/// (`Tcp { timed_out: true }` then). Reads are cancel-safe: no byte is lost to giving up.
pub async fn detect_until<R: AsyncRead + Unpin>(
    io: &mut R,
    give_up: impl std::future::Future<Output = ()>,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    tokio::pin!(give_up);
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf.freeze()));
        }
        if buf.len() >= MAX_PEEK {
            let p = if buf[0] == 0x16 {
                Protocol::Tls(Hello::default())
            } else {
                Protocol::Tcp { timed_out: false }
            };
            return Ok((p, buf.freeze()));
        }
        tokio::select! {
            // The read first: bytes that are there win over a deadline just past (an
            // unbiased select took such a request for opaque TCP half the time, passing
            // it through unparsed), and the timer is not armed while they keep coming. A
            // timer armed per connection also woke the runtime's parked thread to take
            // the earlier deadline: one `eventfd` write per two connections.
            biased;
            read = io.read_buf(&mut buf) => match read {
                Ok(0) => return Ok((Protocol::Tcp { timed_out: false }, buf.freeze())),
                Ok(_) => {}
                Err(e) => return Err(e),
            },
            () = &mut give_up => return Ok((Protocol::Tcp { timed_out: true }, buf.freeze())),
        }
    }
}

/// `None` while more bytes are needed to decide.
fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    if buf[0] == 0x16 {
        return tls_client_hello(buf).map(Protocol::Tls);
    }
    // An HTTP/1 method is an upper-case token followed by a space.
    let token_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token_len == buf.len() && token_len < 16 {
        return None;
    }
    if (3..16).contains(&token_len) && buf[token_len] == b' ' {
        return Some(Protocol::Http1);
    }
    Some(Protocol::Tcp { timed_out: false })
}

/// Parses a TLS record holding a ClientHello. `None`: need more bytes; `Some(None)`: a
/// ClientHello without a usable SNI (or not a ClientHello at all).
/// What a ClientHello says: the SNI, and whether it offers the mesh ALPN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    /// The server name.
    pub sni: Option<String>,
    /// Whether ALPN offers `outrider-mesh`: another sidecar calling.
    pub mesh: bool,
}

/// Parses a TLS record holding a ClientHello. `None`: need more bytes; `Some(default)`: a
/// ClientHello without SNI or ALPN (or not a ClientHello at all).
fn tls_client_hello(buf: &[u8]) -> Option<Hello> {
    if buf.len() < 5 {
        return None;
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return if 5 + record_len > MAX_PEEK {
            Some(Hello::default())
        } else {
            None
        };
    }
    Some(parse_hello(&buf[5..5 + record_len]).unwrap_or_default())
}

fn parse_hello(hs: &[u8]) -> Option<Hello> {
    let mut r = Reader(hs);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let comp = usize::from(r.u8()?);
    r.take(comp)?;
    let ext_len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(ext_len)?);
    let mut hello = Hello::default();
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take(len)?;
        if ty != 0 && ty != 16 {
            continue;
        }
        // Both server_name and ALPN hold one length-prefixed list.
        let mut s = Reader(data);
        let list_len = usize::from(s.u16()?);
        let mut list = Reader(s.take(list_len)?);
        match ty {
            0 => {
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let n = usize::from(list.u16()?);
                    let name = list.take(n)?;
                    if name_type == 0 {
                        hello.sni = std::str::from_utf8(name).ok().map(str::to_owned);
                    }
                }
            }
            16 => {
                while !list.0.is_empty() {
                    let n = usize::from(list.u8()?);
                    hello.mesh |= list.take(n)? == crate::tls::mtls::MESH_ALPN;
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// An I/O that first yields bytes already read, then the inner stream.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// Replays `bytes` next, before anything not yet replayed.
    pub fn replay(&mut self, bytes: Bytes) {
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            [bytes, std::mem::take(&mut self.prefix)].concat().into()
        };
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the detection buffer instead of carrying it for the connection's life.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(
            classify(b"\x00\x01binary"),
            Some(Protocol::Tcp { timed_out: false })
        );
        assert_eq!(classify(b"\x16\x03\x01\x00"), None);
    }

    #[tokio::test]
    async fn bytes_already_there_win_over_a_deadline_just_past() {
        use std::future::Future;
        use std::io::Write;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        // The request and the deadline become ready together: a request that is there must
        // be seen as HTTP every time (a coin toss would lose one of 20 with odds 1 - 2^-20).
        for _ in 0..20 {
            let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().await.unwrap();
            let mut fut = Box::pin(detect(&mut s, Duration::from_millis(20)));
            let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
            assert!(first.is_pending(), "nothing sent yet");
            // Blocking: the runtime does not turn while the deadline passes and the
            // request lands; the sleep below then turns it once, readying both.
            std::thread::sleep(Duration::from_millis(40));
            c.write_all(req).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            let (p, bytes) = fut.await.unwrap();
            assert_eq!(p, Protocol::Http1);
            assert_eq!(&bytes[..], req);
        }
    }
}
