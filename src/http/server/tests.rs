//! The per-connection drain driver over in-memory pipes and paused time: the HTTP/2 GOAWAY pair, the
//! HTTP/1.1 idle close inside its jitter window, and the forced close at the deadline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{close_when_told_to_go, drive, DeadlineSignal, Driven};
use crate::config::DrainConfig;
use crate::conntrack::{ConnHandle, ConnTrack};
use crate::domain::Direction;
use crate::drain::{Drain, Phase, Trigger, FORCE_GRACE};
use crate::telemetry::metrics::Metrics;

struct Fixture {
    drain: Arc<Drain>,
    conn: Arc<ConnHandle>,
}

fn fixture(timeout: u64, announce: u64) -> Fixture {
    let track = ConnTrack::new(Arc::new(Metrics::new()));
    let cfg = DrainConfig {
        timeout: Duration::from_secs(timeout),
        announce: Duration::from_secs(announce),
        idle_close_window: Duration::from_secs(1),
        ..DrainConfig::default()
    };
    let drain = Drain::new(cfg, track.clone());
    tokio::spawn(drain.clone().run());
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let conn = Arc::new(track.open(Direction::Inbound, "t".into(), a, a));
    Fixture { drain, conn }
}

/// A service that records each request in conntrack, tells the test it arrived, and answers once
/// `release` is notified (or at once when `release` is `None`), through the proxy's last touch on a
/// response (`Connection: close` while draining).
fn serve(
    f: &Fixture,
    server: DuplexStream,
    h2: bool,
    arrived: Arc<Notify>,
    release: Option<Arc<Notify>>,
) -> tokio::task::JoinHandle<()> {
    let (conn, drain) = (f.conn.clone(), f.drain.clone());
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (conn, drain, arrived, release) = (conn.clone(), drain.clone(), arrived.clone(), release.clone());
        async move {
            let guard = conn.request(req.method(), req.uri());
            arrived.notify_one();
            if let Some(r) = release {
                r.notified().await;
            }
            drop(guard);
            let res = http::Response::new(Full::new(Bytes::from_static(b"hello")));
            Ok::<_, Infallible>(close_when_told_to_go(h2, &conn, drain.metrics(), res))
        }
    });
    let (conn, drain) = (f.conn.clone(), f.drain.clone());
    let watch = drain.watch(Direction::Inbound);
    let io = TokioIo::new(server);
    tokio::spawn(async move {
        let deadline = DeadlineSignal::default();
        let driven = Driven {
            conn: &conn,
            session: None,
            drain: &drain,
            all_metrics: drain.metrics(),
            watch,
            deadline: &deadline,
            h2,
            stream_idle: None,
        };
        if h2 {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            drive(Box::pin(b.serve_connection(io, svc)), driven, None).await;
        } else {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new());
            drive(Box::pin(b.serve_connection(io, svc).with_upgrades()), driven, None).await;
        }
    })
}

// The frame codec the integration tests' raw HTTP/2 clients use.
#[allow(dead_code)]
#[path = "../../../tests/support/h2frame.rs"]
mod h2frame;

#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Settings { ack: bool },
    Ping { ack: bool, payload: Vec<u8> },
    GoAway { last_stream_id: u32 },
    Headers { stream: u32, end: bool },
    Data { stream: u32, end: bool },
    Other(u8),
}

async fn read_frame(io: &mut DuplexStream) -> Option<Frame> {
    let f = h2frame::read_frame(io).await.ok()?;
    let end = f.has(h2frame::END_STREAM);
    Some(match f.kind {
        h2frame::DATA => Frame::Data { stream: f.stream, end },
        h2frame::HEADERS => Frame::Headers { stream: f.stream, end },
        h2frame::SETTINGS => Frame::Settings { ack: f.has(h2frame::ACK) },
        h2frame::PING => Frame::Ping { ack: f.has(h2frame::ACK), payload: f.payload.to_vec() },
        h2frame::GOAWAY => Frame::GoAway { last_stream_id: f.last_stream_id() },
        k => Frame::Other(k),
    })
}

/// A GET of `/` on `stream`.
fn get(stream: u32) -> Vec<u8> {
    h2frame::get(stream, "/", "t")
}

/// Reads frames, acknowledging SETTINGS and PINGs as a client must, until `want` matches one.
async fn until(io: &mut DuplexStream, mut want: impl FnMut(&Frame) -> bool) -> Frame {
    loop {
        let f = read_frame(io).await.expect("connection open");
        match &f {
            Frame::Settings { ack: false } => {
                io.write_all(&h2frame::frame(h2frame::SETTINGS, h2frame::ACK, 0, &[])).await.unwrap()
            }
            Frame::Ping { ack: false, payload } => {
                io.write_all(&h2frame::frame(h2frame::PING, h2frame::ACK, 0, payload)).await.unwrap()
            }
            _ => {}
        }
        if want(&f) {
            return f;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn h2_goaway_pair_names_the_stream_in_flight_and_it_completes() {
    let f = fixture(25, 5);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (arrived, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = serve(&f, server, true, arrived.clone(), Some(release.clone()));
    client.write_all(h2frame::PREFACE).await.unwrap();
    client.write_all(&h2frame::frame(h2frame::SETTINGS, 0, 0, &[])).await.unwrap();
    client.write_all(&get(1)).await.unwrap();
    arrived.notified().await;

    f.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    // First GOAWAY: "stop opening streams", last-stream-id 2^31-1, with a PING to time the second.
    assert_eq!(
        until(&mut client, |f| matches!(f, Frame::GoAway { .. })).await,
        Frame::GoAway { last_stream_id: (1 << 31) - 1 }
    );
    // The second, once the PING came back, names stream 1: it will be answered.
    assert_eq!(until(&mut client, |f| matches!(f, Frame::GoAway { .. })).await, Frame::GoAway { last_stream_id: 1 });
    release.notify_one();
    assert_eq!(
        until(&mut client, |f| matches!(f, Frame::Headers { .. })).await,
        Frame::Headers { stream: 1, end: false }
    );
    assert_eq!(until(&mut client, |f| matches!(f, Frame::Data { .. })).await, Frame::Data { stream: 1, end: true });
    // Then the connection ends on its own, long before any deadline.
    let t0 = Instant::now();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    task.await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(f.drain.metrics().drain.goaway_sent.get(), 1);
    assert_eq!(f.drain.metrics().drain.forced_closes.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn h2_connection_opened_during_announce_gets_goaway_at_once() {
    let f = fixture(25, 5);
    f.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    // The clock is paused and jumps to the next timer whenever every task waits: a GOAWAY that came
    // from a timer (the announce end, an idle check) would show as time gone by.
    let t0 = Instant::now();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = serve(&f, server, true, Arc::new(Notify::new()), None);
    client.write_all(h2frame::PREFACE).await.unwrap();
    client.write_all(&h2frame::frame(h2frame::SETTINGS, 0, 0, &[])).await.unwrap();
    let first = until(&mut client, |f| matches!(f, Frame::GoAway { .. })).await;
    assert_eq!(first, Frame::GoAway { last_stream_id: (1 << 31) - 1 });
    let second = until(&mut client, |f| matches!(f, Frame::GoAway { .. })).await;
    assert_eq!(second, Frame::GoAway { last_stream_id: 0 });
    assert_eq!(t0.elapsed(), Duration::ZERO, "the GOAWAY pair waited for a timer");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO, "the connection ended on a timer, not on the GOAWAY");
    assert_eq!(f.drain.metrics().drain.goaway_sent.get(), 1);
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// Reads one small response with a Content-Length body off an HTTP/1.1 connection.
async fn read_response(io: &mut DuplexStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if text.ends_with("hello") {
            return text;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn h1_idle_keep_alive_survives_announce_and_closes_inside_the_jitter_window() {
    let f = fixture(25, 2);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = serve(&f, server, false, Arc::new(Notify::new()), None);
    client.write_all(REQUEST).await.unwrap();
    let res = read_response(&mut client).await;
    assert!(!res.to_ascii_lowercase().contains("connection: close"), "{res}");

    let t0 = Instant::now();
    f.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let closed_after = t0.elapsed();
    assert!(rest.is_empty());
    // Not during announce (the client's next request would race the close), but within the window.
    assert!(closed_after >= Duration::from_secs(2), "{closed_after:?}");
    assert!(closed_after <= Duration::from_secs(3), "{closed_after:?}");
    task.await.unwrap();
    assert_eq!(f.drain.metrics().drain.idle_closes.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn h1_request_during_announce_gets_connection_close() {
    let f = fixture(25, 5);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (arrived, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = serve(&f, server, false, arrived.clone(), Some(release.clone()));
    client.write_all(REQUEST).await.unwrap();
    arrived.notified().await;
    f.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    // drive() has to see the phase before the response goes out; the watch says it has.
    f.drain.watch(Direction::Inbound).reached(Phase::Announcing).await;
    tokio::task::yield_now().await;
    assert!(f.conn.told_to_go());
    release.notify_one();
    let mut all = Vec::new();
    client.read_to_end(&mut all).await.unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello"), "{text}");
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.lines().any(|l| l == "connection: close"), "{text}");
    task.await.unwrap();
    assert_eq!(f.drain.metrics().drain.connection_close_sent.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn request_stuck_at_the_deadline_is_forced_after_the_grace() {
    let f = fixture(3, 1);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let arrived = Arc::new(Notify::new());
    // Never released: the request is still in flight at the deadline.
    let task = serve(&f, server, false, arrived.clone(), Some(Arc::new(Notify::new())));
    client.write_all(REQUEST).await.unwrap();
    arrived.notified().await;
    let t0 = Instant::now();
    f.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3) + FORCE_GRACE);
    let report = f.drain.report();
    assert_eq!(f.drain.metrics().drain.forced_closes.get(), 1);
    assert_eq!(report.forced.len(), 1);
    assert_eq!(report.forced[0].conn_id, f.conn.id);
    assert_eq!(report.forced[0].in_flight.len(), 1);
}
