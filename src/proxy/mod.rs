//! The data path: outbound (explicit proxy and transparent capture) and inbound.
//!
//! Every connection task gets one `Arc<Inputs>`; the swappable [`State`] inside it is what
//! a config reload replaces, so a request uses one consistent config from start to end.

pub mod admit;
mod aside;
pub mod detect;
pub mod error;
pub mod forward;
pub mod http;
mod idle;
pub mod inbound;
mod keepalive;
pub mod outbound;
pub mod slots;
pub mod tunnel;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::config::Compiled;
use crate::net::connect::MeshClient;
use crate::net::dns::Dns;
use crate::policy::egress::CidrRule;

/// What a config produces at run time. Replaced whole on reload.
pub struct State {
    /// The compiled config.
    pub cfg: Compiled,
    /// The resolver (with `dns.hosts`).
    pub dns: Dns,
    /// The access log.
    pub log: AccessLog,
    /// Pooled upstream HTTP/1.1 connections, keyed by checked address.
    pub upstreams: Arc<crate::net::upstream::Upstreams>,
    /// The shared HTTP cache (kept across reloads unless its settings change).
    pub cache: crate::cache::HttpCache,
    /// Mesh mTLS for outbound connections to `mesh.networks`.
    pub mesh_client: Option<MeshClient>,
}

/// The outbound mesh settings for one config: networks, and per-destination expected peers.
fn mesh_client(m: &Arc<Mesh>, cfg: &Compiled) -> Result<MeshClient, String> {
    let mut expected = Vec::new();
    for (net, ids) in &cfg.mesh_identities {
        let tls = crate::tls::client_config(&m.identity, m.identity.bundle(), Some(ids.clone()))
            .map_err(|e| format!("mesh.identities: {e}"))?;
        expected.push((*net, tls));
    }
    let m2 = m.clone();
    Ok(MeshClient {
        tls: m.client.clone(),
        networks: Arc::new(cfg.mesh_networks.clone()),
        expected: Arc::new(expected),
        has_cert: Arc::new(move || m2.identity.is_ready()),
    })
}

/// This workload's mesh identity and the TLS configs made from it, for the life of the
/// process (certificates inside are swapped on renewal; the configs stay valid).
pub struct Mesh {
    /// The identity, renewed in the background.
    pub identity: crate::tls::WorkloadIdentity,
    /// Inbound: terminates mesh mTLS and requires a client certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// Outbound: originates mesh mTLS.
    pub client: Arc<rustls::ClientConfig>,
}

impl Mesh {
    /// Starts the identity (key generated in-process, certificate fetched in the background)
    /// and builds the mesh TLS configs.
    pub fn start(cfg: &crate::tls::IdentityConfig) -> Result<Self, String> {
        let identity = crate::tls::WorkloadIdentity::start(cfg).map_err(|e| e.to_string())?;
        let bundle = identity.bundle().clone();
        let server = crate::tls::server_config(&identity, &bundle).map_err(|e| e.to_string())?;
        let client =
            crate::tls::client_config(&identity, &bundle, None).map_err(|e| e.to_string())?;
        Ok(Self {
            identity,
            server,
            client,
        })
    }
}

impl State {
    /// Builds the run-time state; `prev` lets a reload keep the access-log writer and cache.
    pub fn build(
        mut cfg: Compiled,
        prev: Option<&State>,
        mesh: Option<&Arc<Mesh>>,
    ) -> Result<Self, String> {
        let mesh_client = match mesh {
            Some(m) => Some(mesh_client(m, &cfg)?),
            None => None,
        };
        let dns =
            Dns::new(cfg.dns_hosts.clone(), prev.map(|p| &p.dns)).map_err(|e| e.to_string())?;
        if cfg.source.outbound.egress.allow_dns_servers {
            // Read with resolv.conf at each start and reload, like the resolver itself.
            let first = cfg.source.outbound.egress.allow.len();
            cfg.egress.dns_servers.extend(
                dns.servers()
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| CidrRule::dns_server(first + i, *ip)),
            );
        }
        let log = match prev {
            Some(p) if p.cfg.access_log == cfg.access_log => p.log.clone(),
            _ => AccessLog::open(&cfg.access_log)
                .map_err(|e| format!("access_log.output: cannot open {:?}: {e}", cfg.access_log))?,
        }
        .stripping_query(cfg.access_log_strip_query);
        let upstreams = crate::net::upstream::Upstreams::for_sidecar(
            cfg.connect_timeout,
            cfg.response_idle,
            mesh_client.clone(),
            cfg.clients.idle_timeout,
            // The threads that run stay as they started through a reload.
            prev.map_or_else(|| cfg.source.runtime.workers(), |p| p.upstreams.workers()),
        );
        let cache = match prev {
            Some(p) if p.cfg.cache == cfg.cache => p.cache.clone(),
            _ => crate::cache::HttpCache::new(&cfg.cache),
        };
        Ok(Self {
            cfg,
            dns,
            log,
            upstreams,
            cache,
            mesh_client,
        })
    }
}

/// Shared by every connection task.
pub struct Inputs {
    /// The current state; swapped on reload.
    pub state: ArcSwap<State>,
    /// The addresses this process listens on, for loop detection.
    pub own_addrs: Vec<SocketAddr>,
    /// Tunnels and other detached tasks, so that shutdown can wait for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// The mesh identity and TLS configs, when `identity` is configured.
    pub mesh: Option<Arc<Mesh>>,
    /// Told after each reload, so that open tunnels are checked against the new policy.
    pub reloaded: tokio::sync::watch::Sender<()>,
    /// Each listener's open client connections, against `clients.max_connections`.
    pub slots: slots::Slots,
}

impl Inputs {
    /// Whether dialling `addr` would reach one of this process's own listeners.
    pub fn is_own(&self, addr: SocketAddr) -> bool {
        // `::ffff:127.0.0.1` is 127.0.0.1, and any 127/8 address reaches a 127.0.0.1 listener.
        let ip = addr.ip().to_canonical();
        self.own_addrs.iter().any(|own| {
            let own_ip = own.ip().to_canonical();
            own.port() == addr.port()
                && (own_ip == ip
                    || own_ip.is_unspecified()
                    || ip.is_unspecified()
                    || (own_ip.is_ipv4()
                        && own_ip.is_loopback()
                        && ip.is_ipv4()
                        && ip.is_loopback()))
        })
    }
}

/// Spawns a connection's task with what it holds while it lasts (its listener's slot, its
/// worker's count), given back when the connection has ended. The future is boxed before it is spawned: moved by value (about 900 bytes; 3.8 KB
/// when this was measured at 6 % of the instructions of a one-request connection) it was
/// copied a few times on its way into the task and written over twice when it ended; a box
/// is moved instead. What is held goes beside the box, not in the future, whose size is
/// tuned to a size class (`tests::a_connection_task_stays_within_896_bytes`).
pub fn spawn_connection<F, H>(inputs: &Inputs, task: F, held: H)
where
    F: std::future::Future<Output = ()> + Send + 'static,
    H: Send + 'static,
{
    let task = Box::pin(task);
    inputs.tasks.spawn(async move {
        task.await;
        drop(held);
    });
}

/// Boxes the future `make` returns, allocating first. `Box::pin(f)` builds the future on
/// the stack and copies all of it into the box (4.5 KB for `forward::forward`'s, about 460
/// instructions); built after the allocation, only its set part is copied (twice 1 KB,
/// about 90 instructions each, callgrind). Where rustc lays a future out otherwise it may
/// gain nothing (`inbound::to_app`'s is copied whole either way), so it is used where
/// measured.
#[inline(always)]
pub fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// One listener's accept failures and overflows, shared by every worker that accepts from
/// it, so that an episode (the open-file limit reached, say) is told once, not once per
/// worker.
pub struct AcceptReports {
    failing: Reported<crate::episode::Episode>,
    overflow: Reported<slots::Overflow>,
}

/// An episode's reporter, and whether an episode may be going on: a connection accepted
/// looks at the flag, and takes the lock (which every worker shares) only while one is.
struct Reported<T> {
    on: std::sync::atomic::AtomicBool,
    it: std::sync::Mutex<T>,
}

impl<T> Reported<T> {
    fn new(it: T) -> Self {
        Self {
            on: std::sync::atomic::AtomicBool::new(false),
            it: std::sync::Mutex::new(it),
        }
    }

    /// One more occurrence, told through `f`; the flag is set under the lock, after it.
    fn hit<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut it = self
            .it
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let told = f(&mut it);
        self.on.store(true, std::sync::atomic::Ordering::Relaxed);
        told
    }

    /// Ends the episode through `f`, if one may be going on.
    fn end(&self, f: impl FnOnce(&mut T)) {
        if self.on.load(std::sync::atomic::Ordering::Relaxed) {
            let mut it = self
                .it
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.on.store(false, std::sync::atomic::Ordering::Relaxed);
            f(&mut it);
        }
    }
}

impl AcceptReports {
    /// The reports of listener `which`.
    pub fn new(which: slots::Listener) -> Self {
        Self {
            failing: Reported::new(crate::episode::Episode::default()),
            overflow: Reported::new(slots::Overflow::new(which)),
        }
    }
}

/// A client connection's addresses.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client.
    pub client: SocketAddr,
    /// The original destination, for transparent connections.
    pub original_dst: Option<SocketAddr>,
    /// Requests from inside an explicit `CONNECT` tunnel that carries plain HTTP (HTTP/1, or
    /// HTTP/2 with prior knowledge): each is checked and sent as a redirected one would be,
    /// `original_dst` being the address the `CONNECT` dialled.
    pub in_connect: bool,
}

impl ConnInfo {
    /// `explicit` or `transparent`, for the log.
    pub fn mode(&self) -> &'static str {
        if self.captured() {
            "transparent"
        } else {
            "explicit"
        }
    }

    /// Whether the connection was redirected to the proxy by the capture.
    pub fn captured(&self) -> bool {
        self.original_dst.is_some() && !self.in_connect
    }
}

/// Shares one state for tests and the server.
pub fn inputs(state: State, own_addrs: Vec<SocketAddr>, mesh: Option<Arc<Mesh>>) -> Arc<Inputs> {
    Arc::new(Inputs {
        slots: slots::Slots::new(state.cfg.clients.max_connections),
        state: ArcSwap::from_pointee(state),
        own_addrs,
        tasks: tokio_util::task::TaskTracker::new(),
        mesh,
        reloaded: tokio::sync::watch::Sender::new(()),
    })
}

/// The access-log record for an HTTP request, as far as the request itself tells it.
pub fn request_record<B>(
    direction: &'static str,
    conn: ConnInfo,
    req: &::http::Request<B>,
) -> crate::access_log::Record {
    // What the client asked for, even if it turns out invalid; but never the userinfo of a
    // URL (`http://user:password@host/`), which is refused and may be a password: logs
    // travel further than requests. A Host header is logged as sent: clients put no
    // credentials there, and looking for them cost every request about 100 instructions.
    let authority = req
        .uri()
        .authority()
        .map(|a| crate::policy::host::mask_userinfo(a.as_str()).into_owned())
        .or_else(|| {
            let host = req.headers().get(::http::header::HOST)?;
            Some(String::from_utf8_lossy(host.as_bytes()).into_owned())
        });
    crate::access_log::Record {
        direction,
        mode: conn.mode(),
        protocol: if req.version() == ::http::Version::HTTP_2 {
            "http2"
        } else {
            "http1"
        },
        client: Some(conn.client),
        original_dst: conn.original_dst,
        method: Some(method_text(req.method())),
        path: req.uri().path_and_query().cloned(),
        authority,
        ..crate::access_log::Record::default()
    }
}

/// A method for the log: the standard ones as static strings (no allocation per request).
fn method_text(m: &::http::Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|s| **s == m.as_str()) {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(m.as_str().to_owned()),
    }
}

/// Logs a request head that hyper's parser refused before it reached the proxy (a bad
/// request line or header, a head too large). hyper has already answered it (400, 414 for
/// a URI too long, or 431 for a head too large) and closes the connection; without this,
/// the refusal would leave no trace.
pub fn log_refused_head(
    inputs: &Inputs,
    direction: &'static str,
    conn: ConnInfo,
    error: &crate::body::BoxError,
) {
    let Some(e) = error.downcast_ref::<hyper::Error>() else {
        return;
    };
    if !e.is_parse() {
        return;
    }
    let mut guard = crate::access_log::LogGuard::start(
        inputs.state.load().log.clone(),
        crate::access_log::Record {
            direction,
            mode: conn.mode(),
            protocol: "http1",
            client: Some(conn.client),
            original_dst: conn.original_dst,
            ..crate::access_log::Record::default()
        },
    );
    let reason = format!("malformed request refused by the HTTP parser: {e}");
    // The status hyper sent. Its error kinds are private, so a URI too long (414) is told
    // from a head too large (431) by the text (`forward_edge` notices if that changes).
    guard.record.status = if !e.is_parse_too_large() {
        400
    } else if reason.ends_with("URI too long") {
        414
    } else {
        431
    };
    guard.record.decision = "deny";
    guard.record.reason = Some(reason);
    crate::metrics::record_denial("malformed_request", "deny");
}

/// Accepts connections until shutdown, handing each (with its client address in canonical
/// form, and its slot on `listener`) to `serve`. A connection over `clients.max_connections`
/// is closed at once (see [`slots`]); accept errors (EMFILE and the like) back off instead of
/// spinning. Either is told to the operator per episode, not per connection.
pub async fn accept_loop<F>(
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    (slots, which, reports): (&slots::Slots, slots::Listener, &AcceptReports),
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr, slots::Slot),
{
    use crate::episode::Tell;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, client)) => {
                reports.failing.end(|failing| {
                    if let Some(failures) = failing.end() {
                        tracing::info!(failures, "accepting connections again");
                    }
                });
                let Some(slot) = slots.take(which) else {
                    // Closed on the spot (dropped), before anything is read from it.
                    let open = slots.open(which);
                    reports.overflow.hit(|overflow| overflow.refused(open));
                    continue;
                };
                reports.overflow.end(slots::Overflow::accepted);
                serve(stream, crate::net::orig_dst::canonical(client), slot);
            }
            Err(e) => {
                let told = reports.failing.hit(|failing| failing.hit(1));
                match told {
                    Tell::Begins => {
                        tracing::warn!(error = %e, "accept failed; retrying every 50 ms")
                    }
                    Tell::Lasts(failures) => {
                        tracing::warn!(error = %e, failures, "accept still failing");
                    }
                    Tell::Nothing => {}
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What a connection's task holds (the future spawned for it) is what every connection
    /// costs beside its socket, parked ones included: 2.2 KB before the layers that serve a
    /// connection were written to keep no room they no longer need (see `outbound::serve`
    /// and `keepalive::serve`); 808-888 bytes since, within mimalloc's 896-byte size class
    /// (the next one up is 1,024).
    #[tokio::test]
    async fn a_connection_task_stays_within_896_bytes() {
        let cfg = crate::config::Config::load(None).unwrap();
        let state = State::build(cfg, None, None).unwrap();
        let inputs = inputs(state, Vec::new(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let stream = || tokio::net::TcpStream::connect(addr);

        // One future type per listener: explicit and transparent outbound share one.
        let outbound = outbound::serve(
            inputs.clone(),
            stream().await.unwrap(),
            addr,
            None,
            stop.clone(),
        );
        let inbound = inbound::serve(inputs, stream().await.unwrap(), addr, Some(addr), stop);
        let sizes = [
            ("outbound", std::mem::size_of_val(&outbound)),
            ("inbound", std::mem::size_of_val(&inbound)),
        ];
        for (side, size) in sizes {
            assert!(
                size <= 896,
                "{side}: a connection's task holds {size} bytes"
            );
        }
    }
}
