//! The upstream HTTP/2 client, for requests that arrived as HTTP/2 on a connection addressed
//! to the destination itself: a redirected connection, plain HTTP/2 inside a `CONNECT`, or
//! the inbound listener (see `proxy::http::upstream_version`). Such a client chose HTTP/2
//! for that server, often because the server speaks nothing else: gRPC servers are
//! HTTP/2-only, and gRPC needs trailers, which an HTTP/1.1 hop would drop. Everything else
//! keeps the HTTP/1.1 client of the parent module, whose hot path this one leaves alone.
//!
//! One multiplexed connection per address (hyper's HTTP/2 client, its connection driven by
//! a task of its own), dialled once for all the requests that wait for it; another one when
//! every connection carries as many streams as its server allows. A connection with no
//! stream, unused for the pool's idle timeout, is let go and closes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{header, uri, Request, Response};
use http_body::{Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, Notify};

use super::{connect_maybe_mesh, SendError, Upstreams, IDLE_TIMEOUT, MAX_HEAD};
use crate::body::{self, Body, BoxError};

/// How long a connection to another sidecar may be silent before it is PINGed, and how long
/// the PING may go unanswered before the connection is closed. The peer is Outrider, whose
/// HTTP/2 server answers PINGs at any rate.
const MESH_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);
/// The same for every other server: gRPC's. gRPC servers (C core, Go, Java) count a PING that
/// comes less than 5 minutes after the last one, with no data sent between, as abuse, and
/// after two such close the connection with GOAWAY `ENHANCE_YOUR_CALM` ("too many pings"):
/// with a PING every 10 s, a streaming call (a watch) silent for 40 s was killed.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(300);
/// How long that PING may go unanswered.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The HTTP/2 connections by address, and the dials under way: a pool per worker thread
/// (see [`crate::workers`]), as Envoy's workers keep theirs. A connection's streams are
/// written and read by its task, on the worker that dialled it; a stream from another
/// worker would cross threads both ways. So each worker opens its own connection to an
/// address it sends HTTP/2 to.
pub(super) struct H2Pool(Box<[Shard]>);

type Slots = HashMap<SocketAddr, Slot, foldhash::fast::RandomState>;

/// One worker's connections, on their own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Slots>);

/// A dial that every request waiting for the same address shares; its connection goes into
/// the address's slot.
type Dial = Shared<BoxFuture<'static, Result<(), Arc<SendError>>>>;

#[derive(Default)]
struct Slot {
    /// The open connections: usually one, more while every one of them carries as many
    /// streams as its server allows (long-lived gRPC streams, say), so that a new request
    /// does not wait behind them.
    conns: Vec<Conn>,
    /// The dial under way: a burst of requests on a cold pool (a gRPC client opening many
    /// streams at once) opens one connection, not one each.
    dialling: Option<Dial>,
}

/// One HTTP/2 connection in the pool.
struct Conn {
    send: SendRequest<Ending>,
    used: Instant,
    state: Arc<ConnState>,
}

/// What the pool knows of a connection beyond hyper's handle, shared with its task and its
/// streams.
#[derive(Default)]
struct ConnState {
    /// Streams open on it (hyper does not count them for us).
    streams: AtomicUsize,
    /// How many its server allows at once (`SETTINGS_MAX_CONCURRENT_STREAMS`), kept current
    /// by the connection's task.
    limit: AtomicUsize,
    /// Whether a response has come on it: by then the server's SETTINGS, which precede
    /// everything it sends, are in `limit`. Until then the limit is not known, and hyper
    /// opens one stream at a time and queues the rest (see `dial`).
    answered: AtomicBool,
    /// Whether the server refused a stream on it or said GOAWAY: no new stream goes on it,
    /// and it is let go once its streams have ended.
    retired: AtomicBool,
}

impl ConnState {
    fn has_room(&self) -> bool {
        !self.answered.load(Ordering::Relaxed)
            || self.streams.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
    }
}

/// A request's stream on a connection, counted until its response ends or is dropped.
pub(super) struct Stream(Arc<ConnState>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Checkout {
    Ready(SendRequest<Ending>, Stream),
    Wait(Dial),
}

impl H2Pool {
    /// Pools for `workers` worker threads.
    pub(super) fn new(workers: usize) -> Self {
        Self((0..workers.max(1)).map(|_| Shard::default()).collect())
    }

    /// This worker's pool.
    fn own(&self) -> usize {
        crate::workers::index() % self.0.len()
    }

    /// A connection to `addr` with room for one more stream (with `any_open`, the least
    /// busy open one even without: the stream then waits in hyper's queue for room), or
    /// the dial to wait for (started by `dial` with this worker's pool if none is under
    /// way).
    fn checkout(
        &self,
        addr: SocketAddr,
        any_open: bool,
        dial: impl FnOnce(usize) -> Dial,
    ) -> Checkout {
        let own = self.own();
        let Ok(mut slots) = self.0[own].0.lock() else {
            return Checkout::Wait(dial(own));
        };
        let slot = slots.entry(addr).or_default();
        slot.conns
            .retain(|c| !c.send.is_closed() && c.state.usable());
        let pick = if any_open {
            slot.conns
                .iter_mut()
                .min_by_key(|c| c.state.streams.load(Ordering::Relaxed))
        } else {
            slot.conns.iter_mut().find(|c| c.state.has_room())
        };
        if let Some(c) = pick {
            c.used = Instant::now();
            c.state.streams.fetch_add(1, Ordering::Relaxed);
            return Checkout::Ready(c.send.clone(), Stream(c.state.clone()));
        }
        Checkout::Wait(slot.dialling.get_or_insert_with(|| dial(own)).clone())
    }

    /// Records how the dial to `addr` that pool `shard` started ended.
    fn dialled(
        &self,
        (addr, shard): (SocketAddr, usize),
        result: Result<(SendRequest<Ending>, Arc<ConnState>), SendError>,
    ) -> Result<(), SendError> {
        let Ok(mut slots) = self.0[shard].0.lock() else {
            return result.map(drop);
        };
        let slot = slots.entry(addr).or_default();
        slot.dialling = None;
        let (send, state) = result?;
        slot.conns.push(Conn {
            send,
            used: Instant::now(),
            state,
        });
        Ok(())
    }

    /// Lets go of connections that closed, or that carry no stream and have not been used
    /// for the idle timeout.
    pub(super) fn sweep(&self, now: Instant) {
        for shard in &self.0 {
            let Ok(mut slots) = shard.0.lock() else {
                continue;
            };
            for slot in slots.values_mut() {
                slot.conns.retain(|c| {
                    !c.send.is_closed()
                        && c.state.usable()
                        && (c.state.streams.load(Ordering::Relaxed) > 0
                            || now.saturating_duration_since(c.used) < IDLE_TIMEOUT)
                });
            }
            slots.retain(|_, slot| !slot.conns.is_empty() || slot.dialling.is_some());
        }
    }
}

impl Upstreams {
    /// Sends `req` to `addr` over HTTP/2 (see the module comment). As over HTTP/1.1, the
    /// response head must come within `timeout` of the end of the request body, so that a
    /// long upload or a client-streaming call is not cut off while it still flows.
    pub(super) async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        timeout: std::time::Duration,
    ) -> Result<Response<Body>, SendError> {
        let (mut parts, body) = req.into_parts();
        // HTTP/2 names the target in `:scheme` and `:authority`, which hyper takes from the
        // URI; the Host header it replaces is not sent twice (RFC 9113 §8.3.1).
        // (Both proxy paths already send absolute URIs; this covers any other caller.)
        if parts.uri.authority().is_none() || parts.uri.scheme().is_none() {
            let authority = match parts.uri.authority() {
                Some(a) => a.as_str().to_owned(),
                None => parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map_or_else(|| addr.to_string(), str::to_owned),
            };
            let mut uri_parts = parts.uri.clone().into_parts();
            uri_parts.scheme = Some(uri_parts.scheme.unwrap_or(uri::Scheme::HTTP));
            uri_parts.authority = authority.parse().ok();
            if uri_parts.path_and_query.is_none() {
                uri_parts.path_and_query = Some(uri::PathAndQuery::from_static("/"));
            }
            parts.uri = http::Uri::from_parts(uri_parts)
                .map_err(|e| SendError::Failed(format!("no HTTP/2 request target: {e}")))?;
        }
        parts.headers.remove(header::HOST);
        never_index_ids(&mut parts.headers);
        // A gRPC call carries its own deadline: the response waits that long instead of the
        // configured response timeout, which would cut off a call its client is willing to
        // wait for (a slow unary call, a long poll). A shorter one ends when the client gives
        // up anyway. Without a deadline the configured timeout applies.
        let timeout = grpc_timeout(&parts.headers).unwrap_or(timeout);

        let (mut req, mut ended, mut replay) = Replay::prepare(parts, body);
        let (mut send, mut stream) = self.h2_connection(addr).await?;
        // Sent again at most this often: a burst can meet several connections going away
        // at once, and each of them turns it away.
        let mut again_left = 3;
        loop {
            let exchange = send.try_send_request(req);
            let answered = within(exchange, ended.as_deref(), timeout).await;
            match answered {
                None => {
                    // No response head in time: the server may be gone without a word (a
                    // dead node). The next request goes on another connection, rather than
                    // wait for this one's PING, which a gRPC server lets come only every
                    // 5 minutes.
                    stream.0.retired.store(true, Ordering::Relaxed);
                    return Err(SendError::Timeout);
                }
                Some(Ok(resp)) => {
                    stream.0.answered.store(true, Ordering::Relaxed);
                    return Ok(resp.map(|inner| {
                        body::boxed(Held {
                            inner,
                            _stream: stream,
                        })
                    }));
                }
                // Not processed: safe to send again whatever the method (RFC 9113 §8.7),
                // on another connection.
                Some(Err(mut e)) if again_left > 0 => {
                    again_left -= 1;
                    match e.take_message() {
                        // Never sent: the connection closed (a GOAWAY, say) before it went out.
                        Some(unsent) => req = unsent,
                        // Sent, but the server says it did not process it: a stream refused,
                        // or above the last one a GOAWAY let through (a server that closes
                        // its connections after so many requests, as nginx does after 1,000,
                        // or one that is restarting). That connection takes no more.
                        None if unprocessed(e.error()) => {
                            stream.0.retired.store(true, Ordering::Relaxed);
                            let Some(again) = replay.request().await else {
                                return Err(failed(e.error()));
                            };
                            (req, ended, replay) = again;
                        }
                        None => return Err(failed(e.error())),
                    }
                    (send, stream) = self.h2_connection(addr).await?;
                }
                Some(Err(e)) => return Err(failed(e.error())),
            }
        }
    }

    /// A connection to `addr` with a stream claimed on it.
    async fn h2_connection(
        &self,
        addr: SocketAddr,
    ) -> Result<(SendRequest<Ending>, Stream), SendError> {
        // Each wait ends with a new connection, which others may fill first (a burst larger
        // than a connection's stream limit). After a few, the request takes its turn on the
        // least busy connection rather than dial on: a burst is not met with a connection
        // per hundred streams, nor a server that closes new connections with endless dials.
        const WAITS: u32 = 4;
        for waited in 0..=WAITS {
            match self
                .h2
                .checkout(addr, waited == WAITS, |shard| self.start_dial(addr, shard))
            {
                Checkout::Ready(send, stream) => return Ok((send, stream)),
                Checkout::Wait(_) if waited == WAITS => break,
                Checkout::Wait(dial) => dial.await.map_err(|e| e.copy())?,
            }
        }
        Err(SendError::Failed(format!(
            "every new HTTP/2 connection to {addr} closed before it could be used"
        )))
    }

    /// Dials `addr` in a task of its own, so that the requests waiting for it are not left
    /// without a connection when the one that started it goes away; the connection goes
    /// into pool `shard`.
    fn start_dial(&self, addr: SocketAddr, shard: usize) -> Dial {
        let (pool, timeout, mesh) = (
            Arc::clone(&self.h2),
            self.connect_timeout,
            self.mesh.clone(),
        );
        let task = tokio::spawn(async move {
            let result = dial(addr, timeout, mesh.as_ref()).await;
            pool.dialled((addr, shard), result).map_err(Arc::new)
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(SendError::Failed(format!(
                    "dialling {addr} failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared()
    }
}

async fn dial(
    addr: SocketAddr,
    timeout: std::time::Duration,
    mesh: Option<&super::MeshClient>,
) -> Result<(SendRequest<Ending>, Arc<ConnState>), SendError> {
    let io = connect_maybe_mesh(addr, timeout, mesh).await?;
    let (interval, wait) = if io.is_mesh() {
        (MESH_KEEPALIVE, MESH_KEEPALIVE)
    } else {
        (KEEPALIVE, KEEPALIVE_TIMEOUT)
    };
    // The requests of many streams are sent in one write (see `corked`).
    let (io, cork) = crate::net::corked::new(io);
    let (send, conn) = hyper::client::conn::http2::Builder::new(cork.client_exec())
        // The same bound as on an HTTP/1.1 response head.
        .max_header_list_size(MAX_HEAD as u32)
        // Until the server's SETTINGS say how many streams it takes, one: more could be
        // refused (REFUSED_STREAM), and a refused request cannot be sent again here.
        .initial_max_send_streams(1)
        // A server that vanished without a FIN or RST (a dead node, a dropped NAT entry)
        // would keep its connection "open", and a streaming call on it would wait for ever:
        // unanswered PINGs close it, as Linkerd's do (a call waiting for its response head
        // has the response timeout, which also retires the connection).
        .timer(TokioTimer::new())
        .keep_alive_interval(interval)
        .keep_alive_timeout(wait)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(&e))?;
    let state = Arc::new(ConnState {
        limit: AtomicUsize::new(conn.current_max_send_streams()),
        ..ConnState::default()
    });
    let seen = state.clone();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        // The server may change its limit in any SETTINGS frame, which this poll reads.
        let ended = std::future::poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            seen.limit
                .store(conn.current_max_send_streams(), Ordering::Relaxed);
            polled
        })
        .await;
        if let Err(e) = ended {
            tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok((send, state))
}

/// Marks the fields whose values are unique to each request (the request id, tracing ids)
/// as never indexed in HPACK (the h2 crate sends a sensitive value as a never-indexed
/// literal, RFC 7541 §6.2.3). Indexed, such a value went into the app's dynamic table where
/// nothing would ever refer to it again: about fifty of them filled its 4 KiB and evicted the
/// entries that do repeat (forwarding headers, user agent, authority), which then went out
/// whole again, and both sides paid for each insertion and eviction, about 2.7k
/// instructions per request and id in the proxy (`tests/http2_request_id.rs`). One pass
/// over the names, not a lookup per name: most requests carry none of them.
fn never_index_ids(headers: &mut http::HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if matches!(
            name.as_str(),
            "x-request-id"
                | "traceparent"
                | "b3"
                | "x-b3-traceid"
                | "x-b3-spanid"
                | "x-b3-parentspanid"
                | "x-amzn-trace-id"
                | "x-cloud-trace-context"
                | "uber-trace-id"
                | "sentry-trace"
        ) {
            value.set_sensitive(true);
        }
    }
}

/// A gRPC call's deadline from its `grpc-timeout` header: up to 8 digits and a unit (`H`,
/// `M`, `S`, `m`, `u`, `n`); `None` when there is none or it is malformed.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    // A constant: looked up by a `&str`, the name would be parsed for every request.
    const GRPC_TIMEOUT: header::HeaderName = header::HeaderName::from_static("grpc-timeout");
    let raw = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = raw.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether the request was not processed: hyper never sent it (the connection closed
/// first, while the request waited in its queue or for a stream to open; hyper's own pool
/// sends such requests again), or the server refused its stream, or a graceful GOAWAY
/// (NO_ERROR) stopped below it. A GOAWAY for an error is not taken as such: h2 fails every
/// stream with it, processed or not.
fn unprocessed(e: &hyper::Error) -> bool {
    // "Dispatch gone" has no accessor of its own: over HTTP/2 it is a request still queued
    // in the connection's task when that task ended (a sent one's answer is awaited by a
    // task of its own, and fails with the connection's error instead).
    if e.is_canceled() || (e.is_user() && e.to_string().starts_with("dispatch task is gone")) {
        return true;
    }
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    h2.is_remote()
        && match h2.reason() {
            Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
            Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
            _ => false,
        }
}

/// The most of a request body kept for sending it again: a gRPC unary call or a form fits,
/// an upload does not, and is not sent again.
const REPLAY_MAX: usize = 64 * 1024;

/// A request kept for sending again: its head, and its body as hyper hands it back when it
/// drops it (what was sent of it, and the rest).
struct Replay {
    head: Request<()>,
    handed_back: oneshot::Receiver<(Vec<Frame<Bytes>>, Body)>,
}

/// A request for hyper, what says when its body has ended, and what it takes to send it again.
type Prepared = (Request<Ending>, Option<Arc<Notify>>, Replay);

impl Replay {
    /// The request for hyper, keeping what it takes to send it again.
    fn prepare(parts: http::request::Parts, body: Body) -> Prepared {
        let (back, handed_back) = oneshot::channel();
        let replay = Replay {
            head: Request::from_parts(parts.clone(), ()),
            handed_back,
        };
        let (req, ended) = Ending::new(parts, body, back);
        (req, ended, replay)
    }

    /// The request again, or `None` when its body was too large to keep, or hyper has not let
    /// go of it within a second (it drops a refused stream's body as soon as it sees the
    /// refusal).
    async fn request(self) -> Option<Prepared> {
        let waited = tokio::time::timeout(std::time::Duration::from_secs(1), self.handed_back);
        let (sent, rest) = waited.await.ok()?.ok()?;
        let body = body::boxed(Replayed {
            sent: sent.into_iter(),
            rest,
        });
        let (parts, ()) = self.head.into_parts();
        Some(Self::prepare(parts, body))
    }
}

/// A body sent again: the frames kept, then whatever had not been read yet.
struct Replayed {
    sent: std::vec::IntoIter<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.sent.next() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.sent.len() == 0 && self.rest.is_end_stream()
    }
}

/// An HTTP/2 exchange that failed, in words that say what was tried and why: a server that
/// speaks only HTTP/1.1 fails this way.
fn failed(e: &hyper::Error) -> SendError {
    use std::error::Error as _;
    let mut detail = e.to_string();
    if let Some(cause) = e.source() {
        detail = format!("{detail}: {cause}");
    }
    SendError::Failed(format!(
        "HTTP/2 exchange failed: {detail} (sent in HTTP/2 because the client spoke HTTP/2 to this destination)"
    ))
}

/// `exchange`'s outcome, or `None` when it took longer than `timeout` from the end of the
/// request body (`ended` is notified then; `None` when there was no body to wait for).
async fn within<F: std::future::Future>(
    exchange: F,
    ended: Option<&Notify>,
    timeout: std::time::Duration,
) -> Option<F::Output> {
    tokio::pin!(exchange);
    if let Some(ended) = ended {
        tokio::select! {
            r = &mut exchange => return Some(r),
            () = ended.notified() => {}
        }
    }
    tokio::time::timeout(timeout, exchange).await.ok()
}

/// A response body that holds its stream's place in the count until it ends.
struct Held {
    inner: hyper::body::Incoming,
    _stream: Stream,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that says when it has ended (see [`within`]), and keeps what it passed on
/// (up to [`REPLAY_MAX`]) to hand back with the rest when hyper drops it, for a [`Replay`].
pub(super) struct Ending {
    inner: Body,
    ended: Option<Arc<Notify>>,
    sent: Vec<Frame<Bytes>>,
    sent_bytes: usize,
    back: Option<oneshot::Sender<(Vec<Frame<Bytes>>, Body)>>,
}

impl Ending {
    /// The request for hyper, and what says when its body has ended (`None` when it has no
    /// body still to come: the response clock starts at once).
    fn new(
        parts: http::request::Parts,
        body: Body,
        back: oneshot::Sender<(Vec<Frame<Bytes>>, Body)>,
    ) -> (Request<Ending>, Option<Arc<Notify>>) {
        let ended = (!http_body::Body::is_end_stream(&body)).then(|| Arc::new(Notify::new()));
        let ending = Ending {
            inner: body,
            ended: ended.clone(),
            sent: Vec::new(),
            sent_bytes: 0,
            back: Some(back),
        };
        (Request::from_parts(parts, ending), ended)
    }

    /// Keeps a copy of a frame passed on (the data shared, not copied), while the body
    /// stays within [`REPLAY_MAX`] and the request may still be sent again; past either,
    /// nothing is kept (what was is let go) and nothing handed back. A client-streaming call
    /// whose response has begun keeps nothing for the rest of its life.
    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(back) = &self.back else {
            return;
        };
        if back.is_closed() {
            self.back = None;
            self.sent = Vec::new();
            return;
        }
        if let Some(data) = frame.data_ref() {
            self.sent_bytes += data.len();
            if self.sent_bytes > REPLAY_MAX {
                self.back = None;
                self.sent = Vec::new();
                return;
            }
            self.sent.push(Frame::data(data.clone()));
        } else if let Some(trailers) = frame.trailers_ref() {
            self.sent.push(Frame::trailers(trailers.clone()));
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Some(back) = self.back.take() {
            // Nobody waits once the response has come: then this is dropped unread.
            let rest = std::mem::replace(&mut self.inner, body::empty());
            let _ = back.send((std::mem::take(&mut self.sent), rest));
        }
    }
}

impl http_body::Body for Ending {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.keep(frame);
        }
        let over = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if over {
            if let Some(ended) = self.ended.take() {
                // Stored if nobody waits yet: `within` sees it when it gets there.
                ended.notify_one();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    /// Two data frames, as a client sends a body in pieces.
    fn two_pieces(a: &'static str, b: &'static str) -> Body {
        let frames: [Result<Frame<Bytes>, BoxError>; 2] = [
            Ok(Frame::data(Bytes::from(a))),
            Ok(Frame::data(Bytes::from(b))),
        ];
        body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    /// Reads `n` frames of the request's body, as hyper does, then drops it.
    async fn send_part(req: Request<Ending>, n: usize) {
        let mut body = req.into_body();
        for _ in 0..n {
            body.frame().await.unwrap().unwrap();
        }
    }

    #[test]
    fn grpc_deadlines_are_read_as_grpc_writes_them() {
        use std::time::Duration;
        let t = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", http::HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(t("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(t("250u"), Some(Duration::from_micros(250)));
        assert_eq!(t("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10 S", "10"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    /// An HTTP/2 app that answers every stream with `ok`, and counts its connections.
    async fn h2_app() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let ok = hyper::service::service_fn(|_| async {
                    let body = http_body_util::Full::new(Bytes::from_static(b"ok"));
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), ok);
                tokio::spawn(conn);
            }
        });
        (addr, conns)
    }

    /// Each worker sends its streams on an HTTP/2 connection of its own, whose task runs on
    /// that worker, and keeps using it; a stream on another worker's connection would be
    /// handed between threads both ways.
    #[tokio::test]
    async fn each_worker_sends_on_an_http2_connection_of_its_own() {
        use std::time::Duration;
        let (addr, conns) = h2_app().await;
        let sizes = (super::super::MAX_IDLE_TOTAL, 2);
        let pool = Upstreams::with_options(Duration::from_secs(2), None, None, IDLE_TIMEOUT, sizes);
        let get = move || {
            Request::get(format!("http://{addr}/"))
                .body(body::empty())
                .unwrap()
        };
        let second = Duration::from_secs(5);
        let (sent, status) = oneshot::channel();
        let (end, ended) = oneshot::channel::<()>();
        let w1_pool = pool.clone();
        let worker1 = crate::workers::run_as_worker(1, async move {
            let resp = w1_pool.send_h2(addr, get(), second).await;
            sent.send(resp.map(|r| r.status())).unwrap();
            let _ = ended.await;
        });
        assert_eq!(status.await.unwrap().unwrap(), 200);
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        for round in 0..2 {
            let resp = pool.send_h2(addr, get(), second).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(
                conns.load(Ordering::SeqCst),
                2,
                "round {round}: worker 0 did not send on a connection of its own"
            );
        }
        end.send(()).unwrap();
        worker1.join().unwrap();
    }

    #[tokio::test]
    async fn a_body_is_kept_for_a_replay_only_while_one_may_come() {
        let parts = || {
            Request::post("http://app.test/")
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        // Half sent, then dropped (a refused stream): the piece sent and the rest come back.
        let (back, handed_back) = oneshot::channel();
        let (req, _) = Ending::new(parts(), two_pieces("sent ", "rest"), back);
        send_part(req, 1).await;
        let (sent, rest) = handed_back.await.unwrap();
        let mut replayed = body::boxed(Replayed {
            sent: sent.into_iter(),
            rest,
        });
        let mut all = Vec::new();
        while let Some(frame) = replayed.frame().await {
            all.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(all, b"sent rest");

        // The response has come (nobody waits to send it again): nothing is kept.
        let (back, handed_back) = oneshot::channel();
        let (mut req, _) = Ending::new(parts(), two_pieces("a", "b"), back);
        drop(handed_back);
        req.body_mut().frame().await.unwrap().unwrap();
        assert!(req.body().sent.is_empty() && req.body().back.is_none());

        // Past the limit: nothing is kept, nothing handed back.
        let big = Box::leak(vec![b'x'; REPLAY_MAX].into_boxed_slice());
        let big: &'static str = std::str::from_utf8(big).unwrap();
        let (back, handed_back) = oneshot::channel();
        let (req, _) = Ending::new(parts(), two_pieces(big, "y"), back);
        send_part(req, 2).await;
        assert!(handed_back.await.is_err());
    }
}
