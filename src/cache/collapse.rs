//! Request collapsing: concurrent misses for one URL wait for the first one (the
//! leader) instead of all going upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// URLs with a fetch in flight.
#[derive(Default)]
pub struct Collapser {
    inflight: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// What a request should do about an in-flight fetch.
pub enum Role {
    /// No fetch in flight: this request fetches; dropping the guard releases the others.
    Leader(LeaderGuard),
    /// Another request is fetching: wait on it.
    Follower(Waiter),
}

/// Held by the leader until the response is stored or known not to be.
pub struct LeaderGuard {
    key: String,
    collapser: Arc<Collapser>,
    _done: watch::Sender<()>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.collapser
            .inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
        // Dropping `_done` wakes every waiter.
    }
}

/// A follower's handle on the leader's fetch.
pub struct Waiter(watch::Receiver<()>);

impl Waiter {
    /// Resolves when the leader is done (stored, found uncacheable, or failed).
    pub async fn wait(mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

impl Collapser {
    /// Becomes the leader for `key`, or a follower of the current leader.
    pub fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut map = self
            .inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(rx) = map.get(key) {
            return Role::Follower(Waiter(rx.clone()));
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.to_string(), rx);
        Role::Leader(LeaderGuard {
            key: key.to_string(),
            collapser: Arc::clone(self),
            _done: tx,
        })
    }
}
