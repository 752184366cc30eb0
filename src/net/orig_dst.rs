//! The original destination of a redirected connection (`SO_ORIGINAL_DST`), and the seam
//! that lets in-process tests supply one without iptables.

use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// An address with IPv4-mapped IPv6 (`[::ffff:a.b.c.d]:p`) written as the IPv4 it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where a client meant to connect before iptables redirected it. `None` for a connection
/// that was not redirected: no NAT entry, or an original destination that is the listener
/// itself (an explicit-proxy client). `client` is the peer address as accepted (canonical):
/// its family is the connection's, so the socket's own address is asked for only when the
/// kernel has an original destination to compare it with (one system call fewer for every
/// connection that was not redirected).
pub fn original_dst(stream: &TcpStream, client: SocketAddr) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    // An IPv4 connection on a dual-stack socket was NATed by iptables, not ip6tables: ask
    // for the IPv4 original destination.
    let found = if client.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let od = canonical(found.ok()?.as_socket()?);
    let local = canonical(stream.local_addr().ok()?);
    (od != local).then_some(od)
}
