//! Upstream TCP connects, bounded by a timeout and classified so errors map to clear responses.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    #[error("connect to {0} timed out after {1:?}")]
    TimedOut(SocketAddr, Duration),
    #[error("connect to {0} failed: {1}")]
    Other(SocketAddr, std::io::Error),
}

/// Connects with TCP_NODELAY set (proxied request/response traffic is latency-bound).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::TimedOut(addr, timeout)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused(addr)),
        Ok(Err(e)) => Err(ConnectError::Other(addr, e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}
