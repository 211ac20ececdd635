//! Upstream HTTP connections: one pool per endpoint address, and a per-downstream-connection session
//! that keeps using the same upstream connection so the per-request path takes no shared lock.
//!
//! HTTP/1.1: a downstream connection's requests arrive one at a time, so its session holds one upstream
//! connection and hands it back to the endpoint's idle pool when the downstream connection ends.
//! HTTP/2: a small pool of multiplexed upstream connections per endpoint, shared by every session; a
//! request takes a stream on the first connection with one free, and a new connection opens when none
//! has (docs/architecture.md §7).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use http::Response;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::domain::Direction;
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::error::ProxyError;
use crate::http::hop::{self, Hop};
use crate::http::inline::{Inline, Tasks};
use crate::limits::{ConnectLimits, Slot};
use crate::telemetry::metrics::Metrics;
use crate::tls::identity::Identity;
use crate::tls::mesh::Alpn;
use crate::transport::connect::{connect_io, ConnectError, MeshDial};
use crate::transport::stream::UpstreamIo;

/// A request on its way upstream. Boxed once, where it enters the upstream stack: it passes through
/// the retry future, the attempt and the send, and each would otherwise carry its own copy of the head
/// (about 270 bytes), which made a request's boxed attempt future too large for the allocator's fast
/// path (BENCHMARKS.md, issue 13).
pub type UpstreamRequest = Box<http::Request<RequestBody>>;

type H1 = http1::SendRequest<RequestBody>;
type H2 = http2::SendRequest<RequestBody>;

/// Receive window of each stream on an upstream HTTP/2 connection. Data a downstream client has not
/// taken stays in Ebb and keeps its stream's window closed, so this is the most one stalled client (one
/// that never grants flow-control credit, or just reads slowly) holds per stream; the upstream then
/// stops sending on that stream only. At 256 KiB a stream still moves ~250 MB/s at a 1 ms round trip.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// Streams Ebb opens on one upstream HTTP/2 connection at most, whatever the upstream allows (100 is
/// also the common server default); past it, or past the peer's SETTINGS_MAX_CONCURRENT_STREAMS if
/// lower, the next request opens another connection. A fixed cap rather than only the peer's value,
/// so the connection window below holds every stream's window.
const H2_MAX_STREAMS_PER_CONN: usize = 100;

/// Receive window of an upstream HTTP/2 connection: every stream's window fits in it, so stalled streams
/// can never close it for the others (with hyper's 5 MiB / 2 MiB defaults, three stalled streams did:
/// issue 11). 25 MiB; it is memory only when downstream clients stop reading.
const H2_CONN_WINDOW: u32 = H2_STREAM_WINDOW * H2_MAX_STREAMS_PER_CONN as u32;

/// Every upstream endpoint Ebb has talked to.
#[derive(Debug)]
pub struct Upstreams {
    cfg: UpstreamConfig,
    metrics: Arc<Metrics>,
    /// This sidecar's identity, presented when dialling an endpoint over mesh TLS.
    mesh: Option<Arc<Identity>>,
    /// By address and the identity it must prove: the same address dialled plaintext and over mesh
    /// TLS are two pools.
    endpoints: Mutex<HashMap<EndpointKey, Arc<Endpoint>>>,
}

/// An endpoint's address, and the identity it must prove when dialled over mesh TLS.
type EndpointKey = (SocketAddr, Option<Arc<str>>);

impl Upstreams {
    pub fn new(cfg: UpstreamConfig, metrics: Arc<Metrics>, mesh: Option<Arc<Identity>>) -> Arc<Self> {
        Arc::new(Self { cfg, metrics, mesh, endpoints: Mutex::new(HashMap::new()) })
    }

    /// This sidecar's identity, if it has one.
    pub fn mesh(&self) -> Option<&Arc<Identity>> {
        self.mesh.as_ref()
    }

    /// The endpoint for `addr`, dialled over mesh TLS when it must prove `identity`; looked up once per
    /// downstream connection, not per request.
    pub fn endpoint(&self, addr: SocketAddr, identity: Option<Arc<str>>) -> Arc<Endpoint> {
        let mut map = match self.endpoints.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry((addr, identity.clone()))
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    addr,
                    identity,
                    mesh: self.mesh.clone(),
                    cfg: self.cfg.clone(),
                    metrics: self.metrics.clone(),
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(Vec::new()),
                    h2_connecting: tokio::sync::Mutex::new(()),
                    drain_signal: AtomicU64::new(0),
                    keepalive_hint: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Closes idle connections past their idle timeout, and forgets endpoints nothing uses any more
    /// (outbound passthrough meets many destinations); run periodically.
    pub fn reap_idle(&self) {
        let Ok(mut map) = self.endpoints.lock() else { return };
        map.retain(|_, ep| {
            ep.reap();
            // Only the map holds it and it keeps no connection: nothing is lost by forgetting it.
            Arc::strong_count(ep) > 1 || !ep.is_empty()
        });
    }
}

#[derive(Debug)]
struct Idle {
    tx: H1,
    since: Instant,
}

/// What Ebb knows of one upstream HTTP/2 connection's streams. hyper does not say how many streams a
/// connection has open, so Ebb counts the ones it opened.
#[derive(Debug)]
struct H2Streams {
    /// Streams open: a [`Slot`] taken before a request is sent, given back when the response body that
    /// holds it ends.
    open: Arc<AtomicUsize>,
    /// A stream was claimed since the last reap.
    used: AtomicBool,
}

/// hyper's half of an upstream HTTP/2 connection: it takes requests from the senders to h2. It is also
/// the only place hyper tells the peer's SETTINGS_MAX_CONCURRENT_STREAMS.
type H2Driver = http2::Connection<TokioIo<UpstreamIo>, RequestBody, Inline>;
type SharedDriver = Arc<Mutex<Option<Pin<Box<H2Driver>>>>>;

/// One multiplexed upstream HTTP/2 connection.
#[derive(Debug)]
struct H2Conn {
    tx: H2,
    streams: Arc<H2Streams>,
    /// Shared with the task that polls it, so the stream limit can be read when a stream is claimed:
    /// the peer's SETTINGS are applied by hyper's own connection task, and the driver is polled only
    /// when a request is sent, so a value read there could be one request late. `None` once it ended.
    driver: SharedDriver,
}

impl H2Conn {
    /// A stream on this connection if it has one free. Called with the pool locked, so claims do not
    /// race each other past the limit (frees may race, and only make room).
    fn claim(&self) -> Option<(H2, Slot)> {
        let s = &self.streams;
        if self.tx.is_closed() || s.open.load(Ordering::Acquire) >= self.limit() {
            return None;
        }
        let slot = Slot::take_on(&s.open);
        if !s.used.load(Ordering::Relaxed) {
            s.used.store(true, Ordering::Relaxed);
        }
        Some((self.tx.clone(), slot))
    }

    /// The peer's current stream limit, capped; 0 once the connection has ended. Read live, waiting
    /// out a poll of the driver if one is under way (a short step that never blocks): a value kept
    /// from an earlier read is the one h2 assumed before the peer's SETTINGS, and a request claimed on
    /// it queued inside h2 behind streams the peer no longer allowed, for as long as they were held.
    fn limit(&self) -> usize {
        let driver = match self.driver.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        driver.as_ref().map_or(0, |d| d.current_max_send_streams().min(H2_MAX_STREAMS_PER_CONN))
    }

    /// The first stream of a connection just opened for it, whatever the limit says: the request that
    /// opened it goes there (if the connection already closed, sending says so).
    fn claim_first(&self) -> (H2, Slot) {
        let slot = Slot::take_on(&self.streams.open);
        self.streams.used.store(true, Ordering::Relaxed);
        (self.tx.clone(), slot)
    }
}

/// One upstream address and its connections.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// The identity the endpoint must prove; `Some`: dialled over mesh TLS with `mesh`.
    identity: Option<Arc<str>>,
    mesh: Option<Arc<Identity>>,
    cfg: UpstreamConfig,
    metrics: Arc<Metrics>,
    idle: Mutex<Vec<Idle>>,
    /// HTTP/2 connections, oldest first; requests fill the oldest with a free stream.
    h2: Mutex<Vec<H2Conn>>,
    h2_connecting: tokio::sync::Mutex<()>,
    /// When the endpoint last said it is going away (GOAWAY, `Connection: close`), as milliseconds
    /// since [`epoch`] plus one; 0 = never.
    drain_signal: AtomicU64,
    /// The idle timeout the endpoint advertised (`Keep-Alive: timeout=`), in milliseconds; 0 = none.
    keepalive_hint: AtomicU64,
}

/// The origin of the millisecond stamps kept in atomics (tokio's clock, so paused-time tests see it).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64
}

/// What a connect needs from the cluster it is made for: its timeout and its limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectCtx<'a> {
    pub timeout: std::time::Duration,
    pub limits: &'a ConnectLimits,
}

/// A request with the endpoint chosen for it, ready for that endpoint's pool.
#[derive(Debug)]
pub struct Routed {
    pub req: UpstreamRequest,
    pub endpoint: Arc<Endpoint>,
}

/// The bottom of the upstream stack: sends a routed request on its endpoint's pool in the hop's
/// protocol (chosen per request from the cluster's `protocol`, the request fitted to it), through one
/// downstream connection's [`Session`]. The response body holds its HTTP/2 stream's slot until it ends.
#[derive(Clone, Debug)]
pub struct Dispatch(Arc<DispatchCtx>);

/// What [`Dispatch`] needs, behind one `Arc`: the stack is cloned for each request (and the retry
/// layer clones its inner part again), so each layer is kept to a pointer.
#[derive(Debug)]
struct DispatchCtx {
    session: Arc<Session>,
    protocol: UpstreamProtocol,
    /// The client's original destination: Host for an HTTP/1.0 request that had none.
    orig_dst: SocketAddr,
    connect_timeout: std::time::Duration,
    limits: Arc<ConnectLimits>,
}

impl Dispatch {
    pub fn new(
        session: Arc<Session>,
        protocol: UpstreamProtocol,
        orig_dst: SocketAddr,
        connect_timeout: std::time::Duration,
        limits: Arc<ConnectLimits>,
    ) -> Self {
        Self(Arc::new(DispatchCtx { session, protocol, orig_dst, connect_timeout, limits }))
    }
}

impl tower::Service<Routed> for Dispatch {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

    /// Always ready: pools open connections on demand, and the connect limits refuse rather than wait.
    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        let Routed { mut req, endpoint } = routed;
        // The 1xx responses the upstream sends go to the client through its sender, which every
        // copy of the request carries in its body.
        let interim = req.body_mut().take_interim();
        let fitted =
            Hop::choose(self.0.protocol, &req).and_then(|hop| hop::fit(&mut req, hop, self.0.orig_dst).map(|()| hop));
        let this = self.0.clone();
        Box::pin(async move {
            // The client's request, not the endpoint's failure: `Failure::of_error` says so, so neither
            // the breaker nor a retry hears of it.
            let hop = fitted?;
            let ctx = ConnectCtx { timeout: this.connect_timeout, limits: &this.limits };
            match hop {
                Hop::Http2 => {
                    let (res, claim) = this.session.send_h2(&endpoint, req, interim, ctx).await?;
                    let mut res = res.map(ProxyBody::upstream);
                    res.body_mut().hold(claim);
                    Ok(res)
                }
                Hop::Http1 { upgrade } => {
                    let res = this.session.send_h1(&endpoint, req, interim, upgrade, ctx).await?;
                    Ok(res.map(ProxyBody::upstream))
                }
            }
        })
    }
}

impl Endpoint {
    /// How this endpoint is dialled over mesh TLS speaking `alpn`; `None`: plaintext.
    fn mesh_dial(&self, alpn: Alpn) -> Option<MeshDial<'_>> {
        let expected = self.identity.as_ref()?;
        Some(MeshDial { expected, alpn, identity: self.mesh.as_deref() })
    }

    /// The identity this endpoint must prove, if it is dialled over mesh TLS.
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()
    }

    /// The upstream address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the endpoint said it is going away within the last `hold`.
    pub fn signalled_draining(&self, now: Instant, hold: std::time::Duration) -> bool {
        match self.drain_signal.load(Ordering::Relaxed) {
            0 => false,
            at => millis_since_epoch(now) < (at - 1).saturating_add(hold.as_millis() as u64),
        }
    }

    /// Notes that the endpoint said it is going away, and closes its idle connections: they would
    /// only meet the close. New requests go elsewhere while another endpoint can take them.
    pub fn mark_draining(&self) {
        let first = self.drain_signal.swap(millis_since_epoch(Instant::now()) + 1, Ordering::Relaxed) == 0;
        if first {
            tracing::debug!(endpoint = %self.addr, "Endpoint going away");
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// How long an idle connection may stay pooled: our idle timeout, kept below what the endpoint
    /// advertised, so Ebb never sends on a connection the server is closing at that moment.
    fn idle_timeout(&self) -> std::time::Duration {
        match self.keepalive_hint.load(Ordering::Relaxed) {
            0 => self.cfg.idle_timeout,
            ms => {
                let hint = std::time::Duration::from_millis(ms);
                // A second's margin, or half the hint when that is shorter.
                let margin = std::time::Duration::from_secs(1).min(hint / 2);
                self.cfg.idle_timeout.min(hint - margin)
            }
        }
    }

    /// Reads what an HTTP/1.1 response says of the connection: `Keep-Alive: timeout=N` bounds the
    /// pool's idle time, `Connection: close` means the endpoint is going away. A response framed by
    /// both Transfer-Encoding and Content-Length loses the Content-Length: hyper read the body by its
    /// chunks, and RFC 9112 §6.3 has a proxy remove the length before forwarding (kept, it would
    /// cut the body short for the client, or leave it waiting for bytes that never come).
    fn note_response(&self, res: &mut Response<Incoming>) {
        // One pass over the few response headers, not a hashed lookup for each question.
        let (mut close, mut chunked, mut length) = (false, false, false);
        for (name, value) in res.headers() {
            if name == http::header::TRANSFER_ENCODING {
                chunked = true;
            } else if name == http::header::CONTENT_LENGTH {
                length = true;
            } else if name == http::header::CONNECTION {
                close |= value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            } else if name == crate::http::headers::KEEP_ALIVE {
                let secs = value.to_str().ok().and_then(|v| {
                    v.split(',').find_map(|p| p.trim().strip_prefix("timeout=")?.trim().parse::<u64>().ok())
                });
                if let Some(secs) = secs {
                    self.keepalive_hint.store(secs.saturating_mul(1000), Ordering::Relaxed);
                }
            }
        }
        if close {
            self.mark_draining();
        }
        if chunked && length {
            tracing::debug!(endpoint = %self.addr, "Response had Transfer-Encoding and Content-Length; Content-Length removed");
            res.headers_mut().remove(http::header::CONTENT_LENGTH);
        }
    }

    fn checkout(&self) -> Option<H1> {
        let timeout = self.idle_timeout();
        let mut idle = self.idle.lock().ok()?;
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < timeout && i.tx.is_ready() {
                return Some(i.tx);
            }
        }
        None
    }

    fn checkin(&self, tx: H1) {
        // A connection to an endpoint going away is not pooled: it would only meet the close.
        if !tx.is_ready() || self.signalled_draining(Instant::now(), self.cfg.idle_timeout) {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.cfg.max_idle_per_endpoint {
                idle.push(Idle { tx, since: Instant::now() });
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.idle.lock().map(|i| i.is_empty()).unwrap_or(true) && self.h2_pool().iter().all(|c| c.tx.is_closed())
    }

    fn reap(&self) {
        let timeout = self.idle_timeout();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|i| i.since.elapsed() < timeout && i.tx.is_ready());
        }
        // The oldest HTTP/2 connection stays, as the single one did before there was a pool; one opened
        // for a burst goes once a whole reap interval passed without a stream claimed on it. Dropping
        // its sender lets hyper close it after its last stream.
        let mut pool = self.h2_pool();
        pool.retain(|c| !c.tx.is_closed());
        let mut first = true;
        pool.retain(|c| {
            std::mem::take(&mut first)
                || c.streams.open.load(Ordering::Acquire) > 0
                || c.streams.used.swap(false, Ordering::Relaxed)
        });
    }

    fn h2_pool(&self) -> std::sync::MutexGuard<'_, Vec<H2Conn>> {
        // A panic while holding it cannot leave the list half-changed (every change is one Vec call).
        match self.h2.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// Opens a TCP connection within the cluster's limits; the returned slot is the connection's
    /// place under `max_connections`, to be held while it is open.
    async fn open(&self, ctx: ConnectCtx<'_>, alpn: Alpn) -> Result<(UpstreamIo, Slot), ProxyError> {
        let slots = ctx.limits.begin().map_err(ProxyError::Overflow)?;
        let mesh = self.mesh_dial(alpn);
        let stream = connect_io(self.addr, ctx.timeout, mesh).await.inspect_err(|e| {
            self.metrics.upstream_connect_errors.inc();
            if let ConnectError::Tls { cause, .. } = e {
                self.metrics.mtls_handshake_error(Direction::Outbound, cause.as_str());
            }
        })?;
        if stream.is_tls() {
            self.metrics.mtls_handshake(Direction::Outbound);
        }
        drop(slots.pending);
        Ok((stream, slots.connection))
    }

    async fn connect_h1(&self, ctx: ConnectCtx<'_>) -> Result<H1, ProxyError> {
        let (stream, slot) = self.open(ctx, Alpn::Http1).await?;
        let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(ProxyError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(
            async move {
                let _slot = slot;
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "Upstream connection ended");
                }
            }
            .instrument(tracing::debug_span!(parent: None, "upstream", server.addr = %addr, protocol = "http1")),
        );
        Ok(tx)
    }

    /// A sender and a claimed stream on a connection with one free, opening a connection if none has.
    async fn h2_sender(self: &Arc<Self>, ctx: ConnectCtx<'_>) -> Result<(H2, Slot), ProxyError> {
        match self.claim_h2() {
            Some(claimed) => Ok(claimed),
            // Boxed: the connect and handshake futures are large, and every request's future would
            // carry (and move) their space even though few requests ever connect.
            None => Box::pin(self.connect_h2(ctx)).await,
        }
    }

    fn claim_h2(&self) -> Option<(H2, Slot)> {
        self.h2_pool().iter().find_map(H2Conn::claim)
    }

    async fn connect_h2(self: &Arc<Self>, ctx: ConnectCtx<'_>) -> Result<(H2, Slot), ProxyError> {
        // One connect at a time, so a burst of streams shares one new connection (and streams freed
        // meanwhile are used first).
        let _connecting = self.h2_connecting.lock().await;
        if let Some(claimed) = self.claim_h2() {
            return Ok(claimed);
        }
        let (stream, slot) = self.open(ctx, Alpn::Http2).await?;
        // h2's connection, each request's wait for its response and each request body's pipe run
        // inside the driver's task (see `http::inline`).
        let (exec, tasks) = Tasks::new();
        let (tx, conn) = http2::Builder::new(exec)
            .timer(TokioTimer::new())
            // Flow control per stream, not per connection: see the constants. No adaptive window, which
            // would let one fast stream's window grow past what the connection window was sized for.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .adaptive_window(false)
            // A dead upstream connection is noticed by PINGs, not by the next request timing out.
            .keep_alive_interval(crate::config::DownstreamConfig::enabled(self.cfg.http2_keepalive_interval))
            .keep_alive_timeout(self.cfg.http2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ProxyError::Handshake)?;
        let streams = Arc::new(H2Streams { open: Arc::new(AtomicUsize::new(0)), used: AtomicBool::new(false) });
        let driver = Arc::new(Mutex::new(Some(Box::pin(conn))));
        let addr = self.addr;
        let ended = Ended { endpoint: Arc::downgrade(self), streams: streams.clone(), _slot: slot };
        tokio::spawn(
            drive_h2(driver.clone(), tasks, ended)
                .instrument(tracing::debug_span!(parent: None, "upstream", server.addr = %addr, protocol = "http2")),
        );
        let pooled = H2Conn { tx, streams, driver };
        let claimed = pooled.claim_first();
        self.h2_pool().push(pooled);
        Ok(claimed)
    }

    /// Drops the connection `claim` (a stream slot) is on from the pool, so requests go elsewhere or to
    /// a new one.
    fn forget_h2(&self, claim: &Slot) {
        self.h2_pool().retain(|c| !claim.counts_on(&c.streams.open));
    }
}

/// What happens when an upstream HTTP/2 connection stops taking requests.
struct Ended {
    endpoint: std::sync::Weak<Endpoint>,
    streams: Arc<H2Streams>,
    /// The connection's place under its cluster's `max_connections`.
    _slot: Slot,
}

impl Ended {
    /// A connection still in the pool when it stopped taking requests was ended by the endpoint. If
    /// it ended gracefully (a GOAWAY), the endpoint is going away; if it failed (reset, killed, no PING
    /// answer), it is the breaker's business, not a drain. One the pool dropped ended because Ebb let
    /// it go.
    fn run(&self, graceful: bool) {
        let Some(ep) = self.endpoint.upgrade() else { return };
        let mut pool = ep.h2_pool();
        let before = pool.len();
        pool.retain(|c| !Arc::ptr_eq(&c.streams, &self.streams));
        let was_pooled = pool.len() != before;
        drop(pool);
        if was_pooled && graceful {
            ep.mark_draining();
        }
    }
}

/// Drives an upstream HTTP/2 connection's requests to h2 until it stops taking them (hyper ends this
/// part at a GOAWAY), then drops the driver: that is what hands requests still queued in it back
/// unsent and marks the senders closed. Runs what hyper started for the connection (h2's connection
/// itself, the streams) until that ends too; the connection's slot under `max_connections` is held
/// until then, while its socket is open.
async fn drive_h2(driver: SharedDriver, mut tasks: Tasks, ended: Ended) {
    let mut taking = true;
    std::future::poll_fn(|cx| {
        if taking {
            // Only `H2Conn::limit` shares the lock, for a read; a panic cannot leave the driver
            // half-changed.
            let mut slot = match driver.lock() {
                Ok(d) => d,
                Err(p) => p.into_inner(),
            };
            let polled = match slot.as_mut() {
                Some(d) => d.as_mut().poll(cx),
                None => Poll::Ready(Ok(())),
            };
            if let Poll::Ready(result) = polled {
                taking = false;
                let done = slot.take();
                // Outside the lock: dropping it answers the queued requests' callbacks.
                drop(slot);
                drop(done);
                ended.run(result.is_ok());
                if let Err(e) = result {
                    tracing::debug!(error = %e, "Upstream connection ended");
                }
            }
        }
        match tasks.poll_run(cx) {
            Poll::Ready(()) if !taking => Poll::Ready(()),
            _ => Poll::Pending,
        }
    })
    .await;
}

/// A downstream connection's view of its upstreams: the HTTP/1.1 connection it used last, kept for
/// its next request (to whichever endpoint that goes to), so the per-request path takes no shared lock
/// while requests keep going to the same endpoint.
#[derive(Debug, Default)]
pub struct Session {
    h1: Mutex<Option<(Arc<Endpoint>, H1)>>,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends an HTTP/1.1 request to `ep`. A request handed back unsent (the pooled connection closed
    /// under it: the keep-alive race) fails as [`ProxyError::Unprocessed`]: it never reached the
    /// upstream, and the retry layer sends it again.
    pub async fn send_h1(
        &self,
        ep: &Arc<Endpoint>,
        req: UpstreamRequest,
        interim: Option<hyper::ext::InterimSender>,
        upgrade: bool,
        ctx: ConnectCtx<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut tx = match self.take_h1(ep).await {
            Some(tx) => tx,
            // Boxed for the same reason as `connect_h2`: the fast path stays small.
            None => Box::pin(ep.connect_h1(ctx)).await?,
        };
        let mut res = match tx.try_send_request_relaying(*req, interim).await {
            Ok(res) => res,
            Err(mut e) => {
                return Err(match e.take_message() {
                    Some(_unsent) => {
                        tracing::debug!(error = %e.error(), "Pooled connection closed before the request");
                        ProxyError::Unprocessed(e.into_error())
                    }
                    None => ProxyError::Upstream(e.into_error()),
                })
            }
        };
        ep.note_response(&mut res);
        if !upgrade {
            if let Ok(mut slot) = self.h1.lock() {
                *slot = Some((ep.clone(), tx));
            }
        }
        Ok(res)
    }

    /// Hands the connection kept for this client back to its endpoint's pool (where
    /// `upstream.idle_timeout` applies): called once the client has gone quiet, so that an idle
    /// client does not pin an upstream connection, and its memory, for as long as it stays connected.
    pub fn release_idle(&self) {
        let kept = self.h1.lock().ok().and_then(|mut s| s.take());
        if let Some((owner, tx)) = kept {
            owner.checkin(tx);
        }
    }

    /// The connection used last if it went to `ep` and is free again; else one from `ep`'s pool (the
    /// last one goes back to its own endpoint's pool).
    async fn take_h1(&self, ep: &Arc<Endpoint>) -> Option<H1> {
        let cached = self.h1.lock().ok().and_then(|mut s| s.take());
        if let Some((owner, mut tx)) = cached {
            if Arc::ptr_eq(&owner, ep) {
                // Ready once the previous response has been read whole; an error means it closed.
                if tx.ready().await.is_ok() {
                    return Some(tx);
                }
            } else {
                owner.checkin(tx);
            }
        }
        ep.checkout()
    }

    /// Sends an HTTP/2 request on a stream of one of `ep`'s shared connections (a new one when all
    /// are at their stream limit). A request the connection hands back unsent (it is going away)
    /// fails as [`ProxyError::Unprocessed`] and marks the endpoint draining. The response carries the
    /// stream's slot under the connection's stream limit, to be held until the response body ends.
    pub async fn send_h2(
        &self,
        ep: &Arc<Endpoint>,
        req: UpstreamRequest,
        interim: Option<hyper::ext::InterimSender>,
        ctx: ConnectCtx<'_>,
    ) -> Result<(Response<Incoming>, Slot), ProxyError> {
        let (mut tx, mut claim) = ep.h2_sender(ctx).await?;
        if tx.ready().await.is_err() {
            ep.forget_h2(&claim);
            (tx, claim) = ep.h2_sender(ctx).await?;
            tx.ready().await.map_err(ProxyError::Upstream)?;
        }
        match tx.try_send_request_relaying(*req, interim).await {
            Ok(res) => Ok((res, claim)),
            Err(mut e) => match e.take_message() {
                Some(_unsent) => {
                    tracing::debug!(error = %e.error(), "Upstream HTTP/2 connection going away");
                    ep.forget_h2(&claim);
                    ep.mark_draining();
                    Err(ProxyError::Unprocessed(e.into_error()))
                }
                None => Err(ProxyError::Upstream(e.into_error())),
            },
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((ep, tx)) = self.h1.get_mut().ok().and_then(|s| s.take()) {
            ep.checkin(tx);
        }
    }
}
