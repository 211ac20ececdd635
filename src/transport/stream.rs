//! A byte stream that is either plaintext or mesh TLS over it: one type for the rest of the path, so
//! HTTP serving, upstream pools and TCP forwarding do not care which (docs/architecture.md §15).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::transport::io::ClientIo;

/// Plaintext `P`, or TLS `T` (boxed: a TLS session is a few KiB, the plaintext case stays small).
#[derive(Debug)]
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

/// A client connection as served: plaintext, or mesh TLS terminated.
pub type Downstream = MaybeTls<ClientIo, tokio_rustls::server::TlsStream<ClientIo>>;
/// An upstream connection: plaintext, or dialled with mesh TLS.
pub type UpstreamIo = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

impl<P, T> MaybeTls<P, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for MaybeTls<P, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(p) => Pin::new(p).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<P, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(p) => Pin::new(p).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(p) => Pin::new(p).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(&mut **t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(p) => p.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(p) => Pin::new(p).poll_flush(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    /// On TLS: `close_notify`, then the FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(p) => Pin::new(p).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}
