//! HTTP/1.1 through Ebb: keep-alive, chunked and large streamed bodies, WebSocket upgrade, errors.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use support::{client, origin, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn keep_alive_reuses_one_connection_each_side() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let (mut tx, _task) = client::h1(ebb.addr("web").unwrap()).await;
    for _ in 0..5 {
        tx.ready().await.unwrap();
        let res = tx.send_request(client::get("/")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-origin"], "a");
        assert!(res.headers().get("connection").is_none());
        assert_eq!(client::text(res).await, "ok");
    }
    assert_eq!(o.hits.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(o.conns.load(std::sync::atomic::Ordering::SeqCst), 1, "upstream connection reused");
}

#[tokio::test]
async fn host_preserved_and_hop_by_hop_stripped() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let (mut tx, _task) = client::h1(ebb.addr("web").unwrap()).await;
    let req = Request::get("/headers")
        .header("host", "app.example:8080")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "yes")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let seen = client::text(tx.send_request(req).await.unwrap()).await;
    assert!(seen.contains("host: app.example:8080"), "{seen}");
    assert!(seen.contains("x-end-to-end: yes"), "{seen}");
    assert!(!seen.contains("x-secret-hop"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");
}

#[tokio::test]
async fn chunked_request_body_streams_both_ways() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let (mut tx, _task) = client::h1(ebb.addr("web").unwrap()).await;
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
        (0..10).map(|i| Ok(Frame::data(Bytes::from(format!("chunk-{i};"))))).collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let (mut tx2, _t2) = {
        // A stream body needs its own connection type.
        let stream = tokio::net::TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
        let (tx2, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        (tx2, tokio::spawn(conn))
    };
    let res = tx2.send_request(Request::post("/echo").header("host", "a").body(body).unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(text, (0..10).map(|i| format!("chunk-{i};")).collect::<String>());
    // The first connection still works afterwards.
    assert_eq!(tx.send_request(client::get("/")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn large_bodies_stream_without_buffering() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let (mut tx, _task) = client::h1(ebb.addr("web").unwrap()).await;
    // 100 MiB down: read frame by frame, never holding it all.
    let size: u64 = 100 * 1024 * 1024;
    let res = tx.send_request(client::get(&format!("/big?bytes={size}"))).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        got += f.unwrap().into_data().map(|d| d.len() as u64).unwrap_or(0);
    }
    assert_eq!(got, size);

    // 32 MiB up, generated lazily.
    let up: u64 = 32 * 1024 * 1024;
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    let frames = futures_util::stream::iter(
        (0..up / chunk.len() as u64).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let stream = tokio::net::TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    let (mut tx2, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let res = tx2
        .send_request(Request::post("/count").header("host", "a").body(StreamBody::new(frames)).unwrap())
        .await
        .unwrap();
    assert_eq!(client::text(res).await, up.to_string());
}

#[tokio::test]
async fn websocket_upgrade_is_spliced() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let (mut s, head) = client::ws_upgrade(ebb.addr("web").unwrap()).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"frames", b"after upgrade"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, msg);
    }
}

#[tokio::test]
async fn malformed_request_gets_400_and_others_keep_working() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /a b c HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(o.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the origin");
    let (status, body) = client::fetch(addr, "GET", "/").await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn refused_upstream_is_502_with_cause() {
    // A port with nothing listening: bind, learn it, close.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let ebb = proxy_to(dead, |_| {}).await;
    let (mut tx, _task) = client::h1(ebb.addr("web").unwrap()).await;
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-ebb-error"], "upstream-connect-refused");
    // The connection stays usable for the next request.
    tx.ready().await.unwrap();
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert_eq!(res.status(), 502);
}

#[tokio::test]
async fn slow_upstream_times_out_with_504() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| c.upstream.response_timeout = Some(Duration::from_millis(200))).await;
    let (status, _) = client::fetch(ebb.addr("web").unwrap(), "GET", "/slow?ms=2000").await;
    assert_eq!(status, 504);
}

/// An idle client does not pin an upstream connection: once the client has been quiet for an idle
/// tick (a quarter of its idle timeout), the connection its session kept goes back to the pool, and
/// the pool closes it after `upstream.idle_timeout` — while the client's own connection stays open
/// until its idle timeout, and its next request is served on a new upstream connection.
#[tokio::test]
async fn an_idle_clients_upstream_connection_is_closed_after_the_upstream_idle_timeout() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    // An origin that counts the connections it has seen end.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (opened, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::watch::Sender::new(0usize)));
    let (o, e) = (opened.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            o.fetch_add(1, SeqCst);
            let e = e.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                e.send_modify(|n| *n += 1);
            });
        }
    });
    const CLIENT_IDLE: Duration = Duration::from_secs(2);
    let ebb = proxy_to(origin, |c| {
        c.downstream.http1_idle_timeout = CLIENT_IDLE;
        c.upstream.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut tx, client_conn) = client::h1(ebb.addr("web").unwrap()).await;
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert_eq!(client::text(res).await, "ok");
    let quiet_since = tokio::time::Instant::now();

    // The upstream connection ends (quiet tick + pool idle timeout) before the client's idle timeout.
    let mut ended_rx = ended.subscribe();
    tokio::time::timeout(CLIENT_IDLE, ended_rx.wait_for(|n| *n == 1))
        .await
        .expect("the upstream connection of an idle client was still open at the client's idle timeout")
        .unwrap();
    assert!(quiet_since.elapsed() < CLIENT_IDLE);
    assert!(!client_conn.is_finished(), "the client's own connection stays open until its idle timeout");

    // The client's next request goes out on a new upstream connection.
    tx.ready().await.unwrap();
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(client::text(res).await, "ok");
    assert_eq!(opened.load(SeqCst), 2);
}
