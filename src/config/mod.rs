//! The config file: its serde shape (`Config`), loading from YAML, and the embedded default.
//!
//! Loading goes YAML → a generic value → `Config` through `serde_path_to_error`, so that a
//! type error or an unknown key is reported with its key path (`outbound.egress.allw`).
//! Semantic checks live in `validate.rs`, which compiles the file into what the proxy runs.

mod env;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use validate::{validate, Compiled};

/// The shipped example config, used by `outrider run` without `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/outrider.yaml");

/// A config error, naming the key path it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not YAML.
    #[error("config is not valid YAML: {0}")]
    Yaml(String),
    /// A key has the wrong type or is unknown.
    #[error("{path}: {message}")]
    Shape {
        /// The key path, e.g. `outbound.egress.allow[2].ports`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value is well-typed but invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// The key path.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The admin listener.
    pub admin: AdminConfig,
    /// The outbound listener (transparent capture and explicit proxy).
    pub outbound: OutboundConfig,
    /// The inbound listener; absent means no inbound listener.
    pub inbound: Option<InboundConfig>,
    /// Name resolution.
    pub dns: DnsConfig,
    /// Which destinations are other sidecars, reached with mTLS.
    pub mesh: MeshConfig,
    /// This workload's mesh identity; absent: no mTLS.
    pub identity: Option<crate::tls::IdentityConfig>,
    /// Where access-log records go.
    pub access_log: AccessLogConfig,
    /// Shutdown behaviour.
    pub shutdown: ShutdownConfig,
    /// Client connections to both listeners.
    pub clients: ClientsConfig,
    /// The async runtime.
    pub runtime: RuntimeConfig,
}

/// `runtime`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads; 0 (the default) means one per CPU. A sidecar shares its pod's CPUs
    /// with the app, so platform teams often pin this to 1 or 2.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// How many worker threads serve the data path: `worker_threads`, or one per CPU the
    /// process may use (`available_parallelism` reads the cgroup's CPU quota too).
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// `admin`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address, default `127.0.0.1:15000`.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:15000".into(),
        }
    }
}

/// `outbound`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Listen address, default `127.0.0.1:15001`.
    pub listen: String,
    /// The egress allowlist.
    pub egress: EgressConfig,
    /// Upstream timeouts.
    pub timeouts: TimeoutsConfig,
    /// Transparent-capture protocol detection.
    pub detect: DetectConfig,
    /// The shared HTTP cache (off by default).
    pub cache: crate::cache::CacheConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:15001".into(),
            egress: EgressConfig::default(),
            timeouts: TimeoutsConfig::default(),
            detect: DetectConfig::default(),
            cache: crate::cache::CacheConfig::default(),
        }
    }
}

/// `outbound.egress`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// `enforce` (default) or `report`.
    pub mode: EgressMode,
    /// Allow rules; what none allows is denied.
    pub allow: Vec<AllowRule>,
    /// Whether TCP to port 53 of the DNS servers in resolv.conf (the proxy's own, and the
    /// workload's) is allowed without a rule. A resolver library asks again over TCP when an
    /// answer is too large for UDP (a headless Service with many pods); UDP to those servers
    /// already goes past the proxy, so refusing the TCP retry only breaks the large answers.
    /// Captured connections only: through the explicit listener they need a rule.
    pub allow_dns_servers: bool,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            mode: EgressMode::default(),
            allow: Vec::new(),
            allow_dns_servers: true,
        }
    }
}

/// Whether egress denials are enforced or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Deny what no rule allows.
    #[default]
    Enforce,
    /// Let everything pass, but log and count what enforcement would deny.
    Report,
}

/// One `outbound.egress.allow[]` entry: a `host` pattern or a `cidr`, with optional ports.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowRule {
    /// `api.example.com` or `*.example.org` (subdomains only).
    pub host: Option<String>,
    /// `10.20.0.0/16` or a single address.
    pub cidr: Option<String>,
    /// Allowed ports; absent means any port. Kept as wide integers so that a bad port
    /// is reported by `validate` with its key path instead of as a type error.
    pub ports: Option<Vec<i64>>,
}

/// `outbound.timeouts`, as humantime durations (`5s`, `1m`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Upstream TCP connect timeout.
    pub connect: String,
    /// Time from sending a request to receiving the response head.
    pub response: String,
    /// How long an HTTP/1.1 response body may pause (no byte) before it is cut off; `0s`:
    /// no limit.
    pub response_idle: String,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: "5s".into(),
            response: "30s".into(),
            // Envoy's stream idle timeout.
            response_idle: "5m".into(),
        }
    }
}

/// `outbound.detect`: protocol detection for transparent connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// How long to wait for the client's first bytes before treating it as opaque TCP.
    pub timeout: String,
    /// Ports where the server speaks first (MySQL, PostgreSQL, SMTP): no detection.
    pub server_first_ports: Vec<i64>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            timeout: "500ms".into(),
            server_first_ports: vec![21, 22, 25, 110, 143, 587, 3306, 5432],
        }
    }
}

/// `inbound`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// Listen address, default `0.0.0.0:15006`.
    pub listen: String,
    /// `strict`, `permissive` or `disabled`.
    pub mtls: MtlsMode,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// Who may call what; none: all allowed.
    pub authorization: Vec<AuthzRuleConfig>,
    /// Where traffic no route takes goes, on its original port: an IP address (default
    /// `127.0.0.1`), or `original`, the address the caller connected to (the pod's), for an
    /// app that listens on that address alone.
    pub app_host: String,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15006".into(),
            mtls: MtlsMode::default(),
            routes: Vec::new(),
            authorization: Vec::new(),
            app_host: "127.0.0.1".into(),
        }
    }
}

/// Inbound mTLS mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mesh mTLS.
    #[default]
    Strict,
    /// mTLS and plaintext.
    Permissive,
    /// Plaintext only; mesh TLS is passed through as bytes.
    Disabled,
}

/// One inbound route.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// What the request must match.
    #[serde(rename = "match")]
    pub matches: RouteMatch,
    /// Local `host:port` to send it to.
    pub to: String,
}

/// One `inbound.authorization[]` rule: every present condition must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzRuleConfig {
    /// Caller SPIFFE IDs, exact or ending in `/*`.
    pub from: Vec<String>,
    /// Destination ports.
    pub ports: Vec<i64>,
    /// Path prefixes.
    pub paths: Vec<String>,
    /// Methods.
    pub methods: Vec<String>,
}

/// The match part of an inbound route; every present field must match.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    /// Path prefix, e.g. `/api`.
    pub path_prefix: Option<String>,
    /// Host (without port), case-insensitive.
    pub host: Option<String>,
    /// Header values that must be equal.
    pub headers: BTreeMap<String, String>,
}

/// `dns`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Static names: `name: address` or `name: [addresses]`, consulted before DNS.
    pub hosts: BTreeMap<String, OneOrMany>,
}

/// A single value or a list of values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a slice-like iterator.
    pub fn iter(&self) -> impl Iterator<Item = &String> {
        match self {
            Self::One(s) => std::slice::from_ref(s).iter(),
            Self::Many(v) => v.iter(),
        }
    }
}

/// `mesh`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// CIDRs whose destinations get mTLS to their sidecar.
    pub networks: Vec<String>,
    /// The identities expected for some destinations: a peer there must present one of
    /// them, else the connection is refused. Elsewhere any identity of the trust domain is
    /// accepted.
    pub identities: Vec<MeshIdentities>,
}

/// One `mesh.identities[]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshIdentities {
    /// Destinations this applies to.
    pub cidr: String,
    /// SPIFFE IDs a peer there may have.
    pub ids: Vec<String>,
}

/// `access_log`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// `stdout`, `stderr`, `off`, or a file path (appended to).
    #[serde(deserialize_with = "log_output")]
    pub output: String,
    /// Log each `path` without its query string (`?…`), which may carry tokens or
    /// personal data (Squid's `strip_query_terms`).
    pub strip_query: bool,
}

/// Reads `access_log.output`. The parser follows YAML 1.1, where an unquoted `off` is the
/// boolean false: the README's `output: off` must mean off, not a type error.
fn log_output<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Output;
    impl serde::de::Visitor<'_> for Output {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("stdout, stderr, off or a file path")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            if v {
                Err(E::invalid_value(serde::de::Unexpected::Bool(v), &self))
            } else {
                Ok("off".to_owned())
            }
        }
    }
    d.deserialize_any(Output)
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            output: "stdout".into(),
            strip_query: false,
        }
    }
}

/// `clients`: limits on the connections clients make to the outbound and inbound listeners.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsConfig {
    /// How long a client connection may have no request in flight before it is closed
    /// (HTTP/2 with GOAWAY). For HTTP/1 it is also how long a request head may take to
    /// arrive, which is what stops slowloris clients, and how long a request body may pause
    /// (no byte of it) before the request is answered 408.
    pub idle_timeout: String,
    /// The largest request head (request line and headers, or an HTTP/2 header list) a
    /// client may send, in bytes; a larger one is answered 431.
    pub max_request_head_bytes: u64,
    /// How long a tunnel (`CONNECT`, an upgraded connection, transparent TLS or TCP,
    /// inbound TCP) may pass no byte either way before it is closed.
    pub tunnel_idle_timeout: String,
    /// How many client connections each listener (outbound, inbound) holds at once; one
    /// more is closed as soon as it is accepted. 0: no limit.
    pub max_connections: u64,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            idle_timeout: "30s".into(),
            max_request_head_bytes: 128 * 1024,
            // Envoy's TCP proxy default.
            tunnel_idle_timeout: "1h".into(),
            // As Envoy's listeners: no limit unless one is set.
            max_connections: 0,
        }
    }
}

/// `shutdown`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long SIGTERM waits for in-flight requests and tunnels.
    pub drain_timeout: String,
    /// How long after SIGTERM the outbound listener still accepts, while the inbound one is
    /// already closed: an app stopping at the same moment may still call out during its
    /// own graceful shutdown. `0s` (the default): both close at once.
    pub outbound_grace: String,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: "10s".into(),
            outbound_grace: "0s".into(),
        }
    }
}

impl Config {
    /// Parses YAML text, with `${NAME}` in values taken from the environment (see
    /// [`env`]); key-path errors for unknown keys, wrong types and unset variables.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with(text, &|name| std::env::var(name).ok())
    }

    fn from_yaml_with(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        // An empty file is an empty config, i.e. all defaults.
        let mut value = if value.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            value
        };
        let mut typed = env::expand(&mut value, lookup)?;
        loop {
            match serde_path_to_error::deserialize(value.clone()) {
                Ok(config) => return Ok(config),
                Err(e) => {
                    let path = e.path().to_string();
                    // A reference's text where the key takes a number or a boolean.
                    if typed.retype(&mut value, &path) {
                        continue;
                    }
                    return Err(ConfigError::Shape {
                        path: if path == "." {
                            "(top level)".into()
                        } else {
                            path
                        },
                        message: e.into_inner().to_string(),
                    });
                }
            }
        }
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and validates: what `outrider check` does.
    pub fn load(path: Option<&Path>) -> Result<Compiled, ConfigError> {
        let config = match path {
            Some(p) => Self::from_file(p)?,
            None => Self::from_yaml(EMBEDDED_DEFAULT)?,
        };
        validate(config)
    }
}
