//! Serves one client connection as HTTP/1.1 or HTTP/2 through hyper, and is the only place that asks a
//! connection to shut down: it watches the drain and acts per phase (docs/architecture.md §4). It checks
//! and cleans each request (validation, hop-by-hop headers, the hop list) and hands it to a tower
//! `Service`; where that sends it (clusters, retries, the upstream protocol) is not its concern.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::DownstreamConfig;
use crate::conntrack::activity::Part;
use crate::conntrack::{ConnHandle, ConnState, RequestGuard, StreamActivity};
use crate::domain::Protocol;
use crate::drain::{Drain, Phase, Watch, FORCE_GRACE};
use crate::http::body::{ProxyBody, RequestBody};
use crate::http::client::{Session, UpstreamRequest};
use crate::http::error::ProxyError;
use crate::http::headers::{strip_hop_by_hop, upgrade_was_offered, HeadScan};
use crate::http::policy::RequestPolicy;
use crate::telemetry::metrics::{Metrics, ProtoMetrics};
use crate::telemetry::ratelimit::{LogLimit, INTERVAL};
use crate::transport::idle::Idleness;
use crate::transport::stream::Downstream;

/// What every client connection of the proxy shares.
#[derive(Debug)]
pub struct Env {
    pub drain: Arc<Drain>,
    pub metrics: Arc<Metrics>,
    /// Idle timeouts and keep-alive for client connections.
    pub downstream: DownstreamConfig,
    /// Hop header and error detail (the instance's, shared by its connections).
    pub policy: Arc<RequestPolicy>,
}

/// Where a connection's requests go: a tower service over boxed `http::Request`s (the upstream stack),
/// and the session whose kept upstream connection goes back to its pool once the client is quiet.
pub struct Upstream<S> {
    pub service: S,
    pub session: Option<Arc<Session>>,
    /// `inbound.authorization` refuses this connection's caller (named here): every request gets 403.
    pub denied: Option<Arc<str>>,
}

/// What [`serve`] needs of the service it sends requests to.
pub trait RequestService:
    tower::Service<UpstreamRequest, Response = Response<ProxyBody>, Error = ProxyError, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> RequestService for S where
    S: tower::Service<UpstreamRequest, Response = Response<ProxyBody>, Error = ProxyError, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// What every request on one connection shares.
struct Shared<S> {
    conn: Arc<ConnHandle>,
    service: S,
    session: Option<Arc<Session>>,
    drain: Arc<Drain>,
    watch: Watch,
    metrics: ProtoMetrics,
    all_metrics: Arc<Metrics>,
    h2: bool,
    /// Hop header and error detail (the instance's, shared by its connections).
    policy: Arc<RequestPolicy>,
    /// The drain deadline as this connection's requests see it.
    deadline: DeadlineSignal,
    /// The caller `inbound.authorization` refuses, if it does.
    denied: Option<Arc<str>>,
    /// `downstream.upgrade_idle_timeout`, if on.
    upgrade_idle: Option<Duration>,
    /// `downstream.stream_idle_timeout`, if on.
    stream_idle: Option<Duration>,
}

/// The drain deadline for one connection's requests and response bodies, set by the connection's
/// `drive` loop when its drain reaches the deadline phase. A flag and a `Notify` per connection
/// instead of a drain watch per request: cloning a watch receiver and waiting on it was ~4 % of an
/// HTTP/1.1 request's instructions (BENCHMARKS.md, issue 13).
#[derive(Debug, Default)]
struct DeadlineSignal {
    reached: AtomicBool,
    notify: Notify,
}

impl DeadlineSignal {
    fn fire(&self) {
        self.reached.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Resolves once the deadline is reached (at once if it already was).
    async fn wait(&self) {
        // A `Notified` hears `notify_waiters` from its creation on, polled or not: no wake-up is lost
        // between this check and the first poll.
        let notified = self.notify.notified();
        if self.reached.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// Serves a detected HTTP connection until it closes, is drained, or is forced closed at the deadline.
pub async fn serve<S: RequestService>(
    io: Downstream,
    protocol: Protocol,
    conn: Arc<ConnHandle>,
    upstream: Upstream<S>,
    env: &Env,
) {
    let Env { drain, metrics: all_metrics, downstream, policy } = env;
    let drain = drain.clone();
    let watch = drain.watch(conn.direction);
    let h2 = protocol == Protocol::Http2;
    let metrics = all_metrics.proto(conn.direction, protocol).clone();
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        service: upstream.service,
        session: upstream.session,
        drain: drain.clone(),
        watch: watch.clone(),
        metrics,
        all_metrics: all_metrics.clone(),
        h2,
        policy: policy.clone(),
        deadline: DeadlineSignal::default(),
        denied: upstream.denied,
        upgrade_idle: DownstreamConfig::enabled(downstream.upgrade_idle_timeout),
        stream_idle: DownstreamConfig::enabled(downstream.stream_idle_timeout),
    });
    let driven = shared.clone();
    let svc = service_fn(move |req| proxy(shared.clone(), req));
    conn.set_state(ConnState::Serving);
    let io = TokioIo::new(io);
    if h2 {
        // Each stream runs inside this connection's task (see `http::inline`).
        let (exec, tasks) = crate::http::inline::Tasks::new();
        let mut builder = hyper::server::conn::http2::Builder::new(exec);
        builder.timer(TokioTimer::new());
        // Flow control as on the upstream side (http/client.rs): a request body the upstream is slow to
        // take holds one stream window in Ebb and stops that stream only. The connection window holds
        // every stream the client may open, so even all of them stalled leave nothing else waiting
        // (with 200 streams and a window of 64, 64 stalled uploads stopped the client's others), and
        // it bounds what one connection can make Ebb buffer: 16 MiB. No adaptive window: it would
        // grow a stream past that bound.
        const STREAM_WINDOW: u32 = 128 * 1024;
        const MAX_STREAMS: u32 = 128;
        builder
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(MAX_STREAMS * STREAM_WINDOW)
            .adaptive_window(false)
            // Response bytes held per stream beyond what the client's window lets out: a client that
            // stops reading pins this much plus the upstream stream window, not the whole body.
            .max_send_buf_size(STREAM_WINDOW as usize)
            // A client wanting more opens another connection (gRPC clients queue calls past it), and
            // the upstream pool spreads them in any case.
            .max_concurrent_streams(MAX_STREAMS)
            // A client Ebb multiplexes many apps' requests on one connection and resets a stream
            // whenever its app gives up on it; h2's default (20 streams reset before this side
            // accepted them) then ends the shared connection with ENHANCE_YOUR_CALM for everyone.
            // As many as may be open at once still bounds a rapid-reset flood.
            .max_pending_accept_reset_streams(MAX_STREAMS as usize);
        // PINGs find a client that vanished without a FIN (a node gone, a NAT entry dropped), which
        // would otherwise hold its connection and streams until the idle timeout.
        if let Some(interval) = DownstreamConfig::enabled(downstream.http2_keepalive_interval) {
            builder.keep_alive_interval(interval).keep_alive_timeout(downstream.http2_keepalive_timeout);
        }
        let c = crate::http::inline::WithTasks::new(builder.serve_connection(io, svc), tasks);
        let idle = DownstreamConfig::enabled(downstream.http2_idle_timeout);
        drive(Box::pin(c), Driven::of(&driven), idle).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        // No hyper header timeout (30 s unless turned off): it arms a timer each time hyper waits for
        // a request head, on every keep-alive request (~2 % of a request's instructions, BENCHMARKS.md
        // issue 13). `drive` closes idle connections gracefully at the idle timeout and then gives a
        // client trickling a request head half that again before closing it (see `drive`).
        let idle = DownstreamConfig::enabled(downstream.http1_idle_timeout);
        builder.header_read_timeout(None);
        let c = builder.serve_connection(io, svc).with_upgrades();
        drive(Box::pin(c), Driven::of(&driven), idle).await;
    }
}

/// A hyper connection that can be asked to finish gracefully.
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn shutdown(self: Pin<&mut Self>);
}

impl<I, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    hyper::server::conn::http2::Connection<I, S, E>: std::future::Future<Output = Result<(), hyper::Error>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<C: Graceful> Graceful for crate::http::inline::WithTasks<C> {
    fn shutdown(self: Pin<&mut Self>) {
        self.conn().shutdown();
    }
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    hyper::server::conn::http1::UpgradeableConnection<I, S>: std::future::Future<Output = Result<(), hyper::Error>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Whether a connection has been idle (no request in flight, none finished) for its timeout, looked
/// at on the coarse tick of `transport::idle`.
struct IdleCheck {
    idleness: Idleness,
    next: Instant,
}

impl IdleCheck {
    fn new(idle: Duration) -> Self {
        let idleness = Idleness::new(idle);
        let next = crate::clock::after(idleness.tick());
        Self { idleness, next }
    }

    /// At a tick: true once the connection has been idle for the timeout.
    fn expired(&mut self, conn: &ConnHandle) -> bool {
        self.next = crate::clock::after(self.idleness.tick());
        self.idleness.expired(conn.requests_done(), conn.in_flight() > 0)
    }

    /// After `expired`: the connection has been quiet for a whole tick.
    fn quiet(&self) -> bool {
        self.idleness.quiet()
    }

    fn timeout(&self) -> Duration {
        self.idleness.timeout()
    }
}

/// One client connection as [`drive`] acts on it.
struct Driven<'a> {
    conn: &'a Arc<ConnHandle>,
    /// The connection's upstream session, whose kept HTTP/1.1 connection goes back to the pool once
    /// the client is quiet (none in tests that drive hyper alone).
    session: Option<&'a Session>,
    drain: &'a Arc<Drain>,
    all_metrics: &'a Metrics,
    watch: Watch,
    /// Set when the drain reaches its deadline, for the connection's requests.
    deadline: &'a DeadlineSignal,
    h2: bool,
    /// `downstream.stream_idle_timeout`, if on.
    stream_idle: Option<Duration>,
}

impl<'a> Driven<'a> {
    fn of<S>(shared: &'a Shared<S>) -> Self {
        Self {
            conn: &shared.conn,
            session: shared.session.as_deref(),
            drain: &shared.drain,
            all_metrics: &shared.all_metrics,
            watch: shared.watch.clone(),
            deadline: &shared.deadline,
            h2: shared.h2,
            stream_idle: shared.stream_idle,
        }
    }
}

/// Polls the connection to its end while acting on drain phases, and closes it gracefully (HTTP/2:
/// GOAWAY; HTTP/1.1: closed between requests) once it has been idle for `idle`.
///
/// The connection comes boxed: this future then holds a pointer, not hyper's connection state (1.6 KB
/// for HTTP/2) twice over, once as the argument and once pinned, which every connection's task paid
/// for while idle (BENCHMARKS.md, issue 13).
async fn drive<C: Graceful>(mut c: Pin<Box<C>>, driven: Driven<'_>, idle: Option<Duration>) {
    let Driven { conn, session, drain, all_metrics, mut watch, deadline, h2, stream_idle } = driven;
    let mut idle = idle.map(IdleCheck::new);
    // Streams are looked at on their own coarse tick, a quarter of their timeout (`Idleness`'s way),
    // so a stalled one ends between one and one and a quarter timeouts after it last moved.
    let stream_tick = stream_idle.map(|t| (t / 4).max(Duration::from_millis(1)));
    let mut stream_check = stream_tick.map(crate::clock::after);
    let metrics = &all_metrics.drain;
    let mut seen = Phase::Serving;
    let mut phase = watch.phase();
    let mut announced = false;
    let mut shut = false;
    let mut idle_close: Option<Instant> = None;
    let mut force_at: Option<Instant> = None;
    // HTTP/1.1 after this side asked to close: hyper still waits for a request head it has begun to
    // read, and a client trickling one is closed at this time (half the idle timeout after an idle
    // close; an idle timeout and a half after a drain's).
    let mut give_up: Option<Instant> = None;
    let mut sent_at_close = 0;
    loop {
        // Act on every phase up to the current one (a drain may jump straight to the deadline).
        if phase > seen {
            if phase >= Phase::Announcing && !announced {
                announced = true;
                conn.mark_told_to_go();
                if h2 {
                    // hyper sends GOAWAY(2^31-1) and a PING, then the GOAWAY with the real last stream.
                    c.as_mut().shutdown();
                    shut = true;
                    metrics.goaway_sent.inc();
                    tracing::debug!(target: "ebb::trace", "GOAWAY sent");
                }
            }
            // A connection that has not finished a request yet (one taken from the accept queue as the
            // listener closed) is not idle: its first request is on its way and will be answered with
            // `Connection: close`; closing it now would drop that request.
            let fresh = conn.requests_done() == 0;
            if phase >= Phase::Closing && !h2 && !shut && idle_close.is_none() && !fresh {
                // Capped as validation caps it (a config built in code skips that): `now + jitter` must not overflow.
                let window = drain.config().idle_close_window.min(crate::config::MAX_DRAIN_TIMEOUT);
                let jitter = if conn.in_flight() > 0 || window.is_zero() {
                    Duration::ZERO
                } else {
                    window.mul_f64(fastrand::f64())
                };
                idle_close = Some(Instant::now() + jitter);
            }
            if phase >= Phase::Deadline && force_at.is_none() {
                deadline.fire();
                if !shut {
                    c.as_mut().shutdown();
                    shut = true;
                }
                force_at = Some(Instant::now() + FORCE_GRACE);
            }
            seen = phase;
        }
        let idle_at = idle.as_ref().filter(|_| !shut).map(|i| i.next);
        let tick_at = match (idle_at, stream_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            res = c.as_mut() => {
                match res {
                    Ok(()) => tracing::debug!("Connection closed"),
                    Err(e) if e.is_canceled() || e.is_incomplete_message() || is_benign(&e) => {
                        tracing::debug!(error = %e, "Connection ended")
                    }
                    Err(e) => {
                        // The client's doing (a malformed request, a protocol error), once per connection:
                        // counted, and logged where a flood of them cannot fill the log.
                        all_metrics.downstream_errors.inc();
                        tracing::debug!(error = %e, "Connection error");
                    }
                }
                return;
            }
            // One timer for both coarse ticks: a select branch's sleep is polled each time the
            // connection wakes, so a second one cost ~160 instructions per HTTP/1.1 request.
            _ = crate::clock::sleep_until_opt(tick_at), if tick_at.is_some() => {
                let now = Instant::now();
                if stream_check.is_some_and(|at| at <= now) {
                    stream_check = stream_tick.map(crate::clock::after);
                    let (marked, stuck) = conn.expire_idle_streams(stream_idle.unwrap_or_default());
                    for _ in 0..marked {
                        all_metrics.stream_idle_timeout(h2);
                    }
                    // HTTP/1.1 carries one stream: one that flow control keeps from ending (a client
                    // that stopped reading) ends with its connection. HTTP/2 cannot end one stream
                    // from here.
                    if stuck && !h2 {
                        tracing::debug!("Stream idle and not ending; closing the connection");
                        return;
                    }
                }
                if idle_at.is_some_and(|at| at <= now) {
                    let expired = idle.as_mut().is_some_and(|i| i.expired(conn));
                    // Quiet for a tick: the upstream connection kept for this client goes back to the
                    // pool, where `upstream.idle_timeout` closes it; the next request takes one from
                    // there.
                    if let (Some(session), true) = (session, idle.as_ref().is_some_and(IdleCheck::quiet)) {
                        session.release_idle();
                    }
                    if expired {
                        let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
                        all_metrics.idle_timeout(protocol);
                        tracing::debug!("Idle timeout; closing");
                        c.as_mut().shutdown();
                        shut = true;
                        if !h2 {
                            give_up = idle.as_ref().map(|i| Instant::now() + i.timeout() / 2);
                            sent_at_close = conn.conn().bytes_out.load(Ordering::Relaxed);
                        }
                    }
                }
            }
            p = watch.next(seen), if seen < Phase::Deadline => phase = p,
            _ = crate::clock::sleep_until_opt(idle_close), if idle_close.is_some() && !shut => {
                if conn.in_flight() == 0 {
                    metrics.idle_closes.inc();
                }
                c.as_mut().shutdown();
                shut = true;
                give_up = idle.as_ref().map(|i| Instant::now() + i.timeout() + i.timeout() / 2);
                sent_at_close = conn.conn().bytes_out.load(Ordering::Relaxed);
            }
            _ = crate::clock::sleep_until_opt(give_up), if give_up.is_some() => {
                // Not while a request is being answered or a last response is still going out to a
                // slow reader: hyper closes once that is done.
                let sent = conn.conn().bytes_out.load(Ordering::Relaxed);
                if conn.in_flight() == 0 && sent == sent_at_close {
                    tracing::debug!("Request head still incomplete after the close; closing");
                    return;
                }
                give_up = None;
            }
            _ = crate::clock::sleep_until_opt(force_at), if force_at.is_some() => {
                drain.record_forced(conn);
                return;
            }
        }
    }
}

fn is_benign(e: &hyper::Error) -> bool {
    crate::http::error::source_of::<std::io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
        )
    })
}

/// Proxies one request; every failure becomes a response (see `http::error`).
///
/// Everything up to the send runs before the future is made, and the future is one async block: the
/// request head (about 270 bytes) then has one home in it, where an `async fn` around an instrumented
/// block kept three, and the future is small to move into hyper's per-stream task (BENCHMARKS.md,
/// issue 13).
fn proxy<S: RequestService>(
    shared: Arc<Shared<S>>,
    mut req: Request<Incoming>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send {
    let started = Instant::now();
    let guard = shared.conn.request(req.method(), req.uri());
    let activity = guard.activity().clone();
    // Debug level: an enabled span costs a registry slot and field formatting per request (3-6 % of CPU
    // in the benchmark); connection spans stay at info, request spans appear with `ebb=debug`.
    // Attribute names follow OpenTelemetry's HTTP and RPC conventions: the span is also the trace's.
    // Whether the request is traced is decided first: an untraced request's span stays a plain
    // debug span the trace layer never sees, so the sampling ratio is also the tracing cost.
    macro_rules! request_span {
        ($target:expr) => {
            tracing::debug_span!(
                target: $target,
                "request",
                otel.name = %req.method(),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                req.id = guard.id(),
                http.request.method = %req.method(),
                url.path = req.uri().path(),
                network.protocol.version = if shared.h2 { "2" } else { "1.1" },
                client.address = %shared.conn.client.ip(),
                http.response.status_code = tracing::field::Empty,
                rpc.system = tracing::field::Empty,
                rpc.service = tracing::field::Empty,
                rpc.method = tracing::field::Empty,
                rpc.grpc.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            )
        };
    }
    let traced = crate::telemetry::traces::decide(req.headers());
    let span = if traced { request_span!("ebb::otel") } else { request_span!("ebb::http::server") };
    if traced {
        crate::telemetry::traces::continue_from(&span, req.headers());
        if let Some((trace, id)) = crate::telemetry::traces::ids(&span) {
            span.record("trace_id", trace).record("span_id", id);
        }
        req.extensions_mut().insert(crate::telemetry::traces::Traced);
    }
    let head = HeadScan::of(req.headers());
    let grpc = head.grpc;
    if grpc && !span.is_disabled() {
        // `/package.Service/Method`.
        let mut parts = req.uri().path().trim_start_matches('/').splitn(2, '/');
        span.record("rpc.system", "grpc");
        if let (Some(svc), Some(method)) = (parts.next(), parts.next()) {
            span.record("rpc.service", svc).record("rpc.method", method);
        }
    }
    let version = req.version();
    let upgrade = !shared.h2 && head.is_upgrade(req.headers());
    // Boxed: only an upgrade has it, and every request's future (with hyper's stream state) then
    // stays small enough for the allocator's per-thread cache (see `http::inline`).
    let downstream_upgrade = upgrade.then(|| Box::new((hyper::upgrade::on(&mut req), offered_upgrades(req.headers()))));
    let head_request = req.method() == Method::HEAD;
    let outbound = prepare(&shared, req, head, upgrade, &activity);
    // Recorded on by name below: `Span::current()` would cost a subscriber lookup per call, and while
    // the request span is disabled it would hand back the connection's span instead.
    let entered = span.clone();
    async move {
        let res = 'request: {
            let outbound = match outbound {
                Ok(o) => o,
                Err(e) => break 'request fail(&shared, &span, e, grpc, started, guard),
            };
            // Built in place inside the select (no timeout wrapper taking it by value): moving this
            // future showed up as a few percent of CPU on HTTP/2.
            let result = tokio::select! {
                r = send(&shared, outbound) => r,
                _ = shared.deadline.wait() => Err(ProxyError::DrainDeadline),
                _ = std::future::poll_fn(|cx| activity.poll_expired(Part::Response, cx)) => {
                    Err(ProxyError::StreamIdle { client: activity.client_stalled() })
                }
            };
            let mut res = match result {
                Ok(sent) => sent,
                Err(e) => break 'request fail(&shared, &span, e, grpc, started, guard),
            };
            let switching = res.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            if switching {
                match downstream_upgrade.map(|b| *b) {
                    Some((down, offered)) if upgrade_was_offered(&offered, res.headers()) => {
                        splice(shared.clone(), down, &mut res)
                    }
                    // Dropping the 101 closes the upstream connection it switched.
                    _ => break 'request fail(&shared, &span, ProxyError::UpgradeNotOffered, grpc, started, guard),
                }
            }
            shared.metrics.request(res.status().as_u16(), started.elapsed());
            record_status(&span, res.status(), res.headers());
            let (mut parts, body) = res.into_parts();
            // The client's HTTP version, not the upstream's: an HTTP/1.0 origin must not end keep-alive.
            parts.version = version;
            strip_hop_by_hop(&mut parts.headers, upgrade && switching);
            no_content_fields(&mut parts);
            // The request stays in flight until the body ends, not just until the headers arrived.
            let mut body = body.with_guard(guard);
            if head_request || matches!(parts.status, http::StatusCode::NO_CONTENT | http::StatusCode::NOT_MODIFIED) {
                // RFC 9110 §6.4.1: these responses end with their header section. An HTTP/2 upstream
                // can still send DATA; passing it on would make a malformed response on HTTP/2.
                body = body.without_content();
            }
            if grpc && shared.h2 {
                let shared = shared.clone();
                body = body.with_grpc_deadline(async move {
                    shared.deadline.wait().await;
                    shared.drain.record_forced(&shared.conn);
                });
            }
            finish(&shared, Response::from_parts(parts, body))
        };
        Ok(res)
    }
    .instrument(entered)
}

/// A request made ready to go upstream: whole, or (an HTTP/1.1 chunked body, see [`read_ahead`]) still
/// to have its first chunk read.
enum Outbound {
    /// Boxed here, once: the request head (about 270 bytes) then moves as a pointer through this
    /// future and the whole upstream stack (BENCHMARKS.md, issue 13).
    Ready(UpstreamRequest),
    ReadAhead(Box<(http::request::Parts, Incoming, Arc<StreamActivity>)>),
}

/// Checks a request and cleans it for any upstream (see [`validate`], the hop-by-hop headers, the hop
/// list), all before anything is awaited. Fitting it to the upstream hop's protocol is the client
/// side's (`http::hop`).
fn prepare<S>(
    shared: &Shared<S>,
    mut req: Request<Incoming>,
    head: HeadScan,
    upgrade: bool,
    activity: &Arc<StreamActivity>,
) -> Result<Outbound, ProxyError> {
    if let Some(who) = &shared.denied {
        return Err(ProxyError::Unauthorized(who.clone()));
    }
    validate(&req, head, shared.h2)?;
    if head.hop_by_hop {
        strip_hop_by_hop(req.headers_mut(), upgrade);
    }
    if head.underscore {
        crate::http::headers::drop_underscore_aliases(req.headers_mut());
    }
    // After the hop-by-hop headers are gone, so a `Connection` naming it cannot drop the hop list.
    shared.policy.check_hops(req.headers_mut(), shared.conn.direction)?;
    let (parts, body) = req.into_parts();
    // A Content-Length body has no framing of the client's own to get wrong; HTTP/2 frames are h2's.
    if shared.h2 || body.is_end_stream() || body.size_hint().exact().is_some() {
        let body = RequestBody::new(body, None, Some(activity.clone()));
        return Ok(Outbound::Ready(Box::new(Request::from_parts(parts, body))));
    }
    Ok(Outbound::ReadAhead(Box::new((parts, body, activity.clone()))))
}

/// Fields a response must not carry whatever the upstream sent: `Content-Length` on a 204 (RFC 9110
/// §8.6), and `TE`, a request field that `strip_hop_by_hop` keeps only for requests' `TE: trailers`.
fn no_content_fields(parts: &mut http::response::Parts) {
    if parts.status == http::StatusCode::NO_CONTENT {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    if crate::http::headers::has(&parts.headers, &http::header::TE) {
        parts.headers.remove(http::header::TE);
    }
}

/// The request's `Upgrade` values, kept to check the protocol a 101 switches to against them.
fn offered_upgrades(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut offered = http::HeaderMap::new();
    for v in headers.get_all(header::UPGRADE) {
        offered.append(header::UPGRADE, v.clone());
    }
    offered
}

/// Notes a response's status on the request span (for traces): HTTP status, a trailers-only gRPC
/// status, and an error status for 5xx.
fn record_status(span: &tracing::Span, status: http::StatusCode, headers: &http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if let Some(g) = headers
        .get(&crate::http::headers::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
    {
        span.record("rpc.grpc.status_code", i64::from(g));
    }
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// Last touches on a response: during a drain an HTTP/1.1 response carries `Connection: close`, and
/// hyper closes the connection once it is written.
fn finish<S>(shared: &Shared<S>, res: Response<ProxyBody>) -> Response<ProxyBody> {
    close_when_told_to_go(shared.h2, &shared.conn, &shared.all_metrics, res)
}

/// `finish` without the rest of a connection's state, so the drain tests can serve their responses
/// through the one place that adds the header.
fn close_when_told_to_go<B>(h2: bool, conn: &ConnHandle, all_metrics: &Metrics, mut res: Response<B>) -> Response<B> {
    if !h2 && conn.told_to_go() && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        all_metrics.drain.connection_close_sent.inc();
        tracing::debug!(target: "ebb::trace", "connection: close sent (draining)");
    }
    res
}

/// Answers a request that failed with `e`, counted as the client's error or logged as the upstream's.
fn fail<S>(
    shared: &Shared<S>,
    span: &tracing::Span,
    e: ProxyError,
    grpc: bool,
    started: Instant,
    guard: RequestGuard,
) -> Response<ProxyBody> {
    if matches!(e, ProxyError::DrainDeadline) {
        shared.drain.record_forced(&shared.conn);
    }
    match e.client_error() {
        Some(reason) => {
            // Debug: a misbehaving client must not be able to fill the log; the counter shows it.
            shared.all_metrics.client_error(reason);
            tracing::debug!(error = %e, "Request refused");
        }
        None => {
            // An upstream that fails every request must not turn each one into a log line.
            static UPSTREAM_FAILED: LogLimit = LogLimit::new("upstream request failed", INTERVAL);
            if let Some(suppressed) = UPSTREAM_FAILED.check() {
                tracing::info!(error = %e, suppressed, "Upstream request failed");
            }
        }
    }
    let mut res = e.to_response_with(grpc, shared.policy.expose_errors);
    record_status(span, res.status(), res.headers());
    if !shared.h2 && matches!(e, ProxyError::ConnectNotSupported | ProxyError::StreamIdle { client: true }) {
        // A client may send tunnel bytes right after its CONNECT; they are not a next request. A
        // client whose body stalled has left the connection mid-request.
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    shared.metrics.request(res.status().as_u16(), started.elapsed());
    finish(shared, res.map(|b| b.with_guard(guard)))
}

/// How long a chunked request body's first chunk may take to arrive before the request goes upstream
/// without it. Clients write the first chunk with the head or right after, so this costs nothing in
/// practice; it only bounds the wait for a client that streams its body after reading the response.
const READ_AHEAD: Duration = Duration::from_millis(50);

/// Reads a chunked HTTP/1.1 body's first frame before the request goes upstream, so that a body
/// malformed from its first chunk-size line is refused before the upstream connection sees anything
/// (and it stays reusable). A body that goes bad later fails once the request is upstream: hyper then
/// ends that upstream connection, as it holds a partial request.
async fn read_ahead(body: &mut Incoming) -> Result<Option<Frame<Bytes>>, ProxyError> {
    match tokio::time::timeout(READ_AHEAD, body.frame()).await {
        Ok(Some(Ok(frame))) => Ok(Some(frame)),
        Ok(Some(Err(e))) => Err(ProxyError::RequestBody(e)),
        Ok(None) | Err(_) => Ok(None),
    }
}

async fn send<S: RequestService>(shared: &Shared<S>, outbound: Outbound) -> Result<Response<ProxyBody>, ProxyError> {
    use tower::ServiceExt as _;
    let req = match outbound {
        Outbound::Ready(req) => req,
        Outbound::ReadAhead(head) => {
            let (parts, mut body, activity) = *head;
            // Boxed: only a chunked HTTP/1.1 body takes this path, and its timer needs room.
            let first = Box::pin(read_ahead(&mut body)).await?;
            Box::new(Request::from_parts(parts, RequestBody::new(body, first, Some(activity))))
        }
    };
    let mut service = shared.service.clone();
    // The upstream stack is ready at once (it refuses rather than waits), so readiness is asked
    // without a task to wake; a service that said Pending would be driven by the `Oneshot` instead.
    let ready = service.poll_ready(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    match ready {
        std::task::Poll::Ready(Ok(())) => service.call(req).await,
        _ => service.oneshot(req).await,
    }
}

/// Refuses what must not be forwarded: CONNECT (a tunnel would need routing by its authority, which
/// Ebb does not do), and a request whose Host is missing on HTTP/1.1, repeated, or not `host[:port]`
/// (RFC 9112 §3.2 has a server answer those 400; forwarding them lets each hop pick its own reading).
///
/// Also refused (RFC 9113 §8.1.1 forbids forwarding a malformed request): `*` as the target of anything
/// but OPTIONS, an authority whose port is not a port, and on HTTP/2 a value with whitespace at an end.
fn validate(req: &Request<Incoming>, head: HeadScan, h2: bool) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectNotSupported);
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err(ProxyError::AsteriskNotOptions);
    }
    if h2 && head.edge_whitespace {
        return Err(ProxyError::MalformedHeader);
    }
    if req.uri().authority().is_some_and(|a| !crate::http::headers::port_ok(a)) {
        return Err(ProxyError::InvalidHost);
    }
    match head.hosts {
        0 if !h2 && req.version() == Version::HTTP_11 => Err(ProxyError::MissingHost),
        // HTTP/2 carries the authority in `:authority`; HTTP/1.0 may omit Host (one is added upstream).
        0 => Ok(()),
        1 if !head.host_valid => Err(ProxyError::InvalidHost),
        1 => Ok(()),
        _ => Err(ProxyError::DuplicateHost),
    }
}

/// Splices an upgraded connection as bytes once both sides have switched (`res` is the upstream's 101).
/// At the drain deadline a WebSocket is closed between frames with Close 1001 both ways; any other
/// protocol gets a FIN each way after the bytes already read.
fn splice<S: Send + Sync + 'static>(
    shared: Arc<Shared<S>>,
    down: hyper::upgrade::OnUpgrade,
    res: &mut Response<ProxyBody>,
) {
    // The 101's Upgrade names the protocol the server switched to, of those the client offered.
    let websocket = crate::http::websocket::is_websocket(res.headers());
    let up = hyper::upgrade::on(res);
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            use crate::http::websocket::{Flow, FrameTracker};
            use crate::transport::tcp::{relay, Unframed};

            let (down, up) = match tokio::try_join!(down, up) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "Upgrade failed");
                    return;
                }
            };
            shared.conn.set_state(ConnState::Upgraded);
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            let mut watch = shared.watch.clone();
            let deadline = async {
                watch.reached(Phase::Deadline).await;
                shared.drain.record_forced(&shared.conn);
            };
            // Idle like a tunnel: ended as at the deadline (a WebSocket gets Close 1001 each way
            // between frames, then FIN), but not counted as forced.
            let idle = shared.upgrade_idle;
            let relayed = if websocket {
                let (to_up, to_down) = (FrameTracker::new(Flow::ToServer), FrameTracker::new(Flow::ToClient));
                relay(&mut down, &mut up, to_up, to_down, deadline, idle).await
            } else {
                relay(&mut down, &mut up, Unframed, Unframed, deadline, idle).await
            };
            match relayed {
                Ok(r) => {
                    if r.idle {
                        shared.all_metrics.upgrade_idle_timeout(websocket);
                    }
                    tracing::debug!(
                        bytes.up = r.up,
                        bytes.down = r.down,
                        at_deadline = r.at_deadline,
                        idle = r.idle,
                        "Upgrade ended"
                    )
                }
                Err(e) => tracing::debug!(error = %e, "Upgrade ended"),
            }
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests;
