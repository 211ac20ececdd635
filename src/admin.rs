//! Ebb's own HTTP endpoints: admin (loopback only: status, connections, drain, config), telemetry
//! (`/metrics`) and health (`/healthz/live`, `/healthz/ready`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::Config;
use crate::conntrack::{ConnTrack, Counts};
use crate::drain::{Drain, Phase, Scope, Trigger};

/// Which endpoint a server is; each serves a subset of the routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Telemetry,
    Health,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Telemetry => "telemetry",
            Self::Health => "health",
        }
    }
}

/// A listener as reported by `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerView {
    pub name: String,
    pub direction: crate::domain::Direction,
    pub addr: SocketAddr,
    pub target: String,
}

/// What the endpoints read.
#[derive(Debug)]
pub struct State {
    pub drain: Arc<Drain>,
    pub track: Arc<ConnTrack>,
    /// Clusters and their endpoints, for `/status` and the endpoint gauges.
    pub clusters: Arc<crate::upstream::cluster::Clusters>,
    /// The control plane connection, when one is configured.
    pub plane: std::sync::OnceLock<Arc<crate::control::sidecar::PlaneStatus>>,
    pub config: Config,
    pub ready: AtomicBool,
    pub listeners: std::sync::Mutex<Vec<ListenerView>>,
    pub started: tokio::time::Instant,
    /// Open `GET /drain?watch=1` streams; the process waits for them before it exits.
    pub watchers: AtomicUsize,
    /// This workload's mesh identity, if it has one.
    pub identity: Option<Arc<crate::tls::identity::Identity>>,
}

/// The mesh identity as `/status` shows it.
#[derive(Serialize)]
struct IdentityView {
    id: String,
    serial: String,
    expires_at: String,
    seconds_to_expiry: i64,
    trust_bundle: Vec<String>,
    inbound_mtls: &'static str,
}

#[derive(Serialize)]
struct Status {
    state: &'static str,
    ready: bool,
    version: &'static str,
    uptime_ms: u64,
    listeners: Vec<ListenerView>,
    counts: Counts,
    /// Configured clusters with each endpoint's state and outstanding requests.
    clusters: Vec<crate::upstream::cluster::ClusterView>,
    /// The control plane connection; absent in static mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    control_plane: Option<crate::control::sidecar::PlaneView>,
    /// The mesh identity; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<IdentityView>,
    drain: Option<crate::drain::Report>,
}

impl State {
    /// Ready only once started and serving (docs/architecture.md §4).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
            && self.drain.view().phase == Phase::Serving
            && self.plane.get().is_none_or(|p| p.ready())
    }

    fn state_name(&self) -> &'static str {
        if !self.ready.load(Relaxed) {
            "starting"
        } else if self.plane.get().is_some_and(|p| !p.ready()) {
            "waiting for the first config from the control plane"
        } else {
            self.drain.view().phase.as_str()
        }
    }
}

type AdminBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Serves one endpoint until the process exits.
pub async fn run(role: Role, socket: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE repeats at once while the connection stays queued: pause, and say it once a
                // second, not fifty times.
                static ACCEPT_LOG: crate::telemetry::ratelimit::LogLimit = crate::telemetry::ratelimit::LogLimit::new(
                    "admin accept failed",
                    crate::telemetry::ratelimit::INTERVAL,
                );
                if let Some(suppressed) = ACCEPT_LOG.check() {
                    tracing::warn!(role = role.as_str(), error = %e, suppressed, "Admin accept failed");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.clone();
        let span = tracing::debug_span!("admin", role = role.as_str(), client.addr = %peer);
        tokio::spawn(
            async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(role, &state, req).await) }
                });
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new());
                if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                    tracing::debug!(error = %e, "Admin connection ended");
                }
            }
            .instrument(span),
        );
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut r = Response::new(http_body_util::Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<AdminBody> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = text(status, body);
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

async fn route(role: Role, state: &Arc<State>, req: Request<Incoming>) -> Response<AdminBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let admin = role == Role::Admin;
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz/live") if role != Role::Telemetry => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/healthz/ready") | (&Method::GET, "/ready") if role != Role::Telemetry => {
            if state.is_ready() {
                match state.plane.get() {
                    Some(p) => text(StatusCode::OK, format!("ready ({})\n", p.readiness_note())),
                    None => text(StatusCode::OK, "ready\n"),
                }
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", state.state_name()))
            }
        }
        (&Method::GET, "/metrics") if role != Role::Health => {
            state.clusters.refresh_metrics();
            let mut r = text(StatusCode::OK, state.track.metrics().render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/status") if admin => {
            let view = state.drain.view();
            let status = Status {
                state: state.state_name(),
                ready: state.is_ready(),
                version: env!("CARGO_PKG_VERSION"),
                uptime_ms: state.started.elapsed().as_millis() as u64,
                listeners: state.listeners.lock().map(|l| l.clone()).unwrap_or_default(),
                counts: state.track.counts(),
                clusters: state.clusters.views(),
                control_plane: state.plane.get().map(|p| p.view()),
                identity: state.identity.as_ref().map(|i| {
                    let l = i.current();
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(l.info.not_after.max(0) as u64);
                    IdentityView {
                        id: l.info.id.clone(),
                        serial: l.info.serial.clone(),
                        expires_at: humantime::format_rfc3339_seconds(at).to_string(),
                        seconds_to_expiry: l.seconds_to_expiry(),
                        trust_bundle: l.bundle_subjects.clone(),
                        inbound_mtls: state.config.inbound.mtls.as_str(),
                    }
                }),
                drain: (view.phase > Phase::Serving).then(|| state.drain.report()),
            };
            json(StatusCode::OK, &status)
        }
        (&Method::GET, "/connections") if admin => json(StatusCode::OK, &state.track.snapshot()),
        (&Method::GET, "/config_dump") if admin => json(StatusCode::OK, &state.config),
        (&Method::GET, "/drain") if admin => {
            if param(&query, "watch").is_some_and(|v| v != "0" && v != "false") {
                watch_drain(state.clone())
            } else {
                json(StatusCode::OK, &state.drain.report())
            }
        }
        (&Method::POST, "/drain") if admin => post_drain(state, &query, req).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// `POST /drain` parameters, as query string or JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainParams {
    timeout: Option<String>,
    scope: Option<String>,
    #[serde(default)]
    now: bool,
    #[serde(default)]
    exit: bool,
}

/// The drain a `POST /drain` asks for: its query string (which wins) and its JSON body, checked. The
/// error is the client's, as the 400's text.
pub fn drain_trigger(query: &str, body: &[u8]) -> Result<Trigger, String> {
    let mut p: DrainParams = if body.iter().all(u8::is_ascii_whitespace) {
        DrainParams::default()
    } else {
        serde_json::from_slice(body).map_err(|e| format!("bad drain request: {e}"))?
    };
    if let Some(t) = param(query, "timeout") {
        p.timeout = Some(t.to_string());
    }
    if let Some(s) = param(query, "scope") {
        p.scope = Some(s.to_string());
    }
    if param(query, "now").is_some_and(|v| v != "0" && v != "false") {
        p.now = true;
    }
    if param(query, "exit").is_some_and(|v| v != "0" && v != "false") {
        p.exit = true;
    }
    let timeout =
        p.timeout.as_deref().map(humantime::parse_duration).transpose().map_err(|e| format!("timeout: {e}"))?;
    let scope = p.scope.as_deref().map(str::parse::<Scope>).transpose().map_err(|e| format!("scope: {e}"))?;
    Ok(Trigger { timeout, scope, now: p.now, exit: p.exit, ..Trigger::new("admin") })
}

async fn post_drain(state: &Arc<State>, query: &str, req: Request<Incoming>) -> Response<AdminBody> {
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n")),
    };
    let trigger = match drain_trigger(query, &body) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match state.drain.trigger_applied(trigger).await {
        Ok(()) => json(StatusCode::ACCEPTED, &state.drain.report()),
        Err(e @ crate::drain::TriggerError::TimeoutOutOfRange) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// A body fed from a channel, for streamed progress.
struct ChannelBody(mpsc::Receiver<Bytes>, Option<WatcherGuard>);

struct WatcherGuard(Arc<State>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Relaxed);
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                self.1 = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Streams the drain report as NDJSON, a line every 250 ms, until drained; the last line is final.
fn watch_drain(state: Arc<State>) -> Response<AdminBody> {
    let (tx, rx) = mpsc::channel(4);
    state.watchers.fetch_add(1, Relaxed);
    let guard = WatcherGuard(state.clone());
    tokio::spawn(async move {
        loop {
            let report = state.drain.report();
            let done = report.phase == Phase::Drained;
            let mut line = serde_json::to_vec(&report).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() || done {
                return;
            }
            // The drain as a whole, not one direction: after an inbound drain, the exit that follows
            // drains outbound and this stream follows it to the end.
            let _ = tokio::time::timeout(Duration::from_millis(250), state.drain.drained()).await;
        }
    });
    let mut r = Response::new(ChannelBody(rx, Some(guard)).boxed_unsync());
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-ndjson"));
    r
}
