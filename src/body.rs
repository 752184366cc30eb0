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

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// Passes a body through while counting its data bytes, and keeps `guard` alive until the
    /// body is finished or dropped: that is how a request's log record is written when its
    /// response has really ended (or was cut off).
    pub struct Counted<B, G> {
        #[pin]
        inner: B,
        counter: std::sync::Arc<crate::access_log::Bytes>,
        outbound: bool,
        guard: Option<G>,
    }
}

impl<B, G> Counted<B, G> {
    /// Counts into `counter.outbound` (to the client) or `counter.inbound` (from it).
    pub fn new(
        inner: B,
        counter: std::sync::Arc<crate::access_log::Bytes>,
        outbound: bool,
        guard: Option<G>,
    ) -> Self {
        Self {
            inner,
            counter,
            outbound,
            guard,
        }
    }
}

impl<B, G> http_body::Body for Counted<B, G>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                let c = if *this.outbound {
                    &this.counter.outbound
                } else {
                    &this.counter.inbound
                };
                c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let std::task::Poll::Ready(None) = &polled {
            // Finished: write the record now rather than when hyper drops the body.
            this.guard.take();
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
