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
/// `counter`. A body that is already over (most requests have none) is not boxed.
pub fn request_body<B>(incoming: B, counter: std::sync::Arc<crate::access_log::Bytes>) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    if incoming.is_end_stream() {
        return empty();
    }
    boxed(Counted::new(incoming, counter, false, None))
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
        guard: Option<crate::access_log::LogGuard>,
    }
}

impl<B: http_body::Body> Counted<B> {
    /// Counts into `counter.outbound` (to the client) or `counter.inbound` (from it).
    pub fn new(
        inner: B,
        counter: std::sync::Arc<crate::access_log::Bytes>,
        outbound: bool,
        guard: Option<crate::access_log::LogGuard>,
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
