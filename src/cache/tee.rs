//! A body that streams to the client while keeping a copy (up to a limit) for storage.
//!
//! When the body completes within the limit, the store operation runs before the body
//! reports its end, so the next request already finds the response stored. If the body
//! is dropped while that store is still running, it is finished in the background.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// Called once: with the whole body when it completed within the limit (returning the
/// store operation to run), or with `None` when it did not.
pub type OnDone = Box<dyn FnOnce(Option<Bytes>) -> Option<BoxFuture<'static, ()>> + Send>;

/// Streams `inner` through unchanged, copying its data while it stays under `limit`.
pub struct TeeBody {
    inner: Body,
    buf: Option<BytesMut>,
    limit: usize,
    on_done: Option<OnDone>,
    storing: Option<BoxFuture<'static, ()>>,
}

impl TeeBody {
    /// Wraps `inner`; `on_done` runs when the body ends, fails, or is dropped.
    pub fn new(inner: Body, limit: usize, on_done: OnDone) -> Self {
        let mut tee = TeeBody {
            inner,
            buf: Some(BytesMut::new()),
            limit,
            on_done: Some(on_done),
            storing: None,
        };
        // An empty body may never be polled for data.
        if tee.inner.is_end_stream() {
            tee.finish(true);
        }
        tee
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.on_done.take() {
            let body = if complete {
                self.buf.take().map(BytesMut::freeze)
            } else {
                None
            };
            self.storing = done(body);
        }
    }

    fn poll_storing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(fut) = self.storing.as_mut() {
            if fut.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.storing = None;
        }
        Poll::Ready(())
    }
}

impl HttpBody for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.on_done.is_none() && this.storing.is_some() {
            return this.poll_storing(cx).map(|()| None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let over = this
                        .buf
                        .as_ref()
                        .is_some_and(|b| b.len() + data.len() > this.limit);
                    if over {
                        // Too large to store: stop copying, keep streaming.
                        this.buf = None;
                        this.finish(false);
                    } else if let Some(buf) = this.buf.as_mut() {
                        buf.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                this.poll_storing(cx).map(|()| None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.on_done.is_none() && self.storing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // A client that went away mid-body leaves an incomplete copy: never store it.
        self.finish(false);
        // A complete copy still being stored is finished in the background.
        if let (Some(fut), Ok(rt)) = (self.storing.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(fut);
        }
    }
}
