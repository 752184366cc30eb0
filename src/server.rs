//! Process lifecycle: bind every listener first, then serve; reload on SIGHUP without
//! dropping connections; on SIGTERM stop accepting (outbound after `shutdown.outbound_grace`)
//! and drain up to `shutdown.drain_timeout`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Compiled, Config};
use crate::proxy::{self, Inputs, State};
use crate::workers::{Stops, Workers};

/// How the outbound listener learns a connection's original destination. The default asks
/// the kernel; tests substitute their own so that transparent mode runs without iptables.
pub type OrigDstFn = Arc<dyn Fn(&TcpStream) -> Option<SocketAddr> + Send + Sync>;

/// Startup failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {key} {addr}: {source}")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The runtime state could not be built.
    #[error("{0}")]
    State(String),
    /// A worker thread, its runtime or its copy of a listener could not be made.
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// A bound, not yet running proxy: its worker threads wait for [`Server::run`].
pub struct Server {
    inputs: Arc<Inputs>,
    workers: Workers,
    stops: Stops,
    admin: TcpListener,
    handle: ServerHandle,
    /// `None`: the kernel's answer.
    orig_dst: Option<OrigDstFn>,
}

/// Controls a running server: reload, shutdown, addresses.
#[derive(Clone)]
pub struct ServerHandle {
    inputs: Arc<Inputs>,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
    config_path: Option<PathBuf>,
    /// Bound outbound address.
    pub outbound_addr: SocketAddr,
    /// Bound inbound address, if any.
    pub inbound_addr: Option<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
}

fn bind_one(addr: SocketAddr, only_v6: bool) -> std::io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(only_v6)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

fn bind(key: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    // `[::]:15006` serves IPv4 too, like the usual dual-stack default.
    bind_one(addr, false).map_err(|source| StartError::Bind { key, addr, source })
}

/// Binds a data-path listener so that captured IPv6 traffic has somewhere to go as well:
/// `0.0.0.0:P` becomes dual-stack `[::]:P` where the host has IPv6, and `127.0.0.1:P` gets an
/// IPv6-only `[::1]:P` beside it (the iptables script redirects IPv6 to `[::1]`).
fn bind_data(
    key: &'static str,
    addr: SocketAddr,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let v6 = |ip: std::net::Ipv6Addr, port| SocketAddr::new(ip.into(), port);
    if addr.ip() == std::net::Ipv4Addr::UNSPECIFIED {
        if let Ok(l) = bind_one(v6(std::net::Ipv6Addr::UNSPECIFIED, addr.port()), false) {
            return Ok(vec![l]);
        }
    }
    let first = bind(key, addr)?;
    let mut all = vec![];
    if addr.ip() == std::net::Ipv4Addr::LOCALHOST {
        let port = first.local_addr().map_or(addr.port(), |a| a.port());
        // Best effort: a host without IPv6 simply has no IPv6 traffic to capture.
        if let Ok(l) = bind_one(v6(std::net::Ipv6Addr::LOCALHOST, port), true) {
            all.push(l);
        }
    }
    all.insert(0, first);
    Ok(all)
}

impl Server {
    /// Binds every listener (so that a bad address fails before anything runs).
    pub async fn bind(cfg: Compiled, config_path: Option<PathBuf>) -> Result<Self, StartError> {
        let admin = bind("admin.listen", cfg.admin_listen)?;
        let outbound = bind_data("outbound.listen", cfg.outbound_listen)?;
        let inbound = match cfg.inbound_listen {
            Some(a) => bind_data("inbound.listen", a)?,
            None => Vec::new(),
        };
        let local = |l: &std::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let outbound_addr = outbound
            .first()
            .map_or(cfg.outbound_listen, |l| local(l, cfg.outbound_listen));
        let admin_addr = local(&admin, cfg.admin_listen);
        let inbound_addr = cfg
            .inbound_listen
            .map(|a| inbound.first().map_or(a, |l| local(l, a)));
        let mut own: Vec<SocketAddr> = outbound
            .iter()
            .chain(&inbound)
            .filter_map(|l| l.local_addr().ok())
            .collect();
        own.push(admin_addr);
        crate::metrics::install();
        let mesh = match &cfg.identity {
            Some(id) => Some(Arc::new(
                proxy::Mesh::start(id).map_err(|e| StartError::State(format!("identity: {e}")))?,
            )),
            None => None,
        };
        let state = State::build(cfg, None, mesh.as_ref()).map_err(StartError::State)?;
        let workers = state.upstreams.workers();
        let inputs = proxy::inputs(state, own, mesh);
        let handle = ServerHandle {
            inputs: inputs.clone(),
            shutdown: CancellationToken::new(),
            ready: Arc::new(AtomicBool::new(false)),
            config_path,
            outbound_addr,
            inbound_addr,
            admin_addr,
        };
        // The outbound side stops on its own token: it may stay open a while after the
        // inbound side (`shutdown.outbound_grace`).
        let stops = Stops {
            outbound: CancellationToken::new(),
            inbound: handle.shutdown.clone(),
        };
        let workers = Workers::start(workers, &outbound, &inbound, &inputs, &stops)
            .map_err(StartError::Workers)?;
        let admin = TcpListener::from_std(admin).map_err(|source| StartError::Bind {
            key: "admin.listen",
            addr: admin_addr,
            source,
        })?;
        Ok(Self {
            inputs,
            workers,
            stops,
            admin,
            handle,
            orig_dst: None,
        })
    }

    /// Replaces how original destinations are found (the in-process test seam).
    pub fn with_orig_dst(mut self, f: OrigDstFn) -> Self {
        self.orig_dst = Some(f);
        self
    }

    /// The control handle.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until shutdown, then drains. The data path runs on the worker threads; the
    /// admin API and the shutdown sequence on the caller's runtime.
    pub async fn run(self) {
        let Server {
            inputs,
            mut workers,
            stops,
            admin,
            handle,
            orig_dst,
        } = self;
        let _workers_end_with_this = workers.stop_on_drop();
        let shutdown = handle.shutdown.clone();
        let admin_task = tokio::spawn(crate::admin::serve(admin, handle.clone()));
        let mut accepting = workers.go(orig_dst.as_ref());
        handle.ready.store(true, Ordering::SeqCst);
        tracing::info!(outbound = %handle.outbound_addr, admin = %handle.admin_addr, inbound = ?handle.inbound_addr, "outrider ready");
        shutdown.cancelled().await;
        handle.ready.store(false, Ordering::SeqCst);
        let grace = inputs.state.load().cfg.outbound_grace;
        if !grace.is_zero() {
            // As Istio's sidecar drains only inbound at first: the app in the same pod got
            // its SIGTERM too, and its own graceful shutdown may still need to call out.
            tracing::info!(
                ?grace,
                "inbound closed; the outbound listener stays open for shutdown.outbound_grace"
            );
            tokio::time::sleep(grace).await;
        }
        stops.outbound.cancel();
        // Closed once every worker has stopped accepting.
        let _ = accepting.recv().await;
        inputs.tasks.close();
        let drain = inputs.state.load().cfg.drain_timeout;
        if tokio::time::timeout(drain, inputs.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = inputs.tasks.len(),
                "drain timeout: closing remaining connections"
            );
        }
        admin_task.abort();
        workers.stop(WORKERS_END_LIMIT).await;
        inputs.state.load().log.flush();
        tracing::info!("outrider stopped");
    }
}

impl ServerHandle {
    /// Whether the proxy reports ready.
    pub fn is_ready(&self) -> bool {
        // With an identity, not ready until the first certificate is in hand.
        let identity_ready = self
            .inputs
            .mesh
            .as_ref()
            .is_none_or(|m| m.identity.is_ready());
        self.ready.load(Ordering::SeqCst) && !self.shutdown.is_cancelled() && identity_ready
    }

    /// The identity's SPIFFE ID, current certificate chain and the roots in use, for admin
    /// `/certs`.
    pub fn certs(&self) -> Option<serde_json::Value> {
        let m = self.inputs.mesh.as_ref()?;
        Some(serde_json::json!({
            "spiffe_id": m.identity.id().to_string(),
            "not_after": m.identity.not_after(),
            "chain_pem": m.identity.current_chain_pem(),
            "trust_roots": m.identity.bundle().describe(),
        }))
    }

    /// Stops accepting and starts draining.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Reopens the access-log file (after log rotation moved it away): SIGUSR1, or the
    /// admin API's `POST /reopen_logs`. Returns what happened, for the operator.
    pub fn reopen_logs(&self) -> Result<String, String> {
        let state = self.inputs.state.load();
        match state.log.reopen() {
            Ok(Some(path)) => Ok(format!("access log reopened: {}", path.display())),
            Ok(None) => Ok(format!(
                "access log output is {}: nothing to reopen",
                state.cfg.access_log
            )),
            Err(e) => Err(format!(
                "cannot reopen the access log {}: {e}; still writing to the old file",
                state.cfg.access_log
            )),
        }
    }

    /// Drops cached responses: one URL's, or all. Returns how many.
    pub fn purge_cache(&self, url: Option<&str>) -> usize {
        let state = self.inputs.state.load();
        match url {
            Some(u) => state.cache.purge_url(u),
            None => state.cache.purge_all(),
        }
    }

    /// The effective config, for the admin page.
    pub fn config(&self) -> Config {
        self.inputs.state.load().cfg.source.clone()
    }

    /// Re-reads the config file; a valid one applies to new requests, an invalid one is
    /// refused and the running config stays.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("running on the embedded default: nothing to reload".into());
        };
        let cfg = Config::load(Some(path)).map_err(|e| e.to_string())?;
        let old = self.inputs.state.load_full();
        if cfg.outbound_listen != old.cfg.outbound_listen
            || cfg.admin_listen != old.cfg.admin_listen
            || cfg.inbound_listen != old.cfg.inbound_listen
        {
            tracing::warn!("listen addresses changed: they apply after a restart");
        }
        if cfg.identity != old.cfg.identity {
            tracing::warn!("identity changes apply after a restart");
        }
        if cfg.source.runtime.worker_threads != old.cfg.source.runtime.worker_threads {
            tracing::warn!("runtime.worker_threads changed: it applies after a restart");
        }
        // The mesh roots are read again at once (they are also looked at every 5 s): the way
        // to finish a root rotation step without waiting. A bad file keeps the roots in use.
        if let Some(mesh) = &self.inputs.mesh {
            if let Err(e) = mesh.identity.reload_bundle(true) {
                tracing::warn!(error = %e, "identity: the mesh trust bundle cannot be used; keeping the roots in use");
            }
        }
        let state = State::build(cfg, Some(&old), self.inputs.mesh.as_ref())?;
        self.inputs.slots.set_max(state.cfg.clients.max_connections);
        self.inputs.state.store(Arc::new(state));
        // Open tunnels and TCP connections were admitted under the old policy: each checks
        // itself against the new one (see `tunnel::splice`).
        self.inputs.reloaded.send_replace(());
        Ok(())
    }
}

/// How long the end of the drain waits for the workers to close what is left.
const WORKERS_END_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a server until SIGTERM/SIGINT, reloading on SIGHUP and reopening the access log on
/// SIGUSR1 (as nginx and Envoy do, for logrotate's `postrotate`).
pub async fn run_with_signals(server: Server) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = server.handle();
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let h = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => match h.reload() {
                    Ok(()) => tracing::info!("config reloaded"),
                    Err(e) => tracing::error!(error = %e, "config reload refused; keeping the running config"),
                },
                _ = usr1.recv() => match h.reopen_logs() {
                    Ok(done) => tracing::info!("{done}"),
                    Err(e) => tracing::error!("{e}"),
                },
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); h.shutdown(); return; }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); h.shutdown(); return; }
            }
        }
    });
    server.run().await;
    Ok(())
}
