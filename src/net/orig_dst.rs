//! The original destination of a redirected connection (`SO_ORIGINAL_DST`), and the seam
//! that lets in-process tests supply one without iptables.

use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Where a client meant to connect before iptables redirected it. `None` for a connection
/// that was not redirected (an explicit-proxy client, or no NAT entry).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let found = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    found.ok().and_then(|a| a.as_socket()).map(|a| match a {
        // An IPv4 destination seen through a dual-stack socket is still IPv4.
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::V6(v6),
        },
        v4 => v4,
    })
}
