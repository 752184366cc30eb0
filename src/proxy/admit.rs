//! The admit phase: egress policy plus DNS, ending in the one address the proxy will dial.
//! Shared by absolute-form HTTP, CONNECT, and transparent HTTP, TLS and TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::error::ProxyError;
use super::{Inputs, State};
use crate::config::EgressMode;
use crate::policy::egress::{Deny, EgressPolicy, TargetCheck};
use crate::policy::host::Host;

/// The outcome of admission: where to connect, and what to log.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The address to dial.
    pub addr: SocketAddr,
    /// For a name with more than one allowed address (explicit proxy and `CONNECT` only: a
    /// transparent connection goes where it was going), the others, each with the rule that
    /// allows it (none in report mode), in the resolver's order: tried when `addr` cannot
    /// be reached ([`crate::net::attempts`]). Usually empty, which allocates nothing.
    pub alternates: Vec<(SocketAddr, Option<Arc<str>>)>,
    /// `allow` or `report`.
    pub decision: &'static str,
    /// The allowing rule.
    pub rule: Option<std::sync::Arc<str>>,
    /// In report mode, what enforcement would have denied.
    pub reason: Option<String>,
    /// Whether the request's name is known to belong to `addr`, so that a response may be
    /// cached under it. False when a transparent client's Host was not checked (its
    /// destination was allowed by address) or in report mode: caching those would let one
    /// client plant a response for a name it does not own.
    pub name_verified: bool,
}

/// Decides whether `host:port` may be reached and where to dial. In transparent mode
/// (`original_dst` set) the dial address is always the original destination, and the
/// name must resolve to it unless a CIDR rule allows the destination itself. `captured`:
/// the connection was redirected to the proxy (not sent to the explicit listener, nor from
/// inside a `CONNECT`), which alone may use the DNS-server allowance.
pub async fn admit(
    inputs: &Inputs,
    state: &State,
    host: &Host,
    port: u16,
    original_dst: Option<SocketAddr>,
    captured: bool,
) -> Result<Admitted, ProxyError> {
    let result = decide(state, host, port, original_dst, captured).await;
    let admitted = match result {
        Ok(a) => a,
        Err(ProxyError::Denied(deny))
            if state.cfg.egress.mode == EgressMode::Report
                && !matches!(deny, Deny::InvalidHost(_)) =>
        {
            crate::metrics::record_denial(deny.code(), "report");
            let (addr, alternates) = match original_dst {
                Some(od) => (od, Vec::new()),
                None => fallback_addrs(state, host, port).await?,
            };
            tracing::info!(target: "egress", %deny, "report mode: would deny");
            Admitted {
                addr,
                alternates,
                decision: "report",
                rule: None,
                reason: Some(deny.to_string()),
                name_verified: false,
            }
        }
        Err(e) => return Err(e),
    };
    if original_dst.is_none() && inputs.is_own(admitted.addr) {
        return Err(ProxyError::Loop(admitted.addr.to_string()));
    }
    let mut admitted = admitted;
    if !admitted.alternates.is_empty() {
        // Never a way round the loop check: the proxy's own addresses are not tried either.
        admitted.alternates.retain(|(a, _)| !inputs.is_own(*a));
    }
    Ok(admitted)
}

async fn decide(
    state: &State,
    host: &Host,
    port: u16,
    original_dst: Option<SocketAddr>,
    captured: bool,
) -> Result<Admitted, ProxyError> {
    let policy = &state.cfg.egress;
    match before_lookup(policy, host, port, original_dst, captured)? {
        Decided::Done(admitted) => Ok(admitted),
        Decided::ByAddress { name, rule } => {
            let addrs = state.dns.lookup(name).await.map_err(ProxyError::Dns)?;
            // A transparent client resolved the name itself, maybe to a newer answer than
            // the cached one (a CDN's rotating record set): ask the DNS server again before
            // calling its destination forged. (`by_address` refuses it if still absent.)
            if let Some(od) = original_dst {
                let od = od.ip().to_canonical();
                if !addrs.iter().any(|a| a.to_canonical() == od) {
                    if let Ok(fresh) = state.dns.lookup_fresh(name).await {
                        return by_address(policy, name, port, &rule, original_dst, &fresh);
                    }
                }
            }
            by_address(policy, name, port, &rule, original_dst, &addrs)
        }
    }
}

/// Admission decided again, after a config reload, for a connection already open to
/// `addr`: as in transparent mode, with `addr` as the destination, and without a new DNS
/// lookup (the name is taken to resolve to the address it was checked against then).
/// Report mode is the caller's to handle, as in [`admit`].
pub fn recheck(
    policy: &EgressPolicy,
    host: &Host,
    port: u16,
    addr: SocketAddr,
    captured: bool,
) -> Result<Admitted, ProxyError> {
    match before_lookup(policy, host, port, Some(addr), captured)? {
        Decided::Done(admitted) => Ok(admitted),
        Decided::ByAddress { name, rule } => {
            by_address(policy, name, port, &rule, Some(addr), &[addr.ip()])
        }
    }
}

/// What the policy decides before any name is resolved.
enum Decided<'a> {
    Done(Admitted),
    /// A host rule allows the name: its addresses decide.
    ByAddress {
        name: &'a str,
        rule: Arc<str>,
    },
}

fn allowed(addr: SocketAddr, rule: Arc<str>) -> Admitted {
    Admitted {
        addr,
        alternates: Vec::new(),
        decision: "allow",
        rule: Some(rule),
        reason: None,
        name_verified: true,
    }
}

fn before_lookup<'a>(
    policy: &EgressPolicy,
    host: &'a Host,
    port: u16,
    original_dst: Option<SocketAddr>,
    captured: bool,
) -> Result<Decided<'a>, ProxyError> {
    // Transparent: a destination allowed by address is allowed whatever name the client
    // claims (but that name is then unverified, so it is never cached under).
    if let Some(od) = original_dst {
        let by_address = if captured {
            policy.captured_allows(od.ip(), port)
        } else {
            policy.cidr_allows(od.ip(), port)
        };
        if let Some(rule) = by_address {
            let name_verified = matches!(host, Host::Ip(ip) if *ip == od.ip());
            return Ok(Decided::Done(Admitted {
                name_verified,
                ..allowed(od, rule)
            }));
        }
    }
    match (policy.check_target(host, port), host) {
        (TargetCheck::Denied(d), _) => Err(ProxyError::Denied(d)),
        (TargetCheck::IpAllowed { rule }, Host::Ip(ip)) => {
            // An allowed address that is not where the client was going is a forgery.
            match original_dst {
                Some(od) if od.ip() != *ip => Err(ProxyError::Denied(Deny::Forged {
                    host: ip.to_string(),
                    addr: od.ip(),
                })),
                _ => Ok(Decided::Done(allowed(SocketAddr::new(*ip, port), rule))),
            }
        }
        (TargetCheck::HostAllowed { rule }, Host::Name(name)) => {
            Ok(Decided::ByAddress { name, rule })
        }
        // check_target answers IpAllowed only for IPs and HostAllowed only for names.
        (_, other) => Err(ProxyError::BadRequest(format!("unexpected target {other}"))),
    }
}

/// The decision for a name a host rule allows, once its addresses are known.
fn by_address(
    policy: &EgressPolicy,
    name: &str,
    port: u16,
    rule: &Arc<str>,
    original_dst: Option<SocketAddr>,
    addrs: &[IpAddr],
) -> Result<Admitted, ProxyError> {
    match original_dst {
        Some(od) => {
            if !addrs
                .iter()
                .any(|a| a.to_canonical() == od.ip().to_canonical())
            {
                return Err(ProxyError::Denied(Deny::Forged {
                    host: name.to_string(),
                    addr: od.ip(),
                }));
            }
            let (ip, rule) = policy
                .choose_addr(name, port, Some(rule), &[od.ip()])
                .map_err(ProxyError::Denied)?;
            Ok(allowed(SocketAddr::new(ip, od.port()), rule))
        }
        None => {
            let (ip, first) = policy
                .choose_addr(name, port, Some(rule), addrs)
                .map_err(ProxyError::Denied)?;
            let mut admitted = allowed(SocketAddr::new(ip, port), first);
            // The chosen address is the first allowed one; the rest follow it, once each.
            for (i, &other) in addrs.iter().enumerate() {
                if other == ip || addrs[..i].contains(&other) {
                    continue;
                }
                if let Some(r) = policy.addr_allowed(other, port, Some(rule)) {
                    admitted
                        .alternates
                        .push((SocketAddr::new(other, port), Some(r)));
                }
            }
            Ok(admitted)
        }
    }
}

/// Report mode still has to reach the target: the literal IP, or the resolved ones (the
/// first, then the others to try if it cannot be reached).
async fn fallback_addrs(
    state: &State,
    host: &Host,
    port: u16,
) -> Result<(SocketAddr, Vec<(SocketAddr, Option<Arc<str>>)>), ProxyError> {
    match host {
        Host::Ip(ip) => Ok((SocketAddr::new(*ip, port), Vec::new())),
        Host::Name(n) => {
            let addrs = state.dns.lookup(n).await.map_err(ProxyError::Dns)?;
            let mut all = addrs.iter().map(|ip| SocketAddr::new(*ip, port));
            let first = all
                .next()
                .ok_or_else(|| ProxyError::Upstream(n.clone(), "no addresses".into()))?;
            Ok((
                first,
                all.filter(|a| *a != first).map(|a| (a, None)).collect(),
            ))
        }
    }
}
