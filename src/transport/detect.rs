//! Protocol detection: read the client's first bytes under a timeout and decide HTTP/2, HTTP/1.1 or
//! opaque TCP. The bytes read are handed back so they can be replayed to whoever serves the connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "opaque",
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we accept as HTTP/1 (the registered methods are all far shorter).
const MAX_METHOD_LEN: usize = 20;
/// Enough for any decision; a request line longer than this is still HTTP/1 if its method parsed.
const READ_SIZE: usize = 1024;

/// The verdict on a prefix of bytes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Decided(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Verdict::Decided(Protocol::Http2) } else { Verdict::NeedMore };
    }
    // An HTTP/1 request starts with a method token (RFC 9110 §9: tchar, in practice upper case) and a space.
    for (i, &b) in buf.iter().enumerate() {
        if b == b' ' {
            return Verdict::Decided(if i > 0 { Protocol::Http1 } else { Protocol::Opaque });
        }
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') || i >= MAX_METHOD_LEN {
            return Verdict::Decided(Protocol::Opaque);
        }
    }
    Verdict::NeedMore
}

/// Reads until the protocol is known, the peer stops sending, or `timeout` passes.
///
/// Returns the protocol and every byte read. A peer that sends nothing in time (a server-first protocol)
/// or closes early is opaque: its bytes, if any, still go upstream.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> std::io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Ok(_)) => {
                if let Verdict::Decided(p) = classify(&buf) {
                    return Ok((p, buf.freeze()));
                }
                if buf.len() >= READ_SIZE {
                    return Ok((Protocol::Opaque, buf.freeze()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(H2_PREFACE), Verdict::Decided(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), Verdict::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Verdict::Decided(Protocol::Http1));
        assert_eq!(classify(b"PRI / HTTP/1.1\r\n"), Verdict::Decided(Protocol::Http1));
        assert_eq!(classify(b"POS"), Verdict::NeedMore);
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Verdict::Decided(Protocol::Http1));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Verdict::Decided(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::Decided(Protocol::Opaque));
        assert_eq!(classify(b" GET"), Verdict::Decided(Protocol::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ "), Verdict::Decided(Protocol::Opaque));
    }

    #[tokio::test]
    async fn split_preface_is_read_whole() {
        let mut io = tokio_test::io::Builder::new().read(&H2_PREFACE[..5]).read(&H2_PREFACE[5..]).build();
        let (p, bytes) = detect(&mut io, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        assert_eq!(&bytes[..], H2_PREFACE);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_is_opaque_after_timeout() {
        let mut io = tokio_test::io::Builder::new().wait(Duration::from_secs(60)).build();
        let (p, bytes) = detect(&mut io, Duration::from_secs(10)).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert!(bytes.is_empty());
    }

    #[tokio::test]
    async fn early_close_keeps_bytes() {
        let mut io = tokio_test::io::Builder::new().read(b"PR").build();
        let (p, bytes) = detect(&mut io, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert_eq!(&bytes[..], b"PR");
    }
}
