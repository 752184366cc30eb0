//! Host names as the proxy sees them: validation and normalisation of what clients send
//! (Host headers, CONNECT targets, SNI) and of the patterns in the allowlist.

use std::net::IpAddr;

/// A target host after validation: a lower-case DNS name without trailing dot, or an IP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-case, no trailing dot.
    Name(String),
    /// An IP literal (IPv6 without brackets).
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a host string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty.
    #[error("empty host")]
    Empty,
    /// A character no host name may carry (NUL, whitespace, `@`, `%`, `/` …).
    #[error("host contains an invalid character")]
    BadChar,
    /// Userinfo before the host (`user:password@host`): credentials, or a disguise for the
    /// real host (`good.test@evil.test`). RFC 9110 §4.2.4 says to treat it as an error.
    #[error("the URL carries userinfo (user:password@), which is refused: send credentials in an Authorization header")]
    Userinfo,
    /// A last label of digits only (`127.1`, `2130706433`, `0x7f.1`): no DNS name, and not
    /// the dotted-quad form of an IPv4 address either.
    #[error("a host ending in a number is neither a DNS name nor an IPv4 address in dotted-quad form (resolvers read 127.1 or 2130706433 as addresses): write the address as a.b.c.d")]
    NumericName,
    /// An empty label (`a..b`, leading dot) or a label over 63 bytes.
    #[error("host has an empty or over-long label")]
    BadLabel,
    /// Over 253 bytes.
    #[error("host is too long")]
    TooLong,
    /// A port that is not up to five digits.
    #[error("the port is not a number")]
    BadPort,
    /// The TLS ClientHello that would carry the name cannot be read with certainty (two
    /// server names, a broken structure, over 16 KiB): what the server acts on is unknown.
    #[error("unreadable ClientHello: {0}")]
    UnreadableHello(&'static str),
}

/// Parses a host as sent by a client: case-insensitive, one trailing dot ignored,
/// IPv6 in brackets. Refuses anything with characters a DNS name cannot have, so that
/// a crafted Host (`evil.com@good.com`, `good.com\0.evil`) can never match a rule.
pub fn parse_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| HostError::BadChar);
    }
    if let Ok(ip) = raw.parse::<std::net::Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    validate_name(name)?;
    // A top-level label of digits only (`1.2.3`, `0x7f.1`) is no DNS name: libc would read
    // it as a shorthand IPv4 address, so the name checked and the address dialled could differ.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(HostError::NumericName);
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

/// Checks a DNS name (no trailing dot): letters, digits, `-`, `_`; labels 1–63 bytes.
pub fn validate_name(name: &str) -> Result<(), HostError> {
    name_bytes(name.as_bytes())
}

/// What each byte is in a DNS name: [`NAME`] (letters, digits, `-`, `_`), [`DOT`], or 0.
const CLASS: [u8; 256] = {
    let mut class = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
            class[b] = NAME;
        }
        b += 1;
    }
    class[b'.' as usize] = DOT;
    class
};
const NAME: u8 = 1;
const DOT: u8 = 2;

/// [`validate_name`] in one pass over the bytes, each looked up in [`CLASS`]: with
/// `split('.')` and a check per label it cost an inbound request about 550 instructions for
/// a host of 15 bytes.
fn name_bytes(name: &[u8]) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    let mut label = 0usize;
    for &b in name {
        match CLASS[usize::from(b)] {
            NAME => {
                label += 1;
                if label > 63 {
                    return Err(HostError::BadLabel);
                }
            }
            DOT if label > 0 => label = 0,
            DOT => return Err(HostError::BadLabel),
            _ => return Err(HostError::BadChar),
        }
    }
    if label == 0 {
        return Err(HostError::BadLabel);
    }
    Ok(())
}

/// Checks an authority as a server receives it, in a Host header or a request target:
/// `host[:port]`, the host a DNS name (as [`validate_name`], one trailing dot allowed), an
/// IPv4 address or a bracketed IPv6 one, the port digits. Empty is valid: RFC 9110 §7.2 has
/// a client send an empty Host for a target without one. Unlike [`parse_host`] it allocates
/// nothing and accepts a name of digits: it decides what is passed on, not what is dialled.
/// Bytes, not `str`: UTF-8 validation and `str` splitting cost more than the check.
pub fn check_authority(raw: &[u8]) -> Result<(), HostError> {
    if raw.is_empty() {
        return Ok(());
    }
    let (host, port) = if raw[0] == b'[' {
        let end = raw
            .iter()
            .position(|&b| b == b']')
            .ok_or(HostError::BadChar)?;
        let port = match &raw[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err(HostError::BadChar),
        };
        (&raw[..=end], port)
    } else {
        // A second `:` stays in the host, where no name may have one.
        match raw.iter().rposition(|&b| b == b':') {
            Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
            None => (raw, None),
        }
    };
    // RFC 3986 allows an empty port (`a.test:`), and more digits than a port has.
    if port.is_some_and(|p| p.len() > 5 || !p.iter().all(u8::is_ascii_digit)) {
        return Err(HostError::BadPort);
    }
    match host {
        [b'[', v6 @ .., b']'] => std::str::from_utf8(v6)
            .ok()
            .and_then(|v6| v6.parse::<std::net::Ipv6Addr>().ok())
            .map(drop)
            .ok_or(HostError::BadChar),
        _ => name_bytes(host.strip_suffix(b".").unwrap_or(host)),
    }
}

/// Splits `host:port` / `[v6]:port` into its parts. `None` when malformed.
pub fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (h, rest) = authority.split_at(end + 1);
        return match rest {
            "" => Some((h, None)),
            r => r.strip_prefix(':').map(|p| (h, Some(p))),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, Some(p))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

/// An authority for the log: userinfo, which may be a password, is masked as `***@`.
pub fn mask_userinfo(authority: &str) -> std::borrow::Cow<'_, str> {
    // A plain byte loop: `rsplit_once` set up a memrchr search that cost every request
    // about 190 instructions for a host of a dozen bytes.
    match authority.bytes().rposition(|b| b == b'@') {
        Some(at) => format!("***@{}", &authority[at + 1..]).into(),
        None => authority.into(),
    }
}

/// Parses a port string: 1–65535, digits only.
pub fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_masked_for_the_log() {
        assert_eq!(mask_userinfo("user:pw@a.test:8080"), "***@a.test:8080");
        assert_eq!(mask_userinfo("a@b@c.test"), "***@c.test");
        assert_eq!(mask_userinfo("[::1]:80"), "[::1]:80");
    }

    #[test]
    fn normalises_case_and_one_trailing_dot() {
        assert_eq!(
            parse_host("API.Example.COM."),
            Ok(Host::Name("api.example.com".into()))
        );
        assert_eq!(parse_host("a.com.."), Err(HostError::BadLabel));
    }

    #[test]
    fn refuses_tricks() {
        for bad in [
            "evil.com@good.com",
            "good.com\0.evil",
            "a b.com",
            "a\t.com",
            "",
            ".a.com",
            "a..com",
            "a/b",
            "a%2e.com",
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} should be refused");
        }
        for shorthand in [
            "0x7f.1",
            "1.2.3",
            "127.1",
            "2130706433",
            "017700000001",
            "a.1",
        ] {
            assert_eq!(
                parse_host(shorthand),
                Err(HostError::NumericName),
                "{shorthand}"
            );
        }
    }

    #[test]
    fn ip_literals() {
        assert_eq!(
            parse_host("[::1]"),
            Ok(Host::Ip("::1".parse().unwrap_or(IpAddr::from([0u8; 4]))))
        );
        assert!(matches!(parse_host("10.1.2.3"), Ok(Host::Ip(_))));
    }

    #[test]
    fn authorities_as_a_server_receives_them() {
        for good in [
            "a.test",
            "A.Test.:8080",
            "my_svc.ns.svc.cluster.local:80",
            "10.0.0.5:8080",
            "[::1]:443",
            "[fe80::1]",
            "a.test:",
            "",
        ] {
            assert_eq!(check_authority(good.as_bytes()), Ok(()), "{good:?}");
        }
        let refused = [
            ("evil@a.test", HostError::BadChar),
            ("u:p@a.test:80", HostError::BadChar),
            ("a.test/../x", HostError::BadChar),
            ("a.test x", HostError::BadChar),
            ("a\\b", HostError::BadChar),
            ("a.test:80:80", HostError::BadChar),
            ("a.test:http", HostError::BadPort),
            ("a.test:123456", HostError::BadPort),
            ("[::1", HostError::BadChar),
            ("[a.test]:80", HostError::BadChar),
            ("a..test", HostError::BadLabel),
            (":80", HostError::Empty),
        ];
        for (bad, why) in refused {
            assert_eq!(check_authority(bad.as_bytes()), Err(why), "{bad:?}");
        }
        assert_eq!(check_authority(b"a\xff.test"), Err(HostError::BadChar));
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a.com:80"), Some(("a.com", Some("80"))));
        assert_eq!(split_authority("[::1]:443"), Some(("[::1]", Some("443"))));
        assert_eq!(split_authority("a.com"), Some(("a.com", None)));
        assert_eq!(split_authority("::1:80"), None);
        assert_eq!(parse_port("0"), None);
        assert_eq!(parse_port("65536"), None);
        assert_eq!(parse_port("+80"), None);
    }
}
