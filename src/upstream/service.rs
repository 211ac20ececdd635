//! The upstream request path as tower services (docs/architecture.md §12):
//!
//! ```text
//! Route::send ── cluster request limit ── tower::retry::Retry<RetryPolicy, _> ── Attempt ── pools
//! ```
//!
//! `Attempt` is one try: it chooses an endpoint (P2C or round robin, skipping ejected and draining
//! ones), applies the per-try timeout, sends on the endpoint's pool, and tells the endpoint's breaker
//! how it went. `RetryPolicy` decides whether a failed try is tried again. The overall request timeout
//! and the drain deadline stay with the caller (`http::server`), which races them against this.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::retry::Retry;
use tower::{Service, ServiceExt as _};
use tracing::Instrument as _;

use crate::http::body::RequestBody;
use crate::http::client::{ConnectCtx, Session, StreamClaim};
use crate::http::error::ProxyError;
use crate::upstream::cluster::{Cluster, ClusterSlot, Outstanding};
use crate::upstream::limits::{Limit, Slot};
use crate::upstream::retry::{Failure, RetryPolicy};

/// What a response from upstream keeps until its body has been sent whole: its HTTP/2 stream's place
/// under the connection's stream limit, its endpoint's outstanding count, its request slot.
#[derive(Debug, Default)]
pub struct Hold {
    // Each held for its drop only.
    #[allow(dead_code)]
    claim: Option<StreamClaim>,
    #[allow(dead_code)]
    outstanding: Option<Outstanding>,
    /// The cluster's `max_requests` slot and the listener's.
    #[allow(dead_code)]
    request: Option<Slot>,
    #[allow(dead_code)]
    admission: Option<Slot>,
    verdict: Option<Verdict>,
}

/// The breaker's verdict on an attempt whose response headers were fine, given when its body ends:
/// a success unless the body failed (the connection died mid-stream) or a gRPC stream ended
/// UNAVAILABLE in its trailers.
#[derive(Debug)]
struct Verdict {
    cluster: Arc<Cluster>,
    endpoint: usize,
    failed: bool,
}

impl Drop for Verdict {
    fn drop(&mut self) {
        self.cluster.record(self.endpoint, self.failed);
    }
}

impl Hold {
    /// The response body failed on the upstream's side.
    pub fn body_failed(&mut self) {
        if let Some(v) = &mut self.verdict {
            v.failed = true;
        }
    }

    /// The response body ended with `trailers`: UNAVAILABLE counts against the endpoint.
    pub fn trailers(&mut self, trailers: &http::HeaderMap) {
        if trailers.get(&crate::http::headers::GRPC_STATUS).is_some_and(|s| s.as_bytes() == b"14") {
            self.body_failed();
        }
    }
}

/// A try that produced a response (any status).
#[derive(Debug)]
pub struct Attempted {
    pub res: Response<Incoming>,
    pub hold: Hold,
    /// Index of the endpoint in its cluster.
    pub endpoint: Option<usize>,
    /// What the response's status says, classified once for the breaker and the retry policy.
    pub failure: Option<Failure>,
}

/// A try that failed before a response.
#[derive(Debug)]
pub struct AttemptError {
    pub error: ProxyError,
    pub endpoint: Option<usize>,
    /// How retrying sees it; `None` for failures no retry can help (the client's own body failed,
    /// a limit, no endpoint left).
    pub failure: Option<Failure>,
}

impl AttemptError {
    fn terminal(error: ProxyError) -> Self {
        Self { error, endpoint: None, failure: None }
    }
}

/// A request on its way upstream. Boxed once, where it enters the stack: it passes through the retry
/// future, the attempt and the send, and each would otherwise carry its own copy of the head (about
/// 270 bytes), which made a request's boxed attempt future too large for the allocator's fast path
/// (BENCHMARKS.md, issue 13).
pub type UpstreamRequest = Box<Request<RequestBody>>;

/// Endpoints (by index) this request has already failed on; the retry policy adds to it.
#[derive(Clone, Debug, Default)]
pub struct Tried(pub Vec<usize>);

/// The protocol of the upstream hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Http1 { upgrade: bool },
    Http2,
}

/// One try of a request against a cluster.
#[derive(Clone, Debug)]
pub struct Attempt {
    cluster: Arc<Cluster>,
    session: Arc<Session>,
    hop: Hop,
}

impl Service<UpstreamRequest> for Attempt {
    type Response = Attempted;
    type Error = AttemptError;
    type Future = Pin<Box<dyn Future<Output = Result<Attempted, AttemptError>> + Send>>;

    /// Always ready: the pools open connections on demand, and the limits refuse rather than wait.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        Box::pin(attempt(self.cluster.clone(), self.session.clone(), self.hop, req))
    }
}

async fn attempt(
    cluster: Arc<Cluster>,
    session: Arc<Session>,
    hop: Hop,
    mut req: UpstreamRequest,
) -> Result<Attempted, AttemptError> {
    let avoid = req.extensions().get::<Tried>().map(|t| t.0.as_slice()).unwrap_or(&[]);
    let number = avoid.len() + 1;
    let i = cluster.pick(Instant::now(), avoid).map_err(|_| AttemptError::terminal(ProxyError::NoHealthyEndpoint))?;
    let ep = cluster.endpoints[i].clone();
    macro_rules! attempt_span {
        ($target:expr) => {
            tracing::debug_span!(
                target: $target,
                "attempt",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                ebb.cluster = %cluster.name,
                server.address = %ep.addr,
                ebb.attempt = number as i64,
                ebb.outcome = tracing::field::Empty,
            )
        };
    }
    // Traced when its request is (see `http::server`); the next hop then continues from this attempt.
    let traced = req.extensions().get::<crate::telemetry::traces::Traced>().is_some();
    let span = if traced { attempt_span!("ebb::otel") } else { attempt_span!("ebb::upstream::service") };
    if traced {
        crate::telemetry::traces::inject(&span, req.headers_mut());
    }
    let result = attempt_on(&cluster, i, ep, &session, hop, req).instrument(span.clone()).await;
    if !span.is_disabled() {
        let outcome = match &result {
            Ok(a) => a.res.status().as_str().to_string(),
            Err(e) => e.failure.map_or("error", Failure::as_str).to_string(),
        };
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        span.record("ebb.outcome", outcome);
    }
    result
}

async fn attempt_on(
    cluster: &Arc<Cluster>,
    i: usize,
    ep: Arc<crate::upstream::cluster::ClusterEndpoint>,
    session: &Session,
    hop: Hop,
    req: UpstreamRequest,
) -> Result<Attempted, AttemptError> {
    let outstanding = ep.begin();
    let client_failed = req.body().failure();
    let ctx = ConnectCtx { timeout: cluster.connect_timeout, limits: &cluster.connect };
    // Built where it is awaited (a named local would keep its own slot beside the awaited copy), and
    // the timer boxed: only a cluster with a per-try timeout pays for its space.
    let result = match cluster.cfg.per_try_timeout {
        Some(t) => Box::pin(tokio::time::timeout(t, send(session, &ep, req, hop, ctx)))
            .await
            .unwrap_or(Err(ProxyError::PerTryTimeout(t))),
        None => send(session, &ep, req, hop, ctx).await,
    };
    match result {
        Ok((res, claim)) => {
            // A failure status counts now; anything else when its body has ended (see `Verdict`).
            let failure = Failure::of_response(&res);
            let failed = failure.is_some_and(Failure::is_gateway_failure);
            let verdict = if failed {
                cluster.record(i, true);
                None
            } else {
                Some(Verdict { cluster: cluster.clone(), endpoint: i, failed: false })
            };
            let hold = Hold { claim, outstanding: Some(outstanding), request: None, admission: None, verdict };
            Ok(Attempted { res, hold, endpoint: Some(i), failure })
        }
        // hyper reports a failing request body as a failed send; it was the client's side that failed,
        // and neither the endpoint's breaker nor a retry should hear of it.
        Err(ProxyError::Upstream(e)) if client_failed.failed() => {
            Err(AttemptError::terminal(ProxyError::RequestBody(e)))
        }
        Err(error) => {
            let failure = Failure::of_error(&error);
            match failure {
                // Not the endpoint's failure: it is going away, or a pooled connection raced its close.
                Some(Failure::Unprocessed | Failure::RefusedStream) | None => {}
                Some(f) => cluster.record(i, f.is_gateway_failure()),
            }
            Err(AttemptError { error, endpoint: Some(i), failure })
        }
    }
}

/// Sends on the endpoint's pool for the hop's protocol; an HTTP/2 response comes with its stream's claim.
async fn send(
    session: &Session,
    ep: &crate::upstream::cluster::ClusterEndpoint,
    req: UpstreamRequest,
    hop: Hop,
    ctx: ConnectCtx<'_>,
) -> Result<(Response<Incoming>, Option<StreamClaim>), ProxyError> {
    match hop {
        Hop::Http2 => session.send_h2(&ep.pool, req, ctx).await.map(|(res, claim)| (res, Some(claim))),
        Hop::Http1 { upgrade } => session.send_h1(&ep.pool, req, upgrade, ctx).await.map(|res| (res, None)),
    }
}

/// A downstream connection's way to its cluster: the stack every request of the connection goes
/// through.
#[derive(Debug)]
pub struct Route {
    slot: Arc<ClusterSlot>,
    session: Arc<Session>,
    /// The listener's `max_requests`, taken before the cluster's.
    admission: Option<Arc<Limit>>,
}

impl Route {
    pub fn new(slot: Arc<ClusterSlot>, admission: Option<Arc<Limit>>) -> Self {
        Self { slot, session: Arc::new(Session::new()), admission }
    }

    /// The client went quiet: its session's upstream connection goes back to the pool.
    pub fn release_idle(&self) {
        self.session.release_idle();
    }

    /// The cluster as it is now (a config change replaces it between requests).
    pub fn cluster(&self) -> Arc<Cluster> {
        self.slot.load()
    }

    /// Sends a request through `cluster`'s limits, retries and endpoints (`cluster` is this route's
    /// as loaded for the request); returns the response and what it holds until its body ends.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        req: UpstreamRequest,
        hop: Hop,
    ) -> Result<(Response<Incoming>, Hold), ProxyError> {
        let admitted = match &self.admission {
            Some(limit) => Some(limit.try_take().ok_or(ProxyError::Overflow(limit.overflow))?),
            None => None,
        };
        let Some(slot) = cluster.requests.try_take() else {
            cluster.metrics.overflow(cluster.requests.overflow);
            return Err(ProxyError::Overflow(cluster.requests.overflow));
        };
        cluster.metrics.requests.inc();
        let attempt = Attempt { cluster: cluster.clone(), session: self.session.clone(), hop };
        let stack = Retry::new(RetryPolicy::new(cluster.clone()), attempt);
        match stack.oneshot(req).await {
            Ok(mut a) => {
                a.hold.request = Some(slot);
                a.hold.admission = admitted;
                Ok((a.res, a.hold))
            }
            Err(e) => {
                if let ProxyError::Overflow(cause) = e.error {
                    cluster.metrics.overflow(cause);
                }
                Err(e.error)
            }
        }
    }
}
