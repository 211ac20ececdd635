//! Listeners: bind, accept until the drain's close phase, then take what the kernel already queued and
//! close — so a connection the kernel completed is served, never reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::config::Direction;
use crate::drain::{Phase, Watch};

/// Where a listener's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The connection's original destination (iptables REDIRECT); inbound goes to the local app on
    /// the original port.
    OriginalDst,
    /// A fixed upstream.
    Fixed(SocketAddr),
}

/// A bound listener's identity and how its connections are served.
#[derive(Debug)]
pub struct Listener {
    pub name: Arc<str>,
    pub direction: Direction,
    pub target: Target,
    pub local: SocketAddr,
    pub detect_timeout: Duration,
    pub opaque_ports: Arc<[u16]>,
    /// Every port Ebb listens on, so a connection aimed at one of them is refused (no loops).
    pub own_ports: Arc<[u16]>,
    /// Every connection is opaque TCP (no detection).
    pub all_opaque: bool,
}

/// Binds with a deep backlog and SO_REUSEADDR; `[::]` also accepts IPv4.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// After new handshakes are refused, how long the listener keeps accepting those already answered
/// (SYN-ACK sent, the client's ACK on its way): a round trip inside a cluster, with room to spare.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(50);

/// Makes the kernel drop new SYNs to this listener while letting handshakes under way complete.
///
/// Closing a listening socket resets every connection the kernel completed but nobody accepted, and a
/// handshake can complete between the last `accept` and the close: the client believes it is
/// connected, may already have written its request, and gets a reset. With new SYNs dropped first,
/// such a client retransmits its SYN and then finds the port closed (a refused connect, which it
/// retries elsewhere); the handshakes already answered arrive within `HANDSHAKE_GRACE` and are served.
/// The filter sees the TCP header at offset 0: byte 13 holds the flags.
fn refuse_new_handshakes(socket: &TcpListener) -> std::io::Result<()> {
    use socket2::SockFilter;
    const LD_B_ABS: u16 = 0x30;
    const AND_K: u16 = 0x54;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let program = [
        SockFilter::new(LD_B_ABS, 0, 0, 13),
        SockFilter::new(AND_K, 0, 0, SYN | ACK),
        // A bare SYN (a new handshake): drop it. Anything else: keep all of it.
        SockFilter::new(JEQ_K, 0, 1, SYN),
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, u32::MAX),
    ];
    socket2::SockRef::from(socket).attach_filter(&program)
}

/// Accepts until the close phase, handing each connection to `serve`; then refuses new handshakes,
/// serves those under way and what the kernel had already accepted, and closes the socket.
pub async fn run<F>(
    listener: Arc<Listener>,
    socket: TcpListener,
    mut watch: Watch,
    on_announce_accept: impl Fn() + Send,
    serve: F,
) where
    F: Fn(&Arc<Listener>, TcpStream, SocketAddr) + Send,
{
    loop {
        tokio::select! {
            r = socket.accept() => match r {
                Ok((stream, peer)) => {
                    if watch.phase() == Phase::Announcing {
                        on_announce_accept();
                    }
                    serve(&listener, stream, peer);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %listener.name, error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = watch.reached(Phase::Closing) => break,
        }
    }
    match refuse_new_handshakes(&socket) {
        Ok(()) => {
            let until = tokio::time::Instant::now() + HANDSHAKE_GRACE;
            loop {
                tokio::select! {
                    r = socket.accept() => match r {
                        Ok((stream, peer)) => serve(&listener, stream, peer),
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        Err(e) => tracing::warn!(listener = %listener.name, error = %e, "Cannot filter new handshakes; closing as is"),
    }
    let mut late = 0;
    match socket.into_std() {
        Ok(std) => loop {
            match std.accept() {
                Ok((s, peer)) => {
                    late += 1;
                    if s.set_nonblocking(true).is_ok() {
                        if let Ok(s) = TcpStream::from_std(s) {
                            serve(&listener, s, peer);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(listener = %listener.name, error = %e, "Accept failed while closing");
                    break;
                }
            }
        },
        Err(e) => tracing::warn!(listener = %listener.name, error = %e, "Cannot take the accept queue"),
    }
    tracing::info!(listener = %listener.name, queued = late, "Listener closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn filtered_listener_ignores_new_handshakes_and_keeps_established_ones() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut before = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut accepted, _) = socket.accept().await.unwrap();
        refuse_new_handshakes(&socket).unwrap();
        // A new SYN goes unanswered: neither connected nor refused.
        let late = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await;
        assert!(late.is_err(), "a new handshake completed: {late:?}");
        // The established connection is untouched.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        before.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Once closed, the port refuses.
        drop(socket);
        let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
