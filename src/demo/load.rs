//! The demo's load generator: an app that never retries, sending a steady mix of HTTP/1.1, HTTP/2,
//! gRPC unary and gRPC server-streaming requests through its outbound Ebb, and counting each outcome.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::watch;

use crate::demo::app::{grpc_frame, STREAM, STREAM_MESSAGES, UNARY};

/// The kinds of request the demo sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Http1,
    Http2,
    GrpcUnary,
    GrpcStream,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::GrpcUnary => "grpc-unary",
            Self::GrpcStream => "grpc-stream",
        }
    }

    /// `http1`, `http2`, `grpc` (both gRPC kinds).
    pub fn parse_list(s: &str) -> Result<Vec<Kind>, String> {
        let mut out = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p {
                "http1" => out.push(Kind::Http1),
                "http2" => out.push(Kind::Http2),
                "grpc" => out.extend([Kind::GrpcUnary, Kind::GrpcStream]),
                "grpc-unary" => out.push(Kind::GrpcUnary),
                "grpc-stream" => out.push(Kind::GrpcStream),
                other => return Err(format!("unknown protocol `{other}` (http1, http2, grpc)")),
            }
        }
        if out.is_empty() {
            return Err("no protocol".into());
        }
        out.dedup();
        Ok(out)
    }
}

/// One kind's counters.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The first few failures, to say what they were.
    pub samples: Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < 5 {
                s.push(what);
            }
        }
    }
}

/// Where the load goes: the outbound Ebb's listeners.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub h1: SocketAddr,
    pub h2: SocketAddr,
}

/// Per-kind counters for the whole run.
#[derive(Debug)]
pub struct Load {
    pub kinds: Vec<(Kind, Arc<Counts>)>,
}

/// Starts the workers: `rate` requests a second in all, split over the kinds, until `stop` says so.
/// Each worker waits for its own request before the next, so the rate is a ceiling.
pub fn start(
    targets: Targets,
    kinds: &[Kind],
    rate: u32,
    stop: watch::Receiver<bool>,
) -> (Load, Vec<tokio::task::JoinHandle<()>>) {
    /// Workers per kind: enough concurrency that the app's latency does not cap the rate.
    const WORKERS: u32 = 4;
    let mut handles = Vec::new();
    let mut load = Load { kinds: Vec::new() };
    let per_kind = (rate.max(1) as f64 / kinds.len() as f64).max(0.5);
    let interval = Duration::from_secs_f64(f64::from(WORKERS) / per_kind);
    for &kind in kinds {
        let counts = Arc::new(Counts::default());
        load.kinds.push((kind, counts.clone()));
        for w in 0..WORKERS {
            let (counts, stop) = (counts.clone(), stop.clone());
            // Spread the workers' first requests over one interval.
            let offset = interval.mul_f64(f64::from(w) / f64::from(WORKERS));
            handles.push(tokio::spawn(worker(kind, targets, interval, offset, counts, stop)));
        }
    }
    (load, handles)
}

enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

async fn connect(kind: Kind, t: Targets) -> Result<Conn, String> {
    let addr = if kind == Kind::Http1 { t.h1 } else { t.h2 };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if kind == Kind::Http1 {
        let (tx, conn) = http1::handshake(io).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H1(tx))
    } else {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H2(tx))
    }
}

fn request(kind: Kind) -> Request<Full<Bytes>> {
    let (path, body, grpc) = match kind {
        Kind::Http1 | Kind::Http2 => ("/work", Bytes::new(), false),
        Kind::GrpcUnary => (UNARY, grpc_frame(b"ping"), true),
        Kind::GrpcStream => (STREAM, grpc_frame(b"ping"), true),
    };
    let mut b =
        Request::builder().uri(if kind == Kind::Http1 { path.to_string() } else { format!("http://demo.svc{path}") });
    if kind == Kind::Http1 {
        b = b.header(http::header::HOST, "demo.svc");
    }
    if grpc {
        b = b.method("POST").header("content-type", "application/grpc").header("te", "trailers");
    }
    b.body(Full::new(body)).unwrap_or_default()
}

/// Sends one request and checks it whole: status, body, and for gRPC the trailers and message count.
async fn once(conn: &mut Conn, kind: Kind) -> Result<(), String> {
    let req = request(kind);
    let res = match conn {
        Conn::H1(tx) => {
            tx.ready().await.map_err(|e| format!("connection: {e}"))?;
            tx.send_request(req).await
        }
        Conn::H2(tx) => tx.send_request(req).await,
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = res.status();
    let cause = res.headers().get("x-ebb-error").and_then(|v| v.to_str().ok()).map(str::to_string);
    let grpc_head = res.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
    if status != StatusCode::OK {
        return Err(format!("status {status}{}", cause.map(|c| format!(" ({c})")).unwrap_or_default()));
    }
    let body = res.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    match kind {
        Kind::Http1 | Kind::Http2 => Ok(()),
        Kind::GrpcUnary | Kind::GrpcStream => {
            let grpc = body
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or(grpc_head);
            if grpc.as_deref() != Some("0") {
                return Err(format!("grpc-status {}", grpc.unwrap_or_else(|| "missing".into())));
            }
            let bytes = body.to_bytes();
            let mut n = 0;
            let mut at = 0;
            while at + 5 <= bytes.len() {
                let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]) as usize;
                at += 5 + len;
                n += 1;
            }
            let want = if kind == Kind::GrpcStream { STREAM_MESSAGES } else { 1 };
            if n != want || at != bytes.len() {
                return Err(format!("{n} of {want} messages"));
            }
            Ok(())
        }
    }
}

async fn worker(
    kind: Kind,
    t: Targets,
    interval: Duration,
    offset: Duration,
    counts: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if *stop.borrow() {
            return;
        }
        counts.sent.fetch_add(1, Relaxed);
        if conn.is_none() {
            match connect(kind, t).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    counts.fail(e);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        // Bounded: a request that hangs is a failure, not a stuck demo.
        match tokio::time::timeout(Duration::from_secs(30), once(c, kind)).await {
            Ok(Ok(())) => {
                counts.ok.fetch_add(1, Relaxed);
            }
            Ok(Err(e)) => {
                counts.fail(e);
                conn = None;
            }
            Err(_) => {
                counts.fail("no answer within 30 s".into());
                conn = None;
            }
        }
    }
}
