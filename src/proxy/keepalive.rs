//! HTTP/1 client connections: hyper serves requests while they come, and a connection that
//! has been quiet for [`PARK_AFTER`] is parked.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer, and its dispatcher, for as
//! long as it serves a connection, idle ones included: an idle keep-alive connection held
//! about 15 KB of the proxy's memory, where nginx and HAProxy, which give their buffers
//! back between requests, hold under 1 KB. A parked connection is only its socket and this
//! loop's state: hyper is stopped between requests (without closing the socket), its state
//! dropped, and the loop waits for the client's next bytes itself, then starts hyper again
//! with those bytes replayed. A busy connection is never parked, so keep-alive load pays
//! nothing for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::aside::{Aside, First};
use super::detect::Rewind;
use super::http::{ClientLimits, ClientService, ResponseBody};
use super::idle::{Idle, Tracked};
use super::upgrade::{ClientIo, Handoff, Switching};
use crate::body::BoxError;

/// How long a connection is quiet (no request in flight, no response being sent) before
/// it is parked. Well above the gap between a busy client's requests (the bench's
/// fixed-rate load sends one every 32 ms on each connection), so that busy connections are
/// not parked and started again between requests; short beside how long clients keep an
/// idle connection pooled (tens of seconds).
pub(super) const PARK_AFTER: Duration = Duration::from_millis(250);

/// How many bytes a parked connection reads to learn that the client is back; hyper reads
/// the rest. Small: it is room that every parked connection keeps, where a longer head
/// costs one more read when a connection wakes (after at least `PARK_AFTER` of quiet).
const WAKE_READ: usize = 64;

/// Serves an HTTP/1 client connection (keep-alive, upgrades) until it closes, parking it
/// while it is quiet; closes it after the idle timeout, and drains it on `shutdown`.
///
/// A `fn` that returns an `async` block, not an `async fn`: an `async fn` keeps its
/// arguments twice in its state (as passed, and moved into its body) for as long as it
/// runs, parked connections included, where a block's captures are its state.
pub(super) fn serve<I, S, B>(
    io: I,
    svc: S,
    limits: ClientLimits,
    shutdown: CancellationToken,
) -> impl Future<Output = Result<(), BoxError>> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService<B>,
    B: ResponseBody,
{
    let idle = Idle::new();
    let handoff = Arc::new(Handoff::default());
    let mut conn = Conn {
        io: ConnIo {
            io: Rewind::new(Bytes::new(), io),
            idle: idle.clone(),
        },
        svc: Switching {
            inner: Tracked::new(svc, idle.clone()).with_keep_alive_hint(limits.idle_timeout),
            handoff: handoff.clone(),
        },
    };
    async move {
        loop {
            // Boxed: hyper's connection (its buffers, dispatcher and timers) is room that a
            // parked connection does not keep.
            match Box::pin(active(conn, &idle, &handoff, &limits, &shutdown)).await? {
                Some(quiet) => conn = quiet,
                None => return Ok(()),
            }
            let mut first = [0u8; WAKE_READ];
            let deadline = idle
                .quiet_until(limits.idle_timeout)
                .unwrap_or_else(|| Instant::now() + limits.idle_timeout);
            let io = &mut conn.io.io;
            tokio::select! {
                read = io.read(&mut first) => match read {
                    Ok(n) if n > 0 => io.replay(Bytes::copy_from_slice(&first[..n])),
                    // Closed or reset between requests: nothing was in flight.
                    _ => return Ok(()),
                },
                () = shutdown.cancelled() => {
                    let _ = io.shutdown().await;
                    return Ok(());
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::debug!("closing an idle client connection");
                    return Ok(());
                }
            }
        }
    }
}

/// A client connection between two runs of hyper: what a parked connection keeps.
struct Conn<I, S> {
    io: ConnIo<I>,
    svc: Switching<Tracked<S>>,
}

/// Serves `conn` with hyper until it is quiet and can be parked (it is then returned, with
/// nothing left in hyper's buffers), or until it ends (`None`): the client closed it or
/// asked to, a drain, the idle timeout, or a protocol switch that took it.
async fn active<I, S, B>(
    mut conn: Conn<I, S>,
    idle: &Idle,
    handoff: &Handoff,
    limits: &ClientLimits,
    shutdown: &CancellationToken,
) -> Result<Option<Conn<I, S>>, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService<B>,
    B: ResponseBody,
{
    let park_after = PARK_AFTER.min(limits.idle_timeout);
    loop {
        // No timer: without one hyper runs no header-read timeout of its own; the idle
        // timeout below covers a head that comes too slowly.
        let mut hyper = hyper::server::conn::http1::Builder::new()
            .max_buf_size(limits.max_head)
            .serve_connection(TokioIo::new(conn.io), conn.svc);
        let (mut parking, mut draining) = (false, false);
        // hyper stops at once only between requests: after one it has answered, or before
        // it has read anything. Part-way through a head it would instead read on and close
        // after answering (see `parkable`).
        let begun = idle.begun();
        idle.set_read(false);
        let timer = tokio::time::sleep(park_after);
        tokio::pin!(timer);
        let drain = shutdown.cancelled();
        tokio::pin!(drain);
        // The drain and the timer wait aside: they are polled only when they woke, not on
        // each of hyper's wakeups (see `aside`).
        let mut aside = Aside::new();
        let done = loop {
            let drain = (!draining).then_some(drain.as_mut());
            let main = |cx: &mut Context<'_>| hyper.poll_without_shutdown(cx);
            match aside.first(main, drain, timer.as_mut()).await {
                First::Main(res) => break res,
                First::Drain => {
                    draining = true;
                    idle.stop_keep_alive_hint();
                    Pin::new(&mut hyper).graceful_shutdown();
                }
                First::Timer => {
                    let now = Instant::now();
                    match idle.quiet_until(park_after) {
                        // Busy: look again later; an end before then moves the deadline.
                        None => timer.as_mut().reset(now + park_after),
                        Some(at) if at > now => timer.as_mut().reset(at),
                        Some(_) if idle.quiet_until(limits.idle_timeout) <= Some(now) => {
                            // Nothing in flight for the idle timeout (a client that stopped
                            // reading its last response, or a head coming too slowly):
                            // nothing is lost by closing it.
                            tracing::debug!("closing an idle client connection");
                            return Ok(None);
                        }
                        Some(_) if parking || !parkable(idle, begun) => {
                            let next = now + park_after;
                            let limit = idle.quiet_until(limits.idle_timeout);
                            timer.as_mut().reset(limit.map_or(next, |at| at.min(next)));
                        }
                        Some(_) => {
                            // What hyper read of a next head comes back to be replayed.
                            parking = true;
                            Pin::new(&mut hyper).graceful_shutdown();
                        }
                    }
                }
            }
        };
        done?;
        if let Some(waiting) = handoff.take_switch() {
            let parts = hyper.into_parts();
            let mut client = parts.io.into_inner().io;
            if !parts.read_buf.is_empty() {
                client.replay(parts.read_buf);
            }
            let client = Box::new(client) as ClientIo;
            // Nobody waiting: the service switched without asking for the connection.
            if let Some(tx) = waiting {
                let _ = tx.send(client);
            }
            return Ok(None);
        }
        if !parking || draining {
            // hyper is done with the connection (the client closed it or asked to, or a
            // drain): polled as a future once more, it flushes what it has left and shuts
            // the connection down.
            return (&mut hyper).await.map(|()| None).map_err(Into::into);
        }
        let parts = hyper.into_parts();
        conn = Conn {
            io: parts.io.into_inner(),
            svc: parts.service,
        };
        // Part of a next head, read before hyper stopped: replayed to the next hyper (copied
        // out: hyper's bytes share its 8 KiB read buffer, which is not kept).
        if parts.read_buf.is_empty() {
            return Ok(Some(conn));
        }
        conn.io.io.replay(Bytes::copy_from_slice(&parts.read_buf));
    }
}

/// Whether hyper, quiet, can be stopped without losing anything: the last response is
/// flushed (else it is still in hyper's buffer or the TLS layer's, waiting for the client
/// to read it), and hyper is between requests, which for it means that it has answered one
/// since it started (`begun` is the count then), or read nothing yet. On a connection that
/// is part-way through its first head, a graceful shutdown makes hyper read on and close
/// after the answer: such a connection (a slow client, or slowloris) keeps hyper until the
/// head is in or the idle timeout.
fn parkable(idle: &Idle, begun: u64) -> bool {
    idle.flushed() && (idle.begun() > begun || !idle.has_read())
}

/// The client connection as hyper sees it: bytes read while it was parked are replayed
/// first, what was read and whether everything written has been flushed are noted for the
/// loop, and the first write of each answer from the service waits for the worker's pass
/// to end.
///
/// That wait is how an event loop such as HAProxy's sends: it reads what every ready
/// connection has, then writes every answer. A task per connection instead wrote each
/// answer as soon as it had it, between the reads of the others, and a client reading on
/// the other core took each one as it came, went back to sleep, and was woken by the next:
/// a wake-up, often with an interrupt between cores, for most answers. Written after the
/// pass, one pass's answers reach the client together and wake it once. In the lab
/// (inbound, 1 KiB, 64 connections, 2 cores), with the proxy, the client and the app each
/// in a scheduling group of its own (as containers are), cross-core reschedule interrupts
/// per request fell from 0.065 to 0.034, HAProxy's figure, and requests per second rose
/// 7 %. With all three in one group (as `bench/run.sh` starts them) the wake-ups were
/// already that few and requests per second did not move; there the wait trades 0.26 µs of
/// user time per request (one more poll of the connection) for 0.52 µs of system time.
/// With nothing else to run, the wait costs one `epoll_wait` that returns at once.
///
/// Only the service's answers wait, not what hyper writes by itself: on a request it cannot
/// parse (a head too large, a bad Host), hyper queues its error response, tries one flush
/// and closes, so a write that waited there was never made and the client got no answer.
struct ConnIo<I> {
    io: Rewind<I>,
    idle: Idle,
}

impl<I> ConnIo<I> {
    /// Notes that a write is starting (nothing is flushed until it is, even while it waits:
    /// the answer is still in hyper's buffer), and whether it waits for the pass to end: it
    /// is the first of an answer from the service. The task is woken once the worker has
    /// run everything else that was ready and polled for I/O again; the write then goes
    /// through. Each wait follows an answer, so a response cannot be put off for ever.
    fn waits(&self, cx: &mut Context<'_>) -> bool {
        self.idle.set_flushed(false);
        if !self.idle.take_answered() {
            return false;
        }
        let mut after_pass = std::pin::pin!(tokio::task::yield_now());
        after_pass.as_mut().poll(cx).is_pending()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.idle.set_read(true);
        }
        res
    }
}

// hyper calls `poll_flush` only once its own buffer is empty, so a flush that completed is
// the sign that nothing written is left anywhere on the proxy's side.
impl<I: AsyncWrite + Unpin> AsyncWrite for ConnIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.waits(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.waits(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            self.idle.set_flushed(true);
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    // The handlers are `fn`s of one type, so all take the request by value.
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::needless_pass_by_value
    )]
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    fn limits() -> ClientLimits {
        ClientLimits {
            max_connections: 0,
            idle_timeout: Duration::from_secs(30),
            max_head: 64 * 1024,
            tunnel_idle_timeout: Duration::from_secs(30),
        }
    }

    /// What the server's ends did, across connections, in order: `(connection, "read")`
    /// when one read bytes, `(connection, "write")` when one wrote some.
    type Order = Arc<Mutex<Vec<(char, &'static str)>>>;

    /// The server's end of connection `name`, noting the size of every read it is asked
    /// for, and in `order`, its reads and writes.
    struct Noting {
        io: DuplexStream,
        reads: Arc<Mutex<Vec<usize>>>,
        name: char,
        order: Order,
    }

    impl AsyncRead for Noting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads.lock().unwrap().push(buf.remaining());
            let before = buf.filled().len();
            let res = Pin::new(&mut self.io).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.order.lock().unwrap().push((self.name, "read"));
            }
            res
        }
    }

    impl AsyncWrite for Noting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let res = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(1..)) = res {
                self.order.lock().unwrap().push((self.name, "write"));
            }
            res
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    type Handler = fn(http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>>;

    /// Serves one connection with `handler`; returns the client's end, a log of the sizes
    /// of the server's reads, and the `(size, message)` of the buffer between them.
    fn start(handler: Handler, window: usize) -> (DuplexStream, Arc<Mutex<Vec<usize>>>) {
        start_noting(handler, window, 'a', Order::default())
    }

    /// [`start`], noting the connection's reads and writes in `order` as `name`'s.
    fn start_noting(
        handler: Handler,
        window: usize,
        name: char,
        order: Order,
    ) -> (DuplexStream, Arc<Mutex<Vec<usize>>>) {
        let (client, server) = tokio::io::duplex(window);
        let reads = Arc::new(Mutex::new(Vec::new()));
        let io = Noting {
            io: server,
            reads: reads.clone(),
            name,
            order,
        };
        let svc = hyper::service::service_fn(move |req| {
            Box::pin(async move { Ok::<_, Infallible>(handler(req)) })
        });
        tokio::spawn(serve(io, svc, limits(), CancellationToken::new()));
        (client, reads)
    }

    /// Answers with the path.
    fn path(req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        http::Response::new(Full::new(Bytes::from(req.uri().path().to_owned())))
    }

    /// Reads one response with a `content-length`; returns its head and body.
    async fn response(c: &mut DuplexStream) -> (String, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if got.len() >= end + 4 + len {
                    return (head, got[end + 4..end + 4 + len].to_vec());
                }
            }
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed part-way through a response: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// How many times the server's read was the parked connection's small one.
    fn parked_reads(reads: &Mutex<Vec<usize>>) -> usize {
        reads
            .lock()
            .unwrap()
            .iter()
            .filter(|&&n| n == WAKE_READ)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_parked_and_serves_what_comes_next() {
        let (mut c, reads) = start(path, 64 * 1024);
        c.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c).await.1, b"/one");
        tokio::time::sleep(PARK_AFTER * 4).await;
        // Parked: the connection waits with a small read, not hyper's 8 KiB buffer.
        assert!(parked_reads(&reads) > 0, "{:?}", reads.lock().unwrap());
        c.write_all(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c).await.1, b"/two");
        // A head split across a park: its first part is replayed to hyper.
        tokio::time::sleep(PARK_AFTER * 4).await;
        c.write_all(b"GET /thr").await.unwrap();
        tokio::time::sleep(PARK_AFTER * 4).await;
        c.write_all(b"ee HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c).await.1, b"/three");
    }

    /// Connections whose requests are ready at the same time: every request is read before
    /// any answer is written, so that the answers reach a client together and wake it once,
    /// not one by one between the other connections' reads.
    #[tokio::test]
    async fn the_answers_of_one_pass_are_written_after_its_reads() {
        let order = Order::default();
        let mut clients = Vec::new();
        for name in ['a', 'b', 'c'] {
            let (mut c, _) = start_noting(path, 64 * 1024, name, order.clone());
            let head = format!("GET /{name} HTTP/1.1\r\nHost: a\r\n\r\n");
            c.write_all(head.as_bytes()).await.unwrap();
            clients.push((name, c));
        }
        for (name, c) in &mut clients {
            assert_eq!(response(c).await.1, format!("/{name}").into_bytes());
        }
        let order = order.lock().unwrap().clone();
        let first_write = order.iter().position(|(_, what)| *what == "write");
        assert_eq!(first_write, Some(3), "{order:?}");
        // And each connection's answer follows its own request.
        for name in ['a', 'b', 'c'] {
            let mine: Vec<_> = order.iter().filter(|(n, _)| *n == name).collect();
            assert_eq!(mine, [&(name, "read"), &(name, "write")], "{order:?}");
        }
    }

    /// Answers with 64 KiB.
    fn big(_: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        http::Response::new(Full::new(Bytes::from(vec![b'x'; 64 * 1024])))
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_has_not_read_yet_is_not_lost_to_parking() {
        // A 1 KiB window: nearly all of the body waits in hyper's buffer, the whole body
        // having been handed to it, until the client reads.
        let (mut c, reads) = start(big, 1024);
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(PARK_AFTER * 8).await;
        let (head, body) = response(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body.len(), 64 * 1024);
        assert_eq!(parked_reads(&reads), 0, "parked with a response unsent");
        // And once it is all out, the connection is parked after all.
        tokio::time::sleep(PARK_AFTER * 4).await;
        assert!(parked_reads(&reads) > 0, "{:?}", reads.lock().unwrap());
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c).await.1.len(), 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_still_coming_is_not_parked_and_still_times_out() {
        let (mut c, reads) = start(path, 64 * 1024);
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(PARK_AFTER * 8).await;
        assert_eq!(parked_reads(&reads), 0, "{:?}", reads.lock().unwrap());
        // The rest, later: answered, and the connection is kept.
        c.write_all(b"Host: a\r\n\r\n").await.unwrap();
        let (head, body) = response(&mut c).await;
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, b"/");
        // A head that never ends is cut off by the idle timeout.
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(limits().idle_timeout * 2, c.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    }

    /// Switches to an echo of five bytes when asked to upgrade; else answers with the path.
    fn switch(mut req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        if !req.headers().contains_key(http::header::UPGRADE) {
            return path(req);
        }
        let on = super::super::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = on.await.unwrap();
            let mut five = [0u8; 5];
            io.read_exact(&mut five).await.unwrap();
            io.write_all(&five).await.unwrap();
            io.flush().await.unwrap();
        });
        http::Response::builder()
            .status(http::StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "echo")
            .header("connection", "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_switch_after_a_park_gets_the_connection_and_the_bytes_sent_with_it() {
        let (mut c, reads) = start(switch, 64 * 1024);
        c.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(response(&mut c).await.1, b"/one");
        tokio::time::sleep(PARK_AFTER * 4).await;
        assert!(parked_reads(&reads) > 0);
        // The first bytes of the new protocol come in the same write as the head.
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nhello",
        )
        .await
        .unwrap();
        // The echo may come in the same read as the head.
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\nhello") {
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the echo: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "{got:?}");
    }

    /// Refuses to switch; a task waiting for the switch reports what it got.
    fn refuse(mut req: http::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
        let on = super::super::upgrade::on(&mut req);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(on.await.is_err());
        });
        let waited = tokio::spawn(async move { rx.await.unwrap() });
        // The answer says whether the wait had already failed by the next request.
        REFUSED.lock().unwrap().push(waited);
        http::Response::new(Full::new(Bytes::from_static(b"no")))
    }

    static REFUSED: Mutex<Vec<tokio::task::JoinHandle<bool>>> = Mutex::new(Vec::new());

    #[tokio::test(start_paused = true)]
    async fn a_refused_switch_keeps_the_connection_and_ends_the_wait() {
        let (mut c, _) = start(refuse, 64 * 1024);
        let ask = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n";
        c.write_all(ask).await.unwrap();
        assert_eq!(response(&mut c).await.1, b"no");
        let waited = REFUSED.lock().unwrap().pop().unwrap();
        assert!(
            waited.await.unwrap(),
            "the wait for a switch that was refused did not fail"
        );
        // The connection goes on as HTTP.
        c.write_all(ask).await.unwrap();
        assert_eq!(response(&mut c).await.1, b"no");
    }
}
