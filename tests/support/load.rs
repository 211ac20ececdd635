//! A well-behaved load client: it honours `Connection: close` and GOAWAY by moving to another instance,
//! treats a refused connect as "instance gone" (nothing was sent), and never retries a request that was
//! sent. Every sent request must get a complete, successful response, or it counts as failed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

/// Outcome counts for one protocol.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Connects refused (a closed listener): nothing was sent.
    pub refused: AtomicU64,
    /// Requests handed back unsent by the client library (connection already going away).
    pub unsent: AtomicU64,
    pub per_instance: [AtomicU64; 2],
    pub failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, SeqCst);
        if let Ok(mut f) = self.failures.lock() {
            if f.len() < 20 {
                f.push(what);
            }
        }
    }
}

/// The instances a protocol's traffic can go to, and which ones it has seen draining.
#[derive(Debug)]
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    draining: Vec<AtomicBool>,
    rr: AtomicUsize,
    /// Whether `Connection: close` moves traffic away (with one instance, the client reconnects to it).
    move_on_close: bool,
}

impl Backends {
    pub fn new(addrs: Vec<SocketAddr>) -> Arc<Self> {
        let draining = addrs.iter().map(|_| AtomicBool::new(false)).collect();
        Arc::new(Self { addrs, draining, rr: AtomicUsize::new(0), move_on_close: true })
    }

    /// One instance: reconnect after `Connection: close` until connects are refused.
    pub fn single(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addrs: vec![addr],
            draining: vec![AtomicBool::new(false)],
            rr: AtomicUsize::new(0),
            move_on_close: false,
        })
    }

    fn pick(&self) -> Option<usize> {
        let n = self.addrs.len();
        let start = self.rr.fetch_add(1, SeqCst);
        (0..n).map(|k| (start + k) % n).find(|&i| !self.draining[i].load(SeqCst))
    }

    fn mark(&self, i: usize) {
        self.draining[i].store(true, SeqCst);
    }

    fn is_draining(&self, i: usize) -> bool {
        self.draining[i].load(SeqCst)
    }
}

/// Connects to instance `i`; a refused connect marks it gone (nothing was sent, so it is no failure).
async fn connect(b: &Backends, t: &Tally, i: usize) -> Option<tokio::net::TcpStream> {
    match tokio::net::TcpStream::connect(b.addrs[i]).await {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            t.refused.fetch_add(1, SeqCst);
            b.mark(i);
            None
        }
        Err(e) => {
            t.fail(format!("connect: {e}"));
            None
        }
    }
}

/// HTTP/1.1 keep-alive worker: GET `path` in a loop until `stop`.
pub async fn h1_worker(b: Arc<Backends>, t: Arc<Tally>, path: &'static str, stop: Instant) {
    while Instant::now() < stop {
        let Some(i) = b.pick() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Some(stream) = connect(&b, &t, i).await else { continue };
        let Ok((mut tx, conn)) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await else { continue };
        tokio::spawn(conn);
        while Instant::now() < stop && !b.is_draining(i) {
            if tx.ready().await.is_err() {
                break; // closed between requests: nothing sent
            }
            let req = Request::get(path).header("host", "load.test").body(Full::new(Bytes::new())).unwrap();
            let res = match tx.try_send_request(req).await {
                Ok(res) => res,
                Err(e) if e.message().is_some() => {
                    t.unsent.fetch_add(1, SeqCst);
                    break;
                }
                Err(e) => {
                    t.fail(format!("h1 instance {i}: {}", e.error()));
                    break;
                }
            };
            let close = res.headers().get("connection").is_some_and(|v| v == "close");
            let status = res.status();
            match res.into_body().collect().await {
                Ok(_) if status == 200 => {
                    t.ok.fetch_add(1, SeqCst);
                    t.per_instance[i].fetch_add(1, SeqCst);
                }
                Ok(_) => t.fail(format!("h1 instance {i}: status {status}")),
                Err(e) => t.fail(format!("h1 instance {i}: body {e}")),
            }
            if close {
                if b.move_on_close {
                    b.mark(i);
                }
                break;
            }
        }
    }
}

/// What an HTTP/2 worker sends.
#[derive(Clone, Copy, Debug)]
pub enum H2Kind {
    Get(&'static str),
    /// A gRPC unary call to the test echo service.
    GrpcUnary,
}

/// One shared HTTP/2 connection per instance, as real clients keep.
#[derive(Debug, Default)]
pub struct H2Pool {
    conns: Mutex<Vec<Option<http2::SendRequest<Full<Bytes>>>>>,
}

impl H2Pool {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self { conns: Mutex::new(vec![None; n]) })
    }
}

fn grpc_body() -> Bytes {
    // EchoRequest { message: "load" } framed: no compression, 4-byte length, protobuf bytes.
    let msg: &[u8] = &[0x0a, 4, b'l', b'o', b'a', b'd'];
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// HTTP/2 worker: one request at a time on the instance's shared connection, until `stop`.
pub async fn h2_worker(b: Arc<Backends>, pool: Arc<H2Pool>, t: Arc<Tally>, kind: H2Kind, stop: Instant) {
    while Instant::now() < stop {
        let Some(i) = b.pick() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let cached = pool.conns.lock().unwrap()[i].clone().filter(|tx| !tx.is_closed());
        let mut tx = match cached {
            Some(tx) => tx,
            None => {
                let Some(stream) = connect(&b, &t, i).await else { continue };
                let Ok((tx, conn)) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                else {
                    continue;
                };
                tokio::spawn(conn);
                pool.conns.lock().unwrap()[i] = Some(tx.clone());
                tx
            }
        };
        if tx.ready().await.is_err() {
            // GOAWAY received or closed: this instance is going away; nothing was sent.
            b.mark(i);
            continue;
        }
        let addr = b.addrs[i];
        let req = match kind {
            H2Kind::Get(path) => Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap(),
            H2Kind::GrpcUnary => Request::post(format!("http://{addr}/ebb.test.Echo/Unary"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(grpc_body()))
                .unwrap(),
        };
        let res = match tx.try_send_request(req).await {
            Ok(res) => res,
            Err(e) if e.message().is_some() => {
                t.unsent.fetch_add(1, SeqCst);
                b.mark(i);
                continue;
            }
            Err(e) => {
                let err = e.into_error();
                // A stream the server refused was never processed: the client library may resend it.
                if is_refused_stream(&err) {
                    t.unsent.fetch_add(1, SeqCst);
                    b.mark(i);
                    continue;
                }
                t.fail(format!("h2 instance {i}: {err:?}"));
                continue;
            }
        };
        let status = res.status();
        let header_grpc = res.headers().get("grpc-status").cloned();
        let collected = res.into_body().collect().await;
        match (kind, collected) {
            (_, Err(e)) => t.fail(format!("h2 instance {i}: body {e}")),
            (H2Kind::Get(_), Ok(_)) if status == 200 => {
                t.ok.fetch_add(1, SeqCst);
                t.per_instance[i].fetch_add(1, SeqCst);
            }
            (H2Kind::GrpcUnary, Ok(c)) => {
                let grpc_status = c.trailers().and_then(|t| t.get("grpc-status").cloned()).or(header_grpc);
                if status == 200 && grpc_status.as_ref().is_some_and(|s| s == "0") {
                    t.ok.fetch_add(1, SeqCst);
                    t.per_instance[i].fetch_add(1, SeqCst);
                } else {
                    t.fail(format!("grpc instance {i}: http {status} grpc-status {grpc_status:?}"));
                }
            }
            (_, Ok(_)) => t.fail(format!("h2 instance {i}: status {status}")),
        }
    }
}

fn is_refused_stream(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            // REFUSED_STREAM, or a stream above the GOAWAY's last-stream-id (RFC 9113 §6.8): the server
            // provably did not process it.
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
        }
        src = s.source();
    }
    false
}
