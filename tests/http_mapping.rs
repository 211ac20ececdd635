//! HTTP as RFC 9110/9112/9113 say across Ebb's hops (issue 22): each test names what it checks and
//! what happened before the fix.
//!
//! Requests an intermediary must not forward as they came (item 8): before, each reached the
//! origin. `*` as the target of a GET became `GET * HTTP/1.1`; an HTTP/2 value with whitespace at an
//! end passed; `:authority host:99999` passed (the upstream guessed a port); `Content_Length` and
//! `Transfer_Encoding` reached origins that fold `_` into `-`. Each is now refused with 400 naming the
//! cause, or the field is dropped, and the origin never sees it.

mod support;

use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use support::{client, origin, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cause(res: &http::Response<hyper::body::Incoming>) -> String {
    res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// One raw HTTP/1.1 request on a fresh connection; the response head's first line and the whole text.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_asterisk_target_is_for_options_only() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h2(addr).await;
    let uri = Uri::builder().scheme("http").authority(addr.to_string()).path_and_query("*").build().unwrap();
    let res = tx.send_request(Request::get(uri.clone()).body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    assert_eq!((res.status(), cause(&res).as_str()), (StatusCode::BAD_REQUEST, "asterisk-not-options"));
    // HTTP/1.1 too.
    let h1 = origin::http1("b").await;
    let ebb1 = proxy_to(h1.addr, |_| {}).await;
    let text = raw(ebb1.addr("web").unwrap(), "GET * HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400") && text.contains("asterisk-not-options"), "{text}");
    assert_eq!((o.hits.load(SeqCst), h1.hits.load(SeqCst)), (0, 0), "no origin saw them");
}

#[tokio::test]
async fn an_http2_value_with_whitespace_at_an_end_is_malformed() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h2(addr).await;
    for value in [" leading", "trailing\t"] {
        let mut req = client::get_h2(addr, "/headers");
        req.headers_mut().insert("x-spaced", http::HeaderValue::from_str(value).unwrap());
        let res = tx.send_request(req).await.unwrap();
        assert_eq!((res.status(), cause(&res).as_str()), (StatusCode::BAD_REQUEST, "malformed-header"), "{value:?}");
    }
    // The connection is still good for a well-formed request.
    let res = tx.send_request(client::get_h2(addr, "/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(o.hits.load(SeqCst), 1, "only the well-formed request reached the origin");
}

#[tokio::test]
async fn an_authority_whose_port_is_not_a_port_is_refused() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h2(addr).await;
    let res = tx.send_request(client::get_h2_uri("http://a.example:99999/")).await.unwrap();
    assert_eq!((res.status(), cause(&res).as_str()), (StatusCode::BAD_REQUEST, "invalid-host"));
    let h1 = origin::http1("b").await;
    let ebb1 = proxy_to(h1.addr, |_| {}).await;
    let text =
        raw(ebb1.addr("web").unwrap(), "GET / HTTP/1.1\r\nhost: a.example:99999\r\nconnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400") && text.contains("invalid-host"), "{text}");
    assert_eq!((o.hits.load(SeqCst), h1.hits.load(SeqCst)), (0, 0));
}

#[tokio::test]
async fn underscore_spellings_of_framing_fields_never_reach_the_origin() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let text = raw(
        ebb.addr("web").unwrap(),
        "GET /headers HTTP/1.1\r\nhost: a.example\r\ncontent_length: 5\r\ntransfer_encoding: chunked\r\n\
         x_request_id: 7\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_ascii_lowercase();
    assert!(body.contains("x_request_id: 7"), "other names with `_` pass: {body}");
    for smuggled in ["content_length", "transfer_encoding"] {
        assert!(!body.contains(smuggled), "{smuggled} reached the origin: {body}");
    }
}

/// An origin that answers every request on a connection with `response`, byte for byte.
async fn raw_origin(response: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    while let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..i + 4);
                        if s.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A 204 goes out without Content-Length (RFC 9110 §8.6), and no response carries `TE` (a request
/// field), to HTTP/1.1 and HTTP/2 clients alike; before, both came through as the origin sent them.
#[tokio::test]
async fn a_204_has_no_content_length_and_no_response_carries_te() {
    let origin = raw_origin("HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nte: trailers\r\nx-kept: 1\r\n\r\n").await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let addr = ebb.addr("web").unwrap();
    let text = raw(addr, "GET / HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n").await.to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 204") && text.contains("x-kept: 1"), "{text}");
    assert!(!text.contains("content-length") && !text.contains("\r\nte:"), "{text}");
    let (mut tx, _t) = client::h2(addr).await;
    let res = tx.send_request(client::get_h2(addr, "/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let names: Vec<&str> = res.headers().keys().map(|n| n.as_str()).collect();
    assert!(!names.contains(&"content-length") && !names.contains(&"te"), "{names:?}");
}

/// What a test HTTP/2 origin answers: the head, then DATA (if any), then trailers (if any).
#[derive(Clone)]
struct H2Answer {
    /// Sent as a 103 with this `link` before the final response.
    early_hints: Option<&'static str>,
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    data: Option<&'static str>,
    trailers: Vec<(&'static str, &'static str)>,
}

/// An HTTP/2 origin (the h2 crate, which sends what it is told even where RFC 9110 forbids it) that
/// answers each request with `answer` and reports the trailer names each request arrived with.
async fn h2_origin(answer: H2Answer) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<String>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (answer, seen) = (answer.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else { return };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let (answer, seen) = (answer.clone(), seen.clone());
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let names = match body.trailers().await {
                            Ok(Some(t)) => t.keys().map(|k| k.to_string()).collect(),
                            _ => Vec::new(),
                        };
                        let _ = seen.send(names);
                        if let Some(link) = answer.early_hints {
                            let hints = http::Response::builder().status(103).header("link", link);
                            let _ = respond.send_informational(hints.body(()).unwrap());
                        }
                        let mut res = http::Response::builder().status(answer.status);
                        for (k, v) in &answer.headers {
                            res = res.header(*k, *v);
                        }
                        let end = answer.data.is_none() && answer.trailers.is_empty();
                        let Ok(mut send) = respond.send_response(res.body(()).unwrap(), end) else { return };
                        if let Some(d) = answer.data {
                            let _ = send.send_data(Bytes::from_static(d.as_bytes()), answer.trailers.is_empty());
                        }
                        if !answer.trailers.is_empty() {
                            let mut t = http::HeaderMap::new();
                            for (k, v) in &answer.trailers {
                                t.append(*k, http::HeaderValue::from_static(v));
                            }
                            let _ = send.send_trailers(t);
                        }
                    });
                }
            });
        }
    });
    (addr, seen_rx)
}

/// A 101 that switches to a protocol the request did not offer, or answers a request that offered
/// none, is the upstream's error: 502, nothing spliced (RFC 9110 §7.8). Before, both were passed on
/// and the connection spliced. A 101 to a protocol the request offered is still spliced.
#[tokio::test]
async fn a_101_to_a_protocol_the_client_did_not_offer_is_a_502() {
    let origin = raw_origin("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: spdy/3\r\n\r\n").await;
    let ebb = proxy_to(origin, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    for offer in ["upgrade: websocket\r\nconnection: upgrade, close\r\n", "connection: close\r\n"] {
        let text = raw(addr, &format!("GET / HTTP/1.1\r\nhost: a.example\r\n{offer}\r\n")).await;
        assert!(text.starts_with("HTTP/1.1 502") && text.contains("upstream-upgrade-not-offered"), "{offer:?}: {text}");
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\nupgrade: websocket, SPDY/3\r\nconnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("upgrade: spdy/3"), "offered, so switched: {head}");
}

/// A 204, a 304 and an answer to HEAD end with their header section (RFC 9110 §6.4.1): DATA an HTTP/2
/// origin sends after one never reaches the client. Before, an HTTP/2 client got the DATA frames,
/// which its library must treat as a malformed response.
#[tokio::test]
async fn no_content_reaches_a_client_after_a_204_a_304_or_a_head() {
    use support::h2raw::{Event, RawH2};
    for (status, method) in [(204, "GET"), (304, "GET"), (200, "HEAD")] {
        let answer = H2Answer {
            early_hints: None,
            status,
            headers: vec![("x-origin", "1")],
            data: Some("oops"),
            trailers: vec![],
        };
        let (origin, _) = h2_origin(answer).await;
        let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2).await;
        let addr = ebb.addr("web").unwrap();
        let mut c = RawH2::connect(addr).await;
        if method == "HEAD" {
            use support::h2frame::{frame, literal, END_HEADERS, END_STREAM, HEADERS};
            // `:method` (static entry 2) as a literal, `:scheme http`, `:path`, `:authority`.
            let mut block = Vec::new();
            literal(&mut block, 2, "HEAD");
            block.push(0x86);
            literal(&mut block, 4, "/");
            literal(&mut block, 1, "a.example");
            c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block));
        } else {
            c.get(1, "a.example", "/");
        }
        let mut events = Vec::new();
        while let Some(e) = c.next(std::time::Duration::from_secs(5)).await {
            let done = matches!(e, Event::Headers { end_stream: true, .. } | Event::Data { end_stream: true, .. });
            if !matches!(e, Event::Ping) {
                events.push(e);
            }
            if done {
                break;
            }
        }
        assert_eq!(events, vec![Event::Headers { stream: 1, end_stream: true }], "{status} to {method}");
    }
}

/// Trailer sections lose what must not be in one (RFC 9110 §6.5.1: framing, routing, auth), both ways;
/// gRPC's trailers, which HTTP/2 servers never declare in a `Trailer` field, reach an HTTP/1.1 client.
/// Before, `content-length` and `host` passed inside trailers and an HTTP/1.1 client never saw
/// `grpc-status` (hyper sent only declared trailer fields on HTTP/1.1).
#[tokio::test]
async fn trailers_carry_no_framing_and_grpc_status_reaches_an_http1_client() {
    let answer = H2Answer {
        early_hints: None,
        status: 200,
        headers: vec![("content-type", "application/grpc")],
        data: Some("\0\0\0\0\0"),
        trailers: vec![("grpc-status", "0"), ("content-length", "99"), ("host", "evil.example")],
    };
    let (origin, mut seen) = h2_origin(answer).await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2).await;
    let addr = ebb.addr("web").unwrap();

    // HTTP/1.1 client, chunked request with declared trailers, two of them banned.
    let text = raw(
        addr,
        "POST /p.S/M HTTP/1.1\r\nhost: a.example\r\ncontent-type: application/grpc\r\nte: trailers\r\n\
         trailer: x-sum, content-length, host\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         5\r\n\0\0\0\0\0\r\n0\r\nx-sum: 7\r\ncontent-length: 5\r\nhost: evil.example\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    let mut names = seen.recv().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["x-sum"], "the origin's view of the request trailers");
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let (_head, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(rest.contains("\r\ngrpc-status: 0\r\n"), "grpc-status reached the HTTP/1.1 client: {rest:?}");
    assert!(!rest.contains("content-length") && !rest.contains("evil"), "{rest:?}");

    // HTTP/2 client: the response trailers without the banned two.
    let (mut tx, _t) = client::h2(addr).await;
    let mut req = client::get_h2(addr, "/p.S/M");
    req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    let res = tx.send_request(req).await.unwrap();
    let _ = seen.recv().await;
    let trailers = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().trailers().cloned().unwrap();
    let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, vec!["grpc-status"]);
}

/// A pseudo-header field in a trailer section makes the request malformed (RFC 9113 §8.1): the client's
/// stream is reset with PROTOCOL_ERROR and the origin never sees the trailers complete. Before (h2
/// dropped the pseudo-header and delivered the rest), the origin got `x-sum` and the client a 200.
#[tokio::test]
async fn a_pseudo_header_in_trailers_makes_the_request_malformed() {
    use support::h2frame::{frame, literal, DATA, END_HEADERS, END_STREAM, HEADERS};
    use support::h2raw::{Event, RawH2};
    let answer = H2Answer { early_hints: None, status: 200, headers: vec![], data: Some("ok"), trailers: vec![] };
    let (origin, mut seen) = h2_origin(answer).await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2).await;
    let mut c = RawH2::connect(ebb.addr("web").unwrap()).await;
    // POST (static entry 3), `:scheme http`, `:path /`, `:authority`; the body follows.
    let mut head = vec![0x83, 0x86];
    literal(&mut head, 4, "/");
    literal(&mut head, 1, "a.example");
    c.send(frame(HEADERS, END_HEADERS, 1, &head));
    c.send(frame(DATA, 0, 1, b"hi"));
    // Trailers: `:path /evil` first (pseudo-header fields lead a block), then `x-sum: 1` (a literal
    // with a new name, RFC 7541 §6.2.2).
    let mut trailers = Vec::new();
    literal(&mut trailers, 4, "/evil");
    trailers.extend_from_slice(b"\x00\x05x-sum\x011");
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, &trailers));
    let mut outcome = None;
    while let Some(e) = c.next(std::time::Duration::from_secs(5)).await {
        if matches!(e, Event::Reset { .. } | Event::Headers { .. }) {
            outcome = Some(e);
            break;
        }
    }
    assert_eq!(outcome, Some(Event::Reset { stream: 1, error_code: 1 }), "PROTOCOL_ERROR on stream 1");
    if let Ok(Some(names)) = tokio::time::timeout(std::time::Duration::from_secs(1), seen.recv()).await {
        assert!(names.is_empty(), "the origin saw trailers: {names:?}");
    }
}

/// A real gRPC client (grpcio, gRPC's C-core) with a multi-address target sends every call with
/// `:authority: 127.0.0.1:P,127.0.0.1:P`; a real grpcio server accepts that. Through Ebb every call
/// succeeds. Before (h2 reset each such stream as malformed), 0 succeeded, and after 1,024 resets the
/// client's connection died with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_with_a_multi_address_target_gets_every_call_through() {
    use std::process::{Command, Stdio};
    let python = support::peers::venv_bin().join("python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpcio_peer.py");
    let has_grpcio = Command::new(&python).args(["-c", "import grpc"]).status().is_ok_and(|s| s.success());
    assert!(has_grpcio, "grpcio is not installed in {}: run the tests with scripts/test.sh", python.display());
    let mut server = Command::new(&python).args([script, "server"]).stdout(Stdio::piped()).spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let lines = support::process::stdout_lines(&mut server);
    let _server = Kill(server);
    let port: u16 = lines.recv_timeout(std::time::Duration::from_secs(30)).unwrap().trim().parse().unwrap();
    let ebb =
        proxy_to(([127, 0, 0, 1], port).into(), |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2)
            .await;
    let p = ebb.addr("web").unwrap().port();
    let target = format!("ipv4:127.0.0.1:{p},127.0.0.1:{p}");
    let calls = 300;
    let out = tokio::task::spawn_blocking(move || {
        support::process::output_within(
            Command::new(python).args([script, "client", &target, &calls.to_string()]),
            std::time::Duration::from_secs(120),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.split_whitespace().take(2).collect::<Vec<_>>(), ["300", "0"], "ok, failed, last error: {text}");
}

/// 1xx responses an HTTP/1.1 origin sends before its final response reach the client (RFC 9110 §15.2:
/// a proxy forwards the 1xx it did not ask for): `103 Early Hints` with its `link`, to an HTTP/1.1
/// client as a 103 head and to an HTTP/2 client as a HEADERS frame before the final one; an origin's
/// `100 Continue` to a client that sent no Expect. Before, Ebb swallowed them all.
#[tokio::test]
async fn interim_responses_from_an_http1_origin_reach_the_client() {
    use support::h2raw::{Event, RawH2};
    let origin = raw_origin(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let addr = ebb.addr("web").unwrap();
    let text = raw(addr, "GET / HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n").await;
    let heads: Vec<&str> = text.split("\r\n").filter(|l| l.starts_with("HTTP/1.1 ")).collect();
    assert_eq!(heads, ["HTTP/1.1 100 Continue", "HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"], "{text}");
    assert!(text.contains("HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
    // An HTTP/1.0 client can parse no 1xx: it gets the final response alone.
    let text = raw(addr, "GET / HTTP/1.0\r\nhost: a.example\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.0 200 OK"), "{text}");

    // HTTP/2: three HEADERS frames on the stream (100, 103, 200), then the body.
    let mut c = RawH2::connect(addr).await;
    c.get(1, "a.example", "/");
    let mut frames = Vec::new();
    while let Some(e) = c.next(std::time::Duration::from_secs(5)).await {
        let last = matches!(e, Event::Data { end_stream: true, .. } | Event::Reset { .. } | Event::Closed);
        if !matches!(e, Event::Ping) {
            frames.push(e);
        }
        if last {
            break;
        }
    }
    let interim = Event::Headers { stream: 1, end_stream: false };
    assert_eq!(frames[..3], [interim.clone(), interim.clone(), interim], "{frames:?}");
    assert!(matches!(frames.get(3), Some(Event::Data { stream: 1, .. })), "{frames:?}");
}

/// A client that sent `Expect: 100-continue` gets one `100 Continue`, not one from hyper and another
/// from the origin.
#[tokio::test]
async fn an_expecting_client_gets_one_100_continue() {
    let origin = raw_origin("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let mut s = tokio::net::TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nhost: a.example\r\ncontent-length: 2\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue\r\n\r\n"));
    s.write_all(b"hi").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let text = format!("{}{}", String::from_utf8_lossy(&buf[..n]), String::from_utf8_lossy(&rest));
    assert_eq!(text.matches("100 Continue").count(), 1, "{text}");
    assert!(text.contains("HTTP/1.1 200 OK"), "{text}");
}

/// An HTTP/2 client's request trailers reach an HTTP/1.1 origin though no `Trailer` field declared
/// them (HTTP/2 needs none); the banned ones do not. Before, hyper dropped every undeclared trailer.
#[tokio::test]
async fn undeclared_request_trailers_reach_an_http1_origin() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = l.local_addr().unwrap();
    let (got, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 4096];
                // The chunked body ends with the last chunk, its trailers and an empty line.
                while !seen.windows(5).any(|w| w == b"0\r\n\r\n") && !has_trailer_end(&seen) {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = got.send(String::from_utf8_lossy(&seen).to_ascii_lowercase());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            });
        }
    });
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let addr = ebb.addr("web").unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", http::HeaderValue::from_static("7"));
    trailers.insert("content-length", http::HeaderValue::from_static("5"));
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    let uri = format!("http://{addr}/upload");
    let req = Request::post(uri).body(http_body_util::StreamBody::new(frames)).unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = got_rx.recv().await.unwrap();
    let tail = seen.split("\r\n0\r\n").nth(1).unwrap_or_default().to_string();
    assert!(tail.contains("x-sum: 7"), "the undeclared trailer reached the origin: {seen:?}");
    assert!(!tail.contains("content-length"), "{seen:?}");
}

/// Whether `seen` holds a chunked body's end: the last chunk `0`, trailer fields, an empty line.
fn has_trailer_end(seen: &[u8]) -> bool {
    let text = String::from_utf8_lossy(seen);
    text.split_once("\r\n0\r\n").is_some_and(|(_, tail)| tail.ends_with("\r\n\r\n") || tail == "\r\n")
}

/// An HTTP/2 origin's `103 Early Hints` reaches HTTP/1.1 and HTTP/2 clients ahead of the final
/// response. Before, hyper's HTTP/2 client never reported it.
#[tokio::test]
async fn early_hints_from_an_http2_origin_reach_the_client() {
    use support::h2raw::{Event, RawH2};
    let answer = H2Answer {
        early_hints: Some("</a.css>; rel=preload"),
        status: 200,
        headers: vec![],
        data: Some("ok"),
        trailers: vec![],
    };
    let (origin, _) = h2_origin(answer).await;
    let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2).await;
    let addr = ebb.addr("web").unwrap();
    let text = raw(addr, "GET / HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n").await;
    assert!(
        text.starts_with("HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK"),
        "{text}"
    );
    let mut c = RawH2::connect(addr).await;
    c.get(1, "a.example", "/");
    let mut frames = Vec::new();
    while let Some(e) = c.next(std::time::Duration::from_secs(5)).await {
        let last = matches!(e, Event::Data { end_stream: true, .. } | Event::Reset { .. } | Event::Closed);
        if !matches!(e, Event::Ping) {
            frames.push(e);
        }
        if last {
            break;
        }
    }
    let headers = Event::Headers { stream: 1, end_stream: false };
    assert_eq!(frames[..2], [headers.clone(), headers], "{frames:?}");
    assert!(matches!(frames.get(2), Some(Event::Data { stream: 1, .. })), "{frames:?}");
}
