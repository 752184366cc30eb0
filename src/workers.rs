//! The data path's threads. Each worker runs its own single-threaded tokio runtime and
//! accepts from every data-path listener (the same sockets, shared); a connection is served
//! to its end on the thread that accepted it, with the upstream connections that thread
//! opened (the pool is sharded by worker, see `net::upstream`). This is how nginx, HAProxy
//! and Envoy run: a request's wakeups, timers and memory stay on one core.
//!
//! One multi-threaded runtime, which every worker shares (one epoll, work stealing), cost
//! about a quarter more CPU per proxied request on a 2-core machine (README, Performance):
//! a socket's readiness reached whichever worker held the I/O driver, and its task was
//! handed over between threads. The caller's runtime keeps the control work (admin API,
//! signals, certificate renewal, sweeps).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::proxy::Inputs;
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
        let stop = CancellationToken::new();
        let (ended_tx, ended) = mpsc::channel(1);
        let mut go = Vec::with_capacity(n);
        for i in 0..n.max(1) {
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
            let (inputs, stops, stop, ended_tx) = (
                inputs.clone(),
                stops.clone(),
                stop.clone(),
                ended_tx.clone(),
            );
            std::thread::Builder::new()
                // `ps -T`, `top -H`: the kernel keeps 15 bytes of a thread's name.
                .name(format!("outrider-w{i}"))
                .spawn(move || {
                    INDEX.set(i);
                    rt.block_on(run(go_rx, listeners, inputs, stops, stop));
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

/// One worker: waits for the go, accepts until its stop tokens, then serves what it has
/// until the workers are stopped.
async fn run(
    go: oneshot::Receiver<Go>,
    listeners: Listeners,
    inputs: Arc<Inputs>,
    stops: Stops,
    stop: CancellationToken,
) {
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
    let mut loops = tokio::task::JoinSet::new();
    for l in listeners.outbound {
        let task = crate::server::accept_outbound(
            l,
            inputs.clone(),
            orig_dst.clone(),
            stops.outbound.clone(),
        );
        loops.spawn(task);
    }
    for l in listeners.inbound {
        let task = crate::proxy::inbound::accept(l, inputs.clone(), stops.inbound.clone());
        loops.spawn(task);
    }
    tokio::select! {
        () = async { while loops.join_next().await.is_some() {} } => {}
        () = stop.cancelled() => return,
    }
    drop(accepting);
    stop.cancelled().await;
}
