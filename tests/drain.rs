//! The drain, with real clients and origins: what each kind of connection sees in each phase.

mod support;

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use ebb::config::Direction;
use ebb::drain::{Phase, Trigger};
use support::grpc::{self, EchoRequest};
use support::h2raw::{Event, RawH2};
use support::load::{self, Backends, H2Kind, H2Pool, Stop, Tally};
use support::{client, eventually, listener, origin, proxy_to};

/// How long any single wait may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);

fn timing(c: &mut ebb::config::Config, announce_ms: u64, timeout_ms: u64) {
    c.drain.announce = Duration::from_millis(announce_ms);
    c.drain.timeout = Duration::from_millis(timeout_ms);
    c.drain.idle_close_window = Duration::from_millis(100);
}

/// `f`'s output, or a failed test if it takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
}

#[tokio::test]
async fn in_flight_http1_request_completes_with_connection_close() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let (mut tx, conn_task) = client::h1(ebb.addr("web").unwrap()).await;
    let req = tokio::spawn(async move {
        let res = tx.send_request(client::get("/hold")).await.unwrap();
        let close = res.headers().get("connection").cloned();
        (res.status(), close, client::text(res).await)
    });
    // The request is at the origin, so in flight through Ebb, when the drain begins.
    o.arrivals(1, WAIT).await;
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let at_start = ebb.drain.report().at_start;
    assert_eq!(at_start.in_flight_requests, 1, "{at_start:?}");
    assert_eq!(ebb.drain.watch(Direction::Inbound).phase(), Phase::Announcing);
    o.release(1);
    let (status, close, body) = within(WAIT, "response", req).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "held");
    assert_eq!(close.expect("Connection header"), "close", "response of a request in flight when the drain began");
    // And the connection then closes, cleanly.
    let ended = within(WAIT, "connection closed", conn_task).await;
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
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    // The connection's task has acted on the announce once it marks the connection told to go; closing
    // it then would have been in the same step, so the request below would find it closed.
    let told = eventually(WAIT, async || matches!(ebb.track.snapshot().as_slice(), [c] if c.told_to_go)).await;
    assert!(told, "the connection saw the announce: {:?}", ebb.track.snapshot());
    assert!(!conn_task.is_finished(), "idle connection closed during announce");
    within(WAIT, "ready", tx.ready()).await.unwrap();
    let res = within(WAIT, "response", tx.send_request(client::get("/")))
        .await
        .expect("next request on the idle connection succeeds");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["connection"], "close");
    // Phases only move forward: the connection outlived the announce up to here.
    assert_eq!(ebb.drain.watch(Direction::Inbound).phase(), Phase::Announcing, "the request came while announcing");
    client::text(res).await;
    assert!(within(WAIT, "connection closed", conn_task).await.unwrap().is_ok());
}

#[tokio::test]
async fn idle_connection_is_closed_in_close_phase_and_drain_ends() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 300, 10_000)).await;
    let (mut tx, conn_task) = client::h1(ebb.addr("web").unwrap()).await;
    client::text(tx.send_request(client::get("/")).await.unwrap()).await;
    let started = std::time::Instant::now();
    ebb.drain.trigger(Trigger::new("test")).unwrap();
    let report = within(WAIT, "drained", ebb.wait()).await;
    assert!(within(WAIT, "client saw the close", conn_task).await.unwrap().is_ok());
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
    h2.get(1, &web.to_string(), "/hold");
    h2.get(3, &web.to_string(), "/hold");
    // Both streams are at the origin before the drain begins, and held there until both GOAWAYs are
    // out, so the responses are sent on a connection told to go.
    o.arrivals(2, WAIT).await;
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let mut events = Vec::new();
    let mut released = false;
    loop {
        let ev = h2.next(WAIT).await.unwrap_or_else(|| panic!("no frame within {WAIT:?}: {events:?}"));
        let closed = ev == Event::Closed;
        events.push(ev);
        if closed {
            break;
        }
        let goaways = events.iter().filter(|e| matches!(e, Event::GoAway { .. })).count();
        if goaways == 2 && !released {
            o.release(2);
            released = true;
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
    let report = ebb.drain.report();
    assert_eq!(report.goaway_sent, 1);
    assert_eq!(report.requests_completed, 2, "both streams finished during the drain");
}

/// A client that opened a stream just before it read the first GOAWAY and its PING can write the
/// PING's ack ahead of that stream's HEADERS (h2's own client does: acks go out before queued stream
/// frames). On the wire: GOAWAY(2^31-1), PING from Ebb; the ack, then HEADERS of stream 3 from the
/// client. The stream was sent in good faith, so Ebb serves it and the final GOAWAY names it. Before,
/// the final GOAWAY went out on the first ack with last-stream-id 1, and stream 3 was dropped
/// unanswered: a request lost to a client with nowhere else to send it.
#[tokio::test]
async fn a_stream_written_after_the_shutdown_ping_ack_is_served() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let web = ebb.addr("web").unwrap();
    let mut h2 = RawH2::connect(web).await;
    // Stream 1 keeps the connection, and so the drain, going until the end.
    h2.get(1, &web.to_string(), "/hold");
    o.arrivals(1, WAIT).await;
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let mut events = Vec::new();
    // RawH2 acks a PING as soon as it reads it, so stream 3 goes out right behind the ack.
    let mut goaway_seen = false;
    loop {
        let ev = h2.next(WAIT).await.unwrap_or_else(|| panic!("no frame within {WAIT:?}: {events:?}"));
        goaway_seen |= matches!(ev, Event::GoAway { .. });
        let ping = ev == Event::Ping;
        events.push(ev);
        if goaway_seen && ping {
            break;
        }
    }
    h2.get(3, &web.to_string(), "/");
    let mut released = false;
    loop {
        let ev = h2.next(WAIT).await.unwrap_or_else(|| panic!("no frame within {WAIT:?}: {events:?}"));
        let closed = ev == Event::Closed;
        events.push(ev);
        if closed {
            break;
        }
        let goaways = events.iter().filter(|e| matches!(e, Event::GoAway { .. })).count();
        if goaways == 2 && !released {
            o.release(1);
            released = true;
        }
    }
    let goaways: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::GoAway { last_stream_id, error_code: 0 } => Some(*last_stream_id),
            _ => None,
        })
        .collect();
    assert_eq!(goaways, vec![(1 << 31) - 1, 3], "the final GOAWAY names stream 3: {events:?}");
    for stream in [1, 3] {
        assert!(
            events.iter().any(|e| matches!(e, Event::Data { stream: s, end_stream: true, .. } if *s == stream)),
            "stream {stream} completed: {events:?}"
        );
    }
    assert!(!events.iter().any(|e| matches!(e, Event::Reset { .. })), "{events:?}");
    assert_eq!(ebb.drain.report().requests_completed, 2, "both streams were served during the drain");
}

#[tokio::test]
async fn new_connections_accepted_during_announce_refused_after() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 2000, 10_000)).await;
    let web = ebb.addr("web").unwrap();
    // Hold the drain open with a request held at the origin.
    let holder = tokio::spawn(async move { client::fetch(web, "GET", "/hold").await });
    o.arrivals(1, WAIT).await;
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    // Announcing: a new connection is accepted and served, told to close.
    let (mut tx, _t) = client::h1(web).await;
    let res = within(WAIT, "response", tx.send_request(client::get("/"))).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["connection"], "close");
    client::text(res).await;
    assert_eq!(ebb.drain.report().accepted_during_announce, 1, "exactly the connection opened while announcing");
    let mut w = ebb.drain.watch(Direction::Inbound);
    within(WAIT, "closing", w.reached(Phase::Closing)).await;
    // The listener closes once it has served what the kernel had already queued; until then a connect
    // may still complete (and is served), after it every connect is refused.
    let refused = eventually(WAIT, async || {
        matches!(tokio::net::TcpStream::connect(web).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    assert!(refused, "listener closed after announce");
    assert_eq!(ebb.drain.report().accepted_during_announce, 1, "nothing accepted while closing counts as announce");
    o.release(1);
    assert_eq!(within(WAIT, "held request", holder).await.unwrap(), (http::StatusCode::OK, "held".to_string()));
    let report = within(WAIT, "drained", ebb.wait()).await;
    assert_eq!(report.inbound, Phase::Drained);
    assert_eq!(report.forced_closes, 0, "{report:?}");
}

#[tokio::test]
async fn request_past_deadline_is_forced_and_named() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 200, 1000)).await;
    let web = ebb.addr("web").unwrap();
    let (mut tx, _t) = client::h1(web).await;
    // Held at the origin and never released: still waiting for headers at the deadline.
    let req = tokio::spawn(async move { tx.send_request(client::get("/hold")).await });
    o.arrivals(1, WAIT).await;
    let started = std::time::Instant::now();
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let report = within(WAIT, "drained", ebb.wait()).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(report.forced_closes, 1);
    let f = &report.forced[0];
    assert_eq!(f.protocol, "http1");
    assert_eq!(f.doing, "1 requests in flight");
    assert_eq!(f.in_flight[0].uri, "/hold");
    // The client is answered, not cut off: 503 naming the drain deadline.
    let res = within(WAIT, "answer", req).await.unwrap().expect("a response, not a closed connection");
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-ebb-error"], "drain-deadline");
    assert_eq!(o.hits.load(SeqCst), 1);
}

#[tokio::test]
async fn grpc_stream_open_at_deadline_ends_with_unavailable() {
    let upstream = grpc::server().await;
    let ebb = proxy_to(upstream, |c| timing(c, 200, 1000)).await;
    let mut c = grpc::client(ebb.addr("web").unwrap()).await;
    let mut s = grpc::stream(&mut c, EchoRequest { message: "long".into(), count: 1000, delay_ms: 20 }).await.unwrap();
    assert!(within(WAIT, "first message", s.message()).await.unwrap().is_some());
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let status = within(WAIT, "stream ends", async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended OK; expected UNAVAILABLE"),
                Err(status) => break status,
            }
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");
}

/// A few requests on an outbound keep-alive connection, each answered without `Connection: close`.
async fn outbound_calls(tx: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>) {
    for _ in 0..3 {
        within(WAIT, "outbound connection ready", tx.ready()).await.unwrap();
        let res = within(WAIT, "outbound response", tx.send_request(client::get("/"))).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("connection").is_none(), "no Connection: close on outbound");
        client::text(res).await;
    }
}

#[tokio::test]
async fn outbound_keeps_serving_during_inbound_drain() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| {
        timing(c, 1000, 10_000);
        c.listeners.push(listener("out", o.addr, Direction::Outbound));
    })
    .await;
    let web = ebb.addr("web").unwrap();
    let out = ebb.addr("out").unwrap();
    // An inbound request held at the origin keeps the inbound drain in its closing phase.
    let holder = tokio::spawn(async move { client::fetch(web, "GET", "/hold").await });
    o.arrivals(1, WAIT).await;
    let (mut kept, kept_task) = client::h1(out).await;
    outbound_calls(&mut kept).await;
    ebb.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let mut inbound = ebb.drain.watch(Direction::Inbound);
    let outbound = ebb.drain.watch(Direction::Outbound);
    for phase in [Phase::Announcing, Phase::Closing] {
        within(WAIT, phase.as_str(), inbound.reached(phase)).await;
        // The app's outbound calls are untouched: on the connection it had, and on new ones.
        outbound_calls(&mut kept).await;
        let (mut fresh, fresh_task) = client::h1(out).await;
        outbound_calls(&mut fresh).await;
        assert!(!kept_task.is_finished() && !fresh_task.is_finished(), "outbound connections stay open");
        // Phases only move forward, so the calls above were made in this one.
        assert_eq!(inbound.phase(), phase, "the calls were made while inbound was {phase:?}");
        assert_eq!(outbound.phase(), Phase::Serving);
    }
    assert_eq!(ebb.drain.view().phase, Phase::Closing);
    o.release(1);
    assert_eq!(within(WAIT, "held request", holder).await.unwrap().0, 200);
    let report = within(WAIT, "inbound drained", ebb.wait()).await;
    assert_eq!((report.phase, report.inbound, report.outbound), (Phase::Drained, Phase::Drained, Phase::Serving));
    // Drained inbound leaves outbound serving: the app's late calls during its own shutdown.
    outbound_calls(&mut kept).await;
    let (mut late, _t) = client::h1(out).await;
    outbound_calls(&mut late).await;
    assert_eq!(ebb.drain.report().goaway_sent + ebb.drain.report().connection_close_sent, 1, "only the inbound one");
}

#[tokio::test]
async fn second_trigger_shortens_deadline_via_admin() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |c| timing(c, 5000, 20_000)).await;
    let admin = ebb.admin.unwrap();
    assert_eq!(client::fetch(ebb.health.unwrap(), "GET", "/healthz/ready").await.0, 200);
    let (s, body) = client::fetch(admin, "POST", "/drain").await;
    assert_eq!(s, 202);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((r["scope"].as_str(), r["exit"].as_bool()), (Some("inbound"), Some(false)), "{r}");
    let first = r["deadline_ms"].as_u64().unwrap();
    assert!((19_900..=20_000).contains(&first), "the configured 20 s: {first}");
    let (s, body) = client::fetch(admin, "POST", "/drain?timeout=8s").await;
    assert_eq!(s, 202);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    // 8 s from the second trigger, so 8 s plus however long after the start it came; the report, taken
    // once the trigger was applied, has seen at least that much time go by.
    let d = r["deadline_ms"].as_u64().unwrap();
    let elapsed = r["elapsed_ms"].as_u64().unwrap();
    assert!((8000..=8000 + elapsed).contains(&d), "shortened to 8 s after the second trigger: {d} (elapsed {elapsed})");
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
        // The app: a client that would move on GOAWAY or `Connection: close`, and counts them.
        let (backends, pool, tally, stop) =
            (Backends::single(front), H2Pool::new(1), Arc::new(Tally::default()), Stop::new());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                if h2 {
                    let get = H2Kind::Get("/slow?ms=5");
                    tokio::spawn(load::h2_worker(backends.clone(), pool.clone(), tally.clone(), get, stop.clone()))
                } else {
                    tokio::spawn(load::h1_worker(backends.clone(), tally.clone(), "/slow?ms=5", stop.clone()))
                }
            })
            .collect();
        // Load flows through both Ebbs before the drain begins.
        o.arrivals(20, WAIT).await;
        server_side.drain.trigger_applied(Trigger::new("test")).await.unwrap();
        // The client side is told to go (GOAWAY, `Connection: close`) and moves to new connections,
        // which the server side accepts while announcing; the load then goes on over them.
        let moved = eventually(WAIT, async || server_side.drain.report().accepted_during_announce > 0).await;
        assert!(moved, "h2={h2}: the client side opened no new connection: {:?}", server_side.drain.report());
        let arrived = *o.arrived.borrow();
        o.arrivals(arrived + 20, WAIT).await;
        stop.stop();
        for w in workers {
            within(WAIT, "load worker", w).await.unwrap();
        }
        // Every request answered 200 on the app's first connection: nothing failed or came back unsent,
        // no `Connection: close`, no GOAWAY.
        let summary = tally.summary();
        tally.assert_no_loss(&format!("h2={h2}"));
        let counts = [&tally.unsent, &tally.closes, &tally.refused].map(|c| c.load(SeqCst));
        assert_eq!(counts, [0; 3], "h2={h2}: unsent, closes, refused connects: {summary}");
        assert!(!backends.is_draining(0), "h2={h2}: the app was told to go: {summary}");
        let r = server_side.drain.report();
        assert_eq!(r.inbound, Phase::Announcing, "the load ran while the server side announced: {r:?}");
        assert!(r.requests_completed >= 20, "h2={h2}: requests through the draining side: {r:?}");
        // Each of the app's requests reached the origin once: none lost, none sent twice.
        assert_eq!(o.hits.load(SeqCst) as u64, tally.ok.load(SeqCst), "h2={h2}: origin requests vs the app's");
        assert!(r.goaway_sent + r.connection_close_sent > 0, "the server side announced: {r:?}");
    }
}
