//! The one HTTP body type that flows through the proxy, so that every phase
//! (forward, cache, error responses) can hand bodies to the next without generics.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Any error a body can fail with while streaming.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body: `Send` but not `Sync`, which is what hyper needs and what
/// lets an upstream `Incoming` be passed through without buffering.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body held whole in memory (error pages, cached objects).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A client's request body for the upstream hop, counting bytes from the client into
/// `counter`, and failing with [`BodyIdle`] when none of it arrives for `idle` (see
/// [`IdleLimited`]; HTTP/1 only, the client's `version` says). A body that is already over
/// (most requests have none) is not boxed.
pub fn request_body<B>(
    incoming: B,
    counter: std::sync::Arc<crate::access_log::Bytes>,
    version: http::Version,
    idle: std::time::Duration,
) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    if incoming.is_end_stream() {
        return empty();
    }
    match body_idle_limit(version, idle) {
        Some(limit) => boxed(Counted::new(
            IdleLimited::new(incoming, limit),
            counter,
            false,
            None,
        )),
        None => boxed(Counted::new(incoming, counter, false, None)),
    }
}

/// The pause limit for a client's request body: `idle` for HTTP/1, none for HTTP/2. An
/// HTTP/1 body ties up a connection each way until it ends, and the upstream answers only
/// once it has; an HTTP/2 stream is held in check by flow control and the connection's
/// stream limit, and a gRPC streaming call may rightly pause for longer than any idle
/// timeout.
fn body_idle_limit(
    version: http::Version,
    idle: std::time::Duration,
) -> Option<std::time::Duration> {
    (version != http::Version::HTTP_2).then_some(idle)
}

/// A request body that stopped arriving: no byte of it for this long.
#[derive(Debug, thiserror::Error)]
#[error("no byte of the request body arrived for {0:?}")]
pub struct BodyIdle(pub std::time::Duration);

pin_project_lite::pin_project! {
    /// A client's request body that fails with [`BodyIdle`] once none of it has arrived for
    /// `limit`. Without it, a client that sent a head and part of a body, then nothing (a
    /// slow-body attack, or a client that hung), held its connection and a connection to
    /// the upstream for as long as it liked: the idle timeout covers a connection between
    /// requests, and the response timeout starts when the body has ended. nginx's
    /// `client_body_timeout` is the same guard.
    pub struct IdleLimited<B> {
        #[pin]
        inner: B,
        limit: std::time::Duration,
        // Armed the first time the body waits (a body that arrives with its head never
        // needs one), and pushed back after the body has moved on since.
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        moved: bool,
    }
}

impl<B> IdleLimited<B> {
    /// Wraps `inner`, failing it after `limit` without a byte.
    pub fn new(inner: B, limit: std::time::Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            moved: false,
        }
    }
}

impl<B> http_body::Body for IdleLimited<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.moved = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = *this.limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if std::mem::take(this.moved) {
                    timer.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// Passes a body through while counting its data bytes, and keeps the request's log
    /// guard alive until the body is finished or dropped: that is how a request's record is
    /// written when its response has really ended, or noted as cut off when it did not.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        counter: std::sync::Arc<crate::access_log::Bytes>,
        outbound: bool,
        guard: Option<Box<crate::access_log::LogGuard>>,
    }
}

impl<B: http_body::Body> Counted<B> {
    /// Counts into `counter.outbound` (to the client) or `counter.inbound` (from it).
    pub fn new(
        inner: B,
        counter: std::sync::Arc<crate::access_log::Bytes>,
        outbound: bool,
        guard: Option<Box<crate::access_log::LogGuard>>,
    ) -> Self {
        let mut guard = guard;
        if let Some(g) = guard.as_mut() {
            // A body that is over before it starts (HEAD, 204, 304, an empty 200, a gRPC
            // trailers-only answer) is never polled: hyper sends the head alone. It is
            // complete, not cut off.
            g.response_complete = Some(inner.is_end_stream());
        }
        Self {
            inner,
            counter,
            outbound,
            guard,
        }
    }
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    let c = if *this.outbound {
                        &this.counter.outbound
                    } else {
                        &this.counter.inbound
                    };
                    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                // A body of known length ends with its last byte; hyper may never poll for
                // the end after that, so don't mistake it for a cut-off one.
                if inner.is_end_stream() {
                    if let Some(g) = this.guard.as_mut() {
                        g.response_complete = Some(true);
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(g) = this.guard.as_mut() {
                    g.fail(format!("upstream body failed: {e}"));
                }
            }
            Poll::Ready(None) => {
                // Finished: write the record now rather than when hyper drops the body.
                if let Some(mut g) = this.guard.take() {
                    g.response_complete = Some(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
