//! Opaque TCP: bytes copied both ways, with half-close passed through.

use tokio::net::TcpStream;

use crate::transport::io::ClientIo;

/// Forwards until both sides have closed; when one side finishes sending, the other sees a FIN
/// (`shutdown(SHUT_WR)`), not a close, so request/response protocols that half-close still work.
pub async fn forward(mut client: ClientIo, mut upstream: TcpStream) -> std::io::Result<(u64, u64)> {
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}
