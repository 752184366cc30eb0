//! Semantic validation: turns a parsed [`Config`] into [`Compiled`], the immutable form the
//! proxy runs, or an error naming the key path (`outbound.egress.allow[2].cidr: …`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

use super::{Config, ConfigError, EgressMode, MtlsMode};
use crate::policy::egress::{CidrRule, EgressPolicy, HostPattern, HostRule, PortSet};
use crate::policy::host::{parse_host, validate_name, Host};
use crate::policy::route::{Route, Routes};

/// A validated config, compiled into what the proxy runs.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The file as parsed, for the admin `/config` page.
    pub source: Config,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Outbound listen address.
    pub outbound_listen: SocketAddr,
    /// Inbound listen address, when there is an inbound section.
    pub inbound_listen: Option<SocketAddr>,
    /// The egress allowlist.
    pub egress: EgressPolicy,
    /// Static names from `dns.hosts`, lower-case.
    pub dns_hosts: HashMap<String, Vec<IpAddr>>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream response-head timeout.
    pub response_timeout: Duration,
    /// How long an upstream HTTP/1.1 response body may pause; `None`: no limit.
    pub response_idle: Option<Duration>,
    /// Protocol-detection timeout for transparent connections.
    pub detect_timeout: Duration,
    /// Ports where the server speaks first.
    pub server_first_ports: Vec<u16>,
    /// Inbound mTLS mode.
    pub inbound_mtls: MtlsMode,
    /// Inbound routes.
    pub routes: Routes,
    /// Inbound app host for unrouted traffic: an address, or `None` for the address the
    /// caller connected to (`app_host: original`).
    pub app_host: Option<IpAddr>,
    /// Access log destination.
    pub access_log: String,
    /// Whether logged paths lose their query string.
    pub access_log_strip_query: bool,
    /// SIGTERM drain timeout.
    pub drain_timeout: Duration,
    /// How long the outbound listener stays open after SIGTERM.
    pub outbound_grace: Duration,
    /// Inbound authorization.
    pub authz: crate::policy::authz::Authz,
    /// Mesh networks: destinations reached with mTLS.
    pub mesh_networks: Vec<IpNet>,
    /// Expected peer identities per destination network.
    pub mesh_identities: Vec<(IpNet, Vec<crate::tls::SpiffeId>)>,
    /// The mesh identity, when configured.
    pub identity: Option<crate::tls::IdentityConfig>,
    /// The HTTP cache settings.
    pub cache: crate::cache::CacheConfig,
    /// Limits on client connections (both listeners).
    pub clients: crate::proxy::http::ClientLimits,
}

/// Validates and compiles a parsed config.
pub fn validate(config: Config) -> Result<Compiled, ConfigError> {
    let admin_listen = listen_addr("admin.listen", &config.admin.listen)?;
    let outbound_listen = listen_addr("outbound.listen", &config.outbound.listen)?;
    let inbound_listen = match &config.inbound {
        Some(i) => Some(listen_addr("inbound.listen", &i.listen)?),
        None => None,
    };
    check_distinct(admin_listen, outbound_listen, inbound_listen)?;
    if config.runtime.worker_threads > MAX_WORKERS {
        return Err(ConfigError::invalid(
            "runtime.worker_threads",
            format!(
                "{} is more than {MAX_WORKERS}; 0 means one per CPU",
                config.runtime.worker_threads
            ),
        ));
    }

    let egress = compile_egress(&config)?;
    let mut dns_hosts = HashMap::new();
    for (name, addrs) in &config.dns.hosts {
        let key = format!("dns.hosts.{name}");
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        validate_name(&lower)
            .map_err(|e| ConfigError::invalid(&key, format!("{name:?} is not a host name: {e}")))?;
        let mut ips = Vec::new();
        for a in addrs.iter() {
            ips.push(
                a.parse::<IpAddr>().map_err(|_| {
                    ConfigError::invalid(&key, format!("{a:?} is not an IP address"))
                })?,
            );
        }
        dns_hosts.insert(lower, ips);
    }

    let t = &config.outbound.timeouts;
    let connect_timeout = duration("outbound.timeouts.connect", &t.connect)?;
    let response_timeout = duration("outbound.timeouts.response", &t.response)?;
    let response_idle = Some(duration(
        "outbound.timeouts.response_idle",
        &t.response_idle,
    )?)
    .filter(|d| !d.is_zero());
    let detect_timeout = duration("outbound.detect.timeout", &config.outbound.detect.timeout)?;
    let server_first_ports = ports(
        "outbound.detect.server_first_ports",
        &config.outbound.detect.server_first_ports,
    )?;
    let drain_timeout = duration("shutdown.drain_timeout", &config.shutdown.drain_timeout)?;
    let outbound_grace = duration("shutdown.outbound_grace", &config.shutdown.outbound_grace)?;
    let clients = client_limits(&config.clients)?;

    let authz = match &config.inbound {
        Some(i) => compile_authz(&i.authorization)?,
        None => crate::policy::authz::Authz::default(),
    };
    let mesh_networks = config
        .mesh
        .networks
        .iter()
        .enumerate()
        .map(|(i, c)| cidr(&format!("mesh.networks[{i}]"), c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut mesh_identities = Vec::new();
    for (i, entry) in config.mesh.identities.iter().enumerate() {
        let base = format!("mesh.identities[{i}]");
        let net = cidr(&format!("{base}.cidr"), &entry.cidr)?;
        if entry.ids.is_empty() {
            return Err(ConfigError::invalid(
                format!("{base}.ids"),
                "is empty: name at least one SPIFFE ID",
            ));
        }
        let mut ids = Vec::new();
        for (j, id) in entry.ids.iter().enumerate() {
            ids.push(crate::tls::SpiffeId::parse(id).map_err(|e| {
                ConfigError::invalid(
                    format!("{base}.ids[{j}]"),
                    format!("{id:?} is not a SPIFFE ID: {e}"),
                )
            })?);
        }
        mesh_identities.push((net, ids));
    }
    let (inbound_mtls, routes, app_host) = match &config.inbound {
        Some(i) => (
            i.mtls,
            compile_routes(i)?,
            match i.app_host.as_str() {
                "original" => None,
                other => Some(other.parse::<IpAddr>().map_err(|_| {
                    ConfigError::invalid(
                        "inbound.app_host",
                        format!("{other:?} is not an IP address or \"original\""),
                    )
                })?),
            },
        ),
        None => (
            MtlsMode::Disabled,
            Routes::default(),
            Some(IpAddr::from([127, 0, 0, 1])),
        ),
    };
    config
        .outbound
        .cache
        .validate("outbound.cache")
        .map_err(|msg| match msg.split_once(": ") {
            Some((path, message)) => ConfigError::invalid(path, message),
            None => ConfigError::invalid("outbound.cache", msg),
        })?;
    if let Some(id) = &config.identity {
        id.validate("identity")
            .map_err(|msg| match msg.split_once(": ") {
                Some((path, message)) => ConfigError::invalid(path, message),
                None => ConfigError::invalid("identity", msg),
            })?;
    } else {
        if inbound_mtls != MtlsMode::Disabled && config.inbound.is_some() {
            return Err(ConfigError::invalid(
                "inbound.mtls",
                "strict and permissive need an identity section (or set mtls: disabled)",
            ));
        }
        if !mesh_networks.is_empty() {
            return Err(ConfigError::invalid(
                "mesh.networks",
                "mesh mTLS needs an identity section",
            ));
        }
    }
    if config.access_log.output.is_empty() {
        return Err(ConfigError::invalid(
            "access_log.output",
            "must be stdout, stderr, off or a file path",
        ));
    }
    Ok(Compiled {
        admin_listen,
        outbound_listen,
        inbound_listen,
        egress,
        dns_hosts,
        connect_timeout,
        response_timeout,
        response_idle,
        detect_timeout,
        server_first_ports,
        inbound_mtls,
        routes,
        app_host,
        access_log: config.access_log.output.clone(),
        access_log_strip_query: config.access_log.strip_query,
        drain_timeout,
        outbound_grace,
        clients,
        cache: config.outbound.cache.clone(),
        authz,
        mesh_networks,
        mesh_identities,
        identity: config.identity.clone(),
        source: config,
    })
}

fn listen_addr(path: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse::<SocketAddr>().map_err(|_| {
        ConfigError::invalid(
            path,
            format!("{value:?} is not a listen address (want IP:PORT, e.g. 127.0.0.1:15001)"),
        )
    })
}

fn check_distinct(
    admin: SocketAddr,
    outbound: SocketAddr,
    inbound: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    // Port 0 asks the kernel for a fresh port, so two of them never clash.
    let clash = |a: SocketAddr, b: SocketAddr| {
        a.port() != 0
            && a.port() == b.port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    if clash(admin, outbound) {
        return Err(ConfigError::invalid(
            "outbound.listen",
            format!("{outbound} is also admin.listen: two listeners cannot share an address"),
        ));
    }
    if let Some(inb) = inbound {
        for (other, key) in [(admin, "admin.listen"), (outbound, "outbound.listen")] {
            if clash(inb, other) {
                return Err(ConfigError::invalid(
                    "inbound.listen",
                    format!("{inb} is also {key}: two listeners cannot share an address"),
                ));
            }
        }
    }
    Ok(())
}

fn compile_egress(config: &Config) -> Result<EgressPolicy, ConfigError> {
    let mut hosts = Vec::new();
    let mut cidrs = Vec::new();
    for (index, rule) in config.outbound.egress.allow.iter().enumerate() {
        let base = format!("outbound.egress.allow[{index}]");
        let port_set = match &rule.ports {
            None => PortSet::Any,
            Some(list) if list.is_empty() => {
                return Err(ConfigError::invalid(
                    format!("{base}.ports"),
                    "is empty: omit it to allow any port",
                ))
            }
            Some(list) => PortSet::Only(ports(&format!("{base}.ports"), list)?),
        };
        match (&rule.host, &rule.cidr) {
            (Some(h), None) => hosts.push(HostRule::new(
                index,
                host_pattern(&format!("{base}.host"), h)?,
                port_set,
            )),
            (None, Some(c)) => cidrs.push(CidrRule::new(
                index,
                cidr(&format!("{base}.cidr"), c)?,
                port_set,
            )),
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    &base,
                    "has both host and cidr: give one per rule",
                ))
            }
            (None, None) => return Err(ConfigError::invalid(&base, "needs a host or a cidr")),
        }
    }
    Ok(EgressPolicy {
        mode: config.outbound.egress.mode,
        hosts,
        cidrs,
        dns_servers: Vec::new(),
    })
}

fn host_pattern(path: &str, raw: &str) -> Result<HostPattern, ConfigError> {
    let bad =
        |why: &str| ConfigError::invalid(path, format!("{raw:?} is not a host pattern: {why}"));
    if let Some(suffix) = raw.strip_prefix("*.") {
        if suffix.contains('*') {
            return Err(bad("only one leading `*.` is allowed"));
        }
        return match parse_host(suffix) {
            Ok(Host::Name(n)) => Ok(HostPattern::Suffix(format!(".{n}"))),
            Ok(Host::Ip(_)) => Err(bad(
                "a wildcard needs a domain, use a cidr rule for addresses",
            )),
            Err(e) => Err(bad(&e.to_string())),
        };
    }
    if raw.contains('*') {
        return Err(bad("a wildcard may only be a leading `*.`"));
    }
    match parse_host(raw) {
        Ok(Host::Name(n)) => Ok(HostPattern::Exact(n)),
        Ok(Host::Ip(_)) => Err(bad("an address, use a cidr rule")),
        Err(e) => Err(bad(&e.to_string())),
    }
}

fn cidr(path: &str, raw: &str) -> Result<IpNet, ConfigError> {
    raw.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ConfigError::invalid(path, format!("{raw:?} is not a CIDR")))
}

fn ports(path: &str, list: &[i64]) -> Result<Vec<u16>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, &p)| {
            u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| {
                ConfigError::invalid(
                    format!("{path}[{i}]"),
                    format!("{p} is not a port (1-65535)"),
                )
            })
        })
        .collect()
}

/// Bounds of `clients.max_request_head_bytes`: hyper cannot read with a buffer under 8 KiB
/// (and would panic), and past 16 MiB one client could make the proxy hold that much.
const MIN_HEAD: u64 = 8 * 1024;
const MAX_HEAD: u64 = 16 * 1024 * 1024;

/// More worker threads than this is a typo: each holds a runtime and a copy of every
/// listener, and past the CPUs they only take turns.
const MAX_WORKERS: usize = 1024;

fn client_limits(
    c: &super::ClientsConfig,
) -> Result<crate::proxy::http::ClientLimits, ConfigError> {
    let idle = duration("clients.idle_timeout", &c.idle_timeout)?;
    if idle.is_zero() {
        return Err(ConfigError::invalid(
            "clients.idle_timeout",
            "must be more than zero (a zero timeout would close every connection at once)",
        ));
    }
    if !(MIN_HEAD..=MAX_HEAD).contains(&c.max_request_head_bytes) {
        return Err(ConfigError::invalid(
            "clients.max_request_head_bytes",
            format!(
                "{} is out of range: between {MIN_HEAD} (8 KiB) and {MAX_HEAD} (16 MiB)",
                c.max_request_head_bytes
            ),
        ));
    }
    let tunnel_idle = duration("clients.tunnel_idle_timeout", &c.tunnel_idle_timeout)?;
    if tunnel_idle.is_zero() {
        return Err(ConfigError::invalid(
            "clients.tunnel_idle_timeout",
            "must be more than zero (a zero timeout would close every tunnel at once)",
        ));
    }
    Ok(crate::proxy::http::ClientLimits {
        idle_timeout: idle,
        max_head: c.max_request_head_bytes as usize,
        tunnel_idle_timeout: tunnel_idle,
        max_connections: usize::try_from(c.max_connections).unwrap_or(usize::MAX),
    })
}

fn duration(path: &str, raw: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(raw).map_err(|e| {
        ConfigError::invalid(
            path,
            format!("{raw:?} is not a duration (e.g. 5s, 500ms): {e}"),
        )
    })
}

fn compile_routes(inbound: &super::InboundConfig) -> Result<Routes, ConfigError> {
    let mut out = Vec::new();
    for (i, r) in inbound.routes.iter().enumerate() {
        let base = format!("inbound.routes[{i}]");
        let to = r.to.parse::<SocketAddr>().map_err(|_| {
            ConfigError::invalid(
                format!("{base}.to"),
                format!("{:?} is not an address (IP:PORT)", r.to),
            )
        })?;
        let mut headers = Vec::new();
        for (name, value) in &r.matches.headers {
            let h = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    format!("{base}.match.headers"),
                    format!("{name:?} is not a header name"),
                )
            })?;
            headers.push((h, value.clone()));
        }
        if let Some(p) = &r.matches.path_prefix {
            if !p.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("{base}.match.path_prefix"),
                    format!("{p:?} must start with /"),
                ));
            }
        }
        let host = match &r.matches.host {
            Some(h) => match parse_host(h) {
                Ok(host) => Some(host.to_string()),
                Err(e) => {
                    return Err(ConfigError::invalid(
                        format!("{base}.match.host"),
                        format!("{h:?}: {e}"),
                    ))
                }
            },
            None => None,
        };
        out.push(Route {
            path_prefix: r.matches.path_prefix.clone(),
            host,
            headers,
            to,
        });
    }
    Ok(Routes(out))
}

impl Compiled {
    /// Where inbound traffic to `original_dst` goes when no route takes it: `app_host` (or
    /// the original destination's own address) on the original port.
    pub fn app_addr(&self, original_dst: SocketAddr) -> SocketAddr {
        SocketAddr::new(
            self.app_host.unwrap_or(original_dst.ip()),
            original_dst.port(),
        )
    }

    /// Whether egress denials are enforced.
    pub fn enforcing(&self) -> bool {
        self.egress.mode == EgressMode::Enforce
    }
}

fn compile_authz(
    rules: &[super::AuthzRuleConfig],
) -> Result<crate::policy::authz::Authz, ConfigError> {
    use crate::policy::authz::{Authz, AuthzRule, IdPattern};
    let mut out = Vec::new();
    for (index, r) in rules.iter().enumerate() {
        let base = format!("inbound.authorization[{index}]");
        let mut from = Vec::new();
        for (i, id) in r.from.iter().enumerate() {
            from.push(
                IdPattern::parse(id)
                    .map_err(|m| ConfigError::invalid(format!("{base}.from[{i}]"), m))?,
            );
        }
        for (i, p) in r.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(ConfigError::invalid(
                    format!("{base}.paths[{i}]"),
                    format!("{p:?} must start with /"),
                ));
            }
        }
        let mut methods = Vec::new();
        for (i, m) in r.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(ConfigError::invalid(
                    format!("{base}.methods[{i}]"),
                    format!("{m:?} is not an HTTP method"),
                ));
            }
            methods.push(m.to_ascii_uppercase());
        }
        out.push(AuthzRule {
            index,
            label: format!("authorization[{index}]").into(),
            from,
            ports: ports(&format!("{base}.ports"), &r.ports)?,
            paths: r.paths.clone(),
            methods,
        });
    }
    Ok(Authz(out))
}
