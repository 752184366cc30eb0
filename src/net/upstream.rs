//! The upstream HTTP/1.1 client (and, in [`http2`], the HTTP/2 one).
//!
//! A request is sent from inside the task of the client connection that asked for it: the
//! head (and body) are written to a pooled connection, the response head is read and parsed
//! there, and the response body is read from the upstream socket as the client connection
//! polls it. There is no connection task and no channel between tasks, so a request costs no
//! wakeup of another task; with hyper's pooled client that hand-off (and its pool
//! bookkeeping) was the largest share of the proxy's own CPU per request (bench/README.md).
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding` wins over `Content-Length` (and such a
//! connection is not reused), differing `Content-Length`s are an error, a body without either
//! runs to the close. Idle connections wait in a pool keyed by the checked address they were
//! dialled at; a pooled connection the peer has closed is noticed before it is used, and an
//! idempotent request without a body is retried once more when the race is lost anyway.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::connect::{connect_maybe_mesh, ConnectError, MaybeTls, MeshClient};
use crate::body::{self, Body};

mod http2;

/// Longest response head (and trailer section) accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one response head.
const MAX_HEADERS: usize = 128;
/// Read size while waiting for a head; bodies read up to [`MAX_READ`] at a time.
const HEAD_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Most interim (1xx) responses accepted before the final one.
const MAX_INTERIM: usize = 16;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How much sooner than its server would, a pooled connection is let go. A request sent on
/// a connection the server is closing at that moment is lost (the keep-alive race); one
/// that cannot be repeated (a POST) is a 502. The server's idle timer starts when it has sent its
/// response, the pool's when the request went out, so the margin is on top of that.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);
/// Idle connections kept per upstream address.
const MAX_IDLE_PER_ADDR: usize = 256;
/// Idle connections kept in all, over every address: an explicit proxy for many hosts
/// would otherwise keep up to 256 per host, each a descriptor (and a TLS session to a mesh
/// peer). At the limit, the connection idle longest anywhere is closed to make room.
const MAX_IDLE_TOTAL: usize = 4096;
/// How often the pool sweeps connections that went idle too long (and empty entries).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long the rest of a refused upload is read and discarded at most, and how long a pause
/// in it ends that early (nginx's `lingering_time` and `lingering_timeout`).
const LINGER_TOTAL: Duration = Duration::from_secs(30);
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The exchange failed: the upstream closed, reset, or answered with something that
    /// is not HTTP/1.1.
    #[error("{0}")]
    Failed(String),
    /// No response head within the response timeout.
    #[error("no response within the response timeout")]
    Timeout,
    /// The client's request body stopped arriving (see [`crate::body::IdleLimited`]).
    #[error("{0}")]
    ClientIdle(String),
}

impl SendError {
    /// The same error again, for each of the requests that shared the dial that failed.
    fn copy(&self) -> SendError {
        match self {
            SendError::Connect(e) => SendError::Connect(e.copy()),
            SendError::Failed(s) => SendError::Failed(s.clone()),
            SendError::Timeout => SendError::Timeout,
            SendError::ClientIdle(s) => SendError::ClientIdle(s.clone()),
        }
    }
}

/// A request's other allowed addresses, in its extensions (a name with several; see
/// [`crate::net::attempts`]): tried when the one it is sent to cannot be reached. In the
/// extensions rather than an argument, so that the usual request, which has none, carries
/// nothing more through its send.
#[derive(Clone, Debug)]
pub struct Alternates(pub Vec<SocketAddr>);

/// The address a response came from when it is not the one asked for (the request went to
/// one of its [`Alternates`]): for the log, and for checks that name the address dialled.
#[derive(Clone, Copy, Debug)]
pub struct Dialled(pub SocketAddr);

/// The protocol switch an upstream accepted with `101`: its connection, with any bytes
/// already read after the response head replayed first. Carried in the response's
/// extensions (which need `Clone`, hence the shared slot; the first `take` gets it).
#[derive(Clone)]
pub struct Upgraded(Arc<Mutex<Option<crate::proxy::detect::Rewind<MaybeTls>>>>);

impl Upgraded {
    /// The upgraded connection, once.
    pub fn take(&self) -> Option<crate::proxy::detect::Rewind<MaybeTls>> {
        self.0.lock().ok()?.take()
    }
}

/// Pooled HTTP/1.1 (and HTTP/2) connections to checked addresses (plain, or mesh mTLS
/// where the mesh covers the address).
pub struct Upstreams {
    /// Idle HTTP/1.1 connections, a pool per worker thread ([`crate::workers`]): a
    /// connection is registered with the runtime of the worker that uses it (the one that
    /// dialled it, or took it over: [`Conn::rehome`]), and used from another worker each
    /// of its wakeups would cross threads.
    idle: Box<[Shard]>,
    /// At most this many idle connections in each shard ([`MAX_IDLE_TOTAL`] shared out).
    max_idle: usize,
    connect_timeout: Duration,
    /// How long an HTTP/1.1 response body may pause (no byte) before it is cut off; `None`:
    /// no limit (see [`UpstreamBody`]).
    response_idle: Option<Duration>,
    mesh: Option<MeshClient>,
    /// How long a pooled connection to another sidecar may wait idle: a second less than
    /// this sidecar's own `clients.idle_timeout`, which its peers, configured alike, apply
    /// to it from their side.
    mesh_idle: Duration,
    /// Connections for requests that go on in HTTP/2 (see [`http2`]).
    h2: Arc<http2::H2Pool>,
}

/// One worker's idle pool, on its own cache lines: the workers' locks do not share one.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<IdlePool>);

/// Idle connections by address, oldest first, and how many there are in all.
#[derive(Default)]
struct IdlePool {
    /// Hashed with foldhash, not std's SipHash: every request looks its address up twice
    /// (checkout, checkin), and SipHash over a `SocketAddr` was 1.5 % of an inbound
    /// request's instructions. Flooding needs no stronger hash here: the map holds at most
    /// `max_idle` connections, so a worst case is a scan of that many.
    by_addr: HashMap<SocketAddr, VecDeque<Idle>, foldhash::fast::RandomState>,
    total: usize,
}

impl IdlePool {
    /// Closes the connection that has been idle longest, whatever its address.
    fn evict_oldest(&mut self) {
        let oldest = self
            .by_addr
            .iter()
            .filter_map(|(addr, list)| list.front().map(|e| (e.since, *addr)))
            .min();
        if let Some((_, addr)) = oldest {
            if let Some(list) = self.by_addr.get_mut(&addr) {
                list.pop_front();
                self.total -= 1;
                if list.is_empty() {
                    self.by_addr.remove(&addr);
                }
            }
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream connection and the bytes read from it but not yet used.
struct Conn {
    io: MaybeTls,
    buf: BytesMut,
    timer: HeadTimer,
    names: Names,
    /// How long it may wait idle in the pool and still be used: a little less than its
    /// server keeps it (see [`KEEP_ALIVE_MARGIN`]).
    idle_limit: Duration,
    /// The worker whose runtime the socket (and its timer) is registered with: the pool it
    /// goes back to.
    home: usize,
}

/// The header names of the responses on one connection, as sent and as parsed. An
/// upstream sends the same names in the same order response after response, and
/// comparing the bytes with the last response's is cheaper than `HeaderName::from_bytes`
/// (which lowercases and validates each name, then matches it against the standard set):
/// that was 4 % of an inbound request's instructions.
#[derive(Default)]
struct Names(Vec<(Box<[u8]>, HeaderName)>);

impl Names {
    /// More names than this in one response are parsed as usual (not remembered).
    const MAX: usize = 32;

    /// The name sent as `raw`, the `at`-th header of its response.
    fn get(
        &mut self,
        at: usize,
        raw: &[u8],
    ) -> Result<HeaderName, http::header::InvalidHeaderName> {
        if let Some((sent, name)) = self.0.get(at) {
            if **sent == *raw {
                return Ok(name.clone());
            }
        }
        // Same names in another order: still no parsing.
        if let Some((_, name)) = self.0.iter().find(|(sent, _)| **sent == *raw) {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        let remembered = (Box::from(raw), name.clone());
        if let Some(slot) = self.0.get_mut(at) {
            *slot = remembered;
        } else if self.0.len() < Self::MAX {
            self.0.push(remembered);
        }
        Ok(name)
    }
}

/// What a request was, for reading its response: a `HEAD`, an upgrade asked for, whether
/// it went out whole, and when it began.
#[derive(Clone, Copy)]
struct Sent {
    head_only: bool,
    asked_upgrade: bool,
    whole: bool,
    at: Instant,
}

/// The response-head timer of one upstream connection, kept with it across requests.
///
/// A fresh `Sleep` per request is registered in the runtime's timer wheel and removed
/// again, under its lock, with a clock read for each (2 % of the inbound path's CPU). This
/// one is registered once and moved only when it fires: each request's deadline is later
/// than the last one's, so the timer goes off early, at most once per timeout, and is then
/// set to the deadline of the request waiting at the time (as nginx's timers tolerate
/// lateness rather than move on every event).
struct HeadTimer(Pin<Box<tokio::time::Sleep>>);

impl HeadTimer {
    fn new() -> Self {
        // Far off until the first request sets a deadline (`sleep` would overflow on MAX).
        Self(Box::pin(tokio::time::sleep(Duration::from_secs(
            86_400 * 365,
        ))))
    }

    /// Ready once `at` has passed.
    fn poll_passed(&mut self, at: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        // Only ever moved earlier here: a later deadline is taken up when it fires early.
        if self.0.deadline() > at {
            self.0.as_mut().reset(at);
        }
        loop {
            ready!(self.0.as_mut().poll(cx));
            if tokio::time::Instant::now() >= at {
                return Poll::Ready(());
            }
            self.0.as_mut().reset(at);
        }
    }

    /// Runs `fut` until it completes or `at` passes.
    async fn within<F: Future>(
        &mut self,
        at: tokio::time::Instant,
        fut: F,
    ) -> Result<F::Output, Exchange> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_passed(at, cx).map(|()| Err(Exchange::Timeout))
        })
        .await
    }
}

impl Conn {
    /// Moves another worker's connection to the runtime of worker `here`, which takes it
    /// over: its socket leaves the other worker's epoll and joins this one's (once, see
    /// [`MaybeTls::reregister`]), its timer is made anew here, and it goes back to
    /// `here`'s pool. Left where it was, every readiness of the socket reached the other
    /// worker first, which woke this one through its eventfd (a `write` and a thread
    /// wakeup), and since the connection went back to the other's pool, it never stopped:
    /// a worker that had dialled fewer connections than it keeps busy borrowed the
    /// difference for good (in the lab, sidecar A of the two-hop mesh load wrote to the
    /// other worker's eventfd up to once per 5 requests). `None` when the socket cannot be
    /// moved; it is closed.
    fn rehome(mut self, here: usize) -> Option<Conn> {
        self.io.reregister().ok()?;
        self.timer = HeadTimer::new();
        self.home = here;
        Some(self)
    }

    /// Whether an idle connection can take a request: nothing unread (here or inside the
    /// TLS session), and the peer has not closed it (a readable idle socket means EOF, a
    /// reset, or bytes nobody asked for). The socket probe trusts the runtime's readiness,
    /// as nginx's keepalive cache trusts epoll: a close that arrived in the last instant is
    /// caught by the retry in `send` (bodiless idempotent requests) or answered with a 502.
    fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let tcp = match &mut self.io {
            MaybeTls::Plain(s) => &*s,
            MaybeTls::Tls(t) => {
                let (tcp, session) = t.get_mut();
                match session.process_new_packets() {
                    Ok(state)
                        if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
                    _ => return false,
                }
                &*tcp
            }
        };
        let mut probe = [0u8; 1];
        matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Upstreams {
    /// A pool whose connections are dialled with `connect_timeout`, in mTLS where `mesh`
    /// covers the address, and whose HTTP/1.1 response bodies are cut off after pausing for
    /// `response_idle`. Inside a runtime, a background sweep closes connections idle
    /// longer than the idle timeout; it ends with the pool.
    pub fn new(
        connect_timeout: Duration,
        response_idle: Option<Duration>,
        mesh: Option<MeshClient>,
    ) -> Arc<Self> {
        Self::with_max_idle(connect_timeout, response_idle, mesh, MAX_IDLE_TOTAL)
    }

    /// The same, for a sidecar whose `clients.idle_timeout` is `idle_timeout` and which runs
    /// `workers` worker threads: its pooled connections to other sidecars are let go a
    /// second before those would close them.
    pub fn for_sidecar(
        connect_timeout: Duration,
        response_idle: Option<Duration>,
        mesh: Option<MeshClient>,
        idle_timeout: Duration,
        workers: usize,
    ) -> Arc<Self> {
        let mesh_idle = idle_timeout
            .saturating_sub(KEEP_ALIVE_MARGIN)
            .min(IDLE_TIMEOUT);
        Self::with_options(
            connect_timeout,
            response_idle,
            mesh,
            mesh_idle,
            (MAX_IDLE_TOTAL, workers),
        )
    }

    fn with_max_idle(
        connect_timeout: Duration,
        response_idle: Option<Duration>,
        mesh: Option<MeshClient>,
        max_idle: usize,
    ) -> Arc<Self> {
        let sizes = (max_idle, 1);
        Self::with_options(connect_timeout, response_idle, mesh, IDLE_TIMEOUT, sizes)
    }

    /// `(max_idle, shards)`: at most `max_idle` idle connections, in `shards` pools.
    fn with_options(
        connect_timeout: Duration,
        response_idle: Option<Duration>,
        mesh: Option<MeshClient>,
        mesh_idle: Duration,
        (max_idle, shards): (usize, usize),
    ) -> Arc<Self> {
        let shards = shards.max(1);
        let pool = Arc::new(Self {
            idle: (0..shards).map(|_| Shard::default()).collect(),
            max_idle: max_idle.div_ceil(shards),
            connect_timeout,
            response_idle,
            mesh,
            mesh_idle,
            h2: Arc::new(http2::H2Pool::new(shards)),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            rt.spawn(sweep_while_alive(weak));
        }
        pool
    }

    /// The worker threads the pool is kept for (one pool each).
    pub fn workers(&self) -> usize {
        self.idle.len()
    }

    /// Idle connections in the pool (all addresses).
    pub fn idle_count(&self) -> usize {
        let total = |s: &Shard| s.0.lock().map_or(0, |p| p.total);
        self.idle.iter().map(total).sum()
    }

    /// The most recently used idle connection to `addr` that is still good, as of `now`:
    /// this worker's own first. Another worker's is still better than a new connection (a
    /// handshake, and one more connection for the upstream to hold), and it is moved to
    /// this worker's runtime for good (see [`Conn::rehome`]).
    fn checkout(&self, addr: SocketAddr, now: Instant) -> Option<Conn> {
        let here = crate::workers::index();
        let own = here % self.idle.len();
        if let Some(conn) = Self::take(&self.idle[own].0, addr, now) {
            return Some(conn);
        }
        (0..self.idle.len())
            .filter(|&i| i != own)
            .find_map(|i| Self::take(&self.idle[i].0, addr, now)?.rehome(here))
    }

    fn take(shard: &Mutex<IdlePool>, addr: SocketAddr, now: Instant) -> Option<Conn> {
        let mut idle = shard.lock().ok()?;
        let IdlePool { by_addr, total } = &mut *idle;
        let list = by_addr.get_mut(&addr)?;
        // Most recently used first: its socket is the least likely to have been closed.
        while let Some(mut entry) = list.pop_back() {
            *total -= 1;
            if now.saturating_duration_since(entry.since) < entry.conn.idle_limit
                && entry.conn.is_usable()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Puts `conn` back in its worker's pool, idle since `now`.
    fn checkin(&self, addr: SocketAddr, conn: Conn, now: Instant) {
        let Ok(mut idle) = self.idle[conn.home % self.idle.len()].0.lock() else {
            return;
        };
        let pool = &mut *idle;
        let list = pool.by_addr.entry(addr).or_default();
        while list
            .front()
            .is_some_and(|e| now.duration_since(e.since) >= IDLE_TIMEOUT)
        {
            list.pop_front();
            pool.total -= 1;
        }
        if list.len() >= MAX_IDLE_PER_ADDR {
            return;
        }
        let entry = Idle { conn, since: now };
        if pool.total < self.max_idle {
            list.push_back(entry);
        } else {
            // Eviction may empty and remove any list, this one too: look it up again.
            pool.evict_oldest();
            pool.by_addr.entry(addr).or_default().push_back(entry);
        }
        pool.total += 1;
    }

    async fn dial(&self, addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
        let io = connect_maybe_mesh(addr, timeout, self.mesh.as_ref()).await?;
        let idle_limit = if io.is_mesh() {
            self.mesh_idle
        } else {
            IDLE_TIMEOUT
        };
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            timer: HeadTimer::new(),
            names: Names::default(),
            idle_limit,
            home: crate::workers::index(),
        })
    }

    /// A connection for a request to `addr` or, when it cannot be reached, one of
    /// `alternates` (see [`crate::net::attempts`]): a pooled one to any of them, in the
    /// order they are tried, else the first dial to connect. Also returns whether it was
    /// pooled, and its address.
    async fn connect_any(
        &self,
        addr: SocketAddr,
        alternates: &[SocketAddr],
        pooled_ok: bool,
        now: Instant,
    ) -> Result<(Conn, bool, SocketAddr), ConnectError> {
        let order = crate::net::attempts::order(addr, alternates.iter().copied());
        if pooled_ok {
            for &a in &order {
                if let Some(conn) = self.checkout(a, now) {
                    return Ok((conn, true, a));
                }
            }
        }
        let (conn, a) =
            crate::net::attempts::race(&order, self.connect_timeout, |a, left| self.dial(a, left))
                .await?;
        Ok((conn, false, a))
    }

    /// Sends `req` to `addr` over HTTP/1.1 (the request URI's path and query form the
    /// request target; without a Host header, its authority, or else `addr`, is sent as
    /// one). When `addr` cannot be reached, the request goes to the first of its
    /// [`Alternates`] that can (only explicit-proxy requests have any, and those are sent
    /// in HTTP/1.1); the response then carries the address in a [`Dialled`] extension. The
    /// response body streams from the upstream connection, which goes back to the pool
    /// once the body has been read whole. The response head must come within
    /// `timeout` of the end of the request body (of the start, without one), so that a
    /// long upload is never cut off while it is still flowing. A request in HTTP/2 goes on
    /// in HTTP/2 instead (see [`http2`]).
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Body>, SendError> {
        if req.version() == http::Version::HTTP_2 {
            // Boxed: rare, and its state inline would enlarge every HTTP/1.1 request's
            // future. Even so this branch costs HTTP/1.1 about 130 instructions a request
            // (0.4 %), mostly larger copies of the request future: building the HTTP/2 future
            // out of line, or choosing the future before either is built, cost the same.
            return Box::pin(self.send_h2(addr, req, timeout)).await;
        }
        let (parts, mut body) = req.into_parts();
        let empty = http_body::Body::is_end_stream(&body);
        let EncodedHead {
            head,
            framing,
            asked_upgrade,
        } = encode_head(&parts, addr, empty)?;
        let head_only = parts.method == Method::HEAD;
        let replayable = empty && is_idempotent(&parts.method);
        let mut retried = false;
        // One clock read for the request's bookkeeping: which pooled connections are too
        // old, its response deadline, and when its connection went back to the pool.
        let start = tokio::time::Instant::now();
        loop {
            let pooled = if retried {
                None
            } else {
                self.checkout(addr, start.into_std())
            };
            // `at`: the address connected to when it is another than `addr` (boxed, as the
            // rare case, so that it adds a pointer to every request's future, not a socket
            // address).
            let (mut conn, reused, at) = match pooled {
                Some(conn) => (conn, true, None),
                // Boxed: dialing (TCP, and the mTLS handshake to a mesh peer) is rare with a
                // warm pool, and inline its state would make every request's future larger.
                None => match parts.extensions.get::<Alternates>() {
                    None => (
                        Box::pin(self.dial(addr, self.connect_timeout)).await?,
                        false,
                        None,
                    ),
                    Some(others) => {
                        let now = start.into_std();
                        let any = self.connect_any(addr, &others.0, !retried, now);
                        let (conn, reused, at) = Box::pin(any).await?;
                        (conn, reused, (at != addr).then(|| Box::new(at)))
                    }
                },
            };
            match exchange(&mut conn, &head, &mut body, framing, (start, timeout)).await {
                Ok((resp, whole)) => {
                    if !whole && !http_body::Body::is_end_stream(&body) {
                        tokio::spawn(linger(std::mem::replace(&mut body, body::empty())));
                    }
                    let sent = Sent {
                        head_only,
                        asked_upgrade,
                        whole,
                        at: start.into_std(),
                    };
                    let Some(at) = at else {
                        return self.respond(addr, conn, resp, sent);
                    };
                    let mut resp = self.respond(*at, conn, resp, sent)?;
                    resp.extensions_mut().insert(Dialled(*at));
                    return Ok(resp);
                }
                // A pooled connection the upstream closed just as it was reused: nothing
                // was answered, so a request that can be repeated goes on a fresh one.
                Err(Exchange::Closed { answered: false }) if reused && replayable => {
                    retried = true;
                }
                Err(Exchange::Timeout) => return Err(SendError::Timeout),
                Err(Exchange::ClientIdle(e)) => return Err(SendError::ClientIdle(e)),
                Err(e) => return Err(SendError::Failed(e.to_string())),
            }
        }
    }

    /// Builds the response whose body reads the rest from `conn`.
    fn respond(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut conn: Conn,
        head: Head,
        sent: Sent,
    ) -> Result<Response<Body>, SendError> {
        let Sent {
            head_only,
            asked_upgrade,
            whole: request_sent_whole,
            at,
        } = sent;
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        if let Some(reason) = head.reason {
            resp.extensions_mut().insert(*reason);
        }
        let mut headers = head.headers;
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            if !asked_upgrade {
                return Err(SendError::Failed(
                    "upstream switched protocols without being asked to".into(),
                ));
            }
            let rest = conn.buf.split().freeze();
            *resp.headers_mut() = headers;
            resp.extensions_mut()
                .insert(Upgraded(Arc::new(Mutex::new(Some(
                    crate::proxy::detect::Rewind::new(rest, conn.io),
                )))));
            return Ok(resp);
        }
        // A connection whose request was cut short (an early refusal) is not reused: the
        // upstream would read the rest of it as the next request.
        let mut keep_alive =
            request_sent_whole && head.version == http::Version::HTTP_11 && !head.connection_close;
        if let Some(limit) = head.keep_alive {
            conn.idle_limit = conn.idle_limit.min(limit.saturating_sub(KEEP_ALIVE_MARGIN));
        }
        let framing = if head_only
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if head.has_transfer_encoding {
            // Both framings at once is how requests get smuggled: use TE, never reuse, and
            // drop the Content-Length (RFC 9112 §6.3) so the client is framed by neither.
            if headers.remove(header::CONTENT_LENGTH).is_some() {
                keep_alive = false;
            }
            if let Some(coding) = foreign_coding(&headers) {
                return Err(SendError::Failed(format!(
                    "upstream response uses transfer coding {coding:?}, which the proxy does not decode (only chunked)"
                )));
            }
            if last_token_is(&headers, header::TRANSFER_ENCODING, "chunked") {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::Eof
            }
        } else {
            match head.content_length {
                Ok(Some(n)) => Framing::Length(n),
                Ok(None) => Framing::Eof,
                Err(()) => {
                    return Err(SendError::Failed(
                        "upstream sent an invalid Content-Length".into(),
                    ))
                }
            }
        };
        *resp.headers_mut() = headers;
        if matches!(framing, Framing::Eof) {
            keep_alive = false;
        }
        let body = match framing {
            // The whole body is already here (the usual small response): the connection
            // goes back to the pool before the client has even been answered.
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                let data = conn.buf.split_to(n as usize).freeze();
                if keep_alive && conn.buf.is_empty() {
                    // Idle since the request began (not quite, by one round trip: it
                    // only makes the connection count as idle a little longer).
                    self.checkin(addr, conn, at);
                }
                if data.is_empty() {
                    body::empty()
                } else {
                    body::full(data)
                }
            }
            framing => body::boxed(UpstreamBody {
                conn: Some(conn),
                framing,
                keep_alive,
                pool: Arc::downgrade(self),
                addr,
                idle: self.response_idle,
                waiting: None,
            }),
        };
        *resp.body_mut() = body;
        Ok(resp)
    }
}

async fn sweep_while_alive(pool: Weak<Upstreams>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        for shard in &pool.idle {
            if let Ok(mut idle) = shard.0.lock() {
                sweep(&mut idle, now);
            }
        }
        pool.h2.sweep(now);
    }
}

fn sweep(idle: &mut IdlePool, now: Instant) {
    for list in idle.by_addr.values_mut() {
        list.retain_mut(|e| now.duration_since(e.since) < e.conn.idle_limit && e.conn.is_usable());
    }
    idle.by_addr.retain(|_, list| !list.is_empty());
    idle.total = idle.by_addr.values().map(VecDeque::len).sum();
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request head as it goes upstream, and what was read from its headers on the way.
struct EncodedHead {
    head: Vec<u8>,
    /// How the body is framed on this hop.
    framing: BodyFraming,
    /// Whether the request has an `Upgrade` (only then may the upstream switch protocols).
    asked_upgrade: bool,
}

/// `METHOD target HTTP/1.1`, the headers, a Host if there was none, the framing header
/// for a body that is `empty` or not. `Content-Length`, `Host` and `Upgrade` are read in
/// the same pass over the headers that writes them: looked up apart, the three cost about
/// 300 instructions per request.
fn encode_head(
    parts: &http::request::Parts,
    addr: SocketAddr,
    empty: bool,
) -> Result<EncodedHead, SendError> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + parts.headers.len() * 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    // An empty path goes as "/" (RFC 9112 §3.2.1): `http://a.test?q=1` has a query alone,
    // and `GET ?q=1` is no request line a server has to understand.
    if target.is_empty() || target.starts_with('?') {
        out.push(b'/');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let fields_at = out.len();
    let (mut declared, mut has_host, mut asked_upgrade) = (Ok(None), false, false);
    for (name, value) in &parts.headers {
        // The framing headers are written below from what will really be sent, never
        // copied: a client's Content-Length on a request whose body is not sent (a cache
        // revalidation) would have the upstream read the next request as this one's body.
        if name == header::CONTENT_LENGTH {
            add_content_length(&mut declared, value.as_bytes());
        } else if name != header::TRANSFER_ENCODING {
            has_host |= name == header::HOST;
            asked_upgrade |= name == header::UPGRADE;
            put_field(&mut out, name, value);
        }
    }
    if !has_host {
        // First, where a Host belongs (RFC 9112 §3.2); rare: the proxy sets one.
        let mut host = b"host: ".to_vec();
        match parts.uri.authority() {
            Some(a) => host.extend_from_slice(a.as_str().as_bytes()),
            None => host.extend_from_slice(addr.to_string().as_bytes()),
        }
        host.extend_from_slice(b"\r\n");
        out.splice(fields_at..fields_at, host);
    }
    // A body of declared length is sent as exactly that many bytes, never more: whatever
    // followed would be read by the upstream as another request.
    let declared = declared
        .map_err(|()| SendError::Failed("the request has an invalid Content-Length".into()))?;
    let framing = match declared {
        _ if !empty => declared.map_or(BodyFraming::Chunked, BodyFraming::Length),
        // Nothing is sent; a method that carries a body says so with a zero length.
        Some(_) => BodyFraming::Length(0),
        None if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
            BodyFraming::Length(0)
        }
        None => BodyFraming::None,
    };
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(crate::net::text::Decimal::new(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    Ok(EncodedHead {
        head: out,
        framing,
        asked_upgrade,
    })
}

/// Appends `name: value` and its line end.
fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// How a request body is framed on the upstream hop.
#[derive(Debug, Clone, Copy)]
enum BodyFraming {
    /// No body and no framing header.
    None,
    /// `Content-Length: n` and exactly n bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// How an exchange failed, and whether anything at all came back.
#[derive(Debug, thiserror::Error)]
enum Exchange {
    #[error("upstream closed the connection before a complete response head")]
    Closed { answered: bool },
    #[error("{0}")]
    Failed(String),
    #[error("no response within the response timeout")]
    Timeout,
    #[error("{0}")]
    ClientIdle(String),
}

/// Reads and discards what is left of a client's upload after the upstream answered early
/// and the upload stopped going upstream, as nginx's lingering close does: a client still
/// sending would otherwise have the connection closed under it, and its failed write can
/// hide the answer it has not read yet. Bounded in time, not in bytes (discarding is cheap).
async fn linger(mut body: Body) {
    let until = tokio::time::Instant::now() + LINGER_TOTAL;
    loop {
        let deadline = until.min(tokio::time::Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(_))) => {}
            // Over, failed, or paused too long: dropping the body lets the server close.
            _ => return,
        }
    }
}

/// Writes the request and reads the final response head; returns it and whether the whole
/// request went out. With a body, the head is read while the body is still being sent: an
/// upstream may refuse an upload on its head (413, 401) and stop reading, and the client must
/// get that answer, not a 502 for the write that then fails (nginx and hyper's client pass it
/// on too). An early refusal (4xx, 5xx) ends the upload; an early success still waits for
/// the body to be sent whole. The response head is due `timeout` after `start` without a
/// body, and after the body was sent with one.
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: &mut Body,
    framing: BodyFraming,
    (start, timeout): (tokio::time::Instant, Duration),
) -> Result<(Head, bool), Exchange> {
    let Conn {
        io,
        buf,
        timer,
        names,
        ..
    } = conn;
    if http_body::Body::is_end_stream(body) {
        let at = start + timeout;
        let sent = async {
            write_request(&mut *io, head, body, framing).await?;
            read_head(&mut *io, buf, names).await
        };
        return Ok((timer.within(at, sent).await??, true));
    }
    let (mut rd, mut wr) = tokio::io::split(io);
    let write = write_request(&mut wr, head, body, framing);
    let read = read_head(&mut rd, buf, names);
    tokio::pin!(write, read);
    let early = tokio::select! {
        biased;
        r = &mut read => r?,
        w = &mut write => {
            // The body has been sent, or can no longer be: the response timeout runs.
            let at = tokio::time::Instant::now() + timeout;
            return match w {
                Ok(()) => Ok((timer.within(at, &mut read).await??, true)),
                // The upstream stopped reading: it may have said why before it did.
                Err(closed @ Exchange::Closed { .. }) => match timer.within(at, &mut read).await? {
                    Ok(head) => Ok((head, false)),
                    Err(_) => Err(closed),
                },
                Err(e) => Err(e),
            };
        }
    };
    if early.status.as_u16() >= 400 {
        return Ok((early, false));
    }
    match write.await {
        Ok(()) => Ok((early, true)),
        Err(Exchange::Closed { .. }) => Ok((early, false)),
        Err(e) => Err(e),
    }
}

/// Writes the head and the body (as it arrives from the client) with its framing.
async fn write_request<W: AsyncWrite + Unpin>(
    io: &mut W,
    head: &[u8],
    body: &mut Body,
    framing: BodyFraming,
) -> Result<(), Exchange> {
    let (chunked, mut left) = match framing {
        BodyFraming::Chunked => (true, 0),
        BodyFraming::Length(n) => (false, n),
        BodyFraming::None => (false, 0),
    };
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            Exchange::Closed { answered: false }
        }
        _ => Exchange::Failed(format!("writing the request upstream failed: {e}")),
    };
    if http_body::Body::is_end_stream(body) {
        io.write_all(head).await.map_err(closed)?;
        return io.flush().await.map_err(closed);
    }
    // The head goes out with the first piece of the body when that is small, in one write.
    let mut pending = head.to_vec();
    let mut ended = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<crate::body::BodyIdle>() {
                Exchange::ClientIdle(e.to_string())
            } else {
                Exchange::Failed(format!("the client's request body failed: {e}"))
            }
        })?;
        match frame.into_data() {
            Ok(data) => {
                if !chunked {
                    left = left.checked_sub(data.len() as u64).ok_or_else(|| {
                        Exchange::Failed(
                            "the request body is longer than its Content-Length".into(),
                        )
                    })?;
                }
                if chunked && !data.is_empty() {
                    pending.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                }
                if pending.len() + data.len() <= 16 * 1024 {
                    pending.extend_from_slice(&data);
                } else {
                    io.write_all(&pending).await.map_err(closed)?;
                    pending.clear();
                    io.write_all(&data).await.map_err(closed)?;
                }
                if chunked && !data.is_empty() {
                    pending.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    pending.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        put_field(&mut pending, name, value);
                    }
                    pending.extend_from_slice(b"\r\n");
                    ended = true;
                    // Nothing may follow the last chunk: it would read as another request.
                    break;
                }
            }
        }
        if pending.len() >= 16 * 1024 {
            io.write_all(&pending).await.map_err(closed)?;
            pending.clear();
        }
    }
    if chunked && !ended {
        pending.extend_from_slice(b"0\r\n\r\n");
    }
    if left > 0 {
        return Err(Exchange::Failed(
            "the request body ended before its Content-Length".into(),
        ));
    }
    io.write_all(&pending).await.map_err(closed)?;
    io.flush().await.map_err(closed)
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: http::Version,
    headers: HeaderMap,
    /// The upstream's reason phrase, kept for a status code without a standard one (`520
    /// Web Server Returned an Unknown Error`): hyper would write `<none>` in its place.
    reason: Option<Box<hyper::ext::ReasonPhrase>>,
    /// How long the server says it keeps an idle connection (`Keep-Alive: timeout=N`).
    keep_alive: Option<Duration>,
    /// What the framing headers say, read as the head's names went by, instead of a
    /// lookup for each in the parsed map (about 90 instructions each; `Connection`'s,
    /// with its tokens, about 200): whether `Connection` has `close`, whether there is a
    /// `Transfer-Encoding`.
    connection_close: bool,
    has_transfer_encoding: bool,
    /// `Content-Length` over all its fields, read as they went by.
    content_length: Result<Option<u64>, ()>,
}

/// Reads until a final response head is parsed (interim 1xx heads are skipped; `101` is
/// final). What follows the head stays in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    names: &mut Names,
) -> Result<Head, Exchange> {
    let mut answered = false;
    let mut interim = 0;
    loop {
        if !buf.is_empty() {
            answered = true;
            match parse_head(buf, names).map_err(Exchange::Failed)? {
                Some(head)
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Exchange::Failed(format!(
                            "upstream sent more than {MAX_INTERIM} interim (1xx) responses"
                        )));
                    }
                    continue;
                }
                Some(head) => return Ok(head),
                None if buf.len() >= MAX_HEAD => {
                    return Err(Exchange::Failed(format!(
                        "upstream response head is larger than {MAX_HEAD} bytes"
                    )))
                }
                None => {}
            }
        }
        buf.reserve(HEAD_READ);
        let n =
            std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf))
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof if !answered => {
                        Exchange::Closed { answered }
                    }
                    _ => Exchange::Failed(format!("reading the upstream response failed: {e}")),
                })?;
        if n == 0 {
            return Err(Exchange::Closed { answered });
        }
    }
}

/// Parses one response head off the front of `buf`; `None` when it is not complete yet.
fn parse_head(buf: &mut BytesMut, names: &mut Names) -> Result<Option<Head>, String> {
    // Offsets into `buf` of each name and value, so that the head can be split off and
    // the values shared with it instead of copied one by one. Neither this list nor the
    // parser's header slots are zeroed up front: for 128 possible headers that was 8 KiB
    // of memset per response, a tenth of the proxy's instructions per request.
    let mut spans: SmallVec<[(u32, u32, u32, u32); 24]> = SmallVec::new();
    let (len, status, minor, reason) = {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("upstream sent an invalid response head: {e}")),
        };
        let base = buf.as_ptr() as usize;
        // Offsets fit in u32: a head is at most MAX_HEAD bytes.
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        spans.extend(resp.headers.iter().map(|h| {
            (
                at(h.name.as_bytes()),
                h.name.len() as u32,
                at(h.value),
                h.value.len() as u32,
            )
        }));
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| format!("upstream sent an invalid status code {code}"))?;
        // Looked up only past the common case: most responses are 200s.
        let reason = if status != StatusCode::OK && status.canonical_reason().is_none() {
            resp.reason
                .filter(|r| !r.is_empty())
                .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes().to_vec()).ok())
                .map(Box::new)
        } else {
            None
        };
        (len, status, resp.version.unwrap_or(1), reason)
    };
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut keep_alive = None;
    let (mut connection_close, mut has_transfer_encoding) = (false, false);
    let mut content_length = Ok(None);
    for (at, &(n, nl, v, vl)) in spans.iter().enumerate() {
        let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
        // Read here, where the name goes by anyway: a lookup per response cost more than
        // the hint is worth to the many servers that send none.
        if nl == 10
            && head[n] | 0x20 == b'k'
            && keep_alive.is_none()
            && head[n..n + nl].eq_ignore_ascii_case(b"keep-alive")
        {
            keep_alive = keep_alive_timeout(&head[v..v + vl]);
        }
        let name = names
            .get(at, &head[n..n + nl])
            .map_err(|_| "upstream sent an invalid header name".to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| format!("upstream sent an invalid value for {name}"))?;
        // Comparing with a standard name is comparing two small integers.
        if name == header::CONTENT_LENGTH {
            add_content_length(&mut content_length, value.as_bytes());
        } else if name == header::CONNECTION {
            connection_close |=
                value_tokens(value.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"));
        } else if name == header::TRANSFER_ENCODING {
            has_transfer_encoding = true;
        }
        headers.append(name, value);
    }
    let version = if minor == 0 {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    Ok(Some(Head {
        status,
        version,
        headers,
        reason,
        keep_alive,
        connection_close,
        has_transfer_encoding,
        content_length,
    }))
}

/// The members of a comma-separated header, over all its fields, trimmed, empty ones left out.
/// (Split as bytes: through `to_str` and `str::split` this cost several hundred
/// instructions per response for a `Connection: keep-alive`.)
pub(crate) fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    byte_tokens(headers, name).filter_map(|t| std::str::from_utf8(t).ok())
}

/// [`tokens`] as bytes, non-UTF-8 ones included.
fn byte_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| value_tokens(v.as_bytes()))
}

/// The members of one comma-separated field value, trimmed, empty ones left out.
pub(crate) fn value_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The first transfer coding other than `chunked` (`gzip` in `gzip, chunked`). Only the
/// chunked framing is taken off a message on its way through, and `Transfer-Encoding`
/// stays behind with the hop, so a message with another coding cannot be passed on
/// faithfully: its next hop would get coded bytes with nothing saying so.
pub(crate) fn foreign_coding(headers: &HeaderMap) -> Option<String> {
    // As bytes: a coding that is not UTF-8 is not chunked either.
    byte_tokens(headers, header::TRANSFER_ENCODING)
        .find(|t| !t.eq_ignore_ascii_case(b"chunked"))
        .map(|t| String::from_utf8_lossy(t).into_owned())
}

/// The `timeout=N` of a `Keep-Alive` header's value (`timeout=5, max=100`, as Node and
/// Apache send it): how many seconds the server keeps an idle connection.
fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    value.split(|&b| b == b',').find_map(|param| {
        let (name, value) = param.trim_ascii().split_at_checked(7)?;
        if !name.eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let value = value.trim_ascii().strip_prefix(b"=")?.trim_ascii();
        let secs: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}

/// Whether a comma-separated header has `token` (case-insensitive) anywhere. (As bytes:
/// a token that is not UTF-8 is not the ASCII `token` either.)
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    byte_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the last coding in a comma-separated header is `token`.
fn last_token_is(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The body length from `Content-Length`: every field and list member must agree. The
/// proxy reads it as the fields go by (`add_content_length`); the tests hold that to this.
#[cfg(test)]
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = Ok(None);
    for value in headers.get_all(header::CONTENT_LENGTH) {
        add_content_length(&mut found, value.as_bytes());
    }
    found
}

/// Takes one `Content-Length` field into what the fields before it said.
fn add_content_length(found: &mut Result<Option<u64>, ()>, value: &[u8]) {
    let Ok(mut so_far) = *found else { return };
    // Repeats that agree are allowed, as a list or as fields (RFC 9110 §8.6).
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        // Digits only, and at most 19 of them: that cannot overflow a u64.
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            *found = Err(());
            return;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if so_far.is_some_and(|f| f != n) {
            *found = Err(());
            return;
        }
        so_far = Some(n);
    }
    *found = Ok(so_far);
}

/// How the rest of a response body is delimited.
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunked),
    /// Until the upstream closes.
    Eof,
}

/// Where a chunked decoder is.
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers(Option<HeaderMap>, usize),
}

/// What a step of the chunked decoder produced.
enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Chunked {
    /// Decodes what `buf` holds; `None` when more bytes are needed.
    fn step(&mut self, buf: &mut BytesMut) -> io::Result<Option<Step>> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(bad("upstream chunk-size line is too long"));
                        }
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Chunked::Trailers(None, 0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(rest) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (*rest).min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    *rest -= take;
                    if *rest == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Some(Step::Data(data)));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(bad("upstream chunk is longer than its size"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(map, seen) => {
                    let Some(end) = find_crlf(buf) else {
                        if *seen + buf.len() > MAX_HEAD {
                            return Err(bad("upstream trailers are too large"));
                        }
                        return Ok(None);
                    };
                    if end == 0 {
                        buf.advance(2);
                        return Ok(Some(map.take().map_or(Step::End, Step::Trailers)));
                    }
                    *seen += end + 2;
                    if *seen > MAX_HEAD {
                        return Err(bad("upstream trailers are too large"));
                    }
                    let line = buf.split_to(end).freeze();
                    buf.advance(2);
                    let (name, value) = trailer(&line)?;
                    map.get_or_insert_with(HeaderMap::new).append(name, value);
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The size in a chunk-size line (`hex[;extensions]`); extensions are ignored.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    if line.contains(&b'\n') || line.contains(&b'\r') {
        return Err(bad("upstream chunk-size line has a bare line break"));
    }
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    let rest_ok = rest.is_empty() || {
        let t = rest.trim_ascii_start();
        t.first() == Some(&b';')
    };
    if digits.is_empty() || digits.len() > 15 || !rest_ok {
        return Err(bad("upstream sent an invalid chunk size"));
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| bad("upstream sent an invalid chunk size"))
}

fn trailer(line: &Bytes) -> io::Result<(HeaderName, HeaderValue)> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad("upstream sent an invalid trailer"))?;
    let name = HeaderName::from_bytes(&line[..colon])
        .map_err(|_| bad("upstream sent an invalid trailer name"))?;
    let raw = &line[colon + 1..];
    let value = raw.trim_ascii();
    let start = value.as_ptr() as usize - line.as_ptr() as usize;
    let value = HeaderValue::from_maybe_shared(line.slice(start..start + value.len()))
        .map_err(|_| bad("upstream sent an invalid trailer value"))?;
    Ok((name, value))
}

/// A response body read straight from its upstream connection, which returns to the pool
/// when the body has been read whole (and is closed if the body is dropped before). A body
/// that pauses for `idle` is cut off, as nginx's `proxy_read_timeout` and Envoy's stream
/// idle timeout do: an upstream that hung mid-body held the client's request, and both
/// connections, for as long as the client waited.
struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Weak<Upstreams>,
    addr: SocketAddr,
    idle: Option<Duration>,
    /// While a read waits: when the pause will have lasted `idle`. One clock read per
    /// wait, none for a body that is already in the buffer.
    waiting: Option<tokio::time::Instant>,
}

impl UpstreamBody {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                if let Some(pool) = self.pool.upgrade() {
                    pool.checkin(self.addr, conn, Instant::now());
                }
            }
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let mut want = HEAD_READ;
            match &mut this.framing {
                Framing::Length(rest) => {
                    if *rest == 0 {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    if !conn.buf.is_empty() {
                        let take = (*rest).min(conn.buf.len() as u64);
                        let data = conn.buf.split_to(take as usize).freeze();
                        *rest -= take;
                        if *rest == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    want = usize::try_from(*rest).unwrap_or(MAX_READ).min(MAX_READ);
                }
                Framing::Eof => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    want = MAX_READ;
                }
                Framing::Chunked(state) => match state.step(&mut conn.buf) {
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Ok(Some(Step::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Step::Trailers(map))) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(map))));
                    }
                    Ok(Some(Step::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {
                        if let Chunked::Data(rest) = state {
                            want = usize::try_from(*rest)
                                .unwrap_or(MAX_READ)
                                .clamp(HEAD_READ, MAX_READ);
                        }
                    }
                },
            }
            conn.buf.reserve(want);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf);
            let read = match (read, this.idle) {
                (Poll::Ready(read), _) => {
                    this.waiting = None;
                    read
                }
                (Poll::Pending, None) => return Poll::Pending,
                (Poll::Pending, Some(idle)) => {
                    let at = *this
                        .waiting
                        .get_or_insert_with(|| tokio::time::Instant::now() + idle);
                    if conn.timer.poll_passed(at, cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the upstream's response body paused for {idle:?}: cut off"),
                    ))));
                }
            };
            match read {
                Ok(0) => {
                    this.conn = None;
                    if matches!(this.framing, Framing::Eof) {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the response body ended",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing, Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn decode(input: &[u8]) -> io::Result<(Vec<u8>, Option<HeaderMap>, bool)> {
        let mut buf = BytesMut::from(input);
        let mut state = Chunked::Size;
        let mut out = Vec::new();
        loop {
            match state.step(&mut buf)? {
                Some(Step::Data(d)) => out.extend_from_slice(&d),
                Some(Step::Trailers(t)) => return Ok((out, Some(t), true)),
                Some(Step::End) => return Ok((out, None, true)),
                None => return Ok((out, None, false)),
            }
        }
    }

    /// An origin that answers every request on a connection with a small 200, and reports
    /// when a connection is closed by the proxy.
    async fn origin() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let (addr, closed, _accepted) = counting_origin().await;
        (addr, closed)
    }

    /// [`origin`], which also counts the connections it has accepted.
    async fn counting_origin() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (closed, rx) = tokio::sync::mpsc::unbounded_channel();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            break;
                        }
                    }
                    let _ = closed.send(());
                });
            }
        });
        (addr, rx, accepted)
    }

    /// A worker with no idle connection of its own to an address takes another worker's
    /// rather than dial (one connection, not one per worker), and takes it over: the
    /// connection goes back to its own pool, and is registered with its own runtime, so it
    /// serves on once the other worker's runtime is gone.
    #[tokio::test]
    async fn a_worker_takes_over_another_workers_idle_connection() {
        let sizes = (MAX_IDLE_TOTAL, 2);
        let pool = Upstreams::with_options(Duration::from_secs(2), None, None, IDLE_TIMEOUT, sizes);
        let per_worker = |pool: &Upstreams| -> Vec<usize> {
            pool.idle
                .iter()
                .map(|s| s.0.lock().unwrap().total)
                .collect()
        };
        let get = || {
            let req = Request::builder().uri("/").header("host", "o.test");
            req.body(body::empty()).unwrap()
        };
        let (addr, _closed, accepted) = counting_origin().await;
        // Worker 1, on a thread and runtime of its own as in the proxy, dials and stays up
        // while worker 0 (this thread) uses its connection.
        let (sent, status) = tokio::sync::oneshot::channel();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let w1_pool = pool.clone();
        let worker1 = crate::workers::run_as_worker(1, async move {
            let resp = w1_pool.send(addr, get(), Duration::from_secs(5)).await;
            sent.send(resp.map(|r| r.status())).unwrap();
            let _ = ended.await;
        });
        assert_eq!(status.await.unwrap().unwrap(), 200);
        assert_eq!(per_worker(&pool), [0, 1]);
        let resp = pool
            .send(addr, get(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        assert_eq!(
            per_worker(&pool),
            [1, 0],
            "worker 0 dialled its own connection, or gave worker 1's back to it"
        );
        // Worker 1's runtime ends, and its I/O driver with it.
        end.send(()).unwrap();
        worker1.join().unwrap();
        for _ in 0..3 {
            let resp = pool
                .send(addr, get(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(per_worker(&pool), [1, 0]);
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the connection taken over did not serve on"
        );
    }

    /// Past the pool's total limit, the connection idle longest (whatever its address) is
    /// closed to make room; the pool never holds more than the limit.
    #[tokio::test]
    async fn the_idle_pool_is_bounded_in_all_and_evicts_the_oldest() {
        let pool = Upstreams::with_max_idle(Duration::from_secs(2), None, None, 2);
        let mut origins = Vec::new();
        for _ in 0..3 {
            origins.push(origin().await);
        }
        for (i, (addr, _)) in origins.iter().enumerate() {
            let req = Request::builder()
                .uri("/")
                .header("host", "o.test")
                .body(body::empty())
                .unwrap();
            let resp = pool.send(*addr, req, Duration::from_secs(5)).await.unwrap();
            assert_eq!(resp.status(), 200);
            drop(resp);
            assert_eq!(pool.idle_count(), (i + 1).min(2), "after request {i}");
        }
        // The first origin's connection was the oldest: closed; the others are kept.
        let first = tokio::time::timeout(Duration::from_secs(5), origins[0].1.recv()).await;
        assert!(
            matches!(first, Ok(Some(()))),
            "the oldest idle connection was not closed"
        );
        for (_, closed) in &mut origins[1..] {
            assert!(
                closed.try_recv().is_err(),
                "a newer idle connection was closed"
            );
        }
        // The pooled connections still serve.
        let req = Request::builder()
            .uri("/")
            .header("host", "o.test")
            .body(body::empty())
            .unwrap();
        assert_eq!(
            pool.send(origins[2].0, req, Duration::from_secs(5))
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(pool.idle_count(), 2);
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, trailers, done) =
            decode(b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-sum: 42\r\n\r\n").unwrap();
        assert_eq!(body, b"hello world");
        assert!(done);
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        let (body, trailers, done) = decode(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!((body.len(), trailers.is_none(), done), (10, true, true));
    }

    #[test]
    fn a_partial_chunked_body_waits_for_more() {
        let (body, _, done) = decode(b"5\r\nhel").unwrap();
        assert_eq!((body.as_slice(), done), (&b"hel"[..], false));
        let (_, _, done) = decode(b"5\r\nhello\r").unwrap();
        assert!(!done);
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\nhello\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 junk\r\nhello\r\n",
            b"0\r\nno colon here\r\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_length_must_agree() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), Ok(None));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert_eq!(content_length(&h), Ok(Some(5)));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(content_length(&h), Err(()));
        for bad in ["-1", "+5", "0x10", "", "99999999999999999999"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static(bad));
            assert_eq!(content_length(&h), Err(()), "{bad}");
        }
    }

    #[test]
    fn response_heads_parse_and_share_the_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabc"[..],
        );
        let names = &mut Names::default();
        let head = parse_head(&mut buf, names).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"abc");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-"[..]);
        assert!(parse_head(&mut partial, names).unwrap().is_none());
        let mut garbage = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert!(parse_head(&mut garbage, names).is_err());
    }

    /// A `200` response head with these header lines.
    fn ok_head(fields: &[u8]) -> BytesMut {
        let mut raw = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        raw.extend_from_slice(fields);
        raw.extend_from_slice(b"\r\n");
        raw
    }

    /// The framing headers noted while the head is parsed are what looking them up in the
    /// parsed map gives, remembered names or not: repeats, lists, disagreements, case.
    #[test]
    fn framing_noted_while_parsing_is_what_the_map_says() {
        let names = &mut Names::default();
        let heads: [&[u8]; 12] = [
            b"Content-Length: 3\r\nConnection: keep-alive\r\n",
            b"content-LENGTH: 3\r\nConnection: close\r\n",
            b"Connection: keep-alive, CLOSE \r\nConnection: x-hop\r\n",
            b"Connection: x-hop\r\nconnection: Close\r\nX-Hop: 1\r\n",
            b"Connection: closed, close-ish\r\n",
            b"Content-Length: 5\r\nX-A: 1\r\nContent-Length: 5, 5\r\n",
            b"Content-Length: 5\r\nContent-Length: 6\r\n",
            b"Content-Length: 5, 6\r\nContent-Length: 5\r\n",
            b"Content-Length: -1\r\nContent-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            b"X-Connection: close\r\nX-Transfer-Encoding: chunked\r\nX-Content-Length: 1\r\n",
            b"Server: a\r\n",
        ];
        for round in 0..2 {
            for (i, fields) in heads.iter().enumerate() {
                let head = parse_head(&mut ok_head(fields), names).unwrap().unwrap();
                let h = &head.headers;
                let at = format!("round {round}, response {i}");
                assert_eq!(head.content_length, content_length(h), "{at}");
                let close = has_token(h, header::CONNECTION, "close");
                assert_eq!(head.connection_close, close, "{at}");
                let te = h.contains_key(header::TRANSFER_ENCODING);
                assert_eq!(head.has_transfer_encoding, te, "{at}");
            }
        }
    }

    /// The names remembered from earlier responses on a connection are used only for the
    /// very bytes they were parsed from: reordered, renamed, re-cased, added, dropped or
    /// invalid names in later responses come out as a fresh parse would give them.
    #[test]
    fn remembered_header_names_never_stand_in_for_other_names() {
        let names = &mut Names::default();
        let heads: [&[u8]; 8] = [
            b"Server: a\r\nX-Custom: 1\r\nContent-Length: 0\r\n",
            b"Server: a\r\nX-Custom: 1\r\nContent-Length: 0\r\n",
            b"Server: a\r\nX-Kustom: 1\r\nContent-Length: 0\r\n",
            b"Content-Length: 0\r\nServer: a\r\nX-Custom: 1\r\n",
            b"Content-Length: 0\r\nX-Other: 2\r\nx-custom: 3\r\nVary: b\r\n",
            b"Content-Length: 0\r\n",
            b"Content-Length: 0\r\nX-Custom : 1\r\n",
            b"Content-Length: 0\r\nX-Cust\xffom: 1\r\n",
        ];
        for (i, fields) in heads.iter().enumerate() {
            // Each header as (name, value) text, or the parse error.
            let text = |r: Result<Option<Head>, String>| {
                r.map(|h| {
                    h.map(|h| {
                        let h = h.headers.iter();
                        h.map(|(n, v)| format!("{n}: {v:?}")).collect::<Vec<_>>()
                    })
                })
            };
            let parsed = text(parse_head(&mut ok_head(fields), names));
            let fresh = text(parse_head(&mut ok_head(fields), &mut Names::default()));
            assert_eq!(parsed, fresh, "response {i}");
        }
        // Bounded, and the first slot is the latest response's first name.
        assert!(names.0.len() <= Names::MAX);
        assert_eq!(&*names.0[0].0, b"Content-Length");
    }

    /// A body that disagrees with its Content-Length is never written past the length.
    #[tokio::test]
    async fn a_body_longer_or_shorter_than_its_length_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut got).await;
            got
        });
        let mut io = MaybeTls::Plain(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut long = body::full("0123456789");
        let err = write_request(&mut io, b"H", &mut long, BodyFraming::Length(5)).await;
        assert!(
            matches!(err, Err(Exchange::Failed(ref m)) if m.contains("longer")),
            "{err:?}"
        );
        let mut short = body::full("012");
        let err = write_request(&mut io, b"H", &mut short, BodyFraming::Length(5)).await;
        assert!(
            matches!(err, Err(Exchange::Failed(ref m)) if m.contains("ended before")),
            "{err:?}"
        );
        drop(io);
        // Small bodies are held back with the head until they end, so neither went out at all.
        assert_eq!(peer.await.unwrap(), b"");
    }

    #[test]
    fn keep_alive_hints_are_read_as_servers_write_them() {
        let hint = |v: &str| keep_alive_timeout(v.as_bytes());
        assert_eq!(hint("timeout=5"), Some(Duration::from_secs(5)));
        assert_eq!(hint("timeout=5, max=100"), Some(Duration::from_secs(5)));
        assert_eq!(hint("max=100, Timeout = 15"), Some(Duration::from_secs(15)));
        for no in [
            "",
            "max=100",
            "timeouts=5",
            "timeout=",
            "timeout=soon",
            "timeout=-1",
        ] {
            assert_eq!(hint(no), None, "{no:?}");
        }
        // As the response head parser finds it, under any case of its name.
        let mut names = Names::default();
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nKEEP-ALIVE: timeout=7\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let head = parse_head(&mut buf, &mut names).unwrap().unwrap();
        assert_eq!(head.keep_alive, Some(Duration::from_secs(7)));
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut buf, &mut names)
                .unwrap()
                .unwrap()
                .keep_alive,
            None
        );
    }

    #[test]
    fn request_heads_carry_a_host_and_the_framing() {
        let req = Request::post("http://example.test:8080/a?b=1")
            .header("x-k", "v")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let addr = "127.0.0.1:1".parse().unwrap();
        let text = |parts: &http::request::Parts, empty: bool| {
            encode_head(parts, addr, empty)
                .map(|e| (String::from_utf8(e.head).unwrap(), e.asked_upgrade))
                .map_err(|e| e.to_string())
        };
        // A body of unknown length is chunked; the Host goes first.
        assert_eq!(
            text(&parts, false).unwrap().0,
            "POST /a?b=1 HTTP/1.1\r\nhost: example.test:8080\r\nx-k: v\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        // Nothing sent for a POST: a zero length says so.
        assert_eq!(
            text(&parts, true).unwrap().0,
            "POST /a?b=1 HTTP/1.1\r\nhost: example.test:8080\r\nx-k: v\r\ncontent-length: 0\r\n\r\n"
        );
        // A declared length is sent as what will be sent; the client's Host and Upgrade
        // stay where they were.
        let req = Request::get("/ws")
            .header("content-length", "5")
            .header("host", "h.test")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        assert_eq!(
            text(&parts, false).unwrap(),
            (
                "GET /ws HTTP/1.1\r\nhost: h.test\r\nupgrade: websocket\r\ncontent-length: 5\r\n\r\n".into(),
                true
            )
        );
        assert_eq!(
            text(&parts, true).unwrap().0,
            "GET /ws HTTP/1.1\r\nhost: h.test\r\nupgrade: websocket\r\ncontent-length: 0\r\n\r\n"
        );
        // A GET with no body and no length says nothing of framing.
        parts.headers.remove("content-length");
        parts.headers.remove("upgrade");
        assert_eq!(
            text(&parts, true).unwrap(),
            ("GET /ws HTTP/1.1\r\nhost: h.test\r\n\r\n".into(), false)
        );
        // Lengths that disagree are refused.
        parts
            .headers
            .append("content-length", HeaderValue::from_static("5"));
        parts
            .headers
            .append("content-length", HeaderValue::from_static("6"));
        let refused = text(&parts, false).unwrap_err();
        assert!(refused.contains("invalid Content-Length"), "{refused}");
    }

    /// The client's framing headers never reach the upstream as they were: a body that is
    /// not sent (a cache revalidation copies the client's headers onto an empty body) must
    /// not be announced, or the upstream would read the next request as this one's body.
    #[tokio::test]
    async fn framing_headers_describe_what_is_sent_not_what_the_client_said() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            // One response per head seen, until the client closes.
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut s, &mut chunk)
                    .await
                    .unwrap_or(0);
                if n == 0 {
                    return String::from_utf8_lossy(&got).into_owned();
                }
                got.extend_from_slice(&chunk[..n]);
                let heads = String::from_utf8_lossy(&got).matches("\r\n\r\n").count();
                let answered = String::from_utf8_lossy(&got)
                    .matches("HTTP/1.1\r\n")
                    .count();
                if heads >= answered {
                    let _ = tokio::io::AsyncWriteExt::write_all(
                        &mut s,
                        b"HTTP/1.1 304 Not Modified\r\n\r\n",
                    )
                    .await;
                }
            }
        });
        let pool = Upstreams::new(Duration::from_secs(2), None, None);
        for (method, length, te) in [
            ("GET", "60", None),
            ("POST", "60", Some("chunked")),
            ("DELETE", "0", None),
        ] {
            let mut b = Request::builder()
                .method(method)
                .uri("/u")
                .header("host", "o.test")
                .header("content-length", length);
            if let Some(te) = te {
                b = b.header("transfer-encoding", te);
            }
            let resp = pool
                .send(addr, b.body(body::empty()).unwrap(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(resp.status(), 304);
        }
        drop(pool);
        let seen = peer.await.unwrap();
        assert!(!seen.contains("content-length: 60"), "{seen}");
        assert!(!seen.contains("transfer-encoding"), "{seen}");
        assert!(
            seen.contains("POST /u HTTP/1.1\r\nhost: o.test\r\ncontent-length: 0\r\n\r\n"),
            "{seen}"
        );
        assert!(
            seen.contains("GET /u HTTP/1.1\r\nhost: o.test\r\ncontent-length: 0\r\n\r\n"),
            "{seen}"
        );
    }
}
