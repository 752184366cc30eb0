//! Futures that a connection's task polls only when their own waker has fired.
//!
//! A client connection's task waits on hyper and, beside it, on things that rarely happen:
//! a drain, a park or idle timer. A `select!` polls every branch on every wakeup, and the
//! connection wakes once or twice per request for hyper. Polling the drain costs the
//! cancellation token's mutex and its `Notify`'s waiter-list lock, and a timer re-registers
//! its waker: together about 4.6 % of the proxy's user time on the inbound path, for
//! futures that were never woken. [`Aside`] gives them a waker of their own and skips
//! them until it fires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// The waker handed to the futures set aside: notes that they were woken, and wakes the
/// task that polls them.
struct Flag {
    woken: AtomicBool,
    /// The task's waker. A mutex, not an atomic slot: it is written once per task (or when
    /// the task's waker changes) and read only on a wake, which is rare.
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before the task is woken, so that its next poll sees it.
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Polls a group of futures only when one of them has woken (and on the first poll).
pub(super) struct Aside {
    flag: Arc<Flag>,
    /// `flag` as a waker, made once.
    own: Waker,
    /// The task waker last stored in `flag`, to store it again only when it changes.
    task: Option<Waker>,
}

impl Aside {
    pub(super) fn new() -> Self {
        let flag = Arc::new(Flag {
            // The first poll runs, so that the futures register `own`.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Self {
            own: Waker::from(flag.clone()),
            flag,
            task: None,
        }
    }

    /// Runs `poll` (which polls the futures set aside, with a context whose waker is this
    /// one's) if they were woken since it last ran; `Pending` otherwise.
    pub(super) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let mut task = self
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *task = Some(cx.waker().clone());
            self.task = Some(cx.waker().clone());
        }
        // A plain load first: on the hot path nothing was woken, and a read-modify-write
        // would cost a locked instruction per poll.
        if !self.flag.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Cleared before polling (a full barrier): a wake from here on comes after the
        // futures' state is read, and sets the flag again for the next poll.
        self.flag.woken.swap(false, Ordering::AcqRel);
        poll(&mut Context::from_waker(&self.own))
    }

    /// Makes the next [`Aside::poll`] run. For a future changed by its owner rather than
    /// woken: a timer that fired and was reset has no waker until it is polled again.
    pub(super) fn rearm(&self) {
        self.flag.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use tokio_util::sync::CancellationToken;

    /// A future that counts its polls and is never ready.
    struct Counted<'a>(&'a AtomicUsize);

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[test]
    fn futures_set_aside_are_polled_once_until_woken() {
        let polls = AtomicUsize::new(0);
        let mut counted = pin!(Counted(&polls));
        let mut aside = Aside::new();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            assert!(aside
                .poll(&mut cx, |cx| counted.as_mut().poll(cx))
                .is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        aside.rearm();
        assert!(aside
            .poll(&mut cx, |cx| counted.as_mut().poll(cx))
            .is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    /// The case it is for: a drain, polled once, is seen as soon as the token is
    /// cancelled, and the task that polls it is woken for it.
    #[tokio::test]
    async fn a_drain_set_aside_wakes_the_task_and_is_seen() {
        let token = CancellationToken::new();
        let mut drain = Box::pin(token.clone().cancelled_owned());
        let mut aside = Aside::new();
        let polls = Arc::new(AtomicUsize::new(0));
        let task = {
            let polls = polls.clone();
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::Relaxed);
                aside.poll(cx, |cx| drain.as_mut().poll(cx))
            })
        };
        let task = tokio::spawn(task);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the drain woke the task")
            .expect("the task did not panic");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
