//! Idle timeout for client connections, both protocols.
//!
//! hyper's HTTP/2 server has no idle timer, so a client could hold any number of quiet
//! connections open forever; its HTTP/1 header-read timer costs a fresh timer per request.
//! [`Idle`] counts what is in flight on a connection (a request being answered, a response
//! body being sent) and [`Idle::expired`] resolves once nothing has been for the timeout.
//! The caller then shuts an HTTP/2 connection down gracefully (GOAWAY) and closes an HTTP/1
//! one, which is between requests or part-way through a head that comes too slowly.
//! For HTTP/1 it also notes what `keepalive` needs to tell when hyper can be stopped between
//! requests: how many have begun, whether bytes were read, whether writes were flushed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// What is in flight on one connection, and when it last changed (plus `keepalive`'s notes).
#[derive(Clone)]
pub struct Idle {
    shared: Arc<Shared>,
}

struct Shared {
    /// Requests being answered plus response bodies being sent.
    active: AtomicUsize,
    /// When the last request or response body ended, in ms since `start`.
    quiet_since_ms: AtomicU64,
    /// Requests begun on the connection.
    begun: AtomicU64,
    /// Everything written to the client has been flushed (see `keepalive`).
    flushed: AtomicBool,
    /// Bytes were read from the client since `keepalive` last cleared this.
    read: AtomicBool,
    /// The service has answered a request, and the answer's first write has not been
    /// made yet: it waits for the worker's pass to end (see `keepalive::ConnIo`). Set on
    /// HTTP/2 connections too, where nothing reads it (their writes are `corked`'s).
    answered: AtomicBool,
    /// The idle timeout in whole seconds, for `Keep-Alive: timeout=N`; 0: not sent. Here, not
    /// in [`Tracked`], which every connection's task holds (see `proxy::tests`).
    hint_secs: AtomicU32,
    start: Instant,
}

impl Idle {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                active: AtomicUsize::new(0),
                quiet_since_ms: AtomicU64::new(0),
                begun: AtomicU64::new(0),
                flushed: AtomicBool::new(true),
                read: AtomicBool::new(false),
                answered: AtomicBool::new(false),
                hint_secs: AtomicU32::new(0),
                start: Instant::now(),
            }),
        }
    }

    /// Resolves once nothing has been in flight for `timeout`.
    pub async fn expired(&self, timeout: Duration) {
        loop {
            match self.quiet_until(timeout) {
                Some(at) if at <= Instant::now() => return,
                Some(at) => tokio::time::sleep_until(at).await,
                // Busy: look again a timeout from now; an end before then moves the deadline.
                None => tokio::time::sleep(timeout).await,
            }
        }
    }

    /// When the connection will have been quiet for `timeout`; `None` while it is busy.
    pub(super) fn quiet_until(&self, timeout: Duration) -> Option<Instant> {
        let s = &self.shared;
        let quiet = Duration::from_millis(s.quiet_since_ms.load(Ordering::Acquire));
        (s.active.load(Ordering::Acquire) == 0).then(|| s.start + quiet + timeout)
    }

    // Relaxed, below: these are written and read by the connection's own task only.

    /// Notes whether everything written to the client has been flushed.
    pub(super) fn set_flushed(&self, flushed: bool) {
        self.shared.flushed.store(flushed, Ordering::Relaxed);
    }

    /// Whether everything written to the client has been flushed.
    pub(super) fn flushed(&self) -> bool {
        self.shared.flushed.load(Ordering::Relaxed)
    }

    /// Notes whether bytes were read from the client (since the caller last cleared it).
    pub(super) fn set_read(&self, read: bool) {
        self.shared.read.store(read, Ordering::Relaxed);
    }

    /// Whether bytes were read from the client since [`Idle::set_read`] last cleared it.
    pub(super) fn has_read(&self) -> bool {
        self.shared.read.load(Ordering::Relaxed)
    }

    /// Whether the service has answered since this was last asked; clears it.
    pub(super) fn take_answered(&self) -> bool {
        let answered = self.shared.answered.load(Ordering::Relaxed);
        if answered {
            self.shared.answered.store(false, Ordering::Relaxed);
        }
        answered
    }

    /// How many requests have begun on the connection.
    pub(super) fn begun(&self) -> u64 {
        self.shared.begun.load(Ordering::Relaxed)
    }

    /// Stops the `Keep-Alive` hint on responses not yet answered: called as the connection
    /// is drained, when hyper closes it after the request in flight (`Connection: close`).
    pub(super) fn stop_keep_alive_hint(&self) {
        self.shared.hint_secs.store(0, Ordering::Relaxed);
    }

    /// Counts one unit of work until the returned guard is dropped.
    fn begin(&self) -> Active {
        self.shared.begun.fetch_add(1, Ordering::Relaxed);
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        Active(self.shared.clone())
    }
}

/// One request or response body in flight; its drop records when it ended.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The time first: a watcher that sees the count reach zero must see this end.
        self.0.quiet_since_ms.fetch_max(ms, Ordering::AcqRel);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service wrapper that counts each request, and its response body, as activity, and
/// on HTTP/1.1 says how long the connection is kept idle.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    idle: Idle,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, idle: Idle) -> Self {
        Self { inner, idle }
    }

    /// Answers HTTP/1.1 requests that keep their connection with `Keep-Alive: timeout=N`,
    /// N the idle timeout in whole seconds (none under one second). A client that knows when
    /// an idle connection will be closed lets it go first, rather than send a request on it
    /// as it closes, which loses a request that cannot be repeated (a POST). Node's and
    /// undici's agents, Java's `HttpURLConnection` and Apache HttpClient go by it, and so
    /// does Outrider's own pool, so a sidecar calling another learns its idle timeout.
    pub fn with_keep_alive_hint(self, idle_timeout: Duration) -> Self {
        let secs = u32::try_from(idle_timeout.as_secs()).unwrap_or(u32::MAX);
        self.idle.shared.hint_secs.store(secs, Ordering::Relaxed);
        self
    }
}

impl<S, T, B> hyper::service::Service<http::Request<T>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<T>, Response = http::Response<B>>,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: http::Request<T>) -> Self::Future {
        // hyper closes the connection after a 1.0 request or one with `Connection: close`.
        // (Also after a head with both framings, RFC 9112 §6.3, but hyper takes the
        // `Content-Length` out before the request gets here, so that answer still carries
        // the hint beside `Connection: close`.)
        let keeps = req.version() == http::Version::HTTP_11
            && !crate::net::upstream::has_token(req.headers(), http::header::CONNECTION, "close");
        TrackedFuture {
            active: Some(self.idle.begin()),
            answer: self.inner.call(req),
            keeps,
        }
    }
}

/// A constant, so that the name is checked when compiling, not on each response.
const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");

/// `timeout=N`, made once per thread for the N in use, not once per response.
fn keep_alive_value(secs: u32) -> http::HeaderValue {
    thread_local! {
        static MADE: std::cell::RefCell<Option<(u32, http::HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    MADE.with_borrow_mut(|made| match made {
        Some((n, v)) if *n == secs => v.clone(),
        _ => {
            // Digits and `timeout=` only: always a valid value.
            let v = http::HeaderValue::try_from(format!("timeout={secs}"))
                .unwrap_or_else(|_| http::HeaderValue::from_static("timeout=0"));
            *made = Some((secs, v.clone()));
            v
        }
    })
}

pin_project_lite::pin_project! {
    /// The answer to one request, counted as busy until it comes; then its body is.
    pub struct TrackedFuture<F> {
        #[pin]
        answer: F,
        active: Option<Active>,
        // Whether hyper keeps the connection after this request, as far as the request says.
        keeps: bool,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.answer.poll(cx))?;
        // Read now, not when the request came: a drain since then stops the hint, as hyper
        // answers `Connection: close`. Not on a protocol switch: the connection is no
        // longer HTTP's.
        let hint_secs = match this.active {
            Some(active) if *this.keeps => active.0.hint_secs.load(Ordering::Relaxed),
            _ => 0,
        };
        if hint_secs > 0 && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            res.headers_mut()
                .insert(KEEP_ALIVE, keep_alive_value(hint_secs));
        }
        // The same unit of work goes on with the body, until hyper drops it.
        let active = this.active.take();
        if let Some(active) = &active {
            active.0.answered.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(res.map(|body| TrackedBody {
            body,
            _active: active,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection counted as busy while it is sent.
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        _active: Option<Active>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_the_last_activity_ends() {
        let idle = Idle::new();
        let timeout = Duration::from_secs(30);
        let watch = idle.clone();
        let expired = tokio::spawn(async move {
            watch.expired(timeout).await;
            Instant::now()
        });
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let busy = idle.begin();
        // Held well past the first deadline: a long response body keeps it open.
        tokio::time::sleep(Duration::from_secs(100)).await;
        drop(busy);
        let at = expired.await.unwrap();
        assert_eq!(at.duration_since(start), Duration::from_secs(140));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_expires_after_the_timeout() {
        let idle = Idle::new();
        let start = Instant::now();
        idle.expired(Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
