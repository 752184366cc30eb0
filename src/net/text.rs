//! Addresses as text without `core::fmt`: an IPv4 address's four octets through the
//! formatting machinery cost more instructions than the rest of the forwarding headers,
//! and a log record's two addresses more than the rest of its serialising.

use std::net::{IpAddr, SocketAddr};

/// An IP address (and optionally a port) as text, on the stack.
pub struct IpText {
    buf: [u8; 64],
    len: usize,
}

impl IpText {
    /// Writes `ip` out.
    pub fn new(ip: IpAddr) -> Self {
        let mut t = IpText {
            buf: [0; 64],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    t.push_decimal(u32::from(o));
                }
            }
            // Rare enough to leave to `Display` (zero runs, embedded IPv4).
            IpAddr::V6(v6) => t.display(format_args!("{v6}")),
        }
        t
    }

    /// Writes `addr` out as `Display` does: `ip:port`, or `[ip%scope]:port` for IPv6.
    pub fn socket(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => {
                let mut t = Self::new(IpAddr::V4(*a.ip()));
                t.push(b':');
                t.push_decimal(u32::from(a.port()));
                t
            }
            SocketAddr::V6(a) => {
                let mut t = IpText {
                    buf: [0; 64],
                    len: 0,
                };
                t.display(format_args!("{a}"));
                t
            }
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons, brackets and `%` are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    /// The text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_decimal(&mut self, n: u32) {
        for &d in Decimal::new(u64::from(n)).as_bytes() {
            self.push(d);
        }
    }

    fn display(&mut self, args: std::fmt::Arguments<'_>) {
        use std::io::Write;
        let mut rest = &mut self.buf[self.len..];
        let room = rest.len();
        // The longest IPv6 socket address with a scope id is 57 bytes: it always fits.
        if rest.write_fmt(args).is_ok() {
            self.len += room - rest.len();
        }
    }
}

/// An unsigned number in decimal, on the stack (what `Display` writes, without `core::fmt`).
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    /// Writes `n` out.
    pub fn new(n: u64) -> Self {
        let mut d = Decimal {
            digits: [0; 20],
            start: 20,
        };
        let mut n = n;
        loop {
            d.start -= 1;
            d.digits[d.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    /// The digits.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }

    /// The digits as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ip_text_is_what_display_writes() {
        let ips = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.199.0",
            "127.0.0.1",
            "::1",
            "::",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "fe80::1:2:3:4",
        ];
        for ip in ips {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
            for port in [0, 1, 80, 443, 8080, 65535] {
                let a = SocketAddr::new(ip, port);
                assert_eq!(IpText::socket(a).as_str(), a.to_string());
            }
        }
        for n in 0..=255u8 {
            let ip = IpAddr::from([n, n / 7, 255 - n, n % 10]);
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                .parse()
                .unwrap(),
            65535,
            0,
            4_294_967_295,
        ));
        assert_eq!(IpText::socket(scoped).as_str(), scoped.to_string());
    }

    #[test]
    fn decimal_is_what_display_writes() {
        for n in [0, 1, 9, 10, 99, 100, 65535, 1 << 32, u64::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }
}
