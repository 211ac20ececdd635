//! HTTP/2 and gRPC through Ebb: multiplexing, trailers and statuses intact.

mod support;

use support::grpc::{self, EchoRequest};
use support::{client, origin, proxy_to};

#[tokio::test]
async fn hundred_concurrent_streams_on_one_connection() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();
    let (tx, _task) = client::h2(addr).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let res = tx.send_request(client::get_h2(addr, &format!("/slow?ms=200&i={i}"))).await.unwrap();
            (res.status(), client::text(res).await)
        }));
    }
    let started = std::time::Instant::now();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, "slow"));
    }
    // Multiplexed, not serialised: 100 × 200 ms would take 20 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(o.conns.load(std::sync::atomic::Ordering::SeqCst), 1, "one multiplexed upstream connection");
}

#[tokio::test]
async fn grpc_unary_status_and_metadata_intact() {
    let upstream = grpc::server().await;
    let ebb = proxy_to(upstream, |_| {}).await;
    let mut c = grpc::client(ebb.addr("web").unwrap()).await;
    let res = grpc::unary(&mut c, EchoRequest { message: "hi".into(), ..Default::default() }).await.unwrap();
    assert_eq!(res.metadata().get("x-echo").unwrap(), "1");
    assert_eq!(res.into_inner().message, "hi");
    let err = grpc::unary(&mut c, EchoRequest { message: "fail".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "asked to fail");
}

#[tokio::test]
async fn grpc_server_streaming_delivers_every_message_and_status() {
    let upstream = grpc::server().await;
    let ebb = proxy_to(upstream, |_| {}).await;
    let mut c = grpc::client(ebb.addr("web").unwrap()).await;
    let mut s = grpc::stream(&mut c, EchoRequest { message: "s".into(), count: 20, delay_ms: 5 }).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    // grpc-status 0 arrived as trailers (message() would have failed otherwise).
    assert!(s.trailers().await.unwrap().is_some());
}

#[tokio::test]
async fn grpc_to_dead_upstream_is_unavailable_not_a_protocol_error() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let ebb = proxy_to(dead, |_| {}).await;
    let mut c = grpc::client(ebb.addr("web").unwrap()).await;
    let err = grpc::unary(&mut c, EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(err.metadata().get("x-ebb-error").unwrap(), "upstream-connect-refused");
}

/// HTTP/2 Cookie crumbs reach an HTTP/1.1 origin as one Cookie line, joined with "; " (RFC 9113
/// §8.2.3); before, the origin saw three Cookie lines.
#[tokio::test]
async fn cookie_crumbs_reach_an_http1_origin_as_one_line() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| c.passthrough.protocol = ebb::config::UpstreamProtocol::Http1).await;
    let addr = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h2(addr).await;
    let mut req = client::get_h2(addr, "/headers");
    for c in ["a=1", "b=2", "c=3"] {
        req.headers_mut().append("cookie", c.parse().unwrap());
    }
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = client::text(res).await;
    let cookies: Vec<&str> = seen.lines().filter(|l| l.starts_with("cookie:")).collect();
    assert_eq!(cookies, ["cookie: a=1; b=2; c=3"], "{seen}");
}
