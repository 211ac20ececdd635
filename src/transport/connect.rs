//! Upstream TCP connects, bounded by a timeout and classified so errors map to clear responses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::tls::identity::Identity;
use crate::tls::mesh::Alpn;
use crate::tls::verify::TlsCause;
use crate::transport::stream::{MaybeTls, UpstreamIo};

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    #[error("connect to {0} timed out after {1:?}")]
    TimedOut(SocketAddr, Duration),
    /// The process or the system has no file descriptor left for the socket: nothing is wrong with
    /// the upstream, so it must not be reported (or alerted on) as an upstream failure.
    #[error("no file descriptor left to connect to {0}: {1}")]
    LocalFdExhausted(SocketAddr, std::io::Error),
    #[error("connect to {0} failed: {1}")]
    Other(SocketAddr, std::io::Error),
    /// The TCP connection was made, the mesh TLS handshake failed.
    #[error("mesh TLS to {addr} failed ({}): {source}", cause.as_str())]
    Tls { addr: SocketAddr, cause: TlsCause, source: std::io::Error },
}

/// `EMFILE` (this process is at its descriptor limit) or `ENFILE` (the whole system is).
pub fn fd_exhausted(e: &std::io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(ENFILE | EMFILE))
}

/// Connects with TCP_NODELAY set (proxied request/response traffic is latency-bound).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::TimedOut(addr, timeout)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused(addr)),
        Ok(Err(e)) if fd_exhausted(&e) => Err(ConnectError::LocalFdExhausted(addr, e)),
        Ok(Err(e)) => Err(ConnectError::Other(addr, e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// How an upstream is dialled over mesh TLS: the identity it must prove, what runs inside, and the
/// identity this side presents (`None` when this sidecar has none, which fails the connect).
#[derive(Clone, Copy, Debug)]
pub struct MeshDial<'a> {
    pub expected: &'a Arc<str>,
    pub alpn: Alpn,
    pub identity: Option<&'a Identity>,
}

/// Connects, and with `mesh` completes the TLS handshake too, all within `timeout`.
pub async fn connect_io(
    addr: SocketAddr,
    timeout: Duration,
    mesh: Option<MeshDial<'_>>,
) -> Result<UpstreamIo, ConnectError> {
    let Some(mesh) = mesh else { return connect(addr, timeout).await.map(MaybeTls::Plain) };
    let Some(identity) = mesh.identity else {
        let source = std::io::Error::other("this sidecar has no identity to dial mTLS with");
        return Err(ConnectError::Tls { addr, cause: TlsCause::Failed, source });
    };
    let dial = async {
        let tcp = connect(addr, timeout).await?;
        crate::tls::mesh::connect(tcp, addr, identity, mesh.expected, mesh.alpn)
            .await
            .map_err(|(cause, source)| ConnectError::Tls { addr, cause, source })
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(r) => r.map(|s| MaybeTls::Tls(Box::new(s))),
        Err(_) => Err(ConnectError::TimedOut(addr, timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_exhaustion_is_told_apart() {
        assert!(fd_exhausted(&std::io::Error::from_raw_os_error(24)));
        assert!(fd_exhausted(&std::io::Error::from_raw_os_error(23)));
        assert!(!fd_exhausted(&std::io::Error::from_raw_os_error(111)));
        assert!(!fd_exhausted(&std::io::Error::other("x")));
    }
}
