//! Serves one client connection as HTTP/1.1 or HTTP/2 through hyper, and is the only place that asks a
//! connection to shut down: it watches the drain and acts per phase (docs/architecture.md §4).

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::Instrument;

use crate::conntrack::{ConnHandle, ConnState};
use crate::drain::{Drain, Phase, Watch, FORCE_GRACE};
use crate::http::body::ProxyBody;
use crate::http::client::Session;
use crate::http::error::ProxyError;
use crate::http::headers::{is_grpc, is_upgrade, strip_hop_by_hop};
use crate::telemetry::metrics::ProtoMetrics;
use crate::transport::detect::Protocol;
use crate::transport::io::ClientIo;

/// What every request on one connection shares.
struct Shared {
    conn: Arc<ConnHandle>,
    session: Session,
    drain: Arc<Drain>,
    watch: Watch,
    metrics: ProtoMetrics,
    response_timeout: Option<Duration>,
    h2: bool,
}

/// Serves a detected HTTP connection until it closes, is drained, or is forced closed at the deadline.
pub async fn serve(
    io: ClientIo,
    protocol: Protocol,
    conn: Arc<ConnHandle>,
    session: Session,
    drain: Arc<Drain>,
    response_timeout: Option<Duration>,
) {
    let watch = drain.watch(conn.direction);
    let h2 = protocol == Protocol::Http2;
    let metrics = drain.metrics().proto(conn.direction, protocol).clone();
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        session,
        drain: drain.clone(),
        watch: watch.clone(),
        metrics,
        response_timeout,
        h2,
    });
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy(shared, req).await) }
    });
    conn.set_state(ConnState::Serving);
    let io = TokioIo::new(io);
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let c = builder.serve_connection(io, svc);
        drive(c, conn, drain, watch, true).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        let c = builder.serve_connection(io, svc).with_upgrades();
        drive(c, conn, drain, watch, false).await;
    }
}

/// A hyper connection that can be asked to finish gracefully.
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn shutdown(self: std::pin::Pin<&mut Self>);
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
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
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
    fn shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Polls the connection to its end while acting on drain phases.
async fn drive<C: Graceful>(c: C, conn: Arc<ConnHandle>, drain: Arc<Drain>, mut watch: Watch, h2: bool) {
    tokio::pin!(c);
    let metrics = &drain.metrics().drain;
    let mut seen = Phase::Serving;
    let mut phase = watch.phase();
    let mut announced = false;
    let mut shut = false;
    let mut idle_close: Option<Instant> = None;
    let mut force_at: Option<Instant> = None;
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
                    tracing::debug!("GOAWAY sent");
                }
            }
            // A connection that has not finished a request yet (one taken from the accept queue as the
            // listener closed) is not idle: its first request is on its way and will be answered with
            // `Connection: close`; closing it now would drop that request.
            let fresh = conn.requests_done() == 0;
            if phase >= Phase::Closing && !h2 && !shut && idle_close.is_none() && !fresh {
                let window = drain.config().idle_close_window;
                let jitter = if conn.in_flight() > 0 || window.is_zero() {
                    Duration::ZERO
                } else {
                    window.mul_f64(fastrand::f64())
                };
                idle_close = Some(Instant::now() + jitter);
            }
            if phase >= Phase::Deadline && force_at.is_none() {
                if !shut {
                    c.as_mut().shutdown();
                    shut = true;
                }
                force_at = Some(Instant::now() + FORCE_GRACE);
            }
            seen = phase;
        }
        tokio::select! {
            res = c.as_mut() => {
                match res {
                    Ok(()) => tracing::debug!("Connection closed"),
                    Err(e) if e.is_canceled() || e.is_incomplete_message() || is_benign(&e) => {
                        tracing::debug!(error = %e, "Connection ended")
                    }
                    Err(e) => tracing::info!(error = %e, "Connection error"),
                }
                return;
            }
            p = watch.next(seen), if seen < Phase::Deadline => phase = p,
            _ = sleep_until(idle_close), if idle_close.is_some() && !shut => {
                if conn.in_flight() == 0 {
                    metrics.idle_closes.inc();
                }
                c.as_mut().shutdown();
                shut = true;
            }
            _ = sleep_until(force_at), if force_at.is_some() => {
                drain.record_forced(&conn);
                return;
            }
        }
    }
}

fn is_benign(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        src = s.source();
    }
    false
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Proxies one request; every failure becomes a response (see `http::error`).
async fn proxy(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let guard = shared.conn.request(req.method(), req.uri());
    // Debug level: an enabled span costs a registry slot and field formatting per request (3-6 % of CPU
    // in the benchmark); connection spans stay at info, request spans appear with `ebb=debug`.
    let span =
        tracing::debug_span!("request", req.id = guard.id(), http.method = %req.method(), http.path = req.uri().path());
    async move {
        let grpc = is_grpc(req.headers());
        let version = req.version();
        let upgrade = !shared.h2 && is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        prepare_request(&mut req, shared.h2, upgrade);
        // Built in place inside the select (no timeout wrapper taking it by value): moving this future
        // showed up as a few percent of CPU on HTTP/2.
        let mut deadline = shared.watch.clone();
        let result = tokio::select! {
            r = send(&shared, req, upgrade) => r,
            t = response_timeout(shared.response_timeout) => Err(ProxyError::ResponseTimeout(t)),
            _ = deadline.reached(Phase::Deadline) => Err(ProxyError::DrainDeadline),
        };
        let mut res = match result {
            Ok(res) => res,
            Err(e) => {
                if matches!(e, ProxyError::DrainDeadline) {
                    shared.drain.record_forced(&shared.conn);
                }
                tracing::info!(error = %e, "Upstream request failed");
                let res = e.to_response(grpc);
                shared.metrics.request(res.status().as_u16(), started.elapsed());
                return finish(&shared, res.map(|b| b.with_guard(guard)));
            }
        };
        shared.metrics.request(res.status().as_u16(), started.elapsed());
        let switching = res.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        if let (Some(down), true) = (downstream_upgrade, switching) {
            splice(shared.clone(), down, &mut res);
        }
        let (mut parts, body) = res.into_parts();
        // The client's HTTP version, not the upstream's: an HTTP/1.0 origin must not end keep-alive.
        parts.version = version;
        strip_hop_by_hop(&mut parts.headers, upgrade && switching);
        let mut body = ProxyBody::upstream(body).with_guard(guard);
        if grpc && shared.h2 {
            let mut w = shared.watch.clone();
            let shared = shared.clone();
            body = body.with_grpc_deadline(async move {
                w.reached(Phase::Deadline).await;
                shared.drain.record_forced(&shared.conn);
            });
        }
        finish(&shared, Response::from_parts(parts, body))
    }
    .instrument(span)
    .await
}

/// Last touches on a response: during a drain an HTTP/1.1 response carries `Connection: close`, and
/// hyper closes the connection once it is written.
fn finish(shared: &Shared, mut res: Response<ProxyBody>) -> Response<ProxyBody> {
    if !shared.h2 && shared.conn.told_to_go() && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        shared.drain.metrics().drain.connection_close_sent.inc();
    }
    res
}

async fn send(shared: &Shared, req: Request<Incoming>, upgrade: bool) -> Result<Response<Incoming>, ProxyError> {
    if shared.h2 {
        shared.session.send_h2(req).await
    } else {
        shared.session.send_h1(req, upgrade).await
    }
}

/// Resolves when the upstream has had `timeout` to answer; never without one.
async fn response_timeout(timeout: Option<Duration>) -> Duration {
    match timeout {
        Some(t) => {
            tokio::time::sleep(t).await;
            t
        }
        None => std::future::pending().await,
    }
}

/// Fits a client's request for the upstream hop.
fn prepare_request(req: &mut Request<Incoming>, h2: bool, upgrade: bool) {
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if h2 {
        // An HTTP/2 request needs :scheme and :authority; take the authority from Host if it came that way.
        if req.uri().authority().is_none() {
            let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = host.and_then(|h| h.parse().ok());
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        // Absolute-form (a client that thinks it talks to a proxy): keep the authority as Host.
        if let Some(authority) = req.uri().authority().cloned() {
            if !req.headers().contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(pq);
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

/// Splices an upgraded connection as bytes once both sides have switched (`res` is the upstream's 101).
/// At the drain deadline a WebSocket is closed between frames with Close 1001 both ways; any other
/// protocol gets a FIN each way after the bytes already read.
fn splice(shared: Arc<Shared>, down: hyper::upgrade::OnUpgrade, res: &mut Response<Incoming>) {
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
            let relayed = if websocket {
                let (to_up, to_down) = (FrameTracker::new(Flow::ToServer), FrameTracker::new(Flow::ToClient));
                relay(&mut down, &mut up, to_up, to_down, deadline).await
            } else {
                relay(&mut down, &mut up, Unframed, Unframed, deadline).await
            };
            match relayed {
                Ok(r) => {
                    tracing::debug!(bytes.up = r.up, bytes.down = r.down, at_deadline = r.at_deadline, "Upgrade ended")
                }
                Err(e) => tracing::debug!(error = %e, "Upgrade ended"),
            }
        }
        .instrument(span),
    );
}

#[cfg(test)]
mod tests;
