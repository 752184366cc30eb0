//! Name resolution: `dns.hosts` from config first, then hickory-resolver with the system's
//! resolv.conf and /etc/hosts. Every lookup and failure is counted.
//!
//! resolv.conf's search domains apply as with `ndots:1`, whatever its `ndots` says: a name
//! without a dot (`web`, a Kubernetes service) is looked up in the search domains first, then
//! as it is; a name with dots is looked up as it is, and in the search domains only when that
//! finds no such name (`api.ns2` finds `api.ns2.svc.cluster.local`). A name that exists as
//! written is never replaced by one under a search domain (Kubernetes' `ndots:5` would look up
//! `api.example.com.ns.svc.cluster.local` first), and a lookup that fails for another reason
//! (a timeout) is not repeated under every search domain.
//!
//! /etc/hosts is read here, not by hickory: a name it lists gets its addresses and no DNS
//! question, as getaddrinfo's `hosts: files dns` does.
//!
//! A name's addresses are kept for as long as its answer's TTL allows (the shortest of its
//! records'), as squid's ipcache keeps them: a request for a name looked up a moment ago
//! costs a map lookup, not a pass through hickory's query cache (half again the instructions
//! of the whole request, measured), and a DNS server that sends no SOA with an empty AAAA
//! answer, which hickory cannot cache, is not asked on every request. When the DNS server
//! gives no answer, an answer that expired less than a day ago stands in (RFC 8767).
//!
//! Only the address families the interfaces have are asked for, as with getaddrinfo's
//! `AI_ADDRCONFIG`, looked at again at most once a second when a lookup goes to DNS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup_ip::LookupIp;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::system_conf::read_system_conf;
use hickory_resolver::TokioResolver;

/// A lookup that found nothing usable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("DNS lookup for {host} failed: {reason}")]
pub struct DnsError {
    /// The name.
    pub host: String,
    /// Why.
    pub reason: String,
    /// The DNS server gave no answer (a timeout, a refused or failed query), as against
    /// one that says the name has no addresses: an expired answer may stand in.
    unanswered: bool,
}

/// The hosts file, read when the resolver is built (at start and on each reload).
const HOSTS_FILE: &str = "/etc/hosts";

/// Each name the hosts file lists (lower case, without a trailing dot) and its addresses, in
/// the file's order; a missing or unreadable file lists none.
fn read_hosts_file(path: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(addr)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in words {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let addrs = names.entry(name).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    names
}

/// How long [`Dns::lookup_fresh`] may reuse an answer.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// How many names' answers [`Dns::lookup`] keeps; past that, the expired ones are dropped,
/// and all of them when none has expired (a proxy that asks for more names than this within
/// their TTLs goes back to hickory's cache for them, no worse than without this one).
const MAX_ANSWERS: usize = 4096;

/// How long past its TTL an answer may stand in while the DNS server gives none (RFC 8767's
/// serve-stale, at its recommended lower bound).
const STALE_FOR: Duration = Duration::from_secs(24 * 3600);

/// How long a stale answer is used before the DNS server is asked again (RFC 8767's 30 s):
/// while it is down, one request in this time waits for its timeout, not every one.
const STALE_HOLD: Duration = Duration::from_secs(30);

/// A name's answer: its addresses, when it expires, and until when it may stand in for
/// an answer the DNS server does not give.
struct Answer {
    ips: Addrs,
    until: Instant,
    stale_until: Instant,
}

/// How often, at most, the interfaces' address families are looked at again, on a lookup that
/// goes to DNS: an address that comes after the proxy started (IPv6 from router
/// advertisements, some time after IPv4 from DHCP, on a VM) counts within a second, as it
/// does for getaddrinfo, with no reload.
const FAMILIES_RECHECK: Duration = Duration::from_secs(1);

/// The most addresses a kept answer grows to with fresh ones ([`Dns::lookup_fresh`]).
const MAX_MERGED: usize = 64;

/// Addresses, shared by every request for the name.
pub type Addrs = Arc<[IpAddr]>;

/// Hashed with foldhash (seeded per map), not std's SipHash: a named request looks its
/// name up in both maps.
type Names<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The DNS counters, resolved on first use rather than looked up in the registry on every
/// request; a process installs its recorder before any lookup.
struct Counters {
    lookups: metrics::Counter,
    failures: metrics::Counter,
    stale_answers: metrics::Counter,
}

fn counters() -> &'static Counters {
    static HANDLES: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| Counters {
        lookups: metrics::counter!("outrider_dns_lookups_total"),
        failures: metrics::counter!("outrider_dns_failures_total"),
        stale_answers: metrics::counter!("outrider_dns_stale_answers_total"),
    })
}

/// The resolver: static names over a shared hickory resolver.
#[derive(Clone)]
pub struct Dns {
    statics: Arc<Names<Addrs>>,
    /// Names resolved through DNS, with their addresses and when the answer expires.
    answers: Arc<RwLock<Names<Answer>>>,
    resolver: Arc<TokioResolver>,
    /// The same with answers kept [`FRESH_FOR`] at most, for [`Dns::lookup_fresh`].
    uncached: Arc<TokioResolver>,
    /// resolv.conf's search domains (`search`, or `domain`), in order.
    search: Arc<[Name]>,
    /// The one record type to ask for when the interfaces have one address family only
    /// ([`one_family`]; `None`: both), and when that was last looked at.
    families: Arc<Mutex<(Option<RecordType>, Instant)>>,
    /// The DNS servers resolv.conf names (none when it could not be read: hickory's
    /// fallback servers are not the workload's).
    servers: Arc<[IpAddr]>,
}

impl Dns {
    /// Builds a resolver from the system config (falling back to hickory's defaults when
    /// there is no readable resolv.conf, as in a bare network namespace). `prev`, the
    /// resolver a reload replaces, hands over the answers it keeps: a reload neither asks
    /// the DNS server for every name again nor loses the stand-ins for one that is down.
    pub fn new(
        mut statics: HashMap<String, Vec<IpAddr>>,
        prev: Option<&Dns>,
    ) -> Result<Self, DnsError> {
        // /etc/hosts answers a name it lists, and DNS is not asked (getaddrinfo's `files dns`).
        // Left to hickory, the file gave the A record while the AAAA question still went to
        // the DNS server, and every request for such a name waited for that answer: with no
        // server that answers, the whole query timeout, each time, since failures are not
        // cached. `dns.hosts` from the config comes first.
        for (name, addrs) in read_hosts_file(HOSTS_FILE) {
            statics.entry(name).or_insert(addrs);
        }
        let (config, options, servers) = match read_system_conf() {
            Ok((config, options)) => {
                let mut servers: Vec<IpAddr> = Vec::new();
                for ip in config.name_servers().iter().map(|s| s.ip) {
                    if !servers.contains(&ip) {
                        servers.push(ip);
                    }
                }
                (config, options, servers.into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "no usable system DNS config; using defaults");
                (
                    ResolverConfig::default(),
                    ResolverOpts::default(),
                    [].into(),
                )
            }
        };
        let only = one_family(&interface_addresses());
        if only.is_some() {
            log_families(only);
        }
        let search: Arc<[Name]> = config.search().into();
        let build = |cached: bool| {
            let mut builder =
                TokioResolver::builder_with_config(config.clone(), TokioRuntimeProvider::default())
                    .with_options(options.clone());
            let opts = builder.options_mut();
            opts.use_hosts_file = ResolveHosts::Never;
            if !cached {
                // A second at most: fresh enough for a record set that rotates by the minute,
                // and an app that sends forged Hosts in a loop makes the sidecar ask its DNS
                // server once a second per name, not once per connection.
                opts.positive_max_ttl = Some(FRESH_FOR);
                opts.negative_max_ttl = Some(FRESH_FOR);
            }
            builder.build().map_err(|e| DnsError {
                host: String::new(),
                reason: format!("resolver setup failed: {e}"),
                unanswered: false,
            })
        };
        Ok(Self {
            statics: Arc::new(
                statics
                    .into_iter()
                    .map(|(name, addrs)| (name, addrs.into()))
                    .collect(),
            ),
            answers: prev.map(|p| p.answers.clone()).unwrap_or_default(),
            resolver: Arc::new(build(true)?),
            uncached: Arc::new(build(false)?),
            search,
            families: Arc::new(Mutex::new((only, Instant::now()))),
            servers,
        })
    }

    /// The DNS servers resolv.conf names, in its order.
    pub fn servers(&self) -> &[IpAddr] {
        &self.servers
    }

    /// The one record type to ask for, if the interfaces have one address family only,
    /// looked at again when [`FAMILIES_RECHECK`] has passed.
    fn families(&self) -> Option<RecordType> {
        let Ok(mut state) = self.families.lock() else {
            return None;
        };
        let now = Instant::now();
        if now.saturating_duration_since(state.1) >= FAMILIES_RECHECK {
            let only = one_family(&interface_addresses());
            if only != state.0 {
                log_families(only);
            }
            *state = (only, now);
        }
        state.0
    }

    /// [`Dns::lookup`], asking the DNS server again instead of the cache (at most once a
    /// second per name): for a transparent
    /// connection to an address that the cached answer lacks. The app resolved the name on
    /// its own, maybe after the record set changed (CDNs rotate theirs every minute or so),
    /// and the cached answer would call a genuine connection forged.
    /// The fresh addresses join the kept answer for the rest of its TTL: the app may go on
    /// using the address it got, and the next connection to it needs no fresh lookup (a
    /// DNS question a second for as long as the kept answer lasted), nor is it refused when
    /// the next fresh answer, from a server that gives one address of a set per query, is
    /// another one.
    pub async fn lookup_fresh(&self, host: &str) -> Result<Addrs, DnsError> {
        counters().lookups.increment(1);
        if let Some(ips) = self.statics.get(host) {
            return Ok(ips.clone());
        }
        let (fresh, _) = self.resolve(&self.uncached, host).await?;
        self.merge(host, &fresh);
        Ok(fresh)
    }

    /// Adds `fresh`'s addresses to `host`'s kept answer, if it has one that has not expired
    /// (at most [`MAX_MERGED`] addresses in all).
    fn merge(&self, host: &str, fresh: &Addrs) {
        let Ok(mut answers) = self.answers.write() else {
            return;
        };
        let Some(answer) = answers.get_mut(host) else {
            return;
        };
        if answer.until <= Instant::now() || fresh.iter().all(|ip| answer.ips.contains(ip)) {
            return;
        }
        let mut all = answer.ips.to_vec();
        for ip in fresh.iter() {
            if !all.contains(ip) && all.len() < MAX_MERGED {
                all.push(*ip);
            }
        }
        answer.ips = all.into();
    }

    /// Resolves a lower-case name to its addresses, in the resolver's order.
    pub async fn lookup(&self, host: &str) -> Result<Addrs, DnsError> {
        counters().lookups.increment(1);
        if let Some(ips) = self.statics.get(host) {
            return Ok(ips.clone());
        }
        let now = Instant::now();
        let mut stale = None;
        if let Ok(answers) = self.answers.read() {
            if let Some(answer) = answers.get(host) {
                if answer.until > now {
                    return Ok(answer.ips.clone());
                }
                if answer.stale_until > now {
                    stale = Some((answer.ips.clone(), answer.until, answer.stale_until));
                }
            }
        }
        match self.resolve(&self.resolver, host).await {
            Ok((ips, until)) => {
                if until > now {
                    self.remember(host, &ips, until, until + STALE_FOR);
                }
                Ok(ips)
            }
            // The DNS server is down or unreachable (a restart of the cluster's DNS, a
            // network blip): the last answer stands in, as Envoy's DNS cache keeps its
            // hosts and RFC 8767 has resolvers do, rather than every request for the name
            // failing until it is back. The policy still checks each address it gives. A
            // name the server says is gone gets no stale answer.
            Err(e) if e.unanswered => match stale {
                Some((ips, expired, stale_until)) => {
                    tracing::warn!(
                        host,
                        error = %e.reason,
                        expired_secs_ago = now.saturating_duration_since(expired).as_secs(),
                        "DNS gave no answer; using the expired one for {}s",
                        STALE_HOLD.as_secs()
                    );
                    counters().stale_answers.increment(1);
                    self.remember(host, &ips, now + STALE_HOLD, stale_until);
                    Ok(ips)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Keeps `host`'s answer until `until` (and as a stale stand-in until `stale_until`),
    /// making room when the map is full.
    fn remember(&self, host: &str, ips: &Addrs, until: Instant, stale_until: Instant) {
        let Ok(mut answers) = self.answers.write() else {
            return;
        };
        if answers.len() >= MAX_ANSWERS && !answers.contains_key(host) {
            let now = Instant::now();
            answers.retain(|_, answer| answer.until > now);
            if answers.len() >= MAX_ANSWERS {
                answers.clear();
            }
        }
        let answer = Answer {
            ips: ips.clone(),
            until,
            stale_until,
        };
        answers.insert(host.to_owned(), answer);
    }

    /// Asks `resolver` for `host` (and the search domains' candidates): the addresses, and
    /// when the answer expires.
    async fn resolve(
        &self,
        resolver: &TokioResolver,
        host: &str,
    ) -> Result<(Addrs, Instant), DnsError> {
        // The names are built as ASCII: `host` has passed `policy::host` (letters, digits,
        // `-`, `_`, lower case), and hickory's `&str` conversion runs IDNA (UTS 46, STD3) on
        // it, which refuses `_` inside a label, so `my_svc.internal` failed as "invalid
        // characters" before any query, where getaddrinfo, curl and every peer proxy resolve
        // it. Each is fully qualified, so that hickory adds no search domain of its own.
        let fail = |reason: String, unanswered: bool| {
            counters().failures.increment(1);
            DnsError {
                host: host.into(),
                reason,
                unanswered,
            }
        };
        let relative = Name::from_ascii(host).map_err(|e| fail(brief(&e.to_string()), false))?;
        let mut as_written = relative.clone();
        as_written.set_fqdn(true);
        let searched = self.search.iter().filter_map(|domain| {
            let mut name = relative.clone().append_domain(domain).ok()?;
            name.set_fqdn(true);
            Some(name)
        });
        let names: Vec<Name> = if host.contains('.') {
            std::iter::once(as_written).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(as_written)).collect()
        };
        let only = self.families();
        let mut first_error = None;
        for name in names {
            // Boxed: the resolver's future is large, and inline it would enlarge every
            // request's future, including those for IP literals and static names that never
            // get here.
            let found = match only {
                None => Box::pin(resolver.lookup_ip(name)).await,
                Some(rtype) => Box::pin(resolver.lookup(name, rtype))
                    .await
                    .map(LookupIp::from),
            };
            match found {
                Ok(found) => {
                    let ips: Addrs = found.iter().collect();
                    if !ips.is_empty() {
                        return Ok((ips, found.valid_until()));
                    }
                    first_error.get_or_insert_with(|| "no addresses".to_owned());
                }
                // No such name (or no address records for it): the next candidate may have one.
                Err(e) if e.is_no_records_found() => {
                    first_error.get_or_insert_with(|| brief(&e.to_string()));
                }
                // Another failure (a timeout) is not tried again under every search domain.
                Err(e) => return Err(fail(brief(&e.to_string()), true)),
            }
        }
        Err(fail(
            first_error.unwrap_or_else(|| "no addresses".to_owned()),
            false,
        ))
    }
}

/// The addresses on this network namespace's interfaces (none when they cannot be listed).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    ifaddrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Which one record type to ask DNS for, when the interfaces have addresses of one family
/// only, as getaddrinfo's `AI_ADDRCONFIG` decides (loopback and IPv6 link-local addresses do
/// not count): an IPv4-only pod (most clusters, Docker's default network) asks for no AAAA
/// records, which halves its DNS questions, spares it the wait for a DNS server that drops
/// them, and spares it a dual-stack name's IPv6 addresses, each of which cost a failed
/// connect; an IPv6-only pod (DNS64) asks for no A records. With both, or neither (only
/// loopback), both are asked for.
fn one_family(addrs: &[IpAddr]) -> Option<RecordType> {
    let counts = |a: &&IpAddr| match a {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    };
    let v4 = addrs.iter().filter(counts).any(IpAddr::is_ipv4);
    let v6 = addrs.iter().filter(counts).any(IpAddr::is_ipv6);
    match (v4, v6) {
        (true, false) => Some(RecordType::A),
        (false, true) => Some(RecordType::AAAA),
        _ => None,
    }
}

/// Tells the operator which records DNS is asked for, when that is one type only or changes.
fn log_families(only: Option<RecordType>) {
    match only {
        Some(RecordType::A) => {
            tracing::info!("DNS: asking for A records only: no interface has an IPv6 address")
        }
        Some(_) => {
            tracing::info!("DNS: asking for AAAA records only: no interface has an IPv4 address")
        }
        None => tracing::info!("DNS: asking for A and AAAA records"),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_hosts_file_is_read_as_getaddrinfo_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "# comment\n127.0.0.1\tlocalhost\n::1 localhost ip6-localhost # trailing\n\
             10.0.0.5 Db.Internal. db\n10.0.0.6 db\nnot-an-address name\n127.0.0.1 localhost\n",
        )
        .unwrap();
        let hosts = read_hosts_file(path.to_str().unwrap());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(hosts["localhost"], [ip("127.0.0.1"), ip("::1")]);
        assert_eq!(hosts["db.internal"], [ip("10.0.0.5")]);
        assert_eq!(hosts["db"], [ip("10.0.0.5"), ip("10.0.0.6")]);
        assert!(!hosts.contains_key("name") && !hosts.contains_key("trailing"));
        assert!(read_hosts_file("/nonexistent/hosts").is_empty());
    }

    #[test]
    fn one_address_family_is_asked_for_when_the_interfaces_have_only_that_one() {
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().unwrap()).collect() };
        let lo = ["127.0.0.1", "::1"];
        assert_eq!(one_family(&ips(&lo)), None);
        assert_eq!(one_family(&[]), None);
        let v4 = ["127.0.0.1", "::1", "10.1.2.3", "fe80::1"];
        assert_eq!(one_family(&ips(&v4)), Some(RecordType::A));
        let v6 = ["127.0.0.1", "::1", "fd00::5", "fe80::1"];
        assert_eq!(one_family(&ips(&v6)), Some(RecordType::AAAA));
        let both = ["10.1.2.3", "2001:db8::1"];
        assert_eq!(one_family(&ips(&both)), None);
    }

    #[test]
    fn fresh_addresses_join_a_live_kept_answer_up_to_a_bound() {
        let dns = Dns::new(HashMap::new(), None).unwrap();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        dns.remember("live.test", &vec![ip(1)].into(), later, later);
        dns.remember("expired.test", &vec![ip(1)].into(), now, later);
        let fresh: Addrs = (1..200).map(ip).collect();
        dns.merge("live.test", &fresh);
        dns.merge("expired.test", &fresh);
        dns.merge("unknown.test", &fresh);
        let answers = dns.answers.read().unwrap();
        let live = &answers["live.test"].ips;
        assert_eq!(live.len(), MAX_MERGED);
        assert_eq!(live[..3], [ip(1), ip(2), ip(3)]);
        assert_eq!(answers["expired.test"].ips[..], [ip(1)]);
        assert!(!answers.contains_key("unknown.test"));
    }

    #[test]
    fn kept_answers_stay_bounded_and_expired_ones_go_first() {
        let dns = Dns::new(HashMap::new(), None).unwrap();
        let ips: Addrs = vec!["10.0.0.1".parse().unwrap()].into();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        dns.remember("old.test", &ips, now, later);
        for n in 1..MAX_ANSWERS {
            dns.remember(&format!("n{n}.test"), &ips, later, later);
        }
        // Full: the expired answer makes room, the live ones stay.
        dns.remember("new.test", &ips, later, later);
        let answers = dns.answers.read().unwrap();
        assert_eq!(answers.len(), MAX_ANSWERS);
        assert!(!answers.contains_key("old.test") && answers.contains_key("n1.test"));
        drop(answers);
        // Full of live answers: they go, and the new one is kept.
        dns.remember("newer.test", &ips, later, later);
        let answers = dns.answers.read().unwrap();
        assert_eq!(answers.len(), 1);
        assert!(answers.contains_key("newer.test"));
    }
}
