//! Protocol switches (`CONNECT`, WebSocket) on a client connection: the service asks for
//! the client's side with [`on`] and gets it, as a [`ClientIo`], once the `101` (or the
//! `2xx` to a `CONNECT`) has gone out.
//!
//! hyper hands the connection over itself only from its `with_upgrades` connection, which
//! never gives its IO back otherwise. An HTTP/1 client connection is served instead by
//! [`super::keepalive`], which takes the IO back from hyper to park a quiet connection, and
//! which does the hand-over: [`Switching`] gives each request that may switch a slot,
//! notes whether its response switched, and the loop fills the slot. HTTP/2 (and a
//! connection whose protocol detection did not settle) still goes through hyper's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// A byte stream both ways.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The client's side of a switched connection: the bytes it sent after the switch come
/// first.
pub type ClientIo = Box<dyn Io>;

/// Waits for the client's side of a protocol switch (see [`on`]).
pub enum OnUpgrade {
    /// Handed over by the keep-alive loop.
    Slot(oneshot::Receiver<ClientIo>),
    /// Handed over by hyper (HTTP/2, and connections served by hyper's auto server).
    Hyper(hyper::upgrade::OnUpgrade),
}

impl Future for OnUpgrade {
    type Output = Result<ClientIo, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            OnUpgrade::Slot(rx) => Pin::new(rx)
                .poll(cx)
                .map_err(|_| "the client connection was not handed over (it closed, or the response did not switch)".to_string()),
            OnUpgrade::Hyper(up) => Pin::new(up).poll(cx).map(|r| match r {
                Ok(up) => Ok(Box::new(hyper_util::rt::TokioIo::new(up)) as ClientIo),
                Err(e) => Err(e.to_string()),
            }),
        }
    }
}

/// The client's side of `req`'s protocol switch, once the response that switches has gone
/// out. Call it before the request is taken apart; the future fails if no switch happens.
pub fn on<B>(req: &mut http::Request<B>) -> OnUpgrade {
    let slot = req.extensions_mut().remove::<Slot>();
    match slot.and_then(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).take()) {
        Some(rx) => OnUpgrade::Slot(rx),
        None => OnUpgrade::Hyper(hyper::upgrade::on(req)),
    }
}

/// The receiving end of a request's hand-over, in its extensions until [`on`] takes it
/// (shared because extensions must be `Clone`).
#[derive(Clone)]
struct Slot(Arc<Mutex<Option<oneshot::Receiver<ClientIo>>>>);

/// What the loop learns from the requests on its connection.
#[derive(Default)]
pub(super) struct Handoff {
    /// Where the last request that may switch wants the connection.
    waiting: Mutex<Option<oneshot::Sender<ClientIo>>>,
    /// Its response switched: when hyper is done, the connection goes to `waiting`.
    switched: AtomicBool,
}

impl Handoff {
    /// The slot to fill, when a response switched the connection.
    pub(super) fn take_switch(&self) -> Option<Option<oneshot::Sender<ClientIo>>> {
        self.switched
            .swap(false, Ordering::AcqRel)
            .then(|| self.slot().take())
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<oneshot::Sender<ClientIo>>> {
        // Nothing runs with the lock held that could panic; a poisoned lock is still sound.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A service wrapper that gives each request that may switch protocols (as hyper judges:
/// a `CONNECT`, or an HTTP/1.1 `Upgrade`) a hand-over slot, and notes whether its response
/// switched.
pub(super) struct Switching<S> {
    pub(super) inner: S,
    pub(super) handoff: Arc<Handoff>,
}

impl<S, T, B> hyper::service::Service<http::Request<T>> for Switching<S>
where
    S: hyper::service::Service<http::Request<T>, Response = http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = SwitchingFuture<S::Future>;

    fn call(&self, mut req: http::Request<T>) -> Self::Future {
        // hyper marks the requests it would switch on with its own `OnUpgrade`; the others
        // (nearly all) pass with one lookup in an extension map that is empty.
        let watch = if req
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some()
        {
            let (tx, rx) = oneshot::channel();
            *self.handoff.slot() = Some(tx);
            req.extensions_mut()
                .insert(Slot(Arc::new(Mutex::new(Some(rx)))));
            Some((self.handoff.clone(), req.method() == http::Method::CONNECT))
        } else {
            None
        };
        SwitchingFuture {
            answer: self.inner.call(req),
            watch,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer to a request; for one that may switch, whether it did is noted.
    pub struct SwitchingFuture<F> {
        #[pin]
        answer: F,
        watch: Option<(Arc<Handoff>, bool)>,
    }
}

impl<F, B, E> Future for SwitchingFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.answer.poll(cx));
        if let Some((handoff, connect)) = this.watch.take() {
            // hyper's own rule for a response that switches.
            let switched = res.as_ref().is_ok_and(|r| {
                r.status() == http::StatusCode::SWITCHING_PROTOCOLS
                    || (connect && r.status().is_success())
            });
            if switched {
                handoff.switched.store(true, Ordering::Release);
            } else {
                // No switch: the waiting side learns so now, not when the connection ends.
                handoff.slot().take();
            }
        }
        Poll::Ready(res)
    }
}
