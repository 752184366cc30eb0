//! The egress allowlist, compiled from `outbound.egress` into immutable matchers, and the
//! decision in two steps: before DNS (is this name or IP allowed on this port?) and after
//! DNS (which resolved address may be dialled?). The proxy dials exactly the address that
//! step two returns, so a rebinding resolver cannot change what was checked.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::host::{Host, HostError};
use crate::config::EgressMode;

/// Ports a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSet {
    /// Any port (the rule named none).
    Any,
    /// Only these.
    Only(Vec<u16>),
}

impl PortSet {
    fn allows(&self, port: u16) -> bool {
        match self {
            PortSet::Any => true,
            PortSet::Only(p) => p.contains(&port),
        }
    }
}

/// A host pattern from the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One name, lower-case.
    Exact(String),
    /// `*.example.org`: stored as `.example.org`; matches subdomains only.
    Suffix(String),
}

impl HostPattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == name,
            HostPattern::Suffix(s) => name.len() > s.len() && name.ends_with(s.as_str()),
        }
    }
}

/// A compiled host rule.
#[derive(Debug, Clone)]
pub struct HostRule {
    /// Index in `outbound.egress.allow`.
    pub index: usize,
    /// The pattern.
    pub pattern: HostPattern,
    /// Its ports.
    pub ports: PortSet,
    /// How the log names it, built once: it is written on every request it allows.
    pub label: Arc<str>,
}

impl HostRule {
    /// A rule, with its log label.
    pub fn new(index: usize, pattern: HostPattern, ports: PortSet) -> Self {
        let label = match &pattern {
            HostPattern::Exact(h) => format!("allow[{index}] host {h}"),
            HostPattern::Suffix(s) => format!("allow[{index}] host *{s}"),
        };
        Self {
            index,
            pattern,
            ports,
            label: label.into(),
        }
    }
}

/// A compiled CIDR rule.
#[derive(Debug, Clone)]
pub struct CidrRule {
    /// Index in `outbound.egress.allow`.
    pub index: usize,
    /// The network.
    pub net: IpNet,
    /// Its ports.
    pub ports: PortSet,
    /// How the log names it, built once.
    pub label: Arc<str>,
}

impl CidrRule {
    /// A rule, with its log label.
    pub fn new(index: usize, net: IpNet, ports: PortSet) -> Self {
        Self {
            index,
            net,
            ports,
            label: format!("allow[{index}] cidr {net}").into(),
        }
    }

    /// The rule `outbound.egress.allow_dns_servers` adds for a DNS server of resolv.conf:
    /// port 53 at its address, after every rule of the file.
    pub fn dns_server(index: usize, addr: IpAddr) -> Self {
        Self {
            index,
            net: IpNet::from(canonical(addr)),
            ports: PortSet::Only(vec![53]),
            label: format!("dns server {addr} (resolv.conf)").into(),
        }
    }
}

/// Why egress is denied. Each reads as a sentence for the `x-outrider-error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Deny {
    /// The host failed validation.
    #[error("invalid host: {0}")]
    InvalidHost(HostError),
    /// No rule names this host.
    #[error("no rule for host {0}")]
    NoRuleForHost(String),
    /// A rule names the host, but not on this port.
    #[error("port {port} not allowed for {host}")]
    PortNotAllowed {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// An IP target (literal, or opaque TCP) that no CIDR rule allows.
    #[error("no rule for address {addr} port {port}")]
    NoRuleForAddress {
        /// The address.
        addr: IpAddr,
        /// The port.
        port: u16,
    },
    /// The name resolved only to non-public addresses that no CIDR rule allows.
    #[error("{host} resolved to a private address {addr}")]
    PrivateAddress {
        /// The name.
        host: String,
        /// The first such address.
        addr: IpAddr,
    },
    /// Transparent mode: the Host/SNI does not resolve to the connection's original destination.
    #[error("{host} does not resolve to the original destination {addr} (forged host)")]
    Forged {
        /// The claimed name.
        host: String,
        /// The original destination.
        addr: IpAddr,
    },
}

impl Deny {
    /// A short stable code for metrics labels and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Deny::InvalidHost(_) => "invalid_host",
            Deny::NoRuleForHost(_) => "no_rule_for_host",
            Deny::PortNotAllowed { .. } => "port_not_allowed",
            Deny::NoRuleForAddress { .. } => "no_rule_for_address",
            Deny::PrivateAddress { .. } => "private_address",
            Deny::Forged { .. } => "forged_host",
        }
    }
}

/// Step one's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetCheck {
    /// A host rule allows the name; resolve it and call [`EgressPolicy::choose_addr`].
    HostAllowed {
        /// The rule, for the log.
        rule: Arc<str>,
    },
    /// An IP literal allowed by a CIDR rule: dial it.
    IpAllowed {
        /// The rule, for the log.
        rule: Arc<str>,
    },
    /// Denied before DNS.
    Denied(Deny),
}

/// The compiled allowlist.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// Enforce or report.
    pub mode: EgressMode,
    /// Host rules in file order.
    pub hosts: Vec<HostRule>,
    /// CIDR rules in file order.
    pub cidrs: Vec<CidrRule>,
    /// Port 53 of resolv.conf's DNS servers (`allow_dns_servers`), for captured connections
    /// only: see [`Self::captured_allows`].
    pub dns_servers: Vec<CidrRule>,
}

impl EgressPolicy {
    /// Step one, before any DNS: decides on the name or IP and the port.
    pub fn check_target(&self, host: &Host, port: u16) -> TargetCheck {
        match host {
            Host::Ip(ip) => match self.cidr_allows(*ip, port) {
                Some(rule) => TargetCheck::IpAllowed { rule },
                None => TargetCheck::Denied(Deny::NoRuleForAddress { addr: *ip, port }),
            },
            Host::Name(name) => {
                let mut named = false;
                for rule in &self.hosts {
                    if rule.pattern.matches(name) {
                        named = true;
                        if rule.ports.allows(port) {
                            return TargetCheck::HostAllowed {
                                rule: rule.label.clone(),
                            };
                        }
                    }
                }
                // A name needs a host rule: CIDR rules never make the proxy resolve a name
                // it was not told about (no DNS lookups, and no DNS exfiltration, for names
                // that will be refused anyway).
                if named {
                    TargetCheck::Denied(Deny::PortNotAllowed {
                        host: name.clone(),
                        port,
                    })
                } else {
                    TargetCheck::Denied(Deny::NoRuleForHost(name.clone()))
                }
            }
        }
    }

    /// Step two, after DNS: picks the first resolved address that may be dialled.
    /// With `host_rule`, public addresses are fine and non-public ones need a CIDR rule;
    /// without, every address needs a CIDR rule. Returns the address and the rule.
    pub fn choose_addr(
        &self,
        name: &str,
        port: u16,
        host_rule: Option<&Arc<str>>,
        addrs: &[IpAddr],
    ) -> Result<(IpAddr, Arc<str>), Deny> {
        for &addr in addrs {
            if let Some(rule) = self.addr_allowed(addr, port, host_rule) {
                return Ok((addr, rule));
            }
        }
        match (host_rule, addrs.first()) {
            (Some(_), Some(&addr)) => Err(Deny::PrivateAddress {
                host: name.to_owned(),
                addr,
            }),
            _ => Err(Deny::NoRuleForHost(name.to_owned())),
        }
    }

    /// The rule that lets a name reach `addr` (see [`Self::choose_addr`]), if any.
    pub fn addr_allowed(
        &self,
        addr: IpAddr,
        port: u16,
        host_rule: Option<&Arc<str>>,
    ) -> Option<Arc<str>> {
        if let Some(cidr) = self.cidr_allows(addr, port) {
            // Name both rules when a host rule's name needed a CIDR rule for its address:
            // the usual case for a cluster's own services, so put together at its length
            // (through `format!` the string grew twice, a thousand instructions a request).
            return Some(match host_rule {
                Some(h) if !is_public(addr) => {
                    let mut both = String::with_capacity(h.len() + 3 + cidr.len());
                    both.push_str(h);
                    both.push_str(" + ");
                    both.push_str(&cidr);
                    both.into()
                }
                _ => cidr,
            });
        }
        host_rule.filter(|_| is_public(addr)).cloned()
    }

    /// What lets a transparently captured connection reach `addr:port` whatever name it
    /// claims: a CIDR rule, or else port 53 of a DNS server of resolv.conf. That allowance is
    /// for the resolver library's retry over TCP, which the capture brings to the proxy; a
    /// client of the explicit listener does its DNS elsewhere, and where the proxy is its only
    /// way out, a tunnel to the proxy's resolver would be one for DNS exfiltration.
    pub fn captured_allows(&self, addr: IpAddr, port: u16) -> Option<Arc<str>> {
        self.cidr_allows(addr, port)
            .or_else(|| first_allowing(&self.dns_servers, addr, port))
    }

    /// The first CIDR rule that allows this address and port, described for the log.
    pub fn cidr_allows(&self, addr: IpAddr, port: u16) -> Option<Arc<str>> {
        first_allowing(&self.cidrs, addr, port)
    }
}

/// The label of the first of `rules` that allows `addr:port`.
fn first_allowing(rules: &[CidrRule], addr: IpAddr, port: u16) -> Option<Arc<str>> {
    let addr = canonical(addr);
    rules
        .iter()
        .find(|c| c.net.contains(&addr) && c.ports.allows(port))
        .map(|c| c.label.clone())
}

/// Matches IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is, so that a CIDR
/// rule written for IPv4 covers it and a mapped loopback is seen as loopback.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Whether an address is on the public internet: not loopback, private (RFC 1918,
/// fc00::/7), shared (100.64.0.0/10), link-local (169.254.0.0/16 with the cloud metadata
/// address, fe80::/10), unspecified, multicast, broadcast, reserved, or an IPv6 form that
/// embeds an IPv4 address (mapped, compatible, 6to4, NAT64 local-use prefixes), which could
/// smuggle any of those. An address under the NAT64 well-known prefix (`64:ff9b::/96`, RFC
/// 6052) is the IPv4 address in its last 32 bits, and as public as that one: DNS64 gives
/// every IPv4-only name such an address in an IPv6-only cluster (EKS in IPv6 mode), where
/// counting them all private refused every such name.
/// Documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) count as public:
/// they reach nothing internal, and the namespace tests use them as "internet" hosts.
pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || v6.to_ipv4_mapped().is_some()
                || (s[0..6] == [0, 0, 0, 0, 0, 0])
                || (s[0] == 0x64 && s[1] == 0xff9b && !is_public_nat64(s))
                || s[0] == 0x2002)
        }
    }
}

/// `64:ff9b::a.b.c.d` with `a.b.c.d` public; any other `64:ff9b:…` address is not.
fn is_public_nat64(s: [u16; 8]) -> bool {
    if s[2..6] != [0, 0, 0, 0] {
        return false;
    }
    let [hi, lo] = [s[6].to_be_bytes(), s[7].to_be_bytes()];
    is_public(IpAddr::from([hi[0], hi[1], lo[0], lo[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat64_address_is_as_public_as_the_ipv4_address_it_carries() {
        let public = |a: &str| is_public(a.parse().unwrap_or(IpAddr::from([0u8; 4])));
        // 93.184.216.34 and 203.0.113.5 (public), then 10.0.0.1, 169.254.169.254, 127.0.0.1.
        assert!(public("64:ff9b::5db8:d822"));
        assert!(public("64:ff9b::203.0.113.5"));
        assert!(!public("64:ff9b::a00:1"));
        assert!(!public("64:ff9b::169.254.169.254"));
        assert!(!public("64:ff9b::127.0.0.1"));
        // The local-use prefix (RFC 8215) may carry the address anywhere: never public.
        assert!(!public("64:ff9b:1::5db8:d822"));
        assert!(!public("64:ff9b:0:0:1::5db8:d822"));
        let p = policy();
        let label: Arc<str> = "allow[0] host api.example.com".into();
        let nat64: IpAddr = "64:ff9b::5db8:d822"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(
            p.choose_addr("api.example.com", 80, Some(&label), &[nat64])
                .map(|r| r.0),
            Ok(nat64),
            "a name DNS64 answered for is reached through NAT64"
        );
    }

    fn policy() -> EgressPolicy {
        EgressPolicy {
            dns_servers: Vec::new(),
            mode: EgressMode::Enforce,
            hosts: vec![
                HostRule::new(
                    0,
                    HostPattern::Exact("api.example.com".into()),
                    PortSet::Any,
                ),
                HostRule::new(
                    1,
                    HostPattern::Suffix(".example.org".into()),
                    PortSet::Only(vec![443]),
                ),
            ],
            cidrs: vec![CidrRule::new(
                2,
                "10.20.0.0/16".parse().unwrap_or_else(|_| IpNet::default()),
                PortSet::Only(vec![5432]),
            )],
        }
    }

    fn name(n: &str) -> Host {
        Host::Name(n.into())
    }

    #[test]
    fn suffix_matches_subdomains_only() {
        let p = policy();
        assert!(matches!(
            p.check_target(&name("a.example.org"), 443),
            TargetCheck::HostAllowed { .. }
        ));
        assert!(matches!(
            p.check_target(&name("example.org"), 443),
            TargetCheck::Denied(Deny::NoRuleForHost(_))
        ));
        assert!(matches!(
            p.check_target(&name("a.example.org"), 80),
            TargetCheck::Denied(Deny::PortNotAllowed { .. })
        ));
        assert!(matches!(
            p.check_target(&name("badexample.org"), 5432),
            TargetCheck::Denied(Deny::NoRuleForHost(_))
        ));
    }

    #[test]
    fn private_addresses_need_a_cidr_rule() {
        let p = policy();
        let label: Arc<str> = "allow[0] host api.example.com".into();
        let rule = Some(&label);
        let private: Vec<IpAddr> = [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "::ffff:127.0.0.1",
            "fe80::1",
            "::",
            "100.64.1.1",
            "fd00::1",
            "64:ff9b::a00:1",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
        for a in &private {
            assert!(
                matches!(
                    p.choose_addr("api.example.com", 80, rule, &[*a]),
                    Err(Deny::PrivateAddress { .. })
                ),
                "{a} must be refused"
            );
        }
        let public: IpAddr = "93.184.216.34".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(
            p.choose_addr("api.example.com", 80, rule, &[private[1], public])
                .map(|r| r.0),
            Ok(public)
        );
        let allowed: IpAddr = "10.20.1.1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert!(p.choose_addr("db", 5432, None, &[allowed]).is_ok());
        assert!(p.choose_addr("db", 5433, None, &[allowed]).is_err());
    }
}
