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
        let normal = std::cell::OnceCell::new();
        for rule in &self.0 {
            let from_ok = rule.from.is_empty()
                || req
                    .identity
                    .is_some_and(|id| rule.from.iter().any(|p| p.matches(id)));
            let port_ok = rule.ports.is_empty() || rule.ports.contains(&req.port);
            // A prefix only says what the app will serve if the path means to the app what
            // it says here: a path that is not in normal form matches no rule with paths.
            // (Looked at once, and only when a rule has paths.)
            let path_ok = rule.paths.is_empty()
                || req.path.is_some_and(|path| {
                    *normal.get_or_init(|| abnormal_path(path).is_none())
                        && rule.paths.iter().any(|p| path.starts_with(p.as_str()))
                });
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
            (Some(m), Some(p)) => {
                let mut reason = format!(
                    "no authorization rule allows {who} to {m} {p} on port {}",
                    req.port
                );
                if let Some(why) = abnormal_path(p) {
                    reason.push_str(&format!(
                        ": the path has {why}, and rules with paths match only paths in normal form"
                    ));
                }
                reason
            }
            _ => format!("no authorization rule allows {who} on port {}", req.port),
        })
    }
}

/// Why `path` may mean something else to the app than its prefix says, or `None` when it is
/// in normal form. `/api/../admin` starts with `/api/`, but an app that resolves dot
/// segments serves `/admin`; so do the spellings apps decode first: `%2e` for a dot, `..;`
/// (servlet containers drop `;` parameters), and encoded slashes or backslashes, which turn
/// `..%2f` into a dot segment once decoded.
pub fn abnormal_path(path: &str) -> Option<&'static str> {
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return Some("a backslash");
    }
    let encoded_separator = b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2] | 0x20 == b'f') || (w[1] == b'5' && w[2] | 0x20 == b'c'))
    });
    if encoded_separator {
        return Some("an encoded slash or backslash");
    }
    let dot_segment = path
        .split('/')
        .any(|seg| is_dots(seg.split(';').next().unwrap_or(seg)));
    dot_segment.then_some("a dot segment")
}

/// `.` or `..`, each dot possibly written `%2e`.
fn is_dots(seg: &str) -> bool {
    let b = seg.as_bytes();
    let (mut i, mut dots) = (0, 0);
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b[i] == b'%'
            && b.get(i + 1) == Some(&b'2')
            && b.get(i + 2).map(|c| c | 0x20) == Some(b'e')
        {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
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
    fn paths_not_in_normal_form_match_no_rule_with_paths() {
        let a = rules();
        let shop = Some("spiffe://cluster.local/ns/shop/sa/web");
        for path in [
            "/api/../admin",
            "/api/./../admin",
            "/api/..",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/.%2e/admin",
            "/api/..;/admin",
            "/api/..;jsessionid=1/admin",
            "/api/x%2F..%2F..%2Fadmin",
            "/api/x%2f..",
            "/api/..%5cadmin",
            "/api/..\\admin",
        ] {
            let err = a.check(http(shop, "GET", path)).err().unwrap_or_default();
            assert!(err.contains("normal form"), "{path}: {err:?}");
        }
        // Dots inside a segment are names, not dot segments.
        for path in [
            "/api/.well-known",
            "/api/a..b",
            "/api/...",
            "/api/v1.2/x",
            "/api/%2e%2e%2e",
        ] {
            assert!(a.check(http(shop, "GET", path)).is_ok(), "{path}");
        }
        // A rule without paths does not care how the path is written.
        let any_path = Authz(vec![AuthzRule {
            label: "authorization[0]".into(),
            ..AuthzRule::default()
        }]);
        assert!(any_path.check(http(None, "GET", "/api/../admin")).is_ok());
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
