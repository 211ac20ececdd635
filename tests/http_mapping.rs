//! Requests an intermediary must not forward as they came (issue 22, item 8): before, each reached the
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
