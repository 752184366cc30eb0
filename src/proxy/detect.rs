//! Protocol detection for transparent connections, from the client's first bytes:
//! HTTP/1 request line, HTTP/2 prior-knowledge preface, TLS ClientHello (with its SNI),
//! else opaque TCP. The bytes read are kept and replayed ([`Rewind`]) untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::policy::host::{parse_host, Host, HostError};

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
                Protocol::Tls(Hello::unreadable("a ClientHello over 16 KiB"))
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
    // A TLS record: handshake (22), then the version's major byte, 3 in every TLS version.
    if buf[0] == 0x16 {
        match buf.get(1) {
            None => return None,
            Some(3) => return tls_client_hello(buf).map(Protocol::Tls),
            Some(_) => {}
        }
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

/// What a ClientHello says: the SNI, and whether it offers the mesh ALPN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    /// The server name (as sent: bytes that are not UTF-8 come out replaced, and fail the
    /// host check like any other invalid character).
    pub sni: Option<String>,
    /// Whether ALPN offers `outrider-mesh`: another sidecar calling.
    pub mesh: bool,
    /// Why the ClientHello cannot be read with certainty, when it cannot: then no server
    /// name seen here can be trusted to be the one the server acts on, and the egress check
    /// refuses the connection (Envoy's TLS inspector closes such connections too).
    pub unreadable: Option<&'static str>,
}

impl Hello {
    fn unreadable(why: &'static str) -> Hello {
        Hello {
            unreadable: Some(why),
            ..Hello::default()
        }
    }

    /// The server name as a host to check: `None` without one, `Err` for an invalid name or
    /// an unreadable ClientHello.
    pub fn server(&self) -> Option<Result<Host, HostError>> {
        if let Some(why) = self.unreadable {
            return Some(Err(HostError::UnreadableHello(why)));
        }
        self.sni.as_deref().map(parse_host)
    }
}

/// Reads the ClientHello from the TLS records at the start of `buf`. `None`: need more bytes.
///
/// The handshake message may span several records (RFC 8446 §5.1), and a client can split it
/// on purpose so that a parser reading only the first record sees no server name: a way
/// around an SNI check that TLS servers accept without complaint. So the records are put
/// together until the message is whole. Every client sends it in one record; that case is
/// read where it lies, without a copy.
fn tls_client_hello(buf: &[u8]) -> Option<Hello> {
    let mut rest = buf;
    let mut joined: Vec<u8> = Vec::new();
    loop {
        if rest.len() < 5 {
            return need_more(buf);
        }
        if rest[0] != 0x16 {
            return Some(Hello::unreadable(
                "a record other than handshake inside the ClientHello",
            ));
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            // RFC 8446 §5.1: handshake records are never empty.
            return Some(Hello::unreadable("an empty handshake record"));
        }
        if rest.len() < 5 + len {
            return need_more(buf);
        }
        let fragment = &rest[5..5 + len];
        rest = &rest[5 + len..];
        let message = if joined.is_empty() && fragment.len() >= 4 {
            fragment
        } else {
            joined.extend_from_slice(fragment);
            &joined[..]
        };
        if message.len() < 4 {
            continue;
        }
        if message[0] != 1 {
            // Not a ClientHello, so no TLS client: opaque bytes that begin like TLS.
            return Some(Hello::default());
        }
        let whole = 4
            + ((usize::from(message[1]) << 16)
                | (usize::from(message[2]) << 8)
                | usize::from(message[3]));
        if whole > MAX_PEEK {
            return Some(Hello::unreadable("a ClientHello over 16 KiB"));
        }
        if message.len() >= whole {
            return Some(parse_hello(&message[4..whole]));
        }
        if !joined.is_empty() {
            continue;
        }
        joined.extend_from_slice(fragment);
    }
}

/// `None` (read more) while the peek limit allows it.
fn need_more(buf: &[u8]) -> Option<Hello> {
    if buf.len() >= MAX_PEEK {
        Some(Hello::unreadable("a ClientHello over 16 KiB"))
    } else {
        None
    }
}

/// Reads a ClientHello's body (after the handshake header). A structure that does not add
/// up, or a server name given twice (TLS forbids both; a lenient server might act on either
/// name), makes it unreadable.
fn parse_hello(body: &[u8]) -> Hello {
    const BROKEN: &str = "a ClientHello that does not parse";
    let mut r = Reader(body);
    let Some(exts) = (|| {
        r.take(2 + 32)?; // version, random
        let sid = usize::from(r.u8()?);
        r.take(sid)?;
        let suites = usize::from(r.u16()?);
        r.take(suites)?;
        let comp = usize::from(r.u8()?);
        r.take(comp)?;
        if r.0.is_empty() {
            return Some(&[][..]); // no extensions at all (TLS 1.2 allows it)
        }
        let ext_len = usize::from(r.u16()?);
        r.take(ext_len)
    })() else {
        return Hello::unreadable(BROKEN);
    };
    let mut exts = Reader(exts);
    let mut hello = Hello::default();
    let mut seen_sni = false;
    while !exts.0.is_empty() {
        let Some((ty, data)) = (|| {
            let ty = exts.u16()?;
            let len = usize::from(exts.u16()?);
            Some((ty, exts.take(len)?))
        })() else {
            return Hello::unreadable(BROKEN);
        };
        if ty != 0 && ty != 16 {
            continue;
        }
        // Both server_name and ALPN hold one length-prefixed list.
        let mut s = Reader(data);
        let Some(list) = s.u16().and_then(|n| s.take(usize::from(n))) else {
            return Hello::unreadable(BROKEN);
        };
        let mut list = Reader(list);
        if ty == 0 {
            if seen_sni {
                return Hello::unreadable("two server_name extensions");
            }
            seen_sni = true;
        }
        while !list.0.is_empty() {
            if ty == 0 {
                let Some((name_type, name)) = (|| {
                    let name_type = list.u8()?;
                    let n = usize::from(list.u16()?);
                    Some((name_type, list.take(n)?))
                })() else {
                    return Hello::unreadable(BROKEN);
                };
                if name_type == 0 {
                    if hello.sni.is_some() {
                        return Hello::unreadable("two server names");
                    }
                    hello.sni = Some(String::from_utf8_lossy(name).into_owned());
                }
            } else {
                let Some(name) = list.u8().and_then(|n| list.take(usize::from(n))) else {
                    return Hello::unreadable(BROKEN);
                };
                hello.mesh |= name == crate::tls::mtls::MESH_ALPN;
            }
        }
    }
    hello
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
    #![allow(clippy::unwrap_used, clippy::panic)]
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

    /// A ClientHello record with the given extensions (type, data).
    fn hello_record(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (ty, data) in exts {
            ext.extend_from_slice(&ty.to_be_bytes());
            ext.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, &[])
    }

    /// `payload` as handshake records, cut at the given offsets.
    fn records(payload: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([payload.len()].iter()) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&u16::try_from(end - start).unwrap().to_be_bytes());
            out.extend_from_slice(&payload[start..end]);
            start = end;
        }
        out
    }

    /// A server_name extension listing `names` as host names.
    fn sni_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (0, data)
    }

    fn tls(buf: &[u8]) -> Hello {
        match classify(buf) {
            Some(Protocol::Tls(h)) => h,
            other => panic!("not TLS: {other:?}"),
        }
    }

    #[test]
    fn a_client_hello_split_across_records_is_read_whole() {
        let mut alpn = vec![0, 17, 2];
        alpn.extend_from_slice(b"h2");
        alpn.push(13);
        alpn.extend_from_slice(crate::tls::mtls::MESH_ALPN);
        let one = hello_record(&[sni_ext(&[b"api.test"]), (16, alpn)]);
        let hello = tls(&one);
        assert_eq!(hello.sni.as_deref(), Some("api.test"));
        assert!(hello.mesh);
        assert_eq!(hello.unreadable, None);
        let payload = &one[5..];
        for cuts in [
            vec![1],
            vec![3],
            vec![4, 5],
            vec![2, 40, 41, 60],
            vec![payload.len() - 1],
        ] {
            let split = records(payload, &cuts);
            assert_eq!(tls(&split), hello, "cut at {cuts:?}");
            // Every prefix short of the whole asks for more bytes.
            for end in 1..split.len() {
                assert_eq!(
                    classify(&split[..end]),
                    None,
                    "cut at {cuts:?}, {end} bytes"
                );
            }
        }
    }

    #[test]
    fn a_client_hello_that_cannot_be_read_with_certainty_is_unreadable() {
        let unreadable = |buf: &[u8]| {
            let hello = tls(buf);
            assert!(
                matches!(hello.server(), Some(Err(HostError::UnreadableHello(_)))),
                "{hello:?}"
            );
            hello.unreadable.unwrap_or_default()
        };
        // Two names, in one list or in two extensions: a lenient server might take either.
        let two = hello_record(&[sni_ext(&[b"front.test", b"denied.test"])]);
        assert_eq!(unreadable(&two), "two server names");
        let twice = hello_record(&[sni_ext(&[b"front.test"]), sni_ext(&[b"denied.test"])]);
        assert_eq!(unreadable(&twice), "two server_name extensions");
        // Padded past the peek limit, with the name at the end, in records of 16 KiB.
        let big = hello_record(&[(21, vec![0; MAX_PEEK]), sni_ext(&[b"denied.test"])]);
        let big = records(&big[5..], &[16_000]);
        assert_eq!(unreadable(&big[..MAX_PEEK]), "a ClientHello over 16 KiB");
        assert_eq!(unreadable(&big), "a ClientHello over 16 KiB");
        // Another record type between the pieces (an alert, application data).
        let good = hello_record(&[sni_ext(&[b"api.test"])]);
        let mut mixed = records(&good[5..], &[10]);
        mixed[15] = 0x17;
        assert_eq!(
            unreadable(&mixed),
            "a record other than handshake inside the ClientHello"
        );
        // A server_name list longer than its extension.
        let broken = hello_record(&[(0, vec![0, 20, 0, 0, 3, b'a', b'b', b'c'])]);
        assert_eq!(unreadable(&broken), "a ClientHello that does not parse");
    }

    /// Mutated ClientHellos (bytes changed, lengths broken) never panic the parser, and
    /// however one is split into records it reads the same as in one record.
    #[test]
    fn mutated_hellos_read_the_same_whole_or_split() {
        let mut alpn = vec![0, 14, 13];
        alpn.extend_from_slice(crate::tls::mtls::MESH_ALPN);
        let base = hello_record(&[sni_ext(&[b"api.test"]), (16, alpn), (43, vec![2, 3, 4])]);
        // xorshift: the same cases on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            usize::try_from(x % n as u64).unwrap()
        };
        for _ in 0..20_000 {
            let mut payload = base[5..].to_vec();
            for _ in 0..=next(3) {
                let at = next(payload.len());
                payload[at] = u8::try_from(next(256)).unwrap();
            }
            let whole = classify(&records(&payload, &[]));
            let mut cuts: Vec<usize> = (0..next(4)).map(|_| 1 + next(payload.len() - 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let split = classify(&records(&payload, &cuts));
            assert_eq!(split, whole, "{payload:?} cut at {cuts:?}");
        }
    }

    #[test]
    fn odd_but_readable_hellos_keep_their_meaning() {
        // No SNI at all: checked on the destination address, as before.
        let none = tls(&hello_record(&[]));
        assert_eq!((none.server(), none.unreadable), (None, None));
        // A name that is not UTF-8 fails the host check, not the parse.
        let bad = tls(&hello_record(&[sni_ext(&[b"api\xff.test"])]));
        assert_eq!(bad.server(), Some(Err(HostError::BadChar)));
        // 0x16 followed by anything but TLS's major version 3 is opaque TCP.
        assert_eq!(
            classify(b"\x16\x00\x01\x02"),
            Some(Protocol::Tcp { timed_out: false })
        );
        // A handshake message other than a ClientHello: opaque bytes that begin like TLS.
        let mut server_hello = hello_record(&[]);
        server_hello[5] = 2;
        assert_eq!(tls(&server_hello), Hello::default());
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
