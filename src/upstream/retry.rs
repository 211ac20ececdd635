//! Retries: which failures are retried, full-jitter backoff, the retry budget, and the rule that a
//! request the upstream provably never processed is resent whatever its method and at no cost to
//! the budget (docs/architecture.md §12). Plugged into `tower::retry` as its [`Policy`]; the retry
//! service is built once per connection and clones the policy for each request, so a request starts
//! with no retries counted. The request's deposit into the budget is the cluster limit layer's.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use tower::retry::budget::Budget as _;
use tower::retry::Policy;

use crate::config::RetryOn;
use crate::http::body::ProxyBody;
use crate::http::client::UpstreamRequest;
use crate::http::error::ProxyError;
use crate::transport::connect::ConnectError;
use crate::upstream::cluster::{Cluster, RetryPermit};
use crate::upstream::endpoint::{AttemptError, Classified, Tried};

/// How many times one request is resent because the upstream did not process it (GOAWAY above its
/// stream, REFUSED_STREAM, handed back unsent). Each goes to another endpoint when there is one; the
/// bound only stops a request from bouncing between endpoints that all refuse it.
const MAX_RESENDS: u32 = 4;

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The upstream did not process the request: it may go anywhere again, whatever its method.
    Unprocessed,
    ConnectFailure,
    RefusedStream,
    Reset,
    PerTryTimeout,
    /// A response with this status.
    Status(u16),
    /// A trailers-only gRPC response with this status.
    Grpc(u32),
}

impl Failure {
    /// The metric labels of the kinds of failure, by [`Failure::index`].
    pub const KINDS: [&'static str; 7] =
        ["unprocessed", "connect_failure", "refused_stream", "reset", "per_try_timeout", "status", "grpc_status"];

    /// Its kind's place in [`Failure::KINDS`].
    pub fn index(self) -> usize {
        match self {
            Self::Unprocessed => 0,
            Self::ConnectFailure => 1,
            Self::RefusedStream => 2,
            Self::Reset => 3,
            Self::PerTryTimeout => 4,
            Self::Status(_) => 5,
            Self::Grpc(_) => 6,
        }
    }

    /// The metric label for a retry made for it.
    pub fn as_str(self) -> &'static str {
        Self::KINDS[self.index()]
    }

    /// Whether the upstream may have acted on the request before failing.
    fn maybe_processed(self) -> bool {
        !matches!(self, Self::Unprocessed | Self::ConnectFailure | Self::RefusedStream)
    }

    /// Whether it is the kind of failure that counts against an endpoint's breaker.
    pub fn is_gateway_failure(self) -> bool {
        match self {
            Self::ConnectFailure | Self::Reset | Self::PerTryTimeout => true,
            Self::Status(s) => matches!(s, 502..=504),
            Self::Grpc(s) => s == 14,
            Self::Unprocessed | Self::RefusedStream => false,
        }
    }

    /// Classifies an attempt's error.
    pub fn of_error(e: &ProxyError) -> Option<Self> {
        match e {
            ProxyError::Connect(ConnectError::LocalFdExhausted(..)) => None,
            ProxyError::Connect(_) | ProxyError::Handshake(_) => Some(Self::ConnectFailure),
            ProxyError::Unprocessed(_) => Some(Self::Unprocessed),
            ProxyError::Upstream(e) => Some(match h2_error(e) {
                // RFC 9113 §8.7: a refused stream, or one above a GOAWAY's last stream id, was not
                // processed.
                Some(h2) if h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) => Self::RefusedStream,
                Some(h2) if h2.is_go_away() && h2.is_remote() => Self::Unprocessed,
                _ => Self::Reset,
            }),
            ProxyError::PerTryTimeout(_) => Some(Self::PerTryTimeout),
            _ => None,
        }
    }

    /// Classifies a response: a failure only when its status says so.
    pub fn of_response<B>(res: &http::Response<B>) -> Option<Self> {
        let status = res.status().as_u16();
        if status >= 500 {
            return Some(Self::Status(status));
        }
        // Only a gRPC response has a grpc-status that counts; the content type is a cheaper look.
        if !crate::http::headers::is_grpc(res.headers()) {
            return None;
        }
        let grpc = res.headers().get(&crate::http::headers::GRPC_STATUS)?.to_str().ok()?.parse::<u32>().ok()?;
        (grpc != 0).then_some(Self::Grpc(grpc))
    }
}

/// The h2 error under a hyper error, if HTTP/2 is what failed.
pub fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    crate::http::error::source_of::<h2::Error>(e)
}

/// The n-th retry's wait (n from 0): uniform in [0, cap) with cap = min(max, base × 2^n), and zero
/// when the cap is. Full jitter, so that clients failing together spread their retries over the whole
/// window instead of meeting again after the same base delay (tower's `ExponentialBackoff` adds
/// jitter on top of the base, which keeps every client's floor in step). `unit` is a sample in
/// [0, 1); anything outside is clamped, so the result stays in [0, cap) whatever it is.
pub fn full_jitter(base: Duration, max: Duration, n: u32, unit: f64) -> Duration {
    let cap = base.saturating_mul(1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX)).min(max);
    let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    // Whole nanoseconds, truncated (`mul_f64` rounds to nearest, so a unit just under 1 gave the cap
    // itself), and one below the cap at most: the product of a large cap and such a unit can still
    // round up to the cap in f64.
    let ns = (cap_ns as f64 * unit.clamp(0.0, 1.0)) as u64;
    Duration::from_nanos(ns.min(cap_ns.saturating_sub(1)))
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The per-request retry state `tower::retry::Retry` keeps between attempts.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    cluster: Arc<Cluster>,
    retries: u32,
    resends: u32,
    /// Held while a retry of this request is under way (`limits.max_retries`).
    permit: Option<Arc<RetryPermit>>,
}

impl RetryPolicy {
    /// The state a request starts with (cloned for each).
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster, retries: 0, resends: 0, permit: None }
    }

    /// Whether (and after how long) to try again after `failure`.
    fn decide(&mut self, method: &Method, failure: Failure) -> Option<Duration> {
        let cfg = &self.cluster.cfg.retry;
        let metrics = &self.cluster.metrics;
        if failure == Failure::Unprocessed || failure == Failure::RefusedStream {
            if self.resends >= MAX_RESENDS {
                return None;
            }
            self.resends += 1;
            metrics.retry(failure);
            return Some(Duration::ZERO);
        }
        let wanted = match failure {
            Failure::ConnectFailure => cfg.retry_on.contains(&RetryOn::ConnectFailure),
            Failure::Reset => cfg.retry_on.contains(&RetryOn::Reset),
            Failure::PerTryTimeout => cfg.retry_on.contains(&RetryOn::PerTryTimeout),
            Failure::Status(s) => {
                (matches!(s, 502..=504) && cfg.retry_on.contains(&RetryOn::GatewayError))
                    || (cfg.retry_on.contains(&RetryOn::RetriableStatusCodes)
                        && cfg.retriable_status_codes.contains(&s))
            }
            Failure::Grpc(s) => {
                cfg.retry_on.contains(&RetryOn::RetriableGrpcStatuses) && cfg.retriable_grpc_statuses.contains(&s)
            }
            Failure::Unprocessed | Failure::RefusedStream => true,
        };
        if !wanted || self.retries >= cfg.num_retries {
            return None;
        }
        if cfg.idempotent_only && failure.maybe_processed() && !idempotent(method) {
            return None;
        }
        if self.permit.is_none() {
            match self.cluster.retry_permit() {
                Some(p) => self.permit = Some(Arc::new(p)),
                None => {
                    metrics.overflow("overflow-max-retries");
                    return None;
                }
            }
        }
        if !self.cluster.budget.withdraw() {
            metrics.budget_exhausted.inc();
            return None;
        }
        let wait = full_jitter(cfg.backoff_base, cfg.backoff_max, self.retries, fastrand::f64());
        self.retries += 1;
        metrics.retry(failure);
        Some(wait)
    }
}

impl Policy<UpstreamRequest, Response<ProxyBody>, AttemptError> for RetryPolicy {
    /// Boxed: the wait exists only once a retry is decided, and the retry future of every request
    /// would otherwise carry room for a timer.
    type Future = Pin<Box<tokio::time::Sleep>>;

    fn retry(
        &mut self,
        req: &mut UpstreamRequest,
        result: &mut Result<Response<ProxyBody>, AttemptError>,
    ) -> Option<Self::Future> {
        let (failure, endpoint) = match result {
            Ok(res) => {
                let c = res.extensions().get::<Classified>()?;
                (c.failure?, Some(c.endpoint))
            }
            Err(e) => (e.failure?, e.endpoint),
        };
        // What was sent of the body is gone (more than the replay limit was read): nothing to resend.
        req.body().replay()?;
        let wait = self.decide(req.method(), failure)?;
        if let Some(i) = endpoint {
            // The next attempt goes to another endpoint when the cluster has one to offer.
            match req.extensions_mut().get_mut::<Tried>() {
                Some(tried) => tried.0.push(i),
                None => {
                    req.extensions_mut().insert(Tried(vec![i]));
                }
            }
        }
        // On the request's span: a trace shows why its request went out again.
        tracing::debug!(
            target: "ebb::trace",
            reason = failure.as_str(),
            retry = self.retries,
            resend = self.resends,
            wait_ms = wait.as_millis() as u64,
            "retrying"
        );
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, req: &UpstreamRequest) -> Option<UpstreamRequest> {
        let body = req.body().replay()?;
        let mut clone = Request::new(body);
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        // The extensions Ebb's upstream path reads, one by one: cloning the whole map costs three
        // allocations on every request (the copy exists for a retry that rarely comes); a request
        // usually has none, and then each lookup is a check of an empty map. The client's 1xx
        // sender is in the body and comes with `replay`. A new extension type the upstream path
        // needs goes here.
        let ext = req.extensions();
        if let Some(t) = ext.get::<crate::upstream::endpoint::Tried>() {
            clone.extensions_mut().insert(t.clone());
        }
        if ext.get::<crate::telemetry::traces::Traced>().is_some() {
            clone.extensions_mut().insert(crate::telemetry::traces::Traced);
        }
        if let Some(a) = ext.get::<h2::ext::AuthorityList>() {
            clone.extensions_mut().insert(a.clone());
        }
        Some(Box::new(clone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest f64 below 1: the top of `fastrand::f64()`'s range.
    const ALMOST_ONE: f64 = 1.0 - f64::EPSILON / 2.0;

    #[test]
    fn backoff_samples_stay_within_the_full_jitter_bounds() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        for n in 0..12 {
            let cap = (base * 2u32.pow(n.min(20))).min(max);
            for _ in 0..200 {
                let d = full_jitter(base, max, n, fastrand::f64());
                assert!(d < cap || cap.is_zero(), "retry {n}: {d:?} not below {cap:?}");
            }
            // The bounds themselves: 0 at the bottom; at the top, the largest unit below 1 (and 1 itself,
            // clamped) stays under the cap, by no more than a nanosecond.
            assert_eq!(full_jitter(base, max, n, 0.0), Duration::ZERO);
            for unit in [ALMOST_ONE, 1.0, 2.0] {
                let top = full_jitter(base, max, n, unit);
                assert!(top < cap, "retry {n}, unit {unit}: {top:?} not below {cap:?}");
                assert_eq!(cap - top, Duration::from_nanos(1), "retry {n}, unit {unit}: {top:?} under {cap:?}");
            }
        }
        // Caps of more nanoseconds than an f64 holds exactly, where the product rounds up to the cap.
        for cap in [Duration::from_secs(1 << 30), Duration::MAX] {
            let top = full_jitter(cap, cap, 0, ALMOST_ONE);
            assert!(top < cap, "{top:?} not below {cap:?}");
        }
        // A zero cap has no half-open range to fall in: no wait.
        assert_eq!(full_jitter(Duration::ZERO, max, 3, ALMOST_ONE), Duration::ZERO);
        assert_eq!(full_jitter(base, max, 0, 0.5), Duration::from_micros(12_500));
        assert_eq!(full_jitter(base, max, 3, 0.5), Duration::from_millis(100));
        assert_eq!(full_jitter(base, max, 40, 0.5), Duration::from_millis(125), "capped, no overflow");
    }

    #[test]
    fn only_unprocessed_failures_retry_any_method() {
        assert!(!Failure::Unprocessed.maybe_processed());
        assert!(!Failure::RefusedStream.maybe_processed());
        assert!(!Failure::ConnectFailure.maybe_processed());
        assert!(Failure::Reset.maybe_processed());
        assert!(Failure::Status(503).maybe_processed());
        assert!(Failure::Status(503).is_gateway_failure());
        assert!(!Failure::Status(500).is_gateway_failure());
        assert!(Failure::Grpc(14).is_gateway_failure());
        assert!(!Failure::Grpc(5).is_gateway_failure());
    }

    /// The retry layer over the endpoint layer, as the stack composes them: a failed attempt goes again,
    /// to the other endpoint, after a backoff within the full-jitter cap; each retry is counted once.
    #[tokio::test(start_paused = true)]
    async fn a_gateway_error_is_retried_on_the_other_endpoint_within_the_backoff() {
        use crate::http::client::Routed;
        use crate::upstream::cluster::testing::{answer, cluster, get};
        use crate::upstream::endpoint::ChooseEndpoint;
        use std::sync::Mutex;
        use tower::{ServiceBuilder, ServiceExt as _};

        let cluster = cluster(2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let origin = tower::service_fn(move |r: Routed| {
            let mut seen = s.lock().unwrap();
            seen.push(r.endpoint.addr());
            let status = if seen.len() == 1 { 503 } else { 200 };
            async move { Ok::<_, ProxyError>(answer(status)) }
        });
        let svc = ServiceBuilder::new()
            .layer(tower::retry::RetryLayer::new(RetryPolicy::new(cluster.clone())))
            .layer(crate::upstream::wrap::layer(ChooseEndpoint(cluster.clone())))
            .service(origin);
        let start = tokio::time::Instant::now();
        let res = svc.oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one retry");
        assert_ne!(seen[0], seen[1], "the retry went to the other endpoint");
        assert!(res.extensions().get::<Classified>().is_none(), "the success that ended it is not a failure");
        // The wait is drawn from [0, base); tokio's timer ends a sleep on a whole millisecond, rounding
        // up, so a draw above base - 1 ms ends at base exactly (once in 25 runs at a 25 ms base).
        assert!(start.elapsed() <= cluster.cfg.retry.backoff_base, "the first retry waits at most the base");
        assert_eq!(cluster.metrics.retries(Failure::Status(503)), 1);
    }

    /// A request that is not idempotent is not retried after a failure the upstream may have acted on.
    #[tokio::test(start_paused = true)]
    async fn a_post_is_not_retried_after_a_gateway_error() {
        use crate::http::client::Routed;
        use crate::upstream::cluster::testing::{answer, cluster};
        use crate::upstream::endpoint::ChooseEndpoint;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use tower::{ServiceBuilder, ServiceExt as _};

        let cluster = cluster(2);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let origin = tower::service_fn(move |_r: Routed| {
            c.fetch_add(1, SeqCst);
            async { Ok::<_, ProxyError>(answer(503)) }
        });
        let svc = ServiceBuilder::new()
            .layer(tower::retry::RetryLayer::new(RetryPolicy::new(cluster.clone())))
            .layer(crate::upstream::wrap::layer(ChooseEndpoint(cluster.clone())))
            .service(origin);
        let post = Box::new(Request::post("/").body(crate::http::body::RequestBody::empty()).unwrap());
        assert_eq!(svc.oneshot(post).await.unwrap().status(), 503);
        assert_eq!(calls.load(SeqCst), 1);
    }
}
