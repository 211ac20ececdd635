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

/// Accepts until the close phase, handing each connection to `serve`; then serves what the kernel had
/// already accepted and closes the socket.
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
