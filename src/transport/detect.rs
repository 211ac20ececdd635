//! Protocol detection: read the client's first bytes under a timeout and decide HTTP/2, HTTP/1.1 or
//! opaque TCP. The bytes read are handed back so they can be replayed to whoever serves the connection.
//!
//! HTTP/1 is recognised by the request-line grammar (RFC 9112 §3), not by a list of methods: anything
//! shaped like a request line goes to hyper, which answers what it cannot serve (400, 501) with the
//! same policy, hop-by-hop stripping and drain handling as any request. Only bytes that cannot start a
//! request line are opaque.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use crate::domain::Protocol;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Detection decides on at most this many bytes: a request line longer than this is HTTP/1 if its
/// method, a space and the start of a target fit; anything else still undecided by then is opaque.
const READ_SIZE: usize = 1024;

/// The verdict on a prefix of bytes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Decided(Protocol),
    NeedMore,
}

/// How far a prefix of bytes goes as an HTTP/1 request line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A whole request line: method SP request-target SP HTTP-version, then CRLF or a bare LF.
    Complete,
    /// A byte that no request line can have there.
    Invalid,
    /// Valid so far; `target_started` once the method, its space and a target byte have been seen.
    Partial { target_started: bool },
}

/// RFC 9110 §5.6.2 tchar: the bytes of a method token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A request-target byte: no SP, no CTL (hyper's parser takes the same set, obs-text included).
fn is_target_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7e | 0x80..=0xff)
}

fn request_line(buf: &[u8]) -> Line {
    let mut rest = buf;
    // Empty lines before the request line are allowed (RFC 9112 §2.2) and hyper skips them.
    loop {
        match rest {
            [b'\r', b'\n', tail @ ..] | [b'\n', tail @ ..] => rest = tail,
            [b'\r'] => return Line::Partial { target_started: false },
            [b'\r', ..] => return Line::Invalid,
            _ => break,
        }
    }
    let method = rest.iter().take_while(|&&b| is_tchar(b)).count();
    match rest.get(method) {
        None => return Line::Partial { target_started: false },
        Some(b' ') if method > 0 => rest = &rest[method + 1..],
        Some(_) => return Line::Invalid,
    }
    let target = rest.iter().take_while(|&&b| is_target_byte(b)).count();
    match rest.get(target) {
        None => return Line::Partial { target_started: target > 0 },
        Some(b' ') if target > 0 => rest = &rest[target + 1..],
        Some(_) => return Line::Invalid,
    }
    // HTTP-version = "HTTP/" DIGIT "." DIGIT; `#` stands for a digit.
    for (i, want) in b"HTTP/#.#".iter().enumerate() {
        let Some(&b) = rest.get(i) else { return Line::Partial { target_started: true } };
        let ok = if *want == b'#' { b.is_ascii_digit() } else { b == *want };
        if !ok {
            return Line::Invalid;
        }
    }
    match &rest[8..] {
        [] | [b'\r'] => Line::Partial { target_started: true },
        [b'\n', ..] | [b'\r', b'\n', ..] => Line::Complete,
        _ => Line::Invalid,
    }
}

/// Classifies the first bytes of a connection. Only the first `READ_SIZE` bytes count, and the verdict
/// never changes as bytes are added, so it does not depend on how the peer's writes were split.
fn classify(buf: &[u8]) -> Verdict {
    let buf = &buf[..buf.len().min(READ_SIZE)];
    let n = buf.len().min(H2_PREFACE.len());
    if n > 0 && buf[..n] == H2_PREFACE[..n] {
        // The preface's first line is also a valid HTTP/1 request line: wait for all of it.
        return if n == H2_PREFACE.len() { Verdict::Decided(Protocol::Http2) } else { Verdict::NeedMore };
    }
    match request_line(buf) {
        Line::Complete => Verdict::Decided(Protocol::Http1),
        Line::Invalid => Verdict::Decided(Protocol::Opaque),
        Line::Partial { target_started } if buf.len() >= READ_SIZE => {
            Verdict::Decided(if target_started { Protocol::Http1 } else { Protocol::Opaque })
        }
        Line::Partial { .. } => Verdict::NeedMore,
    }
}

/// The protocol the first bytes of a connection show, or `None` while more bytes could change it.
/// For fuzzing and tests; `detect` is what serves connections.
#[doc(hidden)]
pub fn classify_prefix(buf: &[u8]) -> Option<Protocol> {
    match classify(buf) {
        Verdict::Decided(p) => Some(p),
        Verdict::NeedMore => None,
    }
}

/// Reads until the protocol is known, the peer stops sending, or `timeout` passes.
///
/// Returns the protocol and every byte read. A peer that sends nothing in time (a server-first protocol)
/// or closes early is opaque: its bytes, if any, still go upstream.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> std::io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let deadline = crate::clock::after(timeout);
    loop {
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.freeze())),
            // `classify` always decides once READ_SIZE bytes are in, so this loop ends.
            Ok(Ok(_)) => {
                if let Verdict::Decided(p) = classify(&buf) {
                    return Ok((p, buf.freeze()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::ReadBuf;

    use super::*;

    fn decided(p: Protocol) -> Verdict {
        Verdict::Decided(p)
    }

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(H2_PREFACE), decided(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), Verdict::NeedMore);
        // The preface's first line alone could still become the preface.
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\nHost: a\r\n\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"PRI / HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"POS"), Verdict::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1"), Verdict::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1\r"), Verdict::NeedMore);
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"CONNECT example.com:443 HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"\r\n\nGET / HTTP/1.1\r\n"), decided(Protocol::Http1));
        // Lower case and odd tchar methods are HTTP/1 too; hyper answers what it cannot serve.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"M!X~1 /x HTTP/1.1\r\n"), decided(Protocol::Http1));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n"), decided(Protocol::Http1));
        // Not a request line.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), decided(Protocol::Opaque));
        assert_eq!(classify(b" GET"), decided(Protocol::Opaque));
        assert_eq!(classify(b"GET  / HTTP/1.1\r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"GET / FTP/1.1\r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/1.1\rX"), decided(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/1.1 \r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"GET /a\x01b HTTP/1.1\r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"\rGET"), decided(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), decided(Protocol::Opaque));
        assert_eq!(classify(b"SET key value\r\n"), decided(Protocol::Opaque));
    }

    #[test]
    fn read_size_bounds_the_decision() {
        // A long request line is HTTP/1 once its method, space and target began within READ_SIZE.
        let mut long = b"GET /".to_vec();
        long.resize(READ_SIZE + 100, b'a');
        assert_eq!(classify(&long[..READ_SIZE - 1]), Verdict::NeedMore);
        assert_eq!(classify(&long), decided(Protocol::Http1));
        // A token that never ends is not.
        assert_eq!(classify(&[b'A'; READ_SIZE]), decided(Protocol::Opaque));
        assert_eq!(classify(&b"\r\n".repeat(READ_SIZE / 2)), decided(Protocol::Opaque));
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

    /// Hands out `data` in the given pieces, then EOF (tokio-test's mock insists every read is used).
    struct Pieces {
        data: Vec<u8>,
        cuts: Vec<usize>,
        at: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = &mut *self;
            let end = this.cuts.iter().copied().find(|&c| c > this.at).unwrap_or(this.data.len());
            let n = (end - this.at).min(out.remaining());
            out.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// What `detect` must say about `data` when the peer sends it and closes.
    fn expected(data: &[u8]) -> Protocol {
        match classify(data) {
            Verdict::Decided(p) => p,
            Verdict::NeedMore => Protocol::Opaque,
        }
    }

    fn detect_split(data: &[u8], cuts: &[usize]) -> (Protocol, Bytes) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut io = Pieces { data: data.to_vec(), cuts, at: 0 };
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(detect(&mut io, Duration::from_secs(5))).unwrap()
    }

    fn tchar() -> impl Strategy<Value = u8> {
        prop::sample::select(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ".to_vec())
    }

    /// Valid HTTP/1 request lines, some longer than READ_SIZE, some after empty lines.
    fn request_line_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])], 0..3),
            prop::collection::vec(tchar(), 1..24),
            prop::collection::vec(prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff], 1..1500),
            (0u8..10, 0u8..10),
            prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])],
        )
            .prop_map(|(empty, method, target, (major, minor), eol)| {
                let mut line = empty.concat();
                line.extend_from_slice(&method);
                line.push(b' ');
                line.extend_from_slice(&target);
                line.extend_from_slice(format!(" HTTP/{major}.{minor}").as_bytes());
                line.extend_from_slice(eol);
                line
            })
    }

    /// Bytes worth classifying: noise, request lines with noise after them, and request lines cut
    /// or with a byte changed (near misses).
    fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            (request_line_bytes(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(mut l, tail)| {
                l.extend(tail);
                l
            }),
            (request_line_bytes(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut l, i, b)| {
                let i = i.index(l.len());
                l[i] = b;
                l
            }),
            (request_line_bytes(), any::<prop::sample::Index>()).prop_map(|(l, i)| l[..i.index(l.len())].to_vec()),
            (0..=H2_PREFACE.len(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(n, tail)| {
                let mut b = H2_PREFACE[..n].to_vec();
                b.extend(tail);
                b
            }),
        ]
    }

    proptest! {
        /// However the peer's bytes are split across reads, detection does not panic, reaches the
        /// verdict the whole bytes give, and hands back a prefix of them.
        #[test]
        fn verdict_does_not_depend_on_splits(
            data in first_bytes(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let (p, bytes) = detect_split(&data, &cuts);
            prop_assert_eq!(p, expected(&data));
            prop_assert!(data.starts_with(&bytes));
            // Every prefix classifies without panicking, and a decided prefix is never overruled.
            for n in 0..=data.len().min(READ_SIZE + 1) {
                if let Verdict::Decided(q) = classify(&data[..n]) {
                    prop_assert_eq!(q, p);
                }
            }
        }

        /// Every valid request line is HTTP/1, whole or split.
        #[test]
        fn valid_request_line_is_http1(
            line in request_line_bytes(),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            // The preface's first line waits for the rest of the preface; a header line settles it.
            let mut data = line;
            data.extend_from_slice(b"Host: a\r\n\r\n");
            prop_assert_eq!(classify(&data), decided(Protocol::Http1));
            prop_assert_eq!(detect_split(&data, &cuts).0, Protocol::Http1);
        }
    }
}
