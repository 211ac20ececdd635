//! The drain, with real clients and origins: what each kind of connection sees in each phase.

mod support;

use std::time::Duration;

use ebb::config::Direction;
use ebb::drain::{Phase, Trigger};
use support::grpc::{self, EchoRequest};
use support::h2raw::{Event, RawH2};
use support::{client, listener, origin, proxy_to};

fn timing(c: &mut ebb::config::Config, announce_ms: u64, timeout_ms: u64) {
    c.drain.announce = Duration::from_millis(announce_ms);
    c.drain.timeout = Duration::from_millis(timeout_ms);
    c.drain.idle_close_window = Duration::from_millis(100);
}

#[tokio::test]
async fn in_flight_http1_request_completes_with_connection_close() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let (mut tx, conn_task) = client::h1(ebb.addr("web").unwrap()).await;
    let req = tokio::spawn(async move {
        let res = tx.send_request(client::get("/slow?ms=600")).await.unwrap();
        let close = res.headers().get("connection").cloned();
        (res.status(), close, client::text(res).await)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let (status, close, body) = req.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow");
    assert_eq!(close.unwrap(), "close", "response of a request in flight when the drain began");
    // And the connection then closes, cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(2), conn_task).await.expect("connection closed");
    assert!(ended.unwrap().is_ok());
    assert_eq!(ebb.drain.report().connection_close_sent, 1);
}

#[tokio::test]
async fn idle_keepalive_connection_is_not_closed_during_announce() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let (mut tx, conn_task) = client::h1(ebb.addr("web").unwrap()).await;
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert!(res.headers().get("connection").is_none());
    client::text(res).await;
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    // Idle through part of the announce phase: nothing closes it under the client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!conn_task.is_finished(), "idle connection closed during announce");
    tx.ready().await.unwrap();
    let res = tx.send_request(client::get("/")).await.expect("next request on the idle connection succeeds");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["connection"], "close");
    client::text(res).await;
    assert!(tokio::time::timeout(Duration::from_secs(2), conn_task).await.unwrap().unwrap().is_ok());
}

#[tokio::test]
async fn idle_connection_is_closed_in_close_phase_and_drain_ends() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 300, 10_000)).await;
    let (mut tx, conn_task) = client::h1(ebb.addr("web").unwrap()).await;
    client::text(tx.send_request(client::get("/")).await.unwrap()).await;
    let started = std::time::Instant::now();
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let report = ebb.wait().await;
    assert!(conn_task.is_finished() || tokio::time::timeout(Duration::from_secs(1), conn_task).await.is_ok());
    assert_eq!(report.idle_closes, 1);
    assert_eq!(report.forced_closes, 0);
    assert_eq!(report.closed_gracefully, 1);
    // Announce (300 ms) plus at most the idle-close window (100 ms), not the 10 s deadline.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn http2_client_sees_both_goaways_and_its_stream_completes() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let web = ebb.addr("web").unwrap();
    let mut h2 = RawH2::connect(web).await;
    h2.get(1, &web.to_string(), "/slow?ms=800");
    h2.get(3, &web.to_string(), "/slow?ms=900");
    tokio::time::sleep(Duration::from_millis(200)).await;
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let mut events = Vec::new();
    while let Some(ev) = h2.next(Duration::from_secs(5)).await {
        let closed = ev == Event::Closed;
        events.push(ev);
        if closed {
            break;
        }
    }
    let goaways: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::GoAway { last_stream_id, error_code: 0 } => Some(*last_stream_id),
            _ => None,
        })
        .collect();
    assert_eq!(goaways, vec![(1 << 31) - 1, 3], "graceful double GOAWAY: {events:?}");
    for stream in [1, 3] {
        assert!(events.contains(&Event::Headers { stream, end_stream: false }), "{events:?}");
        assert!(
            events.iter().any(|e| matches!(e, Event::Data { stream: s, end_stream: true, .. } if *s == stream)),
            "stream {stream} completed: {events:?}"
        );
    }
    assert!(!events.iter().any(|e| matches!(e, Event::Reset { .. })), "{events:?}");
    // The first GOAWAY precedes the responses; the connection closes only after both.
    let first_goaway = events.iter().position(|e| matches!(e, Event::GoAway { .. })).unwrap();
    let last_data = events.iter().rposition(|e| matches!(e, Event::Data { .. })).unwrap();
    assert!(first_goaway < last_data);
    let report = ebb.drain.report();
    assert_eq!(report.goaway_sent, 1);
    assert_eq!(report.requests_completed, 2, "both streams finished during the drain");
}

#[tokio::test]
async fn new_connections_accepted_during_announce_refused_after() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 600, 10_000)).await;
    let web = ebb.addr("web").unwrap();
    // Hold the drain open with a slow request.
    let holder = tokio::spawn(async move { client::fetch(web, "GET", "/slow?ms=2000").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Announcing: a new connection is accepted and served, told to close.
    let (mut tx, _t) = client::h1(web).await;
    let res = tx.send_request(client::get("/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["connection"], "close");
    let mut w = ebb.drain.watch(Direction::Inbound);
    w.reached(Phase::Closing).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = tokio::net::TcpStream::connect(web).await.expect_err("listener closed after announce");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(holder.await.unwrap().0, 200, "the held request still completes");
    assert!(ebb.drain.report().accepted_during_announce >= 1);
}

#[tokio::test]
async fn request_past_deadline_is_forced_and_named() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 200, 1000)).await;
    let web = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h1(web).await;
    let req = tokio::spawn(async move { tx.send_request(client::get("/slow?ms=10000")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let report = ebb.wait().await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(report.forced_closes, 1);
    let f = &report.forced[0];
    assert_eq!(f.protocol, "http1");
    assert_eq!(f.doing, "1 requests in flight");
    assert_eq!(f.in_flight[0].uri, "/slow?ms=10000");
    // The client saw its request fail (503 at the deadline, or the connection closed).
    if let Ok(res) = req.await.unwrap() {
        assert_eq!(res.status(), 503);
    }
}

#[tokio::test]
async fn grpc_stream_open_at_deadline_ends_with_unavailable() {
    let upstream = grpc::server().await;
    let ebb = proxy_to(upstream, |c| timing(c, 200, 1000)).await;
    let mut c = grpc::client(ebb.addr("web").unwrap()).await;
    let mut s = grpc::stream(&mut c, EchoRequest { message: "long".into(), count: 1000, delay_ms: 20 }).await.unwrap();
    assert!(s.message().await.unwrap().is_some());
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let status = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended OK; expected UNAVAILABLE"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");
}

#[tokio::test]
async fn outbound_keeps_serving_during_inbound_drain() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| {
        timing(c, 300, 10_000);
        c.listeners.push(listener("out", o.addr, Direction::Outbound));
    })
    .await;
    let web = ebb.addr("web").unwrap();
    let out = ebb.addr("out").unwrap();
    let holder = tokio::spawn(async move { client::fetch(web, "GET", "/slow?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ebb.drain.trigger(Trigger::new("sigterm")).unwrap();
    for _ in 0..2 {
        // Announcing, then closing: the app's outbound calls are untouched.
        let (mut tx, task) = client::h1(out).await;
        for _ in 0..3 {
            tx.ready().await.unwrap();
            let res = tx.send_request(client::get("/")).await.unwrap();
            assert_eq!(res.status(), 200);
            assert!(res.headers().get("connection").is_none(), "no Connection: close on outbound");
            client::text(res).await;
        }
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(ebb.drain.view().phase, Phase::Closing);
    assert_eq!(holder.await.unwrap().0, 200);
}

#[tokio::test]
async fn second_trigger_shortens_deadline_via_admin() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 5000, 20_000)).await;
    let admin = ebb.admin.unwrap();
    let (s, _) = client::fetch(admin, "POST", "/drain").await;
    assert_eq!(s, 202);
    let (s, body) = client::fetch(admin, "POST", "/drain?timeout=8s").await;
    assert_eq!(s, 202);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let d = r["deadline_ms"].as_u64().unwrap();
    assert!((7900..=8200).contains(&d), "shortened to ~8 s: {d}");
    let (_, body) = client::fetch(admin, "POST", "/drain?timeout=60s").await;
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["deadline_ms"].as_u64().unwrap(), d, "never lengthened");
    let (s, body) = client::fetch(admin, "POST", "/drain?timeout=2h").await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(client::fetch(ebb.health.unwrap(), "GET", "/healthz/ready").await.0, 503);
    assert_eq!(client::fetch(ebb.health.unwrap(), "GET", "/healthz/live").await.0, 200);
}

/// Client pod's Ebb → server pod's Ebb → origin: while the server side announces its drain (GOAWAY,
/// `Connection: close`), the client side moves to new connections and the app sees no error.
#[tokio::test]
async fn client_side_ebb_hides_server_side_drain() {
    for h2 in [false, true] {
        let o = if h2 { origin::http2("a").await } else { origin::http1("a").await };
        let server_side = proxy_to(o.addr, |c| timing(c, 1500, 10_000)).await;
        let client_side =
            proxy_to(server_side.addr("web").unwrap(), |c| c.listeners[0].direction = Direction::Outbound).await;
        let front = client_side.addr("web").unwrap();
        let stop = tokio::time::Instant::now() + Duration::from_millis(1100);
        let mut workers = Vec::new();
        for _ in 0..4 {
            workers.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                if h2 {
                    let (mut tx, _t) = client::h2(front).await;
                    while tokio::time::Instant::now() < stop {
                        let res = tx.send_request(client::get_h2(front, "/slow?ms=5")).await.unwrap();
                        statuses.push(res.status().as_u16());
                        client::text(res).await;
                    }
                } else {
                    let (mut tx, _t) = client::h1(front).await;
                    while tokio::time::Instant::now() < stop {
                        tx.ready().await.unwrap();
                        let res = tx.send_request(client::get("/slow?ms=5")).await.unwrap();
                        assert!(res.headers().get("connection").is_none(), "the app's connection is not told to close");
                        statuses.push(res.status().as_u16());
                        client::text(res).await;
                    }
                }
                statuses
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        server_side.drain.trigger(Trigger::new("test")).unwrap();
        let mut total = 0;
        for w in workers {
            let statuses = w.await.unwrap();
            total += statuses.len();
            assert!(statuses.iter().all(|s| *s == 200), "h2={h2}: {statuses:?}");
        }
        assert!(total > 50, "h2={h2}: {total}");
        let r = server_side.drain.report();
        assert!(r.goaway_sent + r.connection_close_sent > 0, "the server side announced: {r:?}");
    }
}
