//! The data path's threads. Each worker runs its own single-threaded tokio runtime and
//! accepts from every data-path listener (the same sockets, shared); a connection is served
//! to its end on one worker, with the upstream connections that worker opened (the pool is
//! sharded by worker, see `net::upstream`). This is how nginx, HAProxy and Envoy run: a
//! request's wakeups, timers and memory stay on one core.
//!
//! Which worker: the one that accepted it, unless another serves fewer connections, which
//! then gets it ([`Balance`]). Left to the accept race, the first connections of an idle
//! proxy all went to the same worker (the last to have polled the listener wakes first):
//! an app with four keep-alive connections used one core of two.
//!
//! One multi-threaded runtime, which every worker shares (one epoll, work stealing), cost
//! about a quarter more CPU per proxied request on a 2-core machine (README, Performance):
//! a socket's readiness reached whichever worker held the I/O driver, and its task was
//! handed over between threads. The caller's runtime keeps the control work (admin API,
//! signals, certificate renewal, sweeps).

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proxy::slots::{Listener, Slot};
use crate::proxy::{self, Inputs};
use crate::server::OrigDstFn;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker number, 0 outside the workers (tests, the control runtime).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Runs `task` as worker `i` does, on a thread and a current-thread runtime of its own,
/// until it ends: for tests of what each worker keeps.
#[cfg(test)]
#[expect(clippy::expect_used, reason = "a test helper")]
pub(crate) fn run_as_worker<F>(i: usize, task: F) -> std::thread::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        INDEX.set(i);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime")
            .block_on(task);
    })
}

/// What a worker needs once the server runs.
struct Go {
    /// How outbound connections learn their original destination (the test seam).
    orig_dst: Option<OrigDstFn>,
    /// Held while the worker accepts: dropped by every worker, the channel closes.
    accepting: mpsc::Sender<()>,
}

/// A worker's listeners, registered with its runtime.
struct Listeners {
    /// Outbound (explicit and transparent).
    outbound: Vec<TcpListener>,
    /// Inbound.
    inbound: Vec<TcpListener>,
}

/// How many connections each worker serves, and the way to hand one to another worker.
pub(crate) struct Balance {
    open: Box<[Arc<Count>]>,
    to: Box<[mpsc::UnboundedSender<Handoff>]>,
    /// Each listener kind's accept reports, told once for all workers.
    reports: [proxy::AcceptReports; 2],
}

/// One worker's count, on its own cache lines: each worker changes its own at every
/// connection.
#[repr(align(128))]
#[derive(Default)]
struct Count(AtomicUsize);

/// A connection accepted by one worker for another to serve, already counted as that
/// worker's.
struct Handoff {
    listener: Listener,
    stream: std::net::TcpStream,
    client: SocketAddr,
    held: Held,
}

/// What a connection's task holds until it ends: its slot, and its place in a worker's
/// count.
type Held = (Slot, Load);

impl Balance {
    /// The worker that should serve a connection `me` accepted: `me`, unless another
    /// serves fewer by more than a sixteenth (so that a busy, evenly loaded proxy does not
    /// pass connections back and forth for a difference of one or two).
    fn pick(&self, me: usize) -> usize {
        let load = |i: usize| self.open[i].0.load(Ordering::Relaxed);
        let mine = load(me);
        let (least, idlest) = (0..self.open.len())
            .map(|i| (load(i), i))
            .min()
            .unwrap_or((mine, me));
        if mine > least + mine / 16 {
            idlest
        } else {
            me
        }
    }
}

/// Held by a connection's task: one fewer for its worker when it ends. It holds that
/// worker's count alone, whose reference count changes only with that worker's
/// connections (and on a hand-over).
pub(crate) struct Load(Arc<Count>);

impl Load {
    /// One more for the worker whose count this is.
    fn on(count: &Arc<Count>) -> Load {
        count.0.fetch_add(1, Ordering::Relaxed);
        Load(count.clone())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let Count(open) = &*self.0;
        open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a worker serves a connection with, wherever it was accepted.
struct Serve {
    me: usize,
    /// `outrider_worker_connections_total{worker}`: how the connections spread.
    served: metrics::Counter,
    inputs: Arc<Inputs>,
    orig_dst: Option<OrigDstFn>,
    stops: Stops,
    balance: Arc<Balance>,
}

impl Serve {
    /// Serves a connection this worker accepted, here or on a less busy worker.
    fn route(&self, listener: Listener, stream: TcpStream, client: SocketAddr, slot: Slot) {
        let to = self.balance.pick(self.me);
        // Counted on the chosen worker now, not once it takes the connection: until then
        // it would still look as idle as before, and a burst of connections accepted in a
        // row went all its way, or back and forth between the two workers on stale counts
        // (`tests/workers.rs`, a burst of 64 split 63 and 1).
        let held = (slot, Load::on(&self.balance.open[to]));
        if to == self.me {
            return self.here(listener, stream, client, held);
        }
        // Out of this worker's epoll, into the other's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, %client, "cannot hand a connection to another worker: closed");
                return;
            }
        };
        let handoff = Handoff {
            listener,
            stream,
            client,
            held,
        };
        // A worker that has ended (shutdown) takes nothing: served here then, and counted
        // here.
        if let Err(mpsc::error::SendError(h)) = self.balance.to[to].send(handoff) {
            let (slot, load) = h.held;
            drop(load);
            let held = (slot, Load::on(&self.balance.open[self.me]));
            self.take(Handoff { held, ..h });
        }
    }

    /// Serves a connection handed over by another worker.
    fn take(&self, h: Handoff) {
        match TcpStream::from_std(h.stream) {
            Ok(stream) => self.here(h.listener, stream, h.client, h.held),
            Err(e) => {
                tracing::debug!(error = %e, client = %h.client, "cannot take a connection from another worker: closed");
            }
        }
    }

    /// Serves a connection on this worker, already counted as this worker's.
    fn here(&self, listener: Listener, stream: TcpStream, client: SocketAddr, held: Held) {
        self.served.increment(1);
        let inputs = &self.inputs;
        match listener {
            Listener::Outbound => {
                // The kernel's answer, except that a connection to the listener itself is
                // explicit.
                let od = match &self.orig_dst {
                    Some(f) => f(&stream),
                    None => crate::net::orig_dst::original_dst(&stream, client),
                };
                let stop = self.stops.outbound.clone();
                let task = proxy::outbound::serve(inputs.clone(), stream, client, od, stop);
                proxy::spawn_connection(inputs, task, held);
            }
            Listener::Inbound => {
                let od = crate::net::orig_dst::original_dst(&stream, client);
                let stop = self.stops.inbound.clone();
                let task = proxy::inbound::serve(inputs.clone(), stream, client, od, stop);
                proxy::spawn_connection(inputs, task, held);
            }
        }
    }
}

/// The started worker threads, waiting for [`Workers::go`].
pub(crate) struct Workers {
    go: Vec<oneshot::Sender<Go>>,
    /// Ends the workers: whatever connections they still serve are closed.
    stop: CancellationToken,
    /// Closed once every worker thread has ended.
    ended: mpsc::Receiver<()>,
}

/// The tokens that stop the accept loops (outbound and inbound stop apart, see `server`).
#[derive(Clone)]
pub(crate) struct Stops {
    /// Stops accepting on the outbound listeners.
    pub outbound: CancellationToken,
    /// Stops accepting on the inbound listeners; connections also close when idle.
    pub inbound: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads, each with its own copy of every data-path listener, and
    /// leaves them waiting for [`Workers::go`]. Fails if a runtime, a listener copy or a
    /// thread cannot be made, so that the server does not start short of workers.
    pub(crate) fn start(
        n: usize,
        outbound: &[std::net::TcpListener],
        inbound: &[std::net::TcpListener],
        inputs: &Arc<Inputs>,
        stops: &Stops,
    ) -> std::io::Result<Self> {
        let n = n.max(1);
        let stop = CancellationToken::new();
        let (ended_tx, ended) = mpsc::channel(1);
        let (to, mut handoffs): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Arc::new(Balance {
            open: (0..n).map(|_| Arc::default()).collect(),
            to: to.into(),
            reports: [Listener::Outbound, Listener::Inbound].map(proxy::AcceptReports::new),
        });
        let mut go = Vec::with_capacity(n);
        for (i, handoffs) in handoffs.drain(..).enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Registered with the worker's runtime from here, so that a failure shows now.
            let listeners = {
                let _in_worker = rt.enter();
                let copy = |l: &std::net::TcpListener| TcpListener::from_std(l.try_clone()?);
                Listeners {
                    outbound: outbound.iter().map(copy).collect::<Result<_, _>>()?,
                    inbound: inbound.iter().map(copy).collect::<Result<_, _>>()?,
                }
            };
            let (go_tx, go_rx) = oneshot::channel();
            let serving = Serving {
                me: i,
                listeners,
                handoffs,
                inputs: inputs.clone(),
                stops: stops.clone(),
                balance: balance.clone(),
            };
            let (stop, ended_tx) = (stop.clone(), ended_tx.clone());
            std::thread::Builder::new()
                // `ps -T`, `top -H`: the kernel keeps 15 bytes of a thread's name.
                .name(format!("outrider-w{i}"))
                .spawn(move || {
                    INDEX.set(i);
                    rt.block_on(run(go_rx, serving, stop));
                    // Closes what connections are left here, on the thread they belong to;
                    // nothing blocking is waited for.
                    rt.shutdown_background();
                    drop(ended_tx);
                })?;
            go.push(go_tx);
        }
        Ok(Self { go, stop, ended })
    }

    /// Starts accepting on every worker. `accepting` closes when all have stopped.
    pub(crate) fn go(&mut self, orig_dst: Option<&OrigDstFn>) -> mpsc::Receiver<()> {
        let (accepting, done) = mpsc::channel(1);
        for w in self.go.drain(..) {
            let go = Go {
                orig_dst: orig_dst.cloned(),
                accepting: accepting.clone(),
            };
            // A worker that is gone has nothing to start; `done` does not wait for it.
            let _ = w.send(go);
        }
        done
    }

    /// Ends the workers, closing whatever connections they still serve, and waits up to
    /// `limit` for their threads to finish (the access-log records of the closed
    /// connections are written by then).
    pub(crate) async fn stop(mut self, limit: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(limit, self.ended.recv()).await;
    }

    /// A guard that ends the workers when dropped: a server future dropped before its drain
    /// (a test that ends, an aborted task) does not leave threads behind.
    pub(crate) fn stop_on_drop(&self) -> tokio_util::sync::DropGuard {
        self.stop.clone().drop_guard()
    }
}

/// What one worker is started with.
struct Serving {
    me: usize,
    listeners: Listeners,
    handoffs: mpsc::UnboundedReceiver<Handoff>,
    inputs: Arc<Inputs>,
    stops: Stops,
    balance: Arc<Balance>,
}

/// One worker: waits for the go, accepts until its stop tokens, then serves what it has
/// until the workers are stopped.
async fn run(go: oneshot::Receiver<Go>, serving: Serving, stop: CancellationToken) {
    let go = tokio::select! {
        go = go => go,
        () = stop.cancelled() => return,
    };
    // The server was dropped without running.
    let Ok(Go {
        orig_dst,
        accepting,
    }) = go
    else {
        return;
    };
    let Serving {
        me,
        listeners,
        mut handoffs,
        inputs,
        stops,
        balance,
    } = serving;
    let serve = Arc::new(Serve {
        me,
        served: metrics::counter!("outrider_worker_connections_total", "worker" => me.to_string()),
        inputs,
        orig_dst,
        stops,
        balance,
    });
    // Until the runtime ends: a connection another worker accepted as this one stopped
    // accepting is still served.
    let taker = serve.clone();
    tokio::spawn(async move {
        while let Some(h) = handoffs.recv().await {
            taker.take(h);
        }
    });
    let mut loops = tokio::task::JoinSet::new();
    let accepting_on = |l: TcpListener, which: Listener, stop: CancellationToken| {
        let serve = serve.clone();
        async move {
            let reports = &serve.balance.reports[usize::from(which == Listener::Inbound)];
            let slots = (&serve.inputs.slots, which, reports);
            proxy::accept_loop(l, stop, slots, |stream, client, slot| {
                serve.route(which, stream, client, slot);
            })
            .await;
        }
    };
    for l in listeners.outbound {
        loops.spawn(accepting_on(
            l,
            Listener::Outbound,
            serve.stops.outbound.clone(),
        ));
    }
    for l in listeners.inbound {
        loops.spawn(accepting_on(
            l,
            Listener::Inbound,
            serve.stops.inbound.clone(),
        ));
    }
    tokio::select! {
        () = async { while loops.join_next().await.is_some() {} } => {}
        () = stop.cancelled() => return,
    }
    drop(accepting);
    stop.cancelled().await;
}
