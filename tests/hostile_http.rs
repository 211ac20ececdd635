//! Hostile and odd HTTP from a raw client (bytes on a plain TcpStream, so nothing tidies them up):
//! malformed chunked bodies, request lines detection must not mistake for opaque TCP, Host rules and
//! CONNECT.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use support::{eventually, origin, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    /// Header lines, names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

const READ_LIMIT: Duration = Duration::from_secs(10);

/// Reads one response (head, then a Content-Length or chunked body) from `s`.
async fn read_response(s: &mut TcpStream) -> Raw {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(READ_LIMIT, s.read(&mut chunk)).await.expect("response in time").unwrap();
        assert!(n > 0, "connection closed before a response; got {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let done = |rest: &[u8]| match length {
        Some(n) => rest.len() >= n,
        None if chunked => rest.ends_with(b"0\r\n\r\n"),
        None => status == 101 || status == 204 || status == 304,
    };
    while !done(&rest) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(READ_LIMIT, s.read(&mut chunk)).await.expect("body in time").unwrap();
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
    Raw { status, headers, body: String::from_utf8_lossy(&rest).into_owned() }
}

/// Writes `bytes` on a fresh connection and reads one response.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s).await
}

/// Whether the server closed `s` (EOF) within the read limit, skipping anything else it sends.
async fn closed(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    loop {
        match tokio::time::timeout(READ_LIMIT, s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn metric(ebb: &ebb::app::Running, series: &str) -> u64 {
    support::sample(&ebb.drain.metrics().render(), series)
}

/// Waits until Ebb has no client connection left, so the upstream connection a closed client
/// connection held is back in the pool before the next one looks.
async fn settle(ebb: &ebb::app::Running) {
    let idle = eventually(Duration::from_secs(10), async || ebb.track.counts().connections == 0).await;
    assert!(idle, "client connections still open: {:?}", ebb.track.counts());
}

// ---- Point 4: malformed chunked request bodies are the client's fault -------------------------

/// A chunked request whose first chunk-size line is malformed fails before any body byte exists, so
/// Ebb answers 400 without sending the request upstream: the origin sees nothing and the upstream
/// connection stays in the pool for the next client.
#[tokio::test]
async fn malformed_first_chunk_is_400_and_keeps_the_upstream_connection() {
    let o = origin::http1("a").await;
    // The pooled connection must outlive the test, however slow the machine.
    let ebb = proxy_to(o.addr, |c| c.upstream.idle_timeout = Duration::from_secs(60)).await;
    let web = ebb.addr("web").unwrap();
    let ok = exchange(web, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(ok.status, 200);
    settle(&ebb).await;
    let cases: [(&str, &[u8]); 5] = [
        ("non-hex size", b"zz\r\nhello\r\n0\r\n\r\n"),
        ("negative size", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("size of 2^72", b"1000000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after the size", b"5\nhello\r\n0\r\n\r\n"),
    ];
    for (what, body) in cases {
        let mut s = TcpStream::connect(web).await.unwrap();
        let mut req = b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        s.write_all(&req).await.unwrap();
        let res = read_response(&mut s).await;
        assert_eq!(res.status, 400, "{what}: {res:?}");
        assert_eq!(res.header("x-ebb-error"), Some("bad-request-body"), "{what}: {res:?}");
        // The framing is lost: the client connection cannot carry another request.
        assert!(closed(&mut s).await, "{what}: client connection left open");
        // Closing our side ends Ebb's lingering close at once.
        drop(s);
        settle(&ebb).await;
    }
    assert_eq!(o.hits.load(SeqCst), 1, "no malformed request reached the origin");
    let again = exchange(web, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(again.status, 200);
    assert_eq!(o.conns.load(SeqCst), 1, "the upstream connection survived every malformed body");
    assert_eq!(metric(&ebb, r#"ebb_client_errors_total{reason="bad-request-body"}"#), 5);
}

/// A body that goes bad after its first chunk was already forwarded: the upstream has a partial
/// request, so its connection must go (hyper closes it); the client still gets 400, not 502.
#[tokio::test]
async fn malformed_chunk_mid_body_is_400_and_drops_the_upstream_connection() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let web = ebb.addr("web").unwrap();
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await.unwrap();
    // The origin has the head (and is reading the body) before the body goes bad.
    assert!(eventually(Duration::from_secs(10), async || o.hits.load(SeqCst) == 1).await);
    s.write_all(b"zz\r\n").await.unwrap();
    let res = read_response(&mut s).await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("bad-request-body"), "{res:?}");
    assert!(closed(&mut s).await);
    drop(s);
    settle(&ebb).await;
    let again = exchange(web, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(again.status, 200);
    assert_eq!(o.conns.load(SeqCst), 2, "the upstream connection holding a partial request was dropped");
    assert_eq!(metric(&ebb, r#"ebb_client_errors_total{reason="bad-request-body"}"#), 1);
}

/// More data than the chunk size declared: the client's framing error, whenever it is noticed.
#[tokio::test]
async fn chunk_longer_than_its_size_is_400() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(
        ebb.addr("web").unwrap(),
        b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloworld\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("bad-request-body"), "{res:?}");
}

// ---- Point 6: anything shaped like HTTP/1 goes through the HTTP path ---------------------------

/// Lower-case and unusual-but-legal method tokens are HTTP/1: Ebb's HTTP path handles them, so
/// hop-by-hop headers are stripped and the connection counts as http1, not opaque.
#[tokio::test]
async fn odd_method_tokens_are_proxied_as_http() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let web = ebb.addr("web").unwrap();
    for method in ["get", "M!X", "x.y~1"] {
        let req = format!("{method} /headers HTTP/1.1\r\nHost: a\r\nConnection: close, x-hop\r\nX-Hop: secret\r\n\r\n");
        let res = exchange(web, req.as_bytes()).await;
        assert_eq!(res.status, 200, "{method}: {res:?}");
        assert!(!res.body.contains("x-hop"), "{method}: hop-by-hop header reached the origin: {}", res.body);
    }
    settle(&ebb).await;
    assert_eq!(metric(&ebb, r#"ebb_connections_opened_total{direction="inbound",protocol="http1"}"#), 3);
    assert_eq!(metric(&ebb, r#"ebb_connections_opened_total{direction="inbound",protocol="opaque"}"#), 0);
}

/// A lower-case request line without Host must meet the same 400 as an upper-case one; as opaque
/// TCP it reached the origin raw.
#[tokio::test]
async fn lowercase_method_without_host_is_400() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(ebb.addr("web").unwrap(), b"get / HTTP/1.1\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(o.hits.load(SeqCst), 0);
}

/// A request line longer than detection reads is still HTTP/1 once its method and target began.
#[tokio::test]
async fn request_line_longer_than_detection_reads_is_http() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let long = "a".repeat(3000);
    let req = format!("get /headers?{long} HTTP/1.1\r\nHost: a\r\nConnection: close, x-hop\r\nX-Hop: 1\r\n\r\n");
    let res = exchange(ebb.addr("web").unwrap(), req.as_bytes()).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(!res.body.contains("x-hop"), "{}", res.body);
}

/// Genuinely non-HTTP bytes (a TLS ClientHello's start) still go through as opaque TCP.
#[tokio::test]
async fn tls_client_hello_stays_opaque() {
    let echo = origin::tcp_echo().await;
    let ebb = proxy_to(echo, |_| {}).await;
    let mut s = TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00];
    s.write_all(&hello).await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(READ_LIMIT, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, hello);
}

// ---- Point 7: Host ------------------------------------------------------------------------------

#[tokio::test]
async fn http11_without_host_is_400() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(ebb.addr("web").unwrap(), b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("missing-host"), "{res:?}");
    assert_eq!(o.hits.load(SeqCst), 0);
    assert_eq!(metric(&ebb, r#"ebb_client_errors_total{reason="missing-host"}"#), 1);
}

#[tokio::test]
async fn duplicate_host_is_400() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let web = ebb.addr("web").unwrap();
    let res = exchange(web, b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("duplicate-host"), "{res:?}");
    // Also on HTTP/1.0, where Host is optional but two are still ambiguous.
    let res = exchange(web, b"GET / HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(o.hits.load(SeqCst), 0);
}

#[tokio::test]
async fn invalid_host_is_400() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(ebb.addr("web").unwrap(), b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("invalid-host"), "{res:?}");
    assert_eq!(o.hits.load(SeqCst), 0);
}

/// HTTP/1.0 goes upstream as HTTP/1.1, which requires Host: it gets the original destination's.
#[tokio::test]
async fn http10_gains_host_from_the_original_destination() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let web = ebb.addr("web").unwrap();
    let res = exchange(web, b"GET /headers HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains(&format!("host: {web}\n")), "{}", res.body);
    let res = exchange(web, b"GET http://app.example:81/headers HTTP/1.0\r\n\r\n").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("host: app.example:81\n"), "{}", res.body);
}

/// An absolute-form target wins over a Host header (RFC 9112 §3.2.2: a proxy generates Host from
/// the target).
#[tokio::test]
async fn absolute_form_target_replaces_host() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(
        ebb.addr("web").unwrap(),
        b"GET http://right.example/headers HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("host: right.example\n"), "{}", res.body);
    assert!(!res.body.contains("wrong.example"), "{}", res.body);
    assert!(res.body.contains("uri: /headers\n"), "{}", res.body);
}

/// The same to an HTTP/2 upstream: one authority (the target's, not also a Host), no userinfo, and the
/// hop's own scheme. Before, the origin saw `:authority evil.example` and `host a.example`, userinfo
/// included, and `:scheme https` over cleartext.
#[tokio::test]
async fn absolute_form_target_to_http2_is_one_authority_without_userinfo() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http2).await;
    let res = exchange(
        ebb.addr("web").unwrap(),
        b"GET https://user:pw@right.example/headers HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("uri: http://right.example/headers\n"), "{}", res.body);
    assert!(!res.body.contains("wrong.example"), "{}", res.body);
    assert!(!res.body.contains("user"), "{}", res.body);
}

/// `Connection: host` is a client naming Host as hop-by-hop; Host is end to end whatever it says.
#[tokio::test]
async fn connection_naming_host_keeps_host() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(
        ebb.addr("web").unwrap(),
        b"GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: host, x-hop, close\r\nX-Hop: 1\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("host: app.example\n"), "{}", res.body);
    assert!(!res.body.contains("x-hop"), "{}", res.body);
}

// ---- Point 8: CONNECT ---------------------------------------------------------------------------

#[tokio::test]
async fn connect_is_refused_with_405_on_http1() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let mut s = TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await.unwrap();
    let res = read_response(&mut s).await;
    assert_eq!(res.status, 405, "{res:?}");
    assert_eq!(res.header("x-ebb-error"), Some("connect-not-supported"), "{res:?}");
    // Whatever the client sends next may be tunnel bytes, not a request: the connection ends.
    assert!(closed(&mut s).await);
    assert_eq!(o.hits.load(SeqCst), 0);
    assert_eq!(metric(&ebb, r#"ebb_client_errors_total{reason="connect-not-supported"}"#), 1);
}

#[tokio::test]
async fn connect_is_refused_with_405_on_http2() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let tcp = TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder().method("CONNECT").uri("example.com:443").body(()).unwrap();
    let (res, _send) = client.send_request(req, false).unwrap();
    let res = tokio::time::timeout(READ_LIMIT, res).await.expect("a response, not silence").unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["x-ebb-error"], "connect-not-supported");
    assert_eq!(o.hits.load(SeqCst), 0);
}

/// An origin that answers every request with `head` and then a chunked "hello", whatever its head says.
async fn te_and_cl_origin(head: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        let response = format!("{head}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
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

/// A response with both Transfer-Encoding and Content-Length is read by its chunks and forwarded
/// without the Content-Length (RFC 9112 §6.3). Before, an HTTP/1.1 client got `hel` for a length of 3
/// and waited forever for a length of 100, and an HTTP/2 client got `content-length: 3` with 5 bytes.
#[tokio::test]
async fn a_response_with_transfer_encoding_and_content_length_loses_the_length() {
    for length in [3, 100] {
        let head = if length == 3 {
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked"
        };
        let origin = te_and_cl_origin(head).await;
        let ebb = proxy_to(origin, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
        let addr = ebb.addr("web").unwrap();
        let raw = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(raw.status, 200);
        assert_eq!(raw.header("content-length"), None, "length {length}: {raw:?}");
        assert!(raw.body.contains("hello"), "length {length}: the whole body, chunked: {raw:?}");

        let (mut tx, _t) = support::client::h2(addr).await;
        let res = tx.send_request(support::client::get_h2(addr, "/")).await.unwrap();
        assert_eq!(res.headers().get("content-length"), None, "length {length}");
        assert_eq!(support::client::text(res).await, "hello", "length {length}");
    }
}

/// A GET body of unknown length (HTTP/1.1 chunked) is forwarded, chunked, never dropped (RFC 9110
/// §9.3.1 gives it no meaning, not no existence). Before, the origin saw no body and the client got
/// 200. (An HTTP/2 client's DATA without content-length takes the same path: `hop::fit`'s unit test.)
#[tokio::test]
async fn a_get_body_of_unknown_length_reaches_the_origin() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let addr = ebb.addr("web").unwrap();
    let res = exchange(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("hello"), "the origin echoed the body: {res:?}");
}

/// `Upgrade: h2c` (RFC 9113 §3.1 deprecates it; Ebb does not switch a hop that way) is served as the
/// plain HTTP/1.1 request it also is, its Upgrade and HTTP2-Settings dropped as the hop-by-hop fields
/// they are. Before, the origin got `Upgrade: h2c` without its HTTP2-Settings, which breaks a real h2c
/// server, and the exchange was treated as an upgrade.
#[tokio::test]
async fn an_h2c_upgrade_request_is_served_as_a_plain_request() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let res = exchange(
        ebb.addr("web").unwrap(),
        b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body.contains("host: a\n"), "{}", res.body);
    assert!(!res.body.contains("upgrade"), "{}", res.body);
    assert!(!res.body.contains("http2-settings"), "{}", res.body);
}
