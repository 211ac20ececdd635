//! A well-behaved load client: it honours `Connection: close` and GOAWAY by moving to another instance,
//! treats a refused connect as "instance gone" (nothing was sent), and re-sends a request only when it is
//! provably unprocessed. Every other request sent must get a complete, successful response, or it counts
//! as failed.
//!
//! Provably unprocessed ("unsent") is one of:
//! - HTTP/1.1: hyper handed the request back (`TrySendError::take_message`): its connection went away
//!   before the request was written;
//! - HTTP/2: its stream id is above the last-stream-id of a GOAWAY the server sent on that connection
//!   (RFC 9113 §6.8: such streams were not processed), or the server reset it with REFUSED_STREAM
//!   (RFC 9113 §8.7).
//!
//! An HTTP/2 request for which no stream was opened (the connection had already received a GOAWAY or
//! closed when it was to be sent) never left the client: it is not a request the server lost, any
//! more than one the worker never built because it saw the GOAWAY first. It is dropped; a re-send of
//! an unsent request waits again, not counted as a re-send.
//!
//! A stream merely ended by a GOAWAY is not enough: whether the server processed it depends on its id
//! against the GOAWAY's last-stream-id, and hyper's client shows neither. So the HTTP/2 worker uses the
//! `h2` crate, which names each stream's id, over a socket that notes the server's GOAWAYs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::h2frame::{GOAWAY, MAX_STREAM_ID};

/// How often one request may be handed back before the worker calls it lost.
const MAX_SENDS: u32 = 5;

/// Ends a run: workers send no new request once it is set, so a test stops its load after the events it
/// waits for (a phase reached, so many requests served) rather than at a time guessed in advance.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stop(&self) {
        self.0.store(true, SeqCst);
    }

    fn going(&self) -> bool {
        !self.0.load(SeqCst)
    }
}

/// Outcome counts for one protocol.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Connects refused (a closed listener): nothing was sent.
    pub refused: AtomicU64,
    /// HTTP/1.1 responses that carried `Connection: close`.
    pub closes: AtomicU64,
    /// Sends that came back provably unprocessed (see the module docs).
    pub unsent: AtomicU64,
    /// Requests that came back unsent at least once.
    pub unsent_requests: AtomicU64,
    /// Re-sends of a request that came back unsent.
    pub retried: AtomicU64,
    /// Requests that came back unsent and then succeeded.
    pub recovered: AtomicU64,
    pub per_instance: [AtomicU64; 2],
    pub failures: Mutex<Vec<String>>,
    /// Why requests came back unsent (the first few).
    pub unsent_why: Mutex<Vec<String>>,
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

    fn succeeded(&self, i: usize, resent: bool) {
        self.ok.fetch_add(1, SeqCst);
        self.per_instance[i].fetch_add(1, SeqCst);
        if resent {
            self.recovered.fetch_add(1, SeqCst);
        }
    }

    /// A request came back unsent; `first` when it had not come back before.
    fn handed_back(&self, first: bool, why: &str) {
        self.unsent.fetch_add(1, SeqCst);
        if first {
            self.unsent_requests.fetch_add(1, SeqCst);
        }
        if let Ok(mut w) = self.unsent_why.lock() {
            if w.len() < 20 {
                w.push(why.to_string());
            }
        }
    }

    /// Nothing failed, and every request that came back unsent was re-sent and succeeded.
    pub fn assert_no_loss(&self, name: &str) {
        let failed = self.failed.load(SeqCst);
        assert_eq!(failed, 0, "{name}: {failed} failures: {:?}", self.failures.lock().unwrap());
        let (unsent, retried) = (self.unsent.load(SeqCst), self.retried.load(SeqCst));
        assert_eq!(unsent, retried, "{name}: every unsent send is followed by a re-send");
        let (requests, recovered) = (self.unsent_requests.load(SeqCst), self.recovered.load(SeqCst));
        assert_eq!(recovered, requests, "{name}: every request that came back unsent succeeded in the end");
    }

    pub fn summary(&self) -> String {
        format!(
            "ok {} failed {} refused-connects {} closes {} unsent {} (requests {}, re-sent {}, recovered {}) per \
             instance {:?} unsent because {:?}",
            self.ok.load(SeqCst),
            self.failed.load(SeqCst),
            self.refused.load(SeqCst),
            self.closes.load(SeqCst),
            self.unsent.load(SeqCst),
            self.unsent_requests.load(SeqCst),
            self.retried.load(SeqCst),
            self.recovered.load(SeqCst),
            [self.per_instance[0].load(SeqCst), self.per_instance[1].load(SeqCst)],
            self.unsent_why.lock().unwrap(),
        )
    }
}

/// A request that came back unsent, waiting to be sent again.
struct Unsent<R> {
    req: R,
    sends: u32,
    /// Why it came back the last time.
    why: String,
}

/// What a worker sends next: the request that came back unsent, or a new one.
fn next_request<R>(t: &Tally, pending: &mut Option<Unsent<R>>, build: impl FnOnce() -> R) -> (R, u32, String) {
    match pending.take() {
        Some(u) => {
            t.retried.fetch_add(1, SeqCst);
            (u.req, u.sends, u.why)
        }
        None => (build(), 0, String::new()),
    }
}

/// Keeps a request that came back unsent for another send, or calls it lost after `MAX_SENDS`.
fn keep_unsent<R>(t: &Tally, pending: &mut Option<Unsent<R>>, req: R, sends: u32, what: &str) {
    t.handed_back(sends == 0, what);
    if sends + 1 >= MAX_SENDS {
        t.fail(format!("{what}: unsent {MAX_SENDS} times"));
    } else {
        *pending = Some(Unsent { req, sends: sends + 1, why: what.to_string() });
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

    /// Whether instance `i` was seen going away (a GOAWAY, a refused connect, or with several
    /// instances a `Connection: close`).
    pub fn is_draining(&self, i: usize) -> bool {
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

/// No instance is left for a request that came back unsent: it is lost.
fn strand<R>(t: &Tally, pending: &mut Option<Unsent<R>>, what: &str) {
    if let Some(u) = pending.take() {
        t.fail(format!("{what}: a request came back unsent ({}) and no instance was left to send it to", u.why));
    }
}

/// HTTP/1.1 keep-alive worker: GET `path` in a loop until `stop`, and past it while a request that came
/// back unsent still waits to be sent.
pub async fn h1_worker(b: Arc<Backends>, t: Arc<Tally>, path: &'static str, stop: Stop) {
    let build = || Request::get(path).header("host", "load.test").body(Full::new(Bytes::new())).unwrap();
    let mut pending: Option<Unsent<Request<Full<Bytes>>>> = None;
    while stop.going() || pending.is_some() {
        let Some(i) = b.pick() else {
            strand(&t, &mut pending, "h1");
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Some(stream) = connect(&b, &t, i).await else { continue };
        let Ok((mut tx, conn)) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await else { continue };
        tokio::spawn(conn);
        while (stop.going() || pending.is_some()) && !b.is_draining(i) {
            if tx.ready().await.is_err() {
                break; // closed between requests: nothing sent
            }
            let (req, sends, _) = next_request(&t, &mut pending, build);
            let res = match tx.try_send_request(req).await {
                Ok(res) => res,
                Err(mut e) => {
                    match e.take_message() {
                        Some(req) => {
                            keep_unsent(&t, &mut pending, req, sends, &format!("h1 instance {i}: handed back"))
                        }
                        None => t.fail(format!("h1 instance {i}: {}", e.error())),
                    }
                    break;
                }
            };
            let close = res.headers().get("connection").is_some_and(|v| v == "close");
            let status = res.status();
            match res.into_body().collect().await {
                Ok(_) if status == 200 => t.succeeded(i, sends > 0),
                Ok(_) => t.fail(format!("h1 instance {i}: status {status}")),
                Err(e) => t.fail(format!("h1 instance {i}: body {e}")),
            }
            if close {
                t.closes.fetch_add(1, SeqCst);
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
    /// A gRPC unary call to another method (the demo app's `/demo.Echo/Unary`).
    GrpcAt(&'static str),
}

/// One shared HTTP/2 connection per instance, as real clients keep.
#[derive(Debug, Default)]
pub struct H2Pool {
    conns: Mutex<Vec<Option<H2Conn>>>,
}

impl H2Pool {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self { conns: Mutex::new(vec![None; n]) })
    }
}

/// An HTTP/2 connection and the lowest last-stream-id its server has sent in a GOAWAY.
#[derive(Clone, Debug)]
struct H2Conn {
    tx: h2::client::SendRequest<Bytes>,
    goaway: Arc<AtomicU32>,
}

/// No GOAWAY seen yet: every stream id is at or below it.
const NO_GOAWAY: u32 = u32::MAX;

/// Finds frame boundaries in what the server sends and notes each GOAWAY's last-stream-id.
#[derive(Debug, Default)]
struct FrameScan {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    kind: u8,
    /// Payload bytes of the current frame seen so far (only the first four matter, for GOAWAY).
    seen: usize,
    id: [u8; 4],
}

impl FrameScan {
    fn feed(&mut self, mut data: &[u8], goaway: &AtomicU32) {
        while !data.is_empty() {
            if self.left == 0 {
                let take = (9 - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == 9 {
                    self.have = 0;
                    self.left = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.kind = self.head[3];
                    self.seen = 0;
                }
                continue;
            }
            let take = self.left.min(data.len());
            if self.kind == GOAWAY && self.seen < 4 {
                let n = (4 - self.seen).min(take);
                self.id[self.seen..self.seen + n].copy_from_slice(&data[..n]);
                if self.seen + n == 4 {
                    // A later GOAWAY may only lower it; keep the lowest all the same.
                    goaway.fetch_min(u32::from_be_bytes(self.id) & MAX_STREAM_ID, SeqCst);
                }
            }
            self.seen += take;
            self.left -= take;
            data = &data[take..];
        }
    }
}

/// The client's socket, reading through a `FrameScan`: the GOAWAY is noted as its bytes arrive, so
/// before `h2` acts on it and before any stream learns of it.
struct Scanned {
    io: TcpStream,
    scan: FrameScan,
    goaway: Arc<AtomicU32>,
}

impl AsyncRead for Scanned {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.scan.feed(&buf.filled()[before..], &this.goaway);
        }
        r
    }
}

impl AsyncWrite for Scanned {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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

/// The request head and body for one HTTP/2 request of `kind`.
fn h2_request(kind: H2Kind, addr: SocketAddr) -> (Request<()>, Option<Bytes>) {
    match kind {
        H2Kind::Get(path) => (Request::get(format!("http://{addr}{path}")).body(()).unwrap(), None),
        H2Kind::GrpcUnary | H2Kind::GrpcAt(_) => (
            Request::post(format!(
                "http://{addr}{}",
                if let H2Kind::GrpcAt(p) = kind { p } else { "/ebb.test.Echo/Unary" }
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap(),
            Some(grpc_body()),
        ),
    }
}

/// The pooled connection to instance `i`, or a new one.
async fn h2_conn(b: &Backends, pool: &H2Pool, t: &Tally, i: usize) -> Option<H2Conn> {
    if let Some(c) = pool.conns.lock().unwrap()[i].clone() {
        return Some(c);
    }
    let stream = connect(b, t, i).await?;
    let _ = stream.set_nodelay(true);
    let goaway = Arc::new(AtomicU32::new(NO_GOAWAY));
    let io = Scanned { io: stream, scan: FrameScan::default(), goaway: goaway.clone() };
    let (tx, conn) = h2::client::handshake(io).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let c = H2Conn { tx, goaway };
    pool.conns.lock().unwrap()[i] = Some(c.clone());
    Some(c)
}

/// Why a stream that failed was provably not processed, if it was not.
fn unprocessed(e: &h2::Error, stream: u32, goaway: u32) -> Option<String> {
    if stream > goaway {
        return Some(format!("stream {stream} above GOAWAY last-stream-id {goaway}"));
    }
    if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Some(format!("stream {stream} refused (REFUSED_STREAM)"));
    }
    None
}

/// The response of one HTTP/2 request, read to its end: status, grpc-status (trailer or header).
async fn h2_exchange(
    tx: h2::client::SendRequest<Bytes>,
    req: Request<()>,
    body: Option<Bytes>,
    goaway: &AtomicU32,
) -> Result<(http::StatusCode, Option<http::HeaderValue>), H2Outcome> {
    let mut tx = tx.ready().await.map_err(|e| H2Outcome::NotSent(format!("connection unusable: {e}")))?;
    // An error here means no stream was opened: nothing of this request left the client.
    let (res, mut send) =
        tx.send_request(req, body.is_none()).map_err(|e| H2Outcome::NotSent(format!("no stream opened: {e}")))?;
    let id = res.stream_id().as_u32();
    let failed = |e: h2::Error| match unprocessed(&e, id, goaway.load(SeqCst)) {
        Some(why) => H2Outcome::Unsent(why),
        None => H2Outcome::Failed(format!("stream {id}: {e:?} (GOAWAY last-stream-id {})", goaway.load(SeqCst))),
    };
    if let Some(b) = body {
        send.send_data(b, true).map_err(failed)?;
    }
    let res = res.await.map_err(failed)?;
    let status = res.status();
    let header_grpc = res.headers().get("grpc-status").cloned();
    let mut recv = res.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(failed)?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv.trailers().await.map_err(failed)?;
    Ok((status, trailers.and_then(|t| t.get("grpc-status").cloned()).or(header_grpc)))
}

/// How an HTTP/2 request that got no response ended.
enum H2Outcome {
    /// Nothing of it left the client: the connection was already going away.
    NotSent(String),
    /// Sent, and the server said it did not process it (above the GOAWAY's last-stream-id, or
    /// REFUSED_STREAM).
    Unsent(String),
    Failed(String),
}

/// HTTP/2 worker: one request at a time on the instance's shared connection, until `stop`, and past it
/// while a request that came back unsent still waits to be sent.
pub async fn h2_worker(b: Arc<Backends>, pool: Arc<H2Pool>, t: Arc<Tally>, kind: H2Kind, stop: Stop) {
    // A request that came back unsent is sent again as an identical new one (h2 keeps the original).
    let mut pending: Option<Unsent<()>> = None;
    while stop.going() || pending.is_some() {
        let Some(i) = b.pick() else {
            strand(&t, &mut pending, "h2");
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Some(conn) = h2_conn(&b, &pool, &t, i).await else { continue };
        if conn.tx.clone().ready().await.is_err() {
            // GOAWAY received, or closed: this instance is going away. Nothing was sent.
            pool.conns.lock().unwrap()[i] = None;
            b.mark(i);
            continue;
        }
        let ((), sends, why) = next_request(&t, &mut pending, || ());
        let (req, body) = h2_request(kind, b.addrs[i]);
        match h2_exchange(conn.tx, req, body, &conn.goaway).await {
            // The GOAWAY came between the check above and this send: as there, nothing left the
            // client, so nothing was lost, and the pod is going away. A request that had come back
            // unsent before waits again, as it was.
            Err(H2Outcome::NotSent(_)) => {
                pool.conns.lock().unwrap()[i] = None;
                b.mark(i);
                if sends > 0 {
                    // Its re-send did not happen: it is not counted as one.
                    t.retried.fetch_sub(1, SeqCst);
                    pending = Some(Unsent { req: (), sends, why });
                }
            }
            Ok((status, grpc_status)) => match kind {
                H2Kind::Get(_) if status == 200 => t.succeeded(i, sends > 0),
                H2Kind::GrpcUnary | H2Kind::GrpcAt(_)
                    if status == 200 && grpc_status.as_ref().is_some_and(|s| s == "0") =>
                {
                    t.succeeded(i, sends > 0)
                }
                _ => t.fail(format!("h2 instance {i}: http {status} grpc-status {grpc_status:?}")),
            },
            Err(H2Outcome::Unsent(why)) => {
                keep_unsent(&t, &mut pending, (), sends, &format!("h2 instance {i}: {why}"));
                b.mark(i);
            }
            Err(H2Outcome::Failed(why)) => t.fail(format!("h2 instance {i}: {why}")),
        }
    }
}
