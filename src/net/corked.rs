//! Writes gathered while a connection is polled and sent once the poll ends, as an event
//! loop sends what one pass of it produced.
//!
//! The h2 crate writes each DATA frame of 256 bytes or more by itself: it chains the
//! payload after its buffer instead of copying it, and holds one such payload at a time.
//! A connection that answered ten streams of 1 KiB in one poll made ten `writev`s, where
//! HAProxy makes one. Through [`Io`], what a connection writes while its [`Driven`]
//! future polls it is copied into one buffer, which is written when the poll returns:
//! the frames of every stream answered in that poll go in one syscall. (Copying a frame
//! costs a fraction of the syscall it saves; a write too large to gather goes straight
//! through.)
//!
//! Writes made outside such a poll (by a task the connection handed its I/O to, after an
//! HTTP/1 upgrade) go through at once, after whatever was gathered before them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a poll gathers before writing: four of HTTP/2's default 16 KiB frames.
const GATHER_MAX: usize = 64 * 1024;

/// Wraps `io`: the connection built on the returned [`Io`] is then polled through
/// [`Cork::drive`].
pub fn new<I>(io: I) -> (Io<I>, Cork<I>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        gathered: Vec::new(),
        gathering: false,
        broken: None,
    }));
    (Io(shared.clone()), Cork(shared))
}

struct Shared<I> {
    io: I,
    /// Written by the connection in the current poll, not yet sent.
    gathered: Vec<u8>,
    /// Set while [`Driven`] polls the connection.
    gathering: bool,
    /// Sending what a poll gathered failed after the poll had returned: the connection
    /// learns it from its next read or write.
    broken: Option<io::ErrorKind>,
}

impl<I: AsyncWrite + Unpin> Shared<I> {
    /// Sends everything gathered.
    fn send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent = 0;
        while sent < self.gathered.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.gathered[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.gathered.drain(..sent);
                    return Poll::Pending;
                }
            }
        }
        // Released, not kept: an idle HTTP/2 connection would otherwise hold up to
        // `GATHER_MAX` for ever (and mimalloc hands the next poll a block as cheaply).
        self.gathered = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<I> Shared<I> {
    fn check(&self) -> io::Result<()> {
        match self.broken {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }
}

fn lock<T>(shared: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while it is held; were it poisoned, its state is still whole.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The I/O a connection is built on (see the module's documentation).
pub struct Io<I>(Arc<Mutex<Shared<I>>>);

impl<I: AsyncRead + Unpin> AsyncRead for Io<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        s.check()?;
        Pin::new(&mut s.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Io<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.0);
        s.check()?;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if s.gathering && s.gathered.len() + len <= GATHER_MAX {
            for b in bufs {
                s.gathered.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        // Outside a poll, or too much to gather: what was gathered goes first.
        ready!(s.send(cx))?;
        Pin::new(&mut s.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering takes slices as cheaply as one buffer.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        s.check()?;
        if s.gathering {
            // Sent, and the I/O flushed, as the poll ends.
            return Poll::Ready(Ok(()));
        }
        ready!(s.send(cx))?;
        Pin::new(&mut s.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        s.check()?;
        ready!(s.send(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

/// Polls the connection built on the matching [`Io`].
pub struct Cork<I>(Arc<Mutex<Shared<I>>>);

impl<I> Cork<I> {
    /// `conn`, each of whose polls ends by sending what it wrote.
    pub fn drive<F: Future>(self, conn: F) -> Driven<F, I> {
        Driven {
            conn,
            shared: self.0,
            ended: None,
        }
    }

    /// See [`ClientExec`].
    pub fn client_exec(self) -> ClientExec<I> {
        ClientExec(Arc::new(FirstSpawn {
            cork: Mutex::new(Some(self)),
            taken: AtomicBool::new(false),
        }))
    }
}

/// The executor for hyper's HTTP/2 client on a corked [`Io`]. That client does its I/O in a
/// task of its own, the first future it spawns (during the handshake): that one is driven
/// through the [`Cork`]. The rest (request bodies being sent, responses awaited) never
/// touch the I/O and are spawned as they are. (`tests/http2_batching.rs` sees it if hyper
/// ever spawns another first: the request bodies would leave one segment each again.)
pub struct ClientExec<I>(Arc<FirstSpawn<I>>);

struct FirstSpawn<I> {
    cork: Mutex<Option<Cork<I>>>,
    /// Set once `cork` is taken: every later spawn (several per request) skips the lock.
    taken: AtomicBool,
}

impl<I> Clone for ClientExec<I> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<I, F> hyper::rt::Executor<F> for ClientExec<I>
where
    I: AsyncWrite + Unpin + Send + 'static,
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let first = if self.0.taken.load(Ordering::Acquire) {
            None
        } else {
            let cork = lock(&self.0.cork).take();
            self.0.taken.store(true, Ordering::Release);
            cork
        };
        match first {
            Some(cork) => tokio::spawn(cork.drive(fut)),
            None => tokio::spawn(fut),
        };
    }
}

pin_project_lite::pin_project! {
    /// See [`Cork::drive`].
    pub struct Driven<F: Future, I> {
        #[pin]
        conn: F,
        shared: Arc<Mutex<Shared<I>>>,
        // The connection's result, held while its last writes are still being sent.
        ended: Option<F::Output>,
    }
}

impl<F: Future, I> Driven<F, I> {
    /// The connection (to start a graceful shutdown, say).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().conn
    }
}

impl<F: Future, I: AsyncWrite + Unpin> Future for Driven<F, I> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.ended.is_none() {
            lock(this.shared).gathering = true;
            let polled = this.conn.poll(cx);
            if let Poll::Ready(out) = polled {
                *this.ended = Some(out);
            }
        }
        let mut s = lock(this.shared);
        s.gathering = false;
        let sent = match s.send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut s.io).poll_flush(cx),
            other => other,
        };
        match sent {
            // Woken when the socket takes more (and the connection is polled again, which
            // does no harm).
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                s.broken = Some(e.kind());
                s.gathered = Vec::new();
                if this.ended.is_none() {
                    // The connection may be waiting on anything but this socket: polled
                    // again, its next read or write fails and it ends.
                    cx.waker().wake_by_ref();
                }
            }
        }
        drop(s);
        match this.ended.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair with small buffers, so that writes are cut short and wait.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpSocket::new_v4().unwrap();
        l.set_recv_buffer_size(4096).unwrap();
        l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l: TcpListener = l.listen(1).unwrap();
        let a = tokio::net::TcpSocket::new_v4().unwrap();
        a.set_send_buffer_size(4096).unwrap();
        let a = a.connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Bytes leave in the order written, whole, through gathered writes of every size, a
    /// peer that reads slowly (so sends are cut short and wait), and writes made after the
    /// connection handed its I/O on.
    #[tokio::test]
    async fn every_byte_arrives_in_order() {
        let (a, mut b) = pair().await;
        let (mut io, cork) = new(a);
        let sizes = [1, 100, 1024, 9, 70 * 1024, 300, 16 * 1024 + 9, 5];
        let expected: Vec<u8> = (0..20)
            .flat_map(|round| sizes.map(|n| (n, round)))
            .flat_map(|(n, round)| (0..n).map(move |i| ((i * 7 + round) % 251) as u8))
            .collect();
        let conn = cork.drive(async move {
            for round in 0..20 {
                for n in sizes {
                    let chunk: Vec<u8> = (0..n).map(|i| ((i * 7 + round) % 251) as u8).collect();
                    io.write_all(&chunk).await.unwrap();
                    // Each chunk in a poll of its own now and then, so some sends begin
                    // with what an earlier poll left.
                    if n == 9 {
                        tokio::task::yield_now().await;
                    }
                }
            }
            io.flush().await.unwrap();
            io
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = b.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() % 7 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        });
        // After the connection ends its I/O is another task's (an upgrade): written at once.
        let limit = std::time::Duration::from_secs(20);
        let mut io = tokio::time::timeout(limit, conn)
            .await
            .expect("writes stalled");
        io.write_all(b"after").await.unwrap();
        io.shutdown().await.unwrap();
        let got = tokio::time::timeout(limit, reader)
            .await
            .expect("bytes stalled");
        let got = got.unwrap();
        assert_eq!(got.len(), expected.len() + 5);
        assert!(
            got[..expected.len()] == expected[..],
            "bytes reordered or lost"
        );
        assert_eq!(&got[expected.len()..], b"after");
    }

    /// An I/O that takes no write and never has anything to read.
    struct Refusing;

    impl AsyncRead for Refusing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Refusing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A write that fails once the poll that made it has returned is not lost: the
    /// connection, waiting to read, is told at once and ends, instead of waiting for ever
    /// with its frames unsent.
    #[tokio::test]
    async fn a_send_that_fails_after_the_poll_ends_the_connection() {
        let (mut io, cork) = new(Refusing);
        let conn = cork.drive(async move {
            // Gathered: it succeeds here.
            io.write_all(b"frame").await?;
            io.flush().await?;
            let mut buf = [0u8; 16];
            io.read(&mut buf).await
        });
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), conn)
            .await
            .expect("the connection never learned that its write failed");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
