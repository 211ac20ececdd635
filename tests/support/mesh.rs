//! A service mesh on loopback, as real processes: server-side Ebbs ("pods", inbound fixed listeners in
//! front of their own origins), a client-side Ebb whose clusters spread the app's requests over the
//! pods, and an app-like load generator that never retries and counts every outcome.
//!
//! Each pod serves three services, one listener (and one client cluster) each:
//! - `h1`: an HTTP/1.1 origin (GETs and POSTs, see [`Pace`]);
//! - `h2`: an HTTP/2 origin (the same routes);
//! - `grpc`: the tonic echo service (unary and server-streaming), over HTTP/2.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client;
use super::grpc::{self, EchoRequest};
use super::origin::{self, Origin};
use super::process::EbbProcess;

/// The services, by listener and cluster name.
pub const SERVICES: [&str; 3] = ["h1", "h2", "grpc"];

/// The address the app dials for a service: matched against the client Ebb's clusters, never dialled.
pub fn vip(service: &str) -> SocketAddr {
    let port = match service {
        "h1" => 9,
        "h2" => 10,
        _ => 11,
    };
    SocketAddr::from(([127, 0, 0, 1], port))
}

const COMMON: &str = "inbound: { enabled: false }\noutbound: { enabled: false }\nadmin: { bind: 127.0.0.1:0 }\n\
                      telemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n";

/// A server-side Ebb and the origins behind it.
pub struct Pod {
    pub ebb: EbbProcess,
    pub h1: Origin,
    pub h2: Origin,
    pub grpc: SocketAddr,
}

/// Mesh mTLS between the client Ebb and the pods: the identity files of each side (one CA), and the
/// SPIFFE ID every pod proves.
pub struct MeshTls {
    pub pod: super::pki::IdentityFiles,
    pub client: super::pki::IdentityFiles,
    pub pod_id: &'static str,
}

/// The `identity:` line of a config using `files`.
fn identity_yaml(files: &super::pki::IdentityFiles) -> String {
    let c = files.config();
    format!(
        "identity: {{ cert: {}, key: {}, trust_bundle: {} }}\n",
        c.cert.display(),
        c.key.display(),
        c.trust_bundle.display()
    )
}

impl Pod {
    /// Starts the origins (on `rt`) and a server-side Ebb with `drain` (a YAML map) and log filter
    /// `log`; with `tls`, the pod has its identity and terminates mesh TLS (plaintext is served too).
    pub fn start(
        rt: &tokio::runtime::Runtime,
        names: [&'static str; 2],
        drain: &str,
        log: &str,
        tls: Option<&MeshTls>,
    ) -> Self {
        let (h1, h2, grpc) =
            rt.block_on(async { (origin::http1(names[0]).await, origin::http2(names[1]).await, grpc::server().await) });
        let identity = tls.map(|t| identity_yaml(&t.pod)).unwrap_or_default();
        let mut y = format!("{COMMON}{identity}log: {{ level: \"{log}\" }}\ndrain: {drain}\nlisteners:\n");
        for (name, target) in [("h1", h1.addr), ("h2", h2.addr), ("grpc", grpc)] {
            y.push_str(&format!("  - {{ name: {name}, bind: 127.0.0.1:0, target: {target}, direction: inbound }}\n"));
        }
        Self { ebb: EbbProcess::start(&y), h1, h2, grpc }
    }

    /// The pod's listener for `service`: the client's endpoint address.
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.ebb.addr(service)
    }
}

/// The client-side Ebb: one outbound listener per service VIP, one cluster per service over the pods'
/// listeners for it. `cluster_extra` is YAML added to every cluster (indented keys, e.g. the outlier).
/// With `tls`, every endpoint is dialled over mesh mTLS and must prove `tls.pod_id`.
pub fn client_ebb(pods: &[&Pod], cluster_extra: &str, log: &str, tls: Option<&MeshTls>) -> EbbProcess {
    let identity = tls.map(|t| identity_yaml(&t.client)).unwrap_or_default();
    let endpoint_identity = tls.map(|t| format!("\n        identity: {}", t.pod_id)).unwrap_or_default();
    let mut y = format!("{COMMON}{identity}log: {{ level: \"{log}\" }}\nlisteners:\n");
    for s in SERVICES {
        y.push_str(&format!("  - {{ name: {s}, bind: 127.0.0.1:0, target: {}, direction: outbound }}\n", vip(s)));
    }
    y.push_str("clusters:\n");
    for s in SERVICES {
        y.push_str(&format!("  - name: {s}\n    addresses: [{}]\n    endpoints:\n", vip(s)));
        for p in pods {
            y.push_str(&format!("      - addr: {}{endpoint_identity}\n", p.addr(s)));
        }
        y.push_str(cluster_extra);
    }
    EbbProcess::start(&y)
}

/// The client Ebb's view of one endpoint in `/status`: state, outstanding requests.
pub fn endpoint<'a>(status: &'a serde_json::Value, cluster: &str, addr: SocketAddr) -> Option<&'a serde_json::Value> {
    status["clusters"].as_array()?.iter().find(|c| c["name"] == cluster)?["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["addr"] == addr.to_string())
}

/// Attempts the client Ebb sent to `endpoint` of `cluster` (`ebb_endpoint_requests_total`).
pub async fn attempts(admin: SocketAddr, cluster: &str, endpoint: SocketAddr) -> u64 {
    let (status, text) = client::fetch(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let (c, e) = (format!("cluster=\"{cluster}\""), format!("endpoint=\"{endpoint}\""));
    text.lines()
        .filter(|l| l.starts_with("ebb_endpoint_requests_total{") && l.contains(&c) && l.contains(&e))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Requests of `service` that reached `pod`: the origin's count for HTTP, the client Ebb's attempts to
/// the pod's endpoint for gRPC (the tonic server counts nothing).
pub async fn served(pod: &Pod, client_admin: SocketAddr, service: &str) -> u64 {
    match service {
        "h1" => pod.h1.hits.load(SeqCst) as u64,
        "h2" => pod.h2.hits.load(SeqCst) as u64,
        _ => attempts(client_admin, "grpc", pod.addr("grpc")).await,
    }
}

/// What the app sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    H1Get,
    H1Post,
    H2Get,
    H2Post,
    GrpcUnary,
    GrpcStream,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::H1Get, Kind::H1Post, Kind::H2Get, Kind::H2Post, Kind::GrpcUnary, Kind::GrpcStream];

    pub fn name(self) -> &'static str {
        match self {
            Kind::H1Get => "http1 GET",
            Kind::H1Post => "http1 POST",
            Kind::H2Get => "http2 GET",
            Kind::H2Post => "http2 POST",
            Kind::GrpcUnary => "grpc unary",
            Kind::GrpcStream => "grpc server-streaming",
        }
    }

    /// The service (listener and cluster) it goes through.
    pub fn service(self) -> &'static str {
        match self {
            Kind::H1Get | Kind::H1Post => "h1",
            Kind::H2Get | Kind::H2Post => "h2",
            Kind::GrpcUnary | Kind::GrpcStream => "grpc",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap()
    }
}

/// One request that did not end as expected.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: Kind,
    pub started: Instant,
    pub ended: Instant,
    pub what: String,
}

/// How many requests of each kind ended well, and every one that did not.
#[derive(Debug, Default)]
pub struct Outcomes {
    ok: [AtomicU64; 6],
    failed: [AtomicU64; 6],
    failures: Mutex<Vec<Failure>>,
}

impl Outcomes {
    pub fn ok(&self, k: Kind) -> u64 {
        self.ok[k.index()].load(SeqCst)
    }

    pub fn failed(&self, k: Kind) -> u64 {
        self.failed[k.index()].load(SeqCst)
    }

    /// The failures recorded (the first 500).
    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().unwrap().clone()
    }

    fn record(&self, k: Kind, started: Instant, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.ok[k.index()].fetch_add(1, SeqCst);
            }
            Err(what) => {
                self.failed[k.index()].fetch_add(1, SeqCst);
                let mut f = self.failures.lock().unwrap();
                if f.len() < 500 {
                    f.push(Failure { kind: k, started, ended: Instant::now(), what });
                }
            }
        }
    }

    pub fn summary(&self) -> String {
        Kind::ALL
            .iter()
            .map(|k| format!("{}: ok {} failed {}", k.name(), self.ok(*k), self.failed(*k)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// No worker runs longer than this, nor sends more than `MAX_REQUESTS`, whatever the test does.
pub const MAX_RUN: Duration = Duration::from_secs(30);
const MAX_REQUESTS: u64 = 100_000;
/// A request not finished by then counts as failed (and ends).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const STREAM_REPLIES: u32 = 4;

/// How long requests take at the origin.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// GETs wait 5 ms, POSTs go to `/echo` (their bodies come back whole and are checked), gRPC calls
    /// wait 5 ms per reply: many requests, some in flight at any moment.
    Brisk,
    /// Every request is held this many milliseconds at the origin (POSTs go to `/slow`, so their
    /// bodies are not echoed; a stream's replies share the time): the set of requests in flight
    /// changes slowly, so a snapshot of it stays true for a few milliseconds.
    Held(u64),
}

impl Pace {
    fn path(self, kind: Kind) -> String {
        match (self, kind) {
            (Pace::Brisk, Kind::H1Post | Kind::H2Post) => "/echo".into(),
            (Pace::Brisk, _) => "/slow?ms=5".into(),
            (Pace::Held(ms), _) => format!("/slow?ms={ms}"),
        }
    }

    fn grpc_delay_ms(self, kind: Kind) -> u64 {
        match (self, kind) {
            (Pace::Brisk, _) => 5,
            (Pace::Held(ms), Kind::GrpcStream) => ms / u64::from(STREAM_REPLIES),
            (Pace::Held(ms), _) => ms,
        }
    }
}

/// The app: workers sending requests through the client Ebb until stopped. It never retries: every
/// request is sent once and counted as ok (expected status and whole body or stream) or failed.
pub struct Load {
    pub outcomes: Arc<Outcomes>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// When a worker stops: on `stop`, after `MAX_RUN`, or after `MAX_REQUESTS`.
#[derive(Clone)]
struct Until {
    stop: Arc<AtomicBool>,
    end: Instant,
    pace: Pace,
}

impl Until {
    fn going(&self, sent: u64) -> bool {
        !self.stop.load(SeqCst) && Instant::now() < self.end && sent < MAX_REQUESTS
    }
}

impl Load {
    /// Starts the workers against the client Ebb's listeners (`h1`, `h2`, `grpc`): per kind of
    /// request, `per_kind` workers each with one request at a time; HTTP/1.1 workers each on their own
    /// keep-alive connection, HTTP/2 workers sharing one connection, gRPC workers one tonic channel.
    pub async fn start(client: &EbbProcess, per_kind: usize, pace: Pace) -> Self {
        let outcomes = Arc::new(Outcomes::default());
        let stop = Arc::new(AtomicBool::new(false));
        let until = Until { stop: stop.clone(), end: Instant::now() + MAX_RUN, pace };
        let (h1, h2, g) = (client.addr("h1"), client.addr("h2"), client.addr("grpc"));
        let h2_conn = h2_connect(h2).await.expect("HTTP/2 connection to the client Ebb");
        let channel = grpc::client(g).await;
        let mut tasks = Vec::new();
        for w in 0..per_kind {
            for kind in [Kind::H1Get, Kind::H1Post] {
                tasks.push(tokio::spawn(h1_worker(h1, kind, w, outcomes.clone(), until.clone())));
            }
            for kind in [Kind::H2Get, Kind::H2Post] {
                tasks.push(tokio::spawn(h2_worker(h2, h2_conn.clone(), kind, w, outcomes.clone(), until.clone())));
            }
            for kind in [Kind::GrpcUnary, Kind::GrpcStream] {
                tasks.push(tokio::spawn(grpc_worker(channel.clone(), kind, w, outcomes.clone(), until.clone())));
            }
        }
        Self { outcomes, stop, tasks }
    }

    /// Stops the workers (each finishes the request it has under way) and waits for them.
    pub async fn finish(self) -> Arc<Outcomes> {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), t)
                .await
                .expect("a load worker ended")
                .expect("a load worker did not panic");
        }
        self.outcomes
    }
}

type H1 = http1::SendRequest<Full<Bytes>>;
type H2 = http2::SendRequest<Full<Bytes>>;

async fn h1_connect(addr: SocketAddr) -> Result<H1, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn h2_connect(addr: SocketAddr) -> Result<H2, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(tx)
}

/// The request for `kind` number `n` of worker `w`, and the body expected back.
fn http_request(kind: Kind, pace: Pace, w: usize, n: u64) -> (Request<Full<Bytes>>, String) {
    let (host, uri_prefix) = match kind.service() {
        "h1" => ("h1.mesh.test", String::new()),
        _ => ("h2.mesh.test", "http://h2.mesh.test".to_string()),
    };
    let b = Request::builder().header("host", host).uri(format!("{uri_prefix}{}", pace.path(kind)));
    match kind {
        Kind::H1Get | Kind::H2Get => (b.method("GET").body(Full::default()).unwrap(), "slow".into()),
        _ => {
            let body = format!("{}-{w}-{n}", kind.name());
            let expected = if matches!(pace, Pace::Brisk) { body.clone() } else { "slow".into() };
            (b.method("POST").body(Full::new(Bytes::from(body))).unwrap(), expected)
        }
    }
}

/// A response's status, `x-ebb-error`, `Connection: close`, body; or why there is none.
async fn exchange(
    send: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>>,
) -> Result<(StatusCode, Option<String>, bool, Bytes), String> {
    let res = send.await.map_err(|e| format!("no response: {e:?}"))?;
    let status = res.status();
    let cause = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap_or("?").to_string());
    let close = res.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = res.into_body().collect().await.map_err(|e| format!("status {status}, body failed: {e:?}"))?.to_bytes();
    Ok((status, cause, close, body))
}

fn judge(r: Result<(StatusCode, Option<String>, bool, Bytes), String>, expected: &str) -> Result<(), String> {
    let (status, cause, _, body) = r?;
    if status != 200 || body != expected.as_bytes() {
        return Err(format!("status {status}, x-ebb-error {cause:?}, body {:?}", String::from_utf8_lossy(&body)));
    }
    Ok(())
}

/// One worker's requests, one at a time: numbered from 1, each bounded by `REQUEST_TIMEOUT` and
/// recorded as an outcome of `kind`.
struct Requests {
    kind: Kind,
    out: Arc<Outcomes>,
    until: Until,
    n: u64,
}

impl Requests {
    fn new(kind: Kind, out: Arc<Outcomes>, until: Until) -> Self {
        Self { kind, out, until, n: 0 }
    }

    /// The next request's number, or `None` once the worker is to stop.
    fn next(&mut self) -> Option<u64> {
        self.until.going(self.n).then(|| {
            self.n += 1;
            self.n
        })
    }

    /// Runs one request and records how it ended.
    async fn record(&self, request: impl std::future::Future<Output = Result<(), String>>) {
        let started = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, request)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
        self.out.record(self.kind, started, result);
    }
}

/// One keep-alive connection, one request at a time. A connection that fails is replaced for the next
/// request; the request it failed is not sent again.
async fn h1_worker(addr: SocketAddr, kind: Kind, w: usize, out: Arc<Outcomes>, until: Until) {
    let pace = until.pace;
    let mut requests = Requests::new(kind, out, until);
    // Taken for each request and put back only after a whole answer without `Connection: close`: a
    // request that failed or ran out of time leaves no connection behind for the next.
    let mut conn: Option<H1> = None;
    while let Some(n) = requests.next() {
        requests
            .record(async {
                let (req, expected) = http_request(kind, pace, w, n);
                let mut tx = match conn.take() {
                    Some(tx) => tx,
                    None => h1_connect(addr).await?,
                };
                // The client Ebb does not close the app's connections; a closed one fails this request.
                tx.ready().await.map_err(|e| format!("connection closed between requests: {e}"))?;
                let result = exchange(tx.send_request(req)).await;
                if matches!(&result, Ok((_, _, close, _)) if !close) {
                    conn = Some(tx);
                }
                judge(result, &expected)
            })
            .await;
    }
}

/// Requests on the shared HTTP/2 connection (a new one of its own if that one closed).
async fn h2_worker(addr: SocketAddr, shared: H2, kind: Kind, w: usize, out: Arc<Outcomes>, until: Until) {
    let pace = until.pace;
    let mut requests = Requests::new(kind, out, until);
    let mut conn = Some(shared);
    while let Some(n) = requests.next() {
        requests
            .record(async {
                let (req, expected) = http_request(kind, pace, w, n);
                let tx = match &mut conn {
                    Some(tx) if !tx.is_closed() => tx,
                    _ => conn.insert(h2_connect(addr).await?),
                };
                tx.ready().await.map_err(|e| format!("connection unusable: {e}"))?;
                judge(exchange(tx.send_request(req)).await, &expected)
            })
            .await;
    }
}

fn grpc_failure(s: &tonic::Status) -> String {
    let cause = s.metadata().get("x-ebb-error").and_then(|v| v.to_str().ok()).map(str::to_string);
    format!("grpc status {:?}: {:?}, x-ebb-error {cause:?}", s.code(), s.message())
}

async fn grpc_call(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    kind: Kind,
    pace: Pace,
    msg: String,
) -> Result<(), String> {
    let req = EchoRequest { message: msg.clone(), count: STREAM_REPLIES, delay_ms: pace.grpc_delay_ms(kind) };
    if kind == Kind::GrpcUnary {
        let res = grpc::unary(c, req).await.map_err(|s| grpc_failure(&s))?;
        let reply = res.into_inner();
        if reply.message != msg {
            return Err(format!("unary reply {reply:?}"));
        }
        return Ok(());
    }
    let mut stream = grpc::stream(c, req).await.map_err(|s| grpc_failure(&s))?;
    let mut seq = 0;
    loop {
        match stream.message().await {
            Ok(Some(m)) if m.seq == seq && m.message == msg => seq += 1,
            Ok(Some(m)) => return Err(format!("reply {seq} out of order: {m:?}")),
            Ok(None) if seq == STREAM_REPLIES => return Ok(()),
            Ok(None) => return Err(format!("stream ended after {seq} of {STREAM_REPLIES} replies")),
            Err(s) => return Err(format!("after {seq} of {STREAM_REPLIES} replies: {}", grpc_failure(&s))),
        }
    }
}

/// gRPC calls on the shared tonic channel.
async fn grpc_worker(
    channel: tonic::client::Grpc<tonic::transport::Channel>,
    kind: Kind,
    w: usize,
    out: Arc<Outcomes>,
    until: Until,
) {
    let pace = until.pace;
    let mut requests = Requests::new(kind, out, until);
    let mut c = channel;
    while let Some(n) = requests.next() {
        requests.record(grpc_call(&mut c, kind, pace, format!("{}-{w}-{n}", kind.name()))).await;
    }
}
