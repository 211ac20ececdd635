//! The client side of a proxied connection: replays the bytes read during detection, counts every byte
//! both ways into the connection's record, and closes with a lingering close when Ebb ends it first.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::conntrack::Conn;
use crate::transport::linger::Linger;

/// An accepted stream with detection's bytes put back in front.
#[derive(Debug)]
pub struct ClientIo {
    prefix: Bytes,
    /// Always present until dropped: taken only to hand the socket to its lingering close.
    inner: Option<TcpStream>,
    conn: Arc<Conn>,
    /// The client closed its side or the socket failed: nothing more can arrive, closing is clean.
    finished: bool,
    linger: Option<Linger>,
}

fn gone() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl ClientIo {
    pub fn new(inner: TcpStream, prefix: Bytes, conn: Arc<Conn>) -> Self {
        conn.bytes_in.fetch_add(prefix.len() as u64, Relaxed);
        Self { prefix, inner: Some(inner), conn, finished: false, linger: None }
    }

    /// Closes through `linger` when this side ends the connection first.
    pub fn with_linger(mut self, linger: Linger) -> Self {
        self.linger = Some(linger);
        self
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let (Some(stream), Some(linger)) = (self.inner.take(), self.linger.take()) else { return };
        if self.finished || linger.timeout.is_zero() {
            return;
        }
        // Dropped outside a runtime only when the process is going away; a plain close is all there is.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(linger.run(stream).instrument(tracing::Span::current()));
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // An emptied `Bytes` still holds detection's whole read buffer; an idle connection
                // would keep it for its life (issue 13: memory per idle connection).
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(Err(gone())) };
        let before = buf.filled().len();
        let res = Pin::new(inner).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n == 0 && buf.remaining() > 0 {
                    this.finished = true;
                }
                this.conn.bytes_in.fetch_add(n as u64, Relaxed);
            }
            Poll::Ready(Err(_)) => this.finished = true,
            Poll::Pending => {}
        }
        res
    }
}

impl ClientIo {
    /// One write to the socket, its bytes counted for the connection; a failed write ends it.
    fn write_counted(
        mut self: Pin<&mut Self>,
        write: impl FnOnce(&mut TcpStream) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(Err(gone())) };
        let res = write(inner);
        match &res {
            Poll::Ready(Ok(n)) => {
                this.conn.bytes_out.fetch_add(*n as u64, Relaxed);
            }
            Poll::Ready(Err(_)) => this.finished = true,
            Poll::Pending => {}
        }
        res
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write_counted(|inner| Pin::new(inner).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.write_counted(|inner| Pin::new(inner).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}
