//! Outbound resilience through an in-process Ebb: clusters, retries and what they may resend, the
//! breaker, limits, the budget, and endpoints that say they are going away. Real origins on loopback.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ebb::config::{ClusterConfig, Direction, EndpointConfig, LbPolicy, RetryOn};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use support::{base_config, client, eventually, listener, origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The service address the app dials: matched against the cluster, never dialled.
const VIP: &str = "127.0.0.1:9";

fn cluster(endpoints: &[SocketAddr]) -> ClusterConfig {
    ClusterConfig {
        name: "web".into(),
        addresses: vec![VIP.parse().unwrap()],
        endpoints: endpoints
            .iter()
            .map(|&addr| EndpointConfig { addr, weight: 1, state: Default::default(), node: None, identity: None })
            .collect(),
        ..ClusterConfig::default()
    }
}

/// Ebb with one outbound listener `out` in front of the VIP, and `c` as its cluster.
async fn ebb_with(c: ClusterConfig) -> ebb::app::Running {
    let mut cfg = base_config();
    cfg.listeners.push(listener("out", VIP.parse().unwrap(), Direction::Outbound));
    cfg.clusters.push(c);
    cfg.validate().expect("valid config");
    ebb::telemetry::init_logging(&cfg.log);
    ebb::app::start(cfg).await.expect("ebb starts")
}

/// One request on a fresh HTTP/1.1 connection: status, `x-ebb-error`, body.
async fn send(addr: SocketAddr, method: &str, path: &str, body: &'static str) -> (StatusCode, String, String) {
    let (mut tx, _task) = client::h1(addr).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    let cause = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, cause, client::text(res).await)
}

/// The value of one Prometheus series; a missing one fails the test.
async fn metric(ebb: &ebb::app::Running, series: &str) -> u64 {
    let (_, text) = client::fetch(ebb.telemetry.unwrap(), "GET", "/metrics").await;
    support::sample(&text, series)
}

/// The state of endpoint `addr` in `/status`.
async fn endpoint_state(ebb: &ebb::app::Running, addr: SocketAddr) -> String {
    let status = client::json(ebb.admin.unwrap(), "/status").await;
    let eps = status["clusters"][0]["endpoints"].as_array().cloned().unwrap_or_default();
    eps.iter()
        .find(|e| e["addr"] == addr.to_string())
        .map(|e| e["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// An HTTP/1.1 server answering every request with `status` while `failing`, 200 otherwise; counts hits.
async fn flaky(status: u16, failing: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (h, failing) = (h.clone(), failing.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    h.fetch_add(1, SeqCst);
                    let code = if failing.load(SeqCst) { status } else { 200 };
                    async move {
                        let mut r = http::Response::new(Full::new(Bytes::from_static(b"flaky")));
                        *r.status_mut() = StatusCode::from_u16(code).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn a_processed_post_that_failed_is_retried_only_when_its_status_is_in_retry_on() {
    let failing = Arc::new(AtomicBool::new(true));
    let (up, hits) = flaky(503, failing).await;
    let mut c = cluster(&[up]);
    c.outlier.consecutive_failures = 0;
    c.retry.retry_on = vec![RetryOn::ConnectFailure, RetryOn::RefusedStream];
    let ebb = ebb_with(c.clone()).await;
    let out = ebb.addr("out").unwrap();
    let (status, cause, _) = send(out, "POST", "/orders", "one order").await;
    assert_eq!((status, cause.as_str()), (StatusCode::SERVICE_UNAVAILABLE, ""), "the upstream's own 503");
    assert_eq!(hits.load(SeqCst), 1, "503 is not in retry_on: the POST went upstream once");

    // The same POST under a policy that retries 503 for any method: 1 + num_retries attempts.
    let failing = Arc::new(AtomicBool::new(true));
    let (up, hits) = flaky(503, failing).await;
    c.endpoints[0].addr = up;
    c.retry.retry_on = vec![RetryOn::GatewayError];
    c.retry.idempotent_only = false;
    let ebb = ebb_with(c).await;
    let (status, _, _) = send(ebb.addr("out").unwrap(), "POST", "/orders", "one order").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(SeqCst), 3, "first attempt and two retries");
    assert_eq!(metric(&ebb, r#"ebb_cluster_retries_total{cluster="web",reason="status"}"#).await, 2);
}

#[tokio::test]
async fn a_get_that_got_a_gateway_error_is_retried_on_the_other_endpoint() {
    let (bad, bad_hits) = flaky(503, Arc::new(AtomicBool::new(true))).await;
    let good = origin::http1("good").await;
    let mut c = cluster(&[bad, good.addr]);
    c.lb = LbPolicy::RoundRobin;
    c.outlier.consecutive_failures = 0;
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    for i in 0..10 {
        let (status, _, body) = send(out, "GET", "/x", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "request {i}");
    }
    // Round robin sends every other first attempt to the bad endpoint; each retry avoids it.
    assert_eq!(bad_hits.load(SeqCst), 5);
    assert_eq!(good.hits.load(SeqCst), 10);
}

/// A raw HTTP/2 server that reads a request's HEADERS and answers GOAWAY with last-stream-id 0: the
/// request was provably not processed. Counts the HEADERS frames it saw.
async fn goaway_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = false;
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    if answered || buf.len() < 24 {
                        continue;
                    }
                    // Frames after the 24-byte preface: 9-byte header (length, type, flags, stream).
                    let mut at = 24;
                    while at + 9 <= buf.len() {
                        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
                        if buf[at + 3] == 0x1 {
                            seen.fetch_add(1, SeqCst);
                            // SETTINGS (empty), then GOAWAY(last_stream_id = 0, NO_ERROR).
                            let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
                            out.extend_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                            let _ = s.write_all(&out).await;
                            answered = true;
                            break;
                        }
                        at += 9 + len;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn an_unprocessed_post_after_goaway_is_resent_once_and_succeeds() {
    let (refusing, refused) = goaway_server().await;
    let good = origin::http2("good").await;
    let mut c = cluster(&[refusing, good.addr]);
    // Round robin starts at the first endpoint: the refusing one gets the first attempt.
    c.lb = LbPolicy::RoundRobin;
    // Nothing that may have been processed is retried: only the unprocessed rule can resend it.
    c.retry.retry_on = vec![];
    c.retry.num_retries = 0;
    let ebb = ebb_with(c).await;
    let (mut tx, _task) = client::h2(ebb.addr("out").unwrap()).await;
    let req = Request::post("http://web.test/count").body(Full::new(Bytes::from_static(b"twelve bytes"))).unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(client::text(res).await, "12", "the body arrived whole, once");
    assert_eq!(refused.load(SeqCst), 1, "the refusing endpoint saw the request's HEADERS once");
    assert_eq!(good.hits.load(SeqCst), 1, "and the other endpoint processed it once");
    assert_eq!(metric(&ebb, r#"ebb_cluster_retries_total{cluster="web",reason="unprocessed"}"#).await, 1);
    assert_eq!(endpoint_state(&ebb, refusing).await, "draining", "its GOAWAY marked it draining");
}

#[tokio::test]
async fn an_endpoint_returning_503s_is_ejected_traffic_moves_and_it_comes_back() {
    let failing = Arc::new(AtomicBool::new(true));
    let (bad, bad_hits) = flaky(503, failing.clone()).await;
    let good = origin::http1("good").await;
    let mut c = cluster(&[bad, good.addr]);
    c.outlier.consecutive_failures = 3;
    c.outlier.base_ejection_time = Duration::from_millis(500);
    c.outlier.jitter = 0.0;
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    let mut n = 0;
    // When the request that ejected the endpoint was sent: the ejection came after it.
    let mut ejected_at = tokio::time::Instant::now();
    while bad_hits.load(SeqCst) < 3 {
        ejected_at = tokio::time::Instant::now();
        let (status, _, _) = send(out, "GET", "/x", "").await;
        assert_eq!(status, StatusCode::OK, "a 503 from the bad endpoint is retried on the good one");
        n += 1;
        assert!(n < 200, "the bad endpoint never got 3 requests");
    }
    assert_eq!(endpoint_state(&ebb, bad).await, "ejected");
    assert_eq!(metric(&ebb, &format!(r#"ebb_endpoint_ejections_total{{cluster="web",endpoint="{bad}"}}"#)).await, 1);
    // While ejected, the bad endpoint gets nothing.
    for _ in 0..20 {
        assert_eq!(send(out, "GET", "/x", "").await.0, StatusCode::OK);
    }
    assert_eq!(bad_hits.load(SeqCst), 3, "no request reached the ejected endpoint");
    failing.store(false, SeqCst);
    assert!(
        eventually(Duration::from_secs(5), async || endpoint_state(&ebb, bad).await == "half_open").await,
        "the ejection ends"
    );
    assert!(ejected_at.elapsed() >= Duration::from_millis(500), "not before its ejection time");
    // The next requests include its probe; once that succeeds it is healthy and takes traffic again.
    assert!(
        eventually(Duration::from_secs(5), async || {
            send(out, "GET", "/x", "").await;
            endpoint_state(&ebb, bad).await == "healthy"
        })
        .await
    );
    let before = bad_hits.load(SeqCst);
    for _ in 0..20 {
        send(out, "GET", "/x", "").await;
    }
    assert!(bad_hits.load(SeqCst) > before, "back in rotation");
}

#[tokio::test]
async fn with_every_endpoint_ejected_requests_fail_fast_with_no_healthy_endpoint() {
    let (bad, hits) = flaky(502, Arc::new(AtomicBool::new(true))).await;
    let mut c = cluster(&[bad]);
    c.outlier.consecutive_failures = 2;
    c.outlier.max_ejection_percent = 100;
    c.retry.retry_on = vec![];
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    for _ in 0..2 {
        assert_eq!(send(out, "GET", "/x", "").await.0, StatusCode::BAD_GATEWAY);
    }
    let (status, cause, _) =
        tokio::time::timeout(Duration::from_secs(2), send(out, "GET", "/x", "")).await.expect("no hang");
    assert_eq!((status, cause.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "no-healthy-endpoint"));
    assert_eq!(hits.load(SeqCst), 2);
}

#[tokio::test]
async fn the_retry_budget_caps_retries_when_every_attempt_fails() {
    let (bad, hits) = flaky(503, Arc::new(AtomicBool::new(true))).await;
    let mut c = cluster(&[bad]);
    c.outlier.consecutive_failures = 0;
    c.retry.num_retries = 2;
    // No share of requests may be retried; the floor allows 1 a second over 10 s: 10 retries in all.
    c.budget.ratio = 0.0;
    c.budget.min_retries_per_second = 1;
    c.budget.window = Duration::from_secs(10);
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    for _ in 0..20 {
        assert_eq!(send(out, "GET", "/x", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    // Without the budget: 20 × 3 = 60 attempts.
    assert_eq!(hits.load(SeqCst), 30, "20 first attempts and the budget's 10 retries");
    assert!(metric(&ebb, r#"ebb_cluster_retry_budget_exhausted_total{cluster="web"}"#).await >= 10);
}

#[tokio::test]
async fn past_max_requests_a_request_is_refused_at_once_with_overflow() {
    let o = origin::http1("held").await;
    let mut c = cluster(&[o.addr]);
    c.limits.max_requests = 1;
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    let first = tokio::spawn(send(out, "GET", "/hold", ""));
    o.arrivals(1, Duration::from_secs(5)).await;
    let (status, cause, _) = send(out, "GET", "/x", "").await;
    assert_eq!((status, cause.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "overflow-max-requests"));
    o.release(1);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert_eq!(send(out, "GET", "/x", "").await.0, StatusCode::OK, "the slot came back with the response");
    assert_eq!(metric(&ebb, r#"ebb_cluster_overflows_total{cluster="web",kind="max-requests"}"#).await, 1);
}

#[tokio::test]
async fn an_inbound_listener_limits_requests_to_the_app() {
    let o = origin::http1("app").await;
    let ebb = support::proxy_to(o.addr, |c| c.listeners[0].max_requests = 2).await;
    let web = ebb.addr("web").unwrap();
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(send(web, "GET", "/hold", ""))).collect();
    o.arrivals(2, Duration::from_secs(5)).await;
    let (status, cause, _) = send(web, "GET", "/x", "").await;
    // The listener's own cause and counter: not the cluster's `overflow-max-requests`.
    assert_eq!((status, cause.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "overflow-listener-max-requests"));
    assert_eq!(o.hits.load(SeqCst), 2, "the app never saw the third");
    assert_eq!(metric(&ebb, r#"ebb_requests_rejected_total{listener="web",reason="max_requests"}"#).await, 1);
    o.release(2);
    for h in held {
        assert_eq!(h.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(send(web, "GET", "/x", "").await.0, StatusCode::OK, "the slots came back with the responses");
}

#[tokio::test]
async fn connection_close_from_an_endpoint_marks_it_draining_and_requests_move() {
    // An endpoint that is going away: every response says `Connection: close`.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let leaving = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    h.fetch_add(1, SeqCst);
                    async {
                        let mut r = http::Response::new(Full::new(Bytes::from_static(b"bye")));
                        r.headers_mut().insert("connection", "close".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    let staying = origin::http1("staying").await;
    let mut c = cluster(&[leaving, staying.addr]);
    c.lb = LbPolicy::RoundRobin;
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    // One keep-alive client connection: the endpoint is chosen per request, not per connection.
    let (mut tx, _task) = client::h1(out).await;
    for i in 0..20 {
        let res = tx.send_request(client::get("/x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        client::text(res).await;
    }
    assert_eq!(hits.load(SeqCst), 1, "after its first `Connection: close` it got no new request");
    assert_eq!(staying.hits.load(SeqCst), 19);
    assert_eq!(endpoint_state(&ebb, leaving).await, "draining");
}

#[tokio::test]
async fn one_client_connection_spreads_its_requests_over_the_endpoints() {
    let (a, b) = (origin::http1("a").await, origin::http1("b").await);
    let mut c = cluster(&[a.addr, b.addr]);
    c.lb = LbPolicy::RoundRobin;
    let ebb = ebb_with(c).await;
    let (mut tx, _task) = client::h1(ebb.addr("out").unwrap()).await;
    for _ in 0..40 {
        let res = tx.send_request(client::get("/x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        client::text(res).await;
    }
    assert_eq!((a.hits.load(SeqCst), b.hits.load(SeqCst)), (20, 20));

    // HTTP/2 clients too, and P2C keeps both endpoints busy.
    let (a2, b2) = (origin::http2("a2").await, origin::http2("b2").await);
    let ebb = ebb_with(cluster(&[a2.addr, b2.addr])).await;
    let (mut tx, _task) = client::h2(ebb.addr("out").unwrap()).await;
    for _ in 0..100 {
        let res = tx.send_request(client::get_h2(VIP.parse().unwrap(), "/x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
    let (x, y) = (a2.hits.load(SeqCst), b2.hits.load(SeqCst));
    assert_eq!(x + y, 100);
    assert!(x >= 20 && y >= 20, "P2C spread {x}/{y}");
}

#[tokio::test]
async fn opaque_tcp_picks_an_endpoint_per_connection_and_skips_a_dead_one() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let echo = origin::tcp_echo().await;
    let mut c = cluster(&[dead, echo]);
    c.lb = LbPolicy::RoundRobin;
    let mut cfg = base_config();
    let mut l = listener("out", VIP.parse().unwrap(), Direction::Outbound);
    l.opaque = true;
    cfg.listeners.push(l);
    cfg.clusters.push(c);
    let ebb = ebb::app::start(cfg).await.unwrap();
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(ebb.addr("out").unwrap()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(&buf, b"ping");
    }
}

#[tokio::test]
async fn a_cluster_protocol_translates_between_http1_and_http2() {
    // An HTTP/1.1 client, an HTTP/2 upstream: Host becomes :authority.
    let h2o = origin::http2("h2").await;
    let mut c = cluster(&[h2o.addr]);
    c.protocol = ebb::config::UpstreamProtocol::Http2;
    let ebb = ebb_with(c).await;
    let (status, _, body) = send(ebb.addr("out").unwrap(), "POST", "/count", "eleven byte").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "11"));
    let (_, _, headers) = send(ebb.addr("out").unwrap(), "GET", "/headers", "").await;
    assert!(headers.contains("uri: http://web.test/headers"), "{headers}");

    // An HTTP/2 client, an HTTP/1.1 upstream: :authority becomes Host.
    let h1o = origin::http1("h1").await;
    let mut c = cluster(&[h1o.addr]);
    c.protocol = ebb::config::UpstreamProtocol::Http1;
    let ebb = ebb_with(c).await;
    let (mut tx, _task) = client::h2(ebb.addr("out").unwrap()).await;
    let res = tx.send_request(client::get_h2("10.1.2.3:80".parse().unwrap(), "/headers")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = client::text(res).await;
    assert!(text.contains("host: 10.1.2.3:80") && text.contains("uri: /headers"), "{text}");
}

#[tokio::test]
async fn a_stream_refused_with_refused_stream_is_resent_whatever_the_policy() {
    // An HTTP/2 server that refuses the first stream it sees (RFC 9113 §8.7: not processed) and
    // answers the rest.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else { return };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let res = http::Response::new(());
                        if let Ok(mut body) = respond.send_response(res, false) {
                            let _ = body.send_data(Bytes::from_static(b"second time"), true);
                        }
                    }
                }
            });
        }
    });
    let mut c = cluster(&[addr]);
    c.retry.retry_on = vec![];
    c.retry.num_retries = 0;
    let ebb = ebb_with(c).await;
    let (mut tx, _task) = client::h2(ebb.addr("out").unwrap()).await;
    let req = Request::post("http://web.test/pay").body(Full::new(Bytes::from_static(b"once"))).unwrap();
    let res = tx.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(client::text(res).await, "second time");
    assert_eq!(streams.load(SeqCst), 2);
    assert_eq!(metric(&ebb, r#"ebb_cluster_retries_total{cluster="web",reason="refused_stream"}"#).await, 1);
}

/// Requests an HTTP/2-only cluster cannot be sent — HTTP/1.1 with an empty Host (no authority for
/// `:authority`), an HTTP/1.1 upgrade — are the client's to fix: Ebb answers them (400, 501) and the
/// endpoints' breakers never hear of them. Before, each counted as an endpoint failure (502
/// `upstream-reset`), and a dozen of them ejected healthy endpoints for half a minute.
#[tokio::test]
async fn requests_an_http2_cluster_cannot_carry_never_eject_its_endpoints() {
    let (a, b) = (origin::http2("a").await, origin::http2("b").await);
    let mut c = cluster(&[a.addr, b.addr]);
    c.protocol = ebb::config::UpstreamProtocol::Http2;
    let ebb = ebb_with(c).await;
    let out = ebb.addr("out").unwrap();
    for _ in 0..12 {
        let (mut tx, _task) = client::h1(out).await;
        let req = Request::get("/x").header("host", "").body(Full::new(Bytes::new())).unwrap();
        let res = tx.send_request(req).await.unwrap();
        let cause = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string());
        assert_eq!((res.status(), cause.as_deref()), (StatusCode::BAD_REQUEST, Some("no-authority-for-http2")));
    }
    for _ in 0..6 {
        let (_s, head) = client::ws_upgrade(out).await;
        assert!(head.starts_with("http/1.1 501"), "{head}");
        assert!(head.contains("x-ebb-error: upgrade-over-http2"), "{head}");
    }
    for ep in [a.addr, b.addr] {
        assert_eq!(endpoint_state(&ebb, ep).await, "healthy");
        let series = format!(r#"ebb_endpoint_ejections_total{{cluster="web",endpoint="{ep}"}}"#);
        assert_eq!(metric(&ebb, &series).await, 0);
    }
    let origin_hits =
        a.hits.load(std::sync::atomic::Ordering::SeqCst) + b.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(origin_hits, 0, "nothing reached an origin");
    // And a request with an authority goes through.
    assert_eq!(send(out, "GET", "/", "").await.0, StatusCode::OK);
}
