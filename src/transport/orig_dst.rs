//! SO_ORIGINAL_DST: where a connection redirected by iptables was really going.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Reads the pre-NAT destination of an accepted connection.
///
/// The getsockopt must match the socket's address family: an IPv4 client on a dual-stack (IPv6)
/// listener arrives as an IPv4-mapped address, and the kernel keeps its NAT entry in the IPv4 table.
pub fn original_dst(stream: &TcpStream, client: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let v4 = match client {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 { sock.original_dst_v4()? } else { sock.original_dst_v6()? };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an inet address"))
}
