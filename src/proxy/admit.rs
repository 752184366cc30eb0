//! The admit phase: egress policy plus DNS, ending in the one address the proxy will dial.
//! Shared by absolute-form HTTP, CONNECT, and transparent HTTP, TLS and TCP.

use std::net::SocketAddr;

use super::error::ProxyError;
use super::{Inputs, State};
use crate::config::EgressMode;
use crate::policy::egress::{Deny, TargetCheck};
use crate::policy::host::Host;

/// The outcome of admission: where to connect, and what to log.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The address to dial, and the only one.
    pub addr: SocketAddr,
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
/// name must resolve to it unless a CIDR rule allows the destination itself.
pub async fn admit(
    inputs: &Inputs,
    state: &State,
    host: &Host,
    port: u16,
    original_dst: Option<SocketAddr>,
) -> Result<Admitted, ProxyError> {
    let result = decide(state, host, port, original_dst).await;
    let admitted = match result {
        Ok(a) => a,
        Err(ProxyError::Denied(deny))
            if state.cfg.egress.mode == EgressMode::Report
                && !matches!(deny, Deny::InvalidHost(_)) =>
        {
            crate::metrics::record_denial(deny.code(), "report");
            let addr = match original_dst {
                Some(od) => od,
                None => fallback_addr(state, host, port).await?,
            };
            tracing::info!(target: "egress", %deny, "report mode: would deny");
            Admitted {
                addr,
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
    Ok(admitted)
}

async fn decide(
    state: &State,
    host: &Host,
    port: u16,
    original_dst: Option<SocketAddr>,
) -> Result<Admitted, ProxyError> {
    let policy = &state.cfg.egress;
    let allowed = |addr, rule| Admitted {
        addr,
        decision: "allow",
        rule: Some(rule),
        reason: None,
        name_verified: true,
    };
    // Transparent: a destination allowed by address is allowed whatever name the client
    // claims (but that name is then unverified, so it is never cached under).
    if let Some(od) = original_dst {
        if let Some(rule) = policy.cidr_allows(od.ip(), port) {
            let name_verified = matches!(host, Host::Ip(ip) if *ip == od.ip());
            return Ok(Admitted {
                name_verified,
                ..allowed(od, rule)
            });
        }
    }
    let host_rule = match (policy.check_target(host, port), host) {
        (TargetCheck::Denied(d), _) => return Err(ProxyError::Denied(d)),
        (TargetCheck::IpAllowed { rule }, Host::Ip(ip)) => {
            // An allowed address that is not where the client was going is a forgery.
            return match original_dst {
                Some(od) if od.ip() != *ip => Err(ProxyError::Denied(Deny::Forged {
                    host: ip.to_string(),
                    addr: od.ip(),
                })),
                _ => Ok(allowed(SocketAddr::new(*ip, port), rule)),
            };
        }
        (TargetCheck::HostAllowed { rule }, Host::Name(name)) => (name, rule),
        // check_target answers IpAllowed only for IPs and HostAllowed only for names.
        (_, other) => return Err(ProxyError::BadRequest(format!("unexpected target {other}"))),
    };
    let (name, rule) = host_rule;
    let addrs = state.dns.lookup(name).await.map_err(ProxyError::Dns)?;
    match original_dst {
        Some(od) => {
            if !addrs
                .iter()
                .any(|a| a.to_canonical() == od.ip().to_canonical())
            {
                return Err(ProxyError::Denied(Deny::Forged {
                    host: name.clone(),
                    addr: od.ip(),
                }));
            }
            let (ip, rule) = policy
                .choose_addr(name, port, Some(&rule), &[od.ip()])
                .map_err(ProxyError::Denied)?;
            Ok(allowed(SocketAddr::new(ip, od.port()), rule))
        }
        None => {
            let (ip, rule) = policy
                .choose_addr(name, port, Some(&rule), &addrs)
                .map_err(ProxyError::Denied)?;
            Ok(allowed(SocketAddr::new(ip, port), rule))
        }
    }
}

/// Report mode still has to reach the target: the literal IP, or the first resolved one.
async fn fallback_addr(state: &State, host: &Host, port: u16) -> Result<SocketAddr, ProxyError> {
    match host {
        Host::Ip(ip) => Ok(SocketAddr::new(*ip, port)),
        Host::Name(n) => {
            let addrs = state.dns.lookup(n).await.map_err(ProxyError::Dns)?;
            addrs
                .first()
                .map(|ip| SocketAddr::new(*ip, port))
                .ok_or_else(|| ProxyError::Upstream(n.clone(), "no addresses".into()))
        }
    }
}
