//! One attempt's endpoint: chosen (P2C or round robin, skipping ejected and draining endpoints and
//! those this request already failed on), its `attempt` span opened and the trace context sent on, and
//! its breaker told how the attempt went — at once for a failure, when the response body ends for a
//! response whose headers were fine. What the attempt was (endpoint, number, failure kind) travels
//! in the response's extensions as [`Classified`], so the retry policy, or any tower layer above,
//! reads it without knowing Ebb's types.

use std::sync::Arc;

use http::Response;
use tokio::time::Instant;

use crate::http::body::{ClientFailure, Observer, ProxyBody};
use crate::http::client::{Routed, UpstreamRequest};
use crate::http::error::ProxyError;
use crate::limits::Slot;
use crate::upstream::cluster::Cluster;
use crate::upstream::retry::Failure;
use crate::upstream::wrap::{Finish, Step};

/// What an attempt whose response counts as a failure (a 5xx, a gRPC error status) was: on the
/// response's extensions, for the retry policy and any layer deciding on failures. A success carries
/// none (no failure, nothing to retry), which keeps the common response free of the extension map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// What the response's status says, classified once for the breaker and the retry policy.
    pub failure: Option<Failure>,
    /// Index of the endpoint in its cluster.
    pub endpoint: usize,
    /// 1 for the first attempt.
    pub attempt: usize,
}

/// An attempt that failed before a response.
#[derive(Debug)]
pub struct AttemptError {
    pub error: ProxyError,
    pub endpoint: Option<usize>,
    /// How retrying sees it; `None` for failures no retry can help (the client's own body failed,
    /// a limit, no endpoint left).
    pub failure: Option<Failure>,
}

impl AttemptError {
    /// A failure no retry can help.
    pub fn terminal(error: ProxyError) -> Self {
        Self { error, endpoint: None, failure: None }
    }
}

/// Endpoints (by index) this request has already failed on; the retry policy adds to it.
#[derive(Clone, Debug, Default)]
pub struct Tried(pub Vec<usize>);

/// Chooses each attempt's endpoint and tells its breaker the outcome.
#[derive(Clone, Debug)]
pub struct ChooseEndpoint(pub Arc<Cluster>);

impl Step<UpstreamRequest> for ChooseEndpoint {
    type InnerReq = Routed;
    type InnerErr = ProxyError;
    type Error = AttemptError;
    type After = Done;

    fn before(&self, mut req: UpstreamRequest) -> Result<(Routed, Done), AttemptError> {
        let cluster = &self.0;
        let avoid = req.extensions().get::<Tried>().map(|t| t.0.as_slice()).unwrap_or(&[]);
        let attempt = avoid.len() + 1;
        let Ok(i) = cluster.pick(Instant::now(), avoid) else {
            return Err(AttemptError::terminal(ProxyError::NoHealthyEndpoint));
        };
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
                    ebb.attempt = attempt as i64,
                    ebb.outcome = tracing::field::Empty,
                )
            };
        }
        // Traced when its request is (see `http::server`); the next hop then continues from this attempt.
        let traced = req.extensions().get::<crate::telemetry::traces::Traced>().is_some();
        let span = if traced { attempt_span!("ebb::otel") } else { attempt_span!("ebb::upstream::endpoint") };
        if traced {
            crate::telemetry::traces::inject(&span, req.headers_mut());
        }
        let done = Done {
            cluster: cluster.clone(),
            endpoint: i,
            attempt,
            outstanding: ep.begin(),
            client_failed: req.body().failure(),
            span,
        };
        Ok((Routed { req, endpoint: ep.pool.clone() }, done))
    }

    fn not_ready(e: ProxyError) -> AttemptError {
        AttemptError::terminal(e)
    }
}

/// What an attempt keeps until its outcome is known.
pub struct Done {
    cluster: Arc<Cluster>,
    endpoint: usize,
    attempt: usize,
    /// Its place on the endpoint's outstanding count, held until the response body ends.
    outstanding: Slot,
    client_failed: ClientFailure,
    span: tracing::Span,
}

impl Finish<Result<Response<ProxyBody>, ProxyError>> for Done {
    type Out = Result<Response<ProxyBody>, AttemptError>;

    fn span(&self) -> Option<&tracing::Span> {
        Some(&self.span)
    }

    fn finish(self, result: Result<Response<ProxyBody>, ProxyError>) -> Self::Out {
        let Done { cluster, endpoint: i, attempt, outstanding, client_failed, span } = self;
        let result = match result {
            Ok(mut res) => {
                // A failure status counts now; anything else when its body has ended (see `Verdict`).
                let failure = Failure::of_response(&res);
                let failed = failure.is_some_and(Failure::is_gateway_failure);
                let body = res.body_mut();
                body.hold(outstanding);
                if failed {
                    cluster.record(i, true);
                } else {
                    // The verdict waits for the body's end: the cluster hears it then (see
                    // `Cluster`'s `BodyObserver`), by its endpoint's index.
                    body.observe(Observer::new(cluster, i));
                }
                // A success carries nothing: the extension map costs three allocations, and a
                // success is what nearly every response is.
                if failure.is_some() {
                    res.extensions_mut().insert(Classified { failure, endpoint: i, attempt });
                }
                Ok(res)
            }
            // hyper reports a failing request body as a failed send; it was the client's side that failed,
            // and neither the endpoint's breaker nor a retry should hear of it.
            Err(ProxyError::Upstream(e)) if client_failed.failed() => {
                let error = if client_failed.stalled() {
                    ProxyError::StreamIdle { client: true }
                } else {
                    ProxyError::RequestBody(e)
                };
                Err(AttemptError::terminal(error))
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
        };
        if !span.is_disabled() {
            let outcome = match &result {
                Ok(res) => res.status().as_str().to_string(),
                Err(e) => e.failure.map_or("error", Failure::as_str).to_string(),
            };
            if result.is_err() {
                span.record("otel.status_code", "ERROR");
            }
            span.record("ebb.outcome", outcome);
        }
        result
    }
}

/// The breaker's verdict on an attempt whose response headers were fine, given when its body ends
/// (`key` is the endpoint's index): a success unless the body failed (the connection died
/// mid-stream) or a gRPC stream ended UNAVAILABLE in its trailers.
impl crate::http::body::BodyObserver for Cluster {
    fn ended(&self, key: usize, failed: bool) {
        self.record(key, failed);
    }

    fn trailers_failed(&self, trailers: &http::HeaderMap) -> bool {
        trailers.get(&crate::http::headers::GRPC_STATUS).is_some_and(|s| s.as_bytes() == b"14")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::cluster::testing::{answer, cluster_with, get};
    use crate::upstream::wrap;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use tower::Layer as _;
    use tower::{Service, ServiceExt as _};

    /// An inner service that answers `status` and records which endpoint each attempt was sent to.
    fn recording(
        status: u16,
        seen: Arc<Mutex<Vec<SocketAddr>>>,
    ) -> impl Service<Routed, Response = Response<ProxyBody>, Error = ProxyError, Future: Send> + Clone {
        tower::service_fn(move |r: Routed| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(r.endpoint.addr());
                Ok::<_, ProxyError>(answer(status))
            }
        })
    }

    #[tokio::test]
    async fn a_response_carries_what_its_attempt_was() {
        let cluster = cluster_with(2, |_| {});
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = wrap::layer(ChooseEndpoint(cluster.clone())).layer(recording(503, seen.clone()));
        let res = svc.oneshot(get()).await.unwrap();
        let c = *res.extensions().get::<Classified>().expect("classified");
        assert_eq!(c.attempt, 1);
        assert_eq!(c.failure, Some(Failure::Status(503)));
        assert_eq!(cluster.endpoints[c.endpoint].addr, seen.lock().unwrap()[0], "the endpoint it went to");
    }

    #[tokio::test]
    async fn an_endpoint_already_tried_is_avoided_and_the_attempt_number_counts_it() {
        let cluster = cluster_with(2, |_| {});
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = wrap::layer(ChooseEndpoint(cluster.clone())).layer(recording(502, seen.clone()));
        for tried in [0, 1] {
            let mut req = get();
            req.extensions_mut().insert(Tried(vec![tried]));
            let res = svc.clone().oneshot(req).await.unwrap();
            let c = *res.extensions().get::<Classified>().unwrap();
            assert_eq!((c.endpoint, c.attempt), (1 - tried, 2));
        }
    }

    #[tokio::test]
    async fn a_gateway_failure_is_told_to_the_breaker_at_once() {
        // One failure ejects; one of two endpoints may be ejected.
        let cluster = cluster_with(2, |c| c.outlier.consecutive_failures = 1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failing = wrap::layer(ChooseEndpoint(cluster.clone())).layer(recording(503, seen.clone()));
        let res = failing.oneshot(get()).await.unwrap();
        let ejected = res.extensions().get::<Classified>().unwrap().endpoint;
        // The response is still held, and yet the breaker already ejected its endpoint.
        let ok = wrap::layer(ChooseEndpoint(cluster.clone())).layer(recording(200, seen.clone()));
        for _ in 0..20 {
            let r = ok.clone().oneshot(get()).await.unwrap();
            assert!(r.extensions().get::<Classified>().is_none(), "a success carries no classification");
            assert_ne!(*seen.lock().unwrap().last().unwrap(), cluster.endpoints[ejected].addr);
        }
        drop(res);
    }

    #[tokio::test]
    async fn a_per_try_timeout_counts_against_the_endpoint_and_is_retriable() {
        let cluster = cluster_with(1, |_| {});
        let inner = tower::service_fn(|_r: Routed| async {
            Err::<Response<ProxyBody>, _>(ProxyError::PerTryTimeout(std::time::Duration::from_millis(5)))
        });
        let err = wrap::layer(ChooseEndpoint(cluster)).layer(inner).oneshot(get()).await.unwrap_err();
        assert_eq!((err.endpoint, err.failure), (Some(0), Some(Failure::PerTryTimeout)));
    }
}
