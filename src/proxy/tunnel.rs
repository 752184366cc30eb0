//! Byte tunnels: `CONNECT` (checked on its target, dialled before the 200 so that a failure
//! is still a proper error response, then on the SNI of the TLS inside), protocol upgrades,
//! and transparent opaque TCP.
//! Each tunnel is logged once, at its close, with the bytes each way.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::upgrade::OnUpgrade;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::admit::admit;
use super::detect::{detect_until, Protocol};
use super::error::ProxyError;
use super::forward::{note_admission, parse_authority};
use super::slots::Listener;
use super::{ConnInfo, Inputs};
use crate::access_log::{Bytes, LogGuard, Record};
use crate::body::{self, Body};
use crate::net::{attempts, connect};
use crate::policy::egress::Deny;
use crate::policy::host::{parse_host, Host};

/// Serves a `CONNECT host:port` request.
pub async fn connect(
    inputs: Arc<Inputs>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let state = inputs.state.load_full();
    let authority = req.uri().authority().map(|a| a.to_string());
    let mut guard = LogGuard::start(
        state.log.clone(),
        Record {
            direction: "outbound",
            mode: conn.mode(),
            protocol: "connect",
            client: Some(conn.client),
            original_dst: conn.original_dst,
            method: Some("CONNECT".into()),
            authority: authority
                .as_deref()
                .map(|a| crate::policy::host::mask_userinfo(a).into_owned()),
            ..Record::default()
        },
    );
    let result = async {
        let authority =
            authority.ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
        if req.uri().port().is_none() {
            return Err(ProxyError::BadRequest("CONNECT needs host:port".into()));
        }
        let (host, port) = parse_authority(&authority, 0)?;
        // Never the DNS-server allowance: a tunnel is what the client asked the proxy for.
        let admitted = admit(&inputs, &state, &host, port, conn.original_dst, false).await?;
        note_admission(&mut guard, &admitted);
        let (timeout, mesh) = (state.cfg.connect_timeout, state.mesh_client.as_ref());
        if admitted.alternates.is_empty() {
            let upstream = connect::connect_maybe_mesh(admitted.addr, timeout, mesh)
                .await
                .map_err(ProxyError::Connect)?;
            return Ok((upstream, host, admitted.addr));
        }
        // The name has other allowed addresses: the first to connect is the tunnel's, and
        // what the log names (with the rule that allows it).
        let order = attempts::order(admitted.addr, admitted.alternates.iter().map(|(a, _)| *a));
        let (upstream, dialled) = attempts::race(&order, timeout, |a, left| {
            connect::connect_maybe_mesh(a, left, mesh)
        })
        .await
        .map_err(ProxyError::Connect)?;
        if let Some((_, rule)) = admitted.alternates.iter().find(|(a, _)| *a == dialled) {
            guard.record.upstream = Some(dialled);
            guard.record.rule = rule.clone();
        }
        Ok((upstream, host, dialled))
    }
    .await;
    match result {
        Ok((upstream, host, dialled)) => {
            let on_upgrade = super::upgrade::on(&mut req);
            guard.record.status = 200;
            let tasks = inputs.tasks.clone();
            tasks.spawn(async move {
                // The tunnel outlives the HTTP connection it came from: count it as open.
                let _gauge = crate::metrics::ConnectionGauge::continued();
                let _slot = inputs.slots.continued(Listener::Outbound);
                let mut client = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(e) => return guard.fail(format!("client upgrade failed: {e}")),
                };
                let mut upstream = upstream;
                let target = (host, dialled);
                let checked =
                    check_inside(&inputs, &state, &mut client, &upstream, &target, &mut guard);
                let first = match checked.await {
                    None => return,
                    Some(Inside::Bytes(first)) => first,
                    Some(Inside::Http { first, http1 }) => {
                        // Plain HTTP: served request by request, each one's Host (HTTP/2:
                        // `:authority`) checked against the address dialled (as on a
                        // redirected connection) and logged. Passed on as bytes, a request
                        // for a host the policy denies could ride on an allowed name's
                        // server (a shared host, a CDN). HTTP/2 goes on in HTTP/2. The
                        // CONNECT's own record is written when the tunnel closes.
                        drop(upstream);
                        let inner = ConnInfo {
                            client: conn.client,
                            original_dst: Some(dialled),
                            in_connect: true,
                        };
                        let io = super::detect::Rewind::new(first, client);
                        super::outbound::serve_in_connect(inputs.clone(), io, inner, http1).await;
                        return;
                    }
                };
                // After a reload, the CONNECT target is checked again, and so is an SNI
                // that named another host, as each was at admission.
                let (host, dialled) = target;
                let sni = guard.record.sni.as_deref().and_then(|n| parse_host(n).ok());
                let recheck = connect_recheck(host, sni, dialled);
                if !first.is_empty() {
                    if let Err(e) = upstream.write_all(&first).await {
                        return guard.fail(format!("upstream write failed: {e}"));
                    }
                    guard
                        .bytes
                        .inbound
                        .fetch_add(first.len() as u64, Ordering::Relaxed);
                }
                splice(&inputs, client, upstream, guard, recheck).await;
            });
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        Err(e) => super::forward::note_error(&mut guard, &e),
    }
}

/// What the first bytes through a `CONNECT` tunnel turned out to be.
enum Inside {
    /// Bytes to send on, then splice: TLS that passed its check, or anything else.
    Bytes(bytes::Bytes),
    /// Plain HTTP/1, or HTTP/2 with prior knowledge (`first` are its first bytes): the
    /// tunnel is served as HTTP.
    Http {
        /// What was read.
        first: bytes::Bytes,
        /// HTTP/1 (else HTTP/2).
        http1: bool,
    },
}

/// The first bytes through a CONNECT tunnel. A TLS ClientHello whose SNI names another host
/// than the CONNECT target must pass the check a transparent connection with that SNI would
/// (the name allowed and resolving to the dialled address, or that address allowed by a
/// CIDR rule): else an allowed name's server — a CDN front — could carry traffic for a
/// denied one. Plain HTTP (HTTP/1, or HTTP/2 with prior knowledge) is handed back to be
/// served request by request, so that each Host or `:authority` gets that check. Returns
/// what was read, or `None` when the tunnel is refused (logged; dropping it closes it).
/// Anything else (opaque bytes) was checked on the CONNECT target alone.
///
/// There is no fail-open timeout here, unlike transparent detection (whose fallback, the
/// destination address, is the stricter check): a client that waited it out could send an
/// unchecked ClientHello. Only a server that speaks first (after the detection timeout,
/// or at once on `outbound.detect.server_first_ports`) ends the wait, or the tunnel idle
/// timeout, which closes the tunnel. Through a mesh peer the TLS session's own records
/// count as speaking; the peer applies its own policy.
async fn check_inside<C: AsyncRead + Unpin>(
    inputs: &Inputs,
    state: &super::State,
    client: &mut C,
    upstream: &connect::MaybeTls,
    (host, dialled): &(Host, SocketAddr),
    guard: &mut LogGuard,
) -> Option<Inside> {
    if state.cfg.server_first_ports.contains(&dialled.port()) {
        return Some(Inside::Bytes(bytes::Bytes::new()));
    }
    let server_spoke = async {
        tokio::time::sleep(state.cfg.detect_timeout).await;
        let _ = upstream.tcp().readable().await;
    };
    // Neither side speaking is a quiet tunnel like any other: closed after the idle timeout.
    let quiet = state.cfg.clients.tunnel_idle_timeout;
    let (protocol, first) =
        match tokio::time::timeout(quiet, detect_until(client, server_spoke)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                guard.fail(format!("client read failed: {e}"));
                return None;
            }
            Err(_) => {
                guard.fail(went_quiet(quiet));
                return None;
            }
        };
    let (server, sni) = match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let http1 = protocol == Protocol::Http1;
            return Some(Inside::Http { first, http1 });
        }
        Protocol::Tls(hello) => match hello.server() {
            Some(server) => (server, hello.sni),
            None => return Some(Inside::Bytes(first)),
        },
        _ => return Some(Inside::Bytes(first)),
    };
    guard.record.sni.clone_from(&sni);
    let sni = sni.as_deref().unwrap_or("(unreadable)");
    let checked = match server {
        Ok(named) if named == *host => return Some(Inside::Bytes(first)),
        Ok(named) => admit(inputs, state, &named, dialled.port(), Some(*dialled), false).await,
        Err(e) => Err(ProxyError::Denied(Deny::InvalidHost(e))),
    };
    let context =
        |what: &dyn std::fmt::Display| format!("SNI {sni} inside a CONNECT to {host}: {what}");
    match checked {
        Ok(a) if a.decision == "report" => {
            guard.record.decision = "report";
            guard.record.reason = Some(context(&a.reason.unwrap_or_default()));
            Some(Inside::Bytes(first))
        }
        Ok(_) => Some(Inside::Bytes(first)),
        Err(e) => {
            super::forward::record_error(guard, &e);
            let context = context(&e);
            if guard.record.decision == "deny" {
                guard.record.reason = Some(context);
            } else {
                guard.record.error = Some(context);
            }
            None
        }
    }
}

/// Whether an open connection is still allowed, asked again after every config reload:
/// `Err` carries the reason it no longer is.
pub type StillAllowed = Box<dyn Fn(&super::State) -> Result<(), String> + Send>;

/// Copies bytes both ways until either side closes, counting them into the guard's
/// record, which is written when the guard drops here (also on reset). After each config
/// reload the connection is checked again with `recheck`, and closed (logged as denied) when
/// the new policy no longer allows it: revoking a rule must not leave a long-lived tunnel
/// open to what it allowed.
pub async fn splice<C, U>(
    inputs: &Inputs,
    client: C,
    mut upstream: U,
    mut guard: LogGuard,
    recheck: StillAllowed,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = CountingIo {
        inner: client,
        bytes: guard.bytes.clone(),
    };
    let mut reloads = inputs.reloaded.subscribe();
    let idle_timeout = inputs.state.load().cfg.clients.tunnel_idle_timeout;
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // The byte counts are looked at four times per timeout: a tunnel is closed between one
    // and one and a half timeouts after its last byte, for one timer per quarter.
    let mut idle = Quiet::new(&guard.bytes, idle_timeout);
    loop {
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    guard.record.error = Some(format!("tunnel ended with error: {e}"));
                }
                return;
            }
            () = tokio::time::sleep(idle.step()) => {
                if idle.expired(&guard.bytes) {
                    guard.record.error = Some(went_quiet(idle_timeout));
                    return;
                }
            }
            changed = reloads.changed() => {
                if changed.is_err() {
                    return; // the server is gone
                }
                if let Err(reason) = recheck(&inputs.state.load()) {
                    // A denial names no allowing rule: the one that admitted the connection
                    // goes into the reason instead.
                    let reason = match guard.record.rule.take() {
                        Some(rule) => format!("closed after a config reload: {reason} (admitted by {rule})"),
                        None => format!("closed after a config reload: {reason}"),
                    };
                    guard.record.decision = "deny";
                    guard.record.reason = Some(reason);
                    crate::metrics::record_denial("revoked", "deny");
                    return;
                }
            }
        }
    }
}

/// The recheck for an outbound connection to `host:port` dialled at `addr` (see
/// [`still_allowed`]).
pub fn egress_recheck(host: Host, port: u16, addr: SocketAddr, captured: bool) -> StillAllowed {
    Box::new(move |state| still_allowed(&state.cfg.egress, &host, port, addr, captured))
}

/// The recheck for a `CONNECT` tunnel: its target, and the SNI inside when that named
/// another host, each as it was checked at admission.
fn connect_recheck(host: Host, sni: Option<Host>, addr: SocketAddr) -> StillAllowed {
    let sni = sni.filter(|named| *named != host);
    Box::new(move |state| connect_still_allowed(&state.cfg.egress, &host, sni.as_ref(), addr))
}

fn connect_still_allowed(
    policy: &crate::policy::egress::EgressPolicy,
    host: &Host,
    sni: Option<&Host>,
    addr: SocketAddr,
) -> Result<(), String> {
    still_allowed(policy, host, addr.port(), addr, false)?;
    match sni {
        Some(named) => still_allowed(policy, named, addr.port(), addr, false)
            .map_err(|e| format!("SNI {named} inside a CONNECT to {host}: {e}")),
        None => Ok(()),
    }
}

/// Whether `policy` allows a connection to `host:port` that was dialled at `addr`, as
/// admission decides it ([`super::admit::recheck`]). In report mode everything is.
fn still_allowed(
    policy: &crate::policy::egress::EgressPolicy,
    host: &Host,
    port: u16,
    addr: SocketAddr,
    captured: bool,
) -> Result<(), String> {
    if policy.mode == crate::config::EgressMode::Report {
        return Ok(());
    }
    super::admit::recheck(policy, host, port, addr, captured)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Joins an upgraded client connection with its upgraded upstream (WebSocket and the like);
/// the request's record is written when it closes, with the bytes each way.
pub async fn splice_upgrades(
    inputs: Arc<Inputs>,
    client: OnUpgrade,
    upstream: crate::net::upstream::Upgraded,
    mut guard: LogGuard,
    recheck: StillAllowed,
    listener: Listener,
) {
    let _gauge = crate::metrics::ConnectionGauge::continued();
    let _slot = inputs.slots.continued(listener);
    let Some(upstream) = upstream.take() else {
        guard.fail("protocol upgrade failed: the upstream connection was already taken".into());
        return;
    };
    match client.await {
        Ok(c) => splice(&inputs, c, upstream, guard, recheck).await,
        Err(e) => guard.fail(format!("protocol upgrade failed: {e}")),
    }
}

/// Whether a tunnel has passed no byte for its idle timeout, from its byte counts.
struct Quiet {
    timeout: std::time::Duration,
    seen: u64,
    since: tokio::time::Instant,
}

impl Quiet {
    fn new(bytes: &Bytes, timeout: std::time::Duration) -> Self {
        Self {
            timeout,
            seen: total(bytes),
            since: tokio::time::Instant::now(),
        }
    }

    /// How long to wait before looking again.
    fn step(&self) -> std::time::Duration {
        (self.timeout / 4).max(std::time::Duration::from_millis(1))
    }

    /// Whether no byte has passed for the timeout; notes any that did.
    fn expired(&mut self, bytes: &Bytes) -> bool {
        let now = total(bytes);
        if now != self.seen {
            self.seen = now;
            self.since = tokio::time::Instant::now();
            return false;
        }
        self.since.elapsed() >= self.timeout
    }
}

/// The log's error for a tunnel closed by its idle timeout.
fn went_quiet(timeout: std::time::Duration) -> String {
    format!(
        "tunnel closed after {} with no bytes either way",
        humantime::format_duration(timeout)
    )
}

fn total(bytes: &Bytes) -> u64 {
    bytes.inbound.load(Ordering::Relaxed) + bytes.outbound.load(Ordering::Relaxed)
}

/// Counts bytes read from (in) and written to (out) the client.
struct CountingIo<T> {
    inner: T,
    bytes: Arc<Bytes>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.bytes.inbound.fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.bytes.outbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(allow: &str) -> crate::policy::egress::EgressPolicy {
        let yaml = format!("outbound:\n  egress:\n    allow:\n{allow}");
        let config = crate::config::Config::from_yaml(&yaml).unwrap();
        crate::config::validate(config).unwrap().egress
    }

    fn name(n: &str) -> Host {
        parse_host(n).unwrap()
    }

    /// What a reload re-checks on an open tunnel: the name against host rules (its public
    /// address as resolved at admission), the address against CIDR rules, and a fronting
    /// SNI as well as the CONNECT target.
    #[test]
    fn open_tunnels_are_rechecked_as_they_were_admitted() {
        let public: SocketAddr = "203.0.113.7:443".parse().unwrap();
        let both = policy("      - host: front.test\n      - host: inner.test\n");
        let front_only = policy("      - host: front.test\n");
        let other_port = policy("      - host: front.test\n        ports: [8443]\n");
        let by_cidr = policy("      - cidr: 203.0.113.0/24\n        ports: [443]\n");
        let front = name("front.test");
        let inner = name("inner.test");

        assert!(still_allowed(&both, &front, 443, public, true).is_ok());
        assert!(still_allowed(&by_cidr, &front, 443, public, true).is_ok());
        let err = still_allowed(&other_port, &front, 443, public, true).unwrap_err();
        assert!(err.contains("front.test") && err.contains("443"), "{err}");
        let err = still_allowed(&front_only, &inner, 443, public, true).unwrap_err();
        assert!(err.contains("inner.test"), "{err}");
        // A private address needs a CIDR rule, whatever the host rule says.
        let private: SocketAddr = "10.1.2.3:443".parse().unwrap();
        assert!(still_allowed(&both, &front, 443, private, true).is_err());
        let ip = Host::Ip(public.ip());
        assert!(still_allowed(&by_cidr, &ip, 443, public, true).is_ok());
        assert!(still_allowed(&both, &ip, 443, public, true).is_err());

        // A CONNECT tunnel: the target, and an SNI that named another host.
        assert!(connect_still_allowed(&both, &front, Some(&inner), public).is_ok());
        let err = connect_still_allowed(&front_only, &front, Some(&inner), public).unwrap_err();
        assert!(err.contains("SNI inner.test"), "{err}");
        assert!(connect_still_allowed(&front_only, &front, None, public).is_ok());
        let err = connect_still_allowed(&other_port, &front, None, public).unwrap_err();
        assert!(err.contains("front.test"), "{err}");

        // Report mode closes nothing.
        let config = crate::config::Config::from_yaml("outbound:\n  egress:\n    mode: report\n");
        let report = crate::config::validate(config.unwrap()).unwrap().egress;
        assert!(connect_still_allowed(&report, &front, Some(&inner), private).is_ok());
    }
}
