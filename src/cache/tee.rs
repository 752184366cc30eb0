//! A body that streams to the client while keeping a copy (up to a limit) for storage.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// Called once: with the whole body when it completed within the limit, else `None`.
pub type OnDone = Box<dyn FnOnce(Option<Bytes>) + Send>;

/// Streams `inner` through unchanged, copying its data while it stays under `limit`.
pub struct TeeBody {
    inner: Body,
    buf: Option<BytesMut>,
    limit: usize,
    on_done: Option<OnDone>,
}

impl TeeBody {
    /// Wraps `inner`; `on_done` runs when the body ends, fails, or is dropped.
    pub fn new(inner: Body, limit: usize, on_done: OnDone) -> Self {
        let mut tee = TeeBody {
            inner,
            buf: Some(BytesMut::new()),
            limit,
            on_done: Some(on_done),
        };
        // An empty body may never be polled (hyper checks `is_end_stream` first).
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
            done(body);
        }
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
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // A client that went away mid-body leaves an incomplete copy: never store it.
        self.finish(false);
    }
}
