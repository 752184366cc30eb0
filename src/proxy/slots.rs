//! `clients.max_connections`: how many client connections each listener holds at once.
//!
//! An app in a loop (or a flood from outside the pod) can open connections until the process
//! runs out of memory or descriptors, and then every other connection fails with it: the
//! inbound side, the admin port, certificate renewal. Each listener therefore counts its own
//! connections, and one over the limit is closed as soon as it is accepted (Envoy's listener
//! connection limit, HAProxy's `maxconn`), counted in `outrider_connections_overflow_total`
//! and warned about once per episode. The other listener keeps serving: an outbound flood
//! does not take the inbound side down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::episode::{Episode, Tell};

/// Which listener a client connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The outbound listener (explicit and transparent).
    Outbound,
    /// The inbound listener.
    Inbound,
}

impl Listener {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
        }
    }
}

/// The open connections of both listeners, and the limit (0: none), which a reload may change.
#[derive(Debug, Default)]
pub struct Slots {
    max: AtomicUsize,
    outbound: Arc<AtomicUsize>,
    inbound: Arc<AtomicUsize>,
}

/// One open client connection; its slot is given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slots {
    /// Counters at zero, with `max` connections per listener (0: no limit).
    pub fn new(max: usize) -> Self {
        let slots = Self::default();
        slots.set_max(max);
        slots
    }

    /// Applies a reloaded `clients.max_connections`; connections already open stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn counter(&self, listener: Listener) -> &Arc<AtomicUsize> {
        match listener {
            Listener::Outbound => &self.outbound,
            Listener::Inbound => &self.inbound,
        }
    }

    /// A slot for a connection just accepted, or `None` when the listener is full.
    pub fn take(&self, listener: Listener) -> Option<Slot> {
        let counter = self.counter(listener);
        let max = self.max.load(Ordering::Relaxed);
        if counter.fetch_add(1, Ordering::Relaxed) >= max && max != 0 {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(counter.clone()))
    }

    /// A slot for a connection that lives on in a task of its own after the one it came in
    /// on ended (a `CONNECT` tunnel, an upgraded connection): it holds the client's socket
    /// still, so it counts, but it was already admitted, so it is never refused.
    pub fn continued(&self, listener: Listener) -> Slot {
        let counter = self.counter(listener);
        counter.fetch_add(1, Ordering::Relaxed);
        Slot(counter.clone())
    }

    /// Connections open on `listener` now.
    pub fn open(&self, listener: Listener) -> usize {
        self.counter(listener).load(Ordering::Relaxed)
    }
}

/// The warnings of one listener's overflow episodes (see [`crate::episode`]): not a line per
/// refused connection, which a flood would turn into a second flood.
pub struct Overflow {
    listener: Listener,
    counter: metrics::Counter,
    episode: Episode,
}

impl Overflow {
    /// The reporter for `listener`.
    pub fn new(listener: Listener) -> Self {
        Self {
            listener,
            counter: metrics::counter!("outrider_connections_overflow_total", "listener" => listener.name()),
            episode: Episode::default(),
        }
    }

    /// A connection was closed because the listener was full (`open` connections).
    pub fn refused(&mut self, open: usize) {
        self.counter.increment(1);
        let listener = self.listener.name();
        match self.episode.hit(1) {
            Tell::Begins => tracing::warn!(
                listener,
                open,
                "clients.max_connections reached: new connections are closed until some end"
            ),
            Tell::Lasts(refused) => {
                tracing::warn!(listener, open, refused, "still at clients.max_connections");
            }
            Tell::Nothing => {}
        }
    }

    /// A connection was accepted: ends an episode, if one was going on.
    pub fn accepted(&mut self) {
        if let Some(refused) = self.episode.end() {
            tracing::info!(
                listener = self.listener.name(),
                refused,
                "accepting connections again after clients.max_connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_listener_counts_its_own_and_a_full_one_refuses() {
        let slots = Slots::new(2);
        let a = slots.take(Listener::Outbound).unwrap();
        let _b = slots.take(Listener::Outbound).unwrap();
        assert!(slots.take(Listener::Outbound).is_none());
        assert_eq!(
            slots.open(Listener::Outbound),
            2,
            "a refusal leaves no count"
        );
        // The other listener is not touched by the first one's flood.
        let _c = slots.take(Listener::Inbound).unwrap();
        // A tunnel that lives on is counted, never refused.
        let tunnel = slots.continued(Listener::Outbound);
        assert_eq!(slots.open(Listener::Outbound), 3);
        drop(tunnel);
        drop(a);
        assert!(slots.take(Listener::Outbound).is_some());
        // Raised by a reload, or lifted (0).
        slots.set_max(0);
        let many: Vec<_> = (0..100)
            .map(|_| slots.take(Listener::Outbound).unwrap())
            .collect();
        assert_eq!(slots.open(Listener::Outbound), 101);
        drop(many);
        assert_eq!(slots.open(Listener::Outbound), 1);
    }
}
