//! SPIFFE IDs: the mesh's names for workloads, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
//! and the patterns that authorization rules match them with.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a SPIFFE ID the mesh accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or has characters SPIFFE does not allow.
    #[error("{0:?} is not a SPIFFE ID: the trust domain must be lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// The path is empty, has an empty segment, or characters SPIFFE does not allow.
    #[error("{0:?} is not a SPIFFE ID: the path must be non-empty segments of letters, digits, '.', '-' or '_'")]
    Path(String),
}

/// A SPIFFE ID such as `spiffe://cluster.local/ns/shop/sa/web`.
///
/// Parsing enforces the SPIFFE spec's character sets, so two IDs are equal exactly when their
/// strings are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    // Byte offset where the path starts (the '/' after the trust domain).
    path_start: usize,
}

const SCHEME: &str = "spiffe://";

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl SpiffeId {
    /// Parses `spiffe://td/path…`; the path must be non-empty.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain(s.to_owned()));
        }
        if path.is_empty() || !path[1..].split('/').all(valid_segment) {
            return Err(SpiffeIdError::Path(s.to_owned()));
        }
        Ok(SpiffeId {
            uri: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// The Kubernetes-style ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The path, e.g. `/ns/shop/sa/web`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

/// Checks an authorization pattern, for config validation: the exact ID, `*` for any ID,
/// or a prefix ending in `/*` that matches every ID below that path
/// (`spiffe://cluster.local/ns/shop/*` matches `.../ns/shop/sa/web`, not `.../ns/shopping/sa/x`).
/// [`crate::policy::authz::IdPattern`] compiles and matches it.
pub fn validate_pattern(pattern: &str) -> Result<(), SpiffeIdError> {
    if pattern == "*" {
        return Ok(());
    }
    match pattern.strip_suffix("/*") {
        // A prefix is valid when it would be a valid ID once something is appended.
        Some(prefix) => SpiffeId::parse(&format!("{prefix}/x")).map(|_| ()),
        None => SpiffeId::parse(pattern).map(|_| ()),
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_displays() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            SpiffeId::workload("cluster.local", "shop", "web").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_non_ids() {
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/a",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a?b",
            "spiffe://user@td/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn validates_patterns() {
        assert!(validate_pattern("*").is_ok());
        assert!(validate_pattern("spiffe://cluster.local/ns/shop/*").is_ok());
        assert!(validate_pattern("spiffe://cluster.local/ns/sho*").is_err());
        assert!(validate_pattern("spiffe://cluster.local/ns/*/sa/x").is_err());
    }
}
