//! Bootstrap tokens: what a new sidecar shows the CA to get its first certificate.
//!
//! A token is `ort1.<claims>.<mac>`: base64url JSON claims (the one SPIFFE ID it is good for, an
//! expiry and a random id) and an HMAC-SHA256 over `ort1.<claims>` keyed with the CA's token
//! secret. Only the CA can mint or check one; any change to a byte breaks the MAC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;

use super::spiffe::SpiffeId;

const VERSION: &str = "ort1";

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenClaims {
    /// The only identity a certificate may be issued for with this token.
    pub sub: SpiffeId,
    /// Unix time (seconds) after which the token is refused.
    pub exp: u64,
    /// Unix time (seconds) the token was minted.
    pub iat: u64,
    /// Random id, so a token can be named in logs without printing it.
    pub jti: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `ort1.<claims>.<mac>` or the claims are not valid JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A token format this CA doesn't know.
    #[error("unknown token version {0:?}: this CA issues ort1 tokens")]
    UnknownVersion(String),
    /// The MAC doesn't match: the token was altered, or another CA minted it.
    #[error("token signature does not verify: it was altered or not issued by this CA")]
    BadSignature,
    /// Past its expiry.
    #[error("token {jti} for {sub} expired at unix time {exp}")]
    Expired {
        /// The token's random id.
        jti: String,
        /// The identity it was for.
        sub: String,
        /// When it expired.
        exp: u64,
    },
    /// Minted for an identity outside this CA's trust domain.
    #[error("token is for {0}, outside this CA's trust domain {1}")]
    WrongTrustDomain(String, String),
    /// The system random generator failed.
    #[error("cannot generate a random token id")]
    Random,
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints a token for `sub`, valid for `ttl` from `now`.
pub fn mint(
    secret: &[u8],
    sub: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, TokenError> {
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).map_err(|_| TokenError::Random)?;
    let iat = unix_seconds(now);
    let claims = TokenClaims {
        sub: sub.clone(),
        exp: iat.saturating_add(ttl.as_secs().max(1)),
        iat,
        jti: hex(&jti),
    };
    let json = serde_json::to_vec(&claims).map_err(|e| TokenError::Malformed(e.to_string()))?;
    let signed = format!("{VERSION}.{}", B64.encode(json));
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        signed.as_bytes(),
    );
    Ok(format!("{signed}.{}", B64.encode(tag.as_ref())))
}

/// Checks a token's MAC, expiry and trust domain, and returns what it grants.
pub fn verify(
    secret: &[u8],
    token: &str,
    trust_domain: &str,
    now: SystemTime,
) -> Result<TokenClaims, TokenError> {
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(version), Some(claims_b64), Some(mac_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three '.'-separated parts".into(),
        ));
    };
    if version != VERSION {
        return Err(TokenError::UnknownVersion(
            version.chars().take(16).collect(),
        ));
    }
    let mac = B64
        .decode(mac_b64)
        .map_err(|_| TokenError::Malformed("signature is not base64url".into()))?;
    // Check the MAC before looking at the claims: nothing unauthenticated is trusted.
    let signed_len = version.len() + 1 + claims_b64.len();
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        &token.as_bytes()[..signed_len],
        &mac,
    )
    .map_err(|_| TokenError::BadSignature)?;
    let json = B64
        .decode(claims_b64)
        .map_err(|_| TokenError::Malformed("claims are not base64url".into()))?;
    let claims: TokenClaims =
        serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
    if claims.sub.trust_domain() != trust_domain {
        return Err(TokenError::WrongTrustDomain(
            claims.sub.to_string(),
            trust_domain.to_owned(),
        ));
    }
    if unix_seconds(now) >= claims.exp {
        return Err(TokenError::Expired {
            jti: claims.jti,
            sub: claims.sub.to_string(),
            exp: claims.exp,
        });
    }
    Ok(claims)
}

/// Lowercase hex, for serial numbers and token ids in logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://td.local/ns/a/sa/b").unwrap()
    }

    #[test]
    fn round_trip_and_refusals() {
        let now = SystemTime::now();
        let t = mint(b"secret", &id(), Duration::from_secs(60), now).unwrap();
        let c = verify(b"secret", &t, "td.local", now).unwrap();
        assert_eq!(c.sub, id());
        assert_eq!(c.jti.len(), 32);
        assert_eq!(
            verify(b"other", &t, "td.local", now),
            Err(TokenError::BadSignature)
        );
        assert!(matches!(
            verify(b"secret", &t, "td.local", now + Duration::from_secs(61)),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify(b"secret", &t, "other.local", now),
            Err(TokenError::WrongTrustDomain(..))
        ));
        assert!(matches!(
            verify(b"secret", "garbage", "td.local", now),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(b"secret", "v9.a.b", "td.local", now),
            Err(TokenError::UnknownVersion(_))
        ));
    }
}
