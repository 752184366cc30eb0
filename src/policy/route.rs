//! Inbound routes, compiled from `inbound.routes`: first match wins.

use std::net::SocketAddr;

use http::HeaderName;

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Path prefix to match, if any.
    pub path_prefix: Option<String>,
    /// Lower-case host (no port) to match, if any.
    pub host: Option<String>,
    /// Headers that must have exactly these values.
    pub headers: Vec<(HeaderName, String)>,
    /// Where matching requests go.
    pub to: SocketAddr,
}

/// The compiled route table.
#[derive(Debug, Clone, Default)]
pub struct Routes(pub Vec<Route>);

impl Routes {
    /// The destination of the first route the request matches.
    pub fn pick(
        &self,
        host: Option<&str>,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<SocketAddr> {
        // Lower-cased (an allocation) only when some route matches on host.
        let host = host.filter(|_| self.0.iter().any(|r| r.host.is_some()));
        let host = host.map(|h| {
            let h = crate::policy::host::split_authority(h).map_or(h, |(h, _)| h);
            h.trim_end_matches('.').to_ascii_lowercase()
        });
        self.0
            .iter()
            .find(|r| {
                r.path_prefix
                    .as_ref()
                    .is_none_or(|p| path.starts_with(p.as_str()))
                    && r.host
                        .as_ref()
                        .is_none_or(|want| host.as_deref() == Some(want.as_str()))
                    && r.headers.iter().all(|(name, value)| {
                        headers
                            .get(name)
                            .is_some_and(|v| v.as_bytes() == value.as_bytes())
                    })
            })
            .map(|r| r.to)
    }
}
