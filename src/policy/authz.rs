//! Inbound authorization, compiled from `inbound.authorization`: which caller identities may
//! call which ports, paths and methods. No rules: everything is allowed. Once any rule
//! exists, what no rule allows is denied.

/// One compiled rule; every present condition must hold.
#[derive(Debug, Clone, Default)]
pub struct AuthzRule {
    /// Index in `inbound.authorization`, for the log.
    pub index: usize,
    /// How the log names it (`authorization[i]`), built once.
    pub label: std::sync::Arc<str>,
    /// Identity patterns: exact SPIFFE IDs, or prefixes written with a trailing `/*`
    /// (stored without the `*`). Empty means any identity, including none.
    pub from: Vec<IdPattern>,
    /// Destination ports; empty means any.
    pub ports: Vec<u16>,
    /// Path prefixes; empty means any (and a rule with paths never matches plain TCP).
    pub paths: Vec<String>,
    /// Upper-case methods; empty means any (and a rule with methods never matches plain TCP).
    pub methods: Vec<String>,
}

/// An identity pattern, compiled from the grammar in [`crate::tls::spiffe::validate_pattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// `*`: any authenticated identity.
    Any,
    /// Exactly this ID.
    Exact(String),
    /// IDs below this path (it ends with `/`, so `ns/shop/` never matches `ns/shopping/…`).
    Prefix(String),
}

impl IdPattern {
    /// Parses `*`, `spiffe://td/ns/x/*` or an exact ID.
    pub fn parse(raw: &str) -> Result<Self, String> {
        crate::tls::spiffe::validate_pattern(raw)
            .map_err(|e| format!("{raw:?} is not a SPIFFE ID or a pattern ending in /*: {e}"))?;
        Ok(match raw.strip_suffix('*') {
            Some("") => IdPattern::Any,
            Some(prefix) => IdPattern::Prefix(prefix.to_owned()),
            None => IdPattern::Exact(raw.to_owned()),
        })
    }

    fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Any => true,
            IdPattern::Exact(e) => e == id,
            IdPattern::Prefix(p) => id.len() > p.len() && id.starts_with(p.as_str()),
        }
    }
}

/// What is being asked: the caller, the port, and for HTTP the path and method.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified peer identity, if the caller used mTLS.
    pub identity: Option<&'a str>,
    /// The destination port.
    pub port: u16,
    /// HTTP path, `None` for plain TCP.
    pub path: Option<&'a str>,
    /// HTTP method, `None` for plain TCP.
    pub method: Option<&'a str>,
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Authz(pub Vec<AuthzRule>);

impl Authz {
    /// `Ok(rule)` naming the allowing rule (or "no rules"), or `Err(reason)`.
    pub fn check(&self, req: Request<'_>) -> Result<std::sync::Arc<str>, String> {
        if self.0.is_empty() {
            static NONE: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
            return Ok(NONE.get_or_init(|| "no authorization rules".into()).clone());
        }
        for rule in &self.0 {
            let from_ok = rule.from.is_empty()
                || req
                    .identity
                    .is_some_and(|id| rule.from.iter().any(|p| p.matches(id)));
            let port_ok = rule.ports.is_empty() || rule.ports.contains(&req.port);
            let path_ok = rule.paths.is_empty()
                || req
                    .path
                    .is_some_and(|path| rule.paths.iter().any(|p| path.starts_with(p.as_str())));
            let method_ok = rule.methods.is_empty()
                || req
                    .method
                    .is_some_and(|m| rule.methods.iter().any(|r| r == m));
            if from_ok && port_ok && path_ok && method_ok {
                return Ok(rule.label.clone());
            }
        }
        let who = req.identity.unwrap_or("an unauthenticated caller");
        Err(match (req.method, req.path) {
            (Some(m), Some(p)) => format!(
                "no authorization rule allows {who} to {m} {p} on port {}",
                req.port
            ),
            _ => format!("no authorization rule allows {who} on port {}", req.port),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Authz {
        Authz(vec![AuthzRule {
            index: 0,
            label: "authorization[0]".into(),
            from: vec![IdPattern::parse("spiffe://cluster.local/ns/shop/*")
                .unwrap_or(IdPattern::Exact(String::new()))],
            ports: vec![8080],
            paths: vec!["/api/".into()],
            methods: vec!["GET".into()],
        }])
    }

    fn http<'a>(id: Option<&'a str>, method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            identity: id,
            port: 8080,
            path: Some(path),
            method: Some(method),
        }
    }

    #[test]
    fn allows_only_what_a_rule_allows() {
        let a = rules();
        let shop = Some("spiffe://cluster.local/ns/shop/sa/web");
        assert!(a.check(http(shop, "GET", "/api/items")).is_ok());
        assert!(a.check(http(shop, "POST", "/api/items")).is_err());
        assert!(a.check(http(shop, "GET", "/admin")).is_err());
        assert!(a
            .check(http(
                Some("spiffe://cluster.local/ns/other/sa/x"),
                "GET",
                "/api/"
            ))
            .is_err());
        assert!(a.check(http(None, "GET", "/api/")).is_err());
        assert!(a
            .check(Request {
                identity: shop,
                port: 8080,
                path: None,
                method: None
            })
            .is_err());
        assert!(Authz::default().check(http(None, "DELETE", "/")).is_ok());
    }

    #[test]
    fn patterns() {
        assert!(IdPattern::parse("spiffe://td/ns/a/*").is_ok());
        assert_eq!(IdPattern::parse("*"), Ok(IdPattern::Any));
        assert!(IdPattern::parse("spiffe://td/ns/sho*").is_err());
        assert!(IdPattern::parse("spiffe://td/ns/*/sa/x").is_err());
        assert!(IdPattern::parse("td/ns/a").is_err());
    }
}
