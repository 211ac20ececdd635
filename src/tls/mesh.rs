//! The TLS sidecars speak to each other: how mesh TLS is told apart from an app's own TLS, and the
//! handshakes on either side (docs/architecture.md §15).
//!
//! The marker is the ALPN: a dialling Ebb offers exactly one `ebb-mesh/…` protocol, which also says
//! what runs inside (HTTP/2, HTTP/1.1 or opaque TCP), so the accepting Ebb needs no second detection.
//! A ClientHello without such an ALPN is the app's own TLS and passes through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::identity::Identity;
use super::verify::{cert_info, TlsCause};
use crate::domain::Protocol;

/// What runs inside a mesh TLS connection, as its ALPN names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    Http2,
    Http1,
    Tcp,
}

/// Every mesh ALPN, in the server's order of preference.
pub const MESH_ALPNS: [Alpn; 3] = [Alpn::Http2, Alpn::Http1, Alpn::Tcp];

impl Alpn {
    /// The protocol id on the wire.
    pub fn wire(self) -> &'static [u8] {
        match self {
            Self::Http2 => b"ebb-mesh/h2",
            Self::Http1 => b"ebb-mesh/http/1.1",
            Self::Tcp => b"ebb-mesh/tcp",
        }
    }

    pub fn from_wire(id: &[u8]) -> Option<Self> {
        MESH_ALPNS.into_iter().find(|a| a.wire() == id)
    }

    /// The ALPN a connection speaking `protocol` offers.
    pub fn of(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Http2 => Self::Http2,
            Protocol::Http1 => Self::Http1,
            Protocol::Opaque => Self::Tcp,
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Self::Http2 => Protocol::Http2,
            Self::Http1 => Protocol::Http1,
            Self::Tcp => Protocol::Opaque,
        }
    }
}

/// What a connection's first bytes are, as far as mesh TLS goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS record, but the ClientHello is not complete yet.
    NeedMore,
    /// A ClientHello offering a mesh ALPN.
    Mesh,
    /// TLS meant for someone else (the app's own), or not a well-formed ClientHello.
    Other,
}

/// The longest ClientHello read before giving up on it as mesh TLS: a record's largest size plus its
/// header; post-quantum key shares make ClientHellos of 1.5-2 KiB, far below it.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// Classifies the bytes a client sent first.
pub fn classify(buf: &[u8]) -> Hello {
    match buf {
        [] => return Hello::NeedMore,
        // A handshake record (22), TLS major version 3.
        [0x16] => return Hello::NeedMore,
        [0x16, 0x03, ..] => {}
        _ => return Hello::NotTls,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Other,
        }
    }
    match acceptor.accept() {
        Ok(None) if buf.len() < MAX_HELLO => Hello::NeedMore,
        Ok(None) => Hello::Other,
        Ok(Some(accepted)) => {
            let mesh =
                accepted.client_hello().alpn().is_some_and(|mut ids| ids.any(|id| Alpn::from_wire(id).is_some()));
            if mesh {
                Hello::Mesh
            } else {
                Hello::Other
            }
        }
        Err(_) => Hello::Other,
    }
}

/// Reads until the ClientHello that `prefix` begins is whole (or shown not to be mesh TLS), within
/// `timeout`. Returns the verdict and every byte read, to be replayed to whoever serves the connection.
pub async fn read_hello<R: AsyncRead + Unpin>(
    stream: &mut R,
    prefix: Bytes,
    timeout: Duration,
) -> std::io::Result<(Hello, Bytes)> {
    let verdict = classify(&prefix);
    if verdict != Hello::NeedMore {
        return Ok((verdict, prefix));
    }
    let mut buf = BytesMut::from(&prefix[..]);
    let read = async {
        loop {
            buf.reserve(4096);
            if stream.read_buf(&mut buf).await? == 0 {
                // The client stopped mid-hello: whatever it is, it is not a mesh handshake.
                return Ok::<_, std::io::Error>(Hello::Other);
            }
            match classify(&buf) {
                Hello::NeedMore => continue,
                v => return Ok(v),
            }
        }
    };
    let verdict = match tokio::time::timeout(timeout, read).await {
        Ok(v) => v?,
        Err(_) => Hello::Other,
    };
    Ok((verdict, buf.freeze()))
}

/// A terminated mesh connection: the stream, what runs inside it, and who the client proved to be.
pub struct Accepted<IO> {
    pub stream: tokio_rustls::server::TlsStream<IO>,
    pub alpn: Alpn,
    pub peer: Arc<str>,
}

/// Terminates mesh TLS on `io` (which replays the ClientHello) with this workload's identity; the
/// client must present a certificate chained to the trust bundle and carrying a SPIFFE ID.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    identity: &Identity,
) -> Result<Accepted<IO>, (TlsCause, std::io::Error)> {
    let config = identity.current().server.clone();
    let stream = tokio_rustls::TlsAcceptor::from(config).accept(io).await.map_err(|e| (TlsCause::of(&e), e))?;
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().and_then(Alpn::from_wire);
    let peer = session.peer_certificates().and_then(|c| c.first()).and_then(|c| cert_info(c).ok());
    match (alpn, peer) {
        (Some(alpn), Some(peer)) => Ok(Accepted { stream, alpn, peer: peer.id.into() }),
        // The verifier required a certificate and the config offers only mesh ALPNs, so neither can
        // be missing after a completed handshake; refused all the same if one is.
        (None, _) => Err((TlsCause::Failed, std::io::Error::other("no mesh ALPN agreed"))),
        (_, None) => {
            Err((TlsCause::NoClientCertificate, std::io::Error::other("no SPIFFE ID in the client certificate")))
        }
    }
}

/// Dials mesh TLS on `stream` (connected to `addr`), offering `alpn`; the server must prove to be
/// `expected`. The error's cause tells a wrong identity, an untrusted or expired certificate and a
/// refusal of this side's certificate apart.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    stream: IO,
    addr: SocketAddr,
    identity: &Identity,
    expected: &Arc<str>,
    alpn: Alpn,
) -> Result<tokio_rustls::client::TlsStream<IO>, (TlsCause, std::io::Error)> {
    let config = identity
        .current()
        .client(expected, alpn)
        .map_err(|e| (TlsCause::Failed, std::io::Error::other(e.to_string())))?;
    // Ebb dials addresses; the name goes unused by the verifier and an IP sends no SNI.
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| (TlsCause::of(&e), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_short_records_are_told_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(classify(&[0x16]), Hello::NeedMore);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00]), Hello::NeedMore);
        assert_eq!(classify(&[0x16, 0x02]), Hello::NotTls);
        // A record header announcing a hello, then garbage instead of one.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]), Hello::Other);
    }

    #[test]
    fn alpn_names_round_trip() {
        for a in MESH_ALPNS {
            assert_eq!(Alpn::from_wire(a.wire()), Some(a));
            assert_eq!(Alpn::of(a.protocol()), a);
        }
        assert_eq!(Alpn::from_wire(b"h2"), None);
    }
}
