//! Addresses, numbers and times as text without `core::fmt`: an IPv4 address's four
//! octets through the formatting machinery cost more instructions than the rest of the
//! forwarding headers, and a log record's two addresses and its timestamp more than the
//! rest of its serialising.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

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
            IpAddr::V4(v4) => write_v4(v4, None, |b| t.push(b)),
            // Rare enough to leave to `Display` (zero runs, embedded IPv4).
            IpAddr::V6(v6) => t.display(format_args!("{v6}")),
        }
        t
    }

    /// Writes `addr` out as `Display` does: `ip:port`, or `[ip%scope]:port` for IPv6.
    pub fn socket(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => {
                let mut t = IpText {
                    buf: [0; 64],
                    len: 0,
                };
                write_v4(*a.ip(), Some(a.port()), |b| t.push(b));
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

/// Appends `addr` as `Display` writes it (a log record writes two per request). IPv4 goes
/// into a buffer of its longest length, `255.255.255.255:65535`, then into `out` in one
/// copy: pushed a byte at a time, each push checked `out`'s capacity (310 instructions per
/// address under callgrind, against 278).
pub fn push_socket(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let mut buf = [0u8; 21];
            let mut n = 0;
            write_v4(*a.ip(), Some(a.port()), |b| {
                if let Some(slot) = buf.get_mut(n) {
                    *slot = b;
                    n += 1;
                }
            });
            out.extend_from_slice(&buf[..n]);
        }
        SocketAddr::V6(_) => out.extend_from_slice(IpText::socket(addr).as_bytes()),
    }
}

/// Writes an IPv4 address, and `:port` when there is one, as `Display` does, a byte at a
/// time to `put` (a stack buffer or a log line). Octets without a division loop: they are
/// most of the digits in a log record.
#[inline]
fn write_v4(ip: Ipv4Addr, port: Option<u16>, mut put: impl FnMut(u8)) {
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            put(b'.');
        }
        if o >= 100 {
            put(b'0' + o / 100);
        }
        if o >= 10 {
            put(b'0' + o / 10 % 10);
        }
        put(b'0' + o % 10);
    }
    if let Some(port) = port {
        put(b':');
        for &d in Decimal::new(u64::from(port)).as_bytes() {
            put(d);
        }
    }
}

/// A time in RFC 3339, UTC, with milliseconds (`2026-11-23T02:00:00.123Z`): what
/// `humantime::format_rfc3339_millis` writes, on the stack and without a format call.
pub struct Rfc3339Millis([u8; 24]);

impl Rfc3339Millis {
    /// 9999-12-31T23:59:59, the last second RFC 3339's four-digit year can write.
    const LAST: u64 = 253_402_300_799;

    /// Writes `t` out. A clock set before 1970 gives the epoch, and one past 9999 the
    /// last millisecond of that year: a log line, unlike humantime, never panics.
    pub fn new(t: SystemTime) -> Self {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, millis) = if since.as_secs() > Self::LAST {
            (Self::LAST, 999)
        } else {
            (since.as_secs(), since.subsec_millis())
        };
        let mut b = *b"0000-00-00T00:00:00.000Z";
        b[..19].copy_from_slice(&Self::second(secs));
        put_digits(&mut b[20..23], u64::from(millis));
        Rfc3339Millis(b)
    }

    /// `secs` as `YYYY-MM-DDTHH:MM:SS`, kept per thread for the next record: a busy proxy
    /// writes thousands of records in the same second (as nginx keeps its log's time
    /// text), and the date and time cost about 160 instructions to write.
    fn second(secs: u64) -> [u8; 19] {
        thread_local! {
            // No time is `u64::MAX` seconds (`new` stops at `LAST`): the first call writes.
            static LAST: std::cell::Cell<(u64, [u8; 19])> =
                const { std::cell::Cell::new((u64::MAX, [0; 19])) };
        }
        LAST.with(|last| {
            let (kept, text) = last.get();
            if kept == secs {
                return text;
            }
            let (year, month, day) = civil_from_days(secs / 86_400);
            let of_day = secs % 86_400;
            let mut b = *b"0000-00-00T00:00:00";
            put_digits(&mut b[0..4], year);
            put_digits(&mut b[5..7], month);
            put_digits(&mut b[8..10], day);
            put_digits(&mut b[11..13], of_day / 3600);
            put_digits(&mut b[14..16], of_day / 60 % 60);
            put_digits(&mut b[17..19], of_day % 60);
            last.set((secs, b));
            b
        })
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and the separators above are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The text's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Fills `out` with the last `out.len()` decimal digits of `n`, zero-padded.
fn put_digits(out: &mut [u8], mut n: u64) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
                let mut pushed = b"x".to_vec();
                push_socket(&mut pushed, a);
                assert_eq!(pushed, format!("x{a}").as_bytes());
            }
        }
        for n in 0..=255u8 {
            let ip = IpAddr::from([n, n / 7, 255 - n, n % 10]);
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
            let mut pushed = Vec::new();
            push_socket(&mut pushed, SocketAddr::new(ip, u16::from(n)));
            assert_eq!(
                pushed,
                SocketAddr::new(ip, u16::from(n)).to_string().as_bytes()
            );
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
    fn rfc3339_millis_is_what_humantime_writes() {
        use std::time::Duration;
        // Leap days, century years (2100 is no leap year, 2000 is), the ends of years and
        // days, and a spread of instants in between, at several sub-second offsets.
        let mut secs: Vec<u64> = vec![
            0,
            951_782_400,   // 2000-02-29
            951_868_799,   // 2000-02-29T23:59:59
            4_107_542_400, // 2100-03-01
            4_102_444_799, // 2099-12-31T23:59:59
            1_795_478_400, // 2026-11-24
            Rfc3339Millis::LAST,
        ];
        secs.extend((0..20_000u64).map(|i| i * 12_673_063 % Rfc3339Millis::LAST));
        for s in secs {
            for nanos in [0, 1_000_000, 999_999_999, 500_000_123] {
                let t = UNIX_EPOCH + Duration::new(s, nanos);
                let want = humantime::format_rfc3339_millis(t).to_string();
                assert_eq!(Rfc3339Millis::new(t).as_str(), want, "{s}.{nanos}");
            }
        }
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(
            Rfc3339Millis::new(before).as_str(),
            "1970-01-01T00:00:00.000Z"
        );
        let after = UNIX_EPOCH + Duration::from_secs(Rfc3339Millis::LAST + 86_400);
        assert_eq!(
            Rfc3339Millis::new(after).as_str(),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn decimal_is_what_display_writes() {
        for n in [0, 1, 9, 10, 99, 100, 65535, 1 << 32, u64::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }
}
