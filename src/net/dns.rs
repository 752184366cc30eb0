//! Name resolution: `dns.hosts` from config first, then hickory-resolver with the system's
//! resolv.conf and /etc/hosts. Every lookup and failure is counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::config::{ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::TokioResolver;

/// A lookup that found nothing usable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("DNS lookup for {host} failed: {reason}")]
pub struct DnsError {
    /// The name.
    pub host: String,
    /// Why.
    pub reason: String,
}

/// The resolver: static names over a shared hickory resolver.
#[derive(Clone)]
pub struct Dns {
    statics: Arc<HashMap<String, Vec<IpAddr>>>,
    resolver: Arc<TokioResolver>,
}

impl Dns {
    /// Builds a resolver from the system config (falling back to hickory's defaults when
    /// there is no readable resolv.conf, as in a bare network namespace).
    pub fn new(statics: HashMap<String, Vec<IpAddr>>) -> Result<Self, DnsError> {
        let mut builder = TokioResolver::builder_tokio().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no usable system DNS config; using defaults");
            TokioResolver::builder_with_config(
                ResolverConfig::default(),
                TokioRuntimeProvider::default(),
            )
        });
        builder.options_mut().use_hosts_file = ResolveHosts::Always;
        let resolver = builder.build().map_err(|e| DnsError {
            host: String::new(),
            reason: format!("resolver setup failed: {e}"),
        })?;
        Ok(Self {
            statics: Arc::new(statics),
            resolver: Arc::new(resolver),
        })
    }

    /// Resolves a lower-case name to its addresses, in the resolver's order.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        metrics::counter!("outrider_dns_lookups_total").increment(1);
        if let Some(ips) = self.statics.get(host) {
            return Ok(ips.clone());
        }
        // A fully qualified query so that resolv.conf search domains cannot turn
        // `api.example.com` into `api.example.com.corp.internal`. The name is built as ASCII:
        // `host` has passed `policy::host` (letters, digits, `-`, `_`, lower case), and
        // hickory's `&str` conversion runs IDNA (UTS 46, STD3) on it, which refuses `_`
        // inside a label, so `my_svc.internal` failed as "invalid characters" before any
        // query, where getaddrinfo, curl and every peer proxy resolve it.
        let fqdn = match Name::from_ascii(format!("{host}.")) {
            Ok(name) => name,
            Err(e) => {
                metrics::counter!("outrider_dns_failures_total").increment(1);
                return Err(DnsError {
                    host: host.into(),
                    reason: brief(&e.to_string()),
                });
            }
        };
        // Boxed: the resolver's future is large, and inline it would enlarge every request's
        // future, including those for IP literals and static names that never get here.
        match Box::pin(self.resolver.lookup_ip(fqdn)).await {
            Ok(found) => {
                let ips: Vec<IpAddr> = found.iter().collect();
                if ips.is_empty() {
                    metrics::counter!("outrider_dns_failures_total").increment(1);
                    return Err(DnsError {
                        host: host.into(),
                        reason: "no addresses".into(),
                    });
                }
                Ok(ips)
            }
            Err(e) => {
                metrics::counter!("outrider_dns_failures_total").increment(1);
                Err(DnsError {
                    host: host.into(),
                    reason: brief(&e.to_string()),
                })
            }
        }
    }
}

/// The resolver's message without the debug dump of the query it may carry: the reason
/// travels in a response header, and the client needs the gist, not the internals.
fn brief(message: &str) -> String {
    let cut = message.find(['{', '\n']).unwrap_or(message.len());
    let head = message[..cut].trim().trim_end_matches(':').trim();
    let head = if head.is_empty() {
        "lookup failed"
    } else {
        head
    };
    head.chars().take(120).collect()
}
