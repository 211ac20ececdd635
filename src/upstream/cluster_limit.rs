//! The cluster's `max_requests`: a request past it is refused at once (503 `overflow-max-requests`);
//! one admitted is counted, deposits into the retry budget, has its body kept for a replay up to the
//! cluster's `retry.max_body_bytes`, and holds its slot until its response body ends. Below it the
//! stack speaks in attempts ([`AttemptError`]); above it, in what the client gets ([`ProxyError`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tower::retry::budget::Budget as _;
use tower::{Layer, Service};

use crate::http::body::ProxyBody;
use crate::http::client::UpstreamRequest;
use crate::http::error::ProxyError;
use crate::limits::Slot;
use crate::upstream::cluster::Cluster;
use crate::upstream::endpoint::AttemptError;
use crate::upstream::future::{after, at_once, Answer, Finish, Then};

/// Makes [`ClusterLimit`] services over a cluster.
#[derive(Clone, Debug)]
pub struct ClusterLimitLayer {
    cluster: Arc<Cluster>,
}

impl ClusterLimitLayer {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

impl<S> Layer<S> for ClusterLimitLayer {
    type Service = ClusterLimit<S>;
    fn layer(&self, inner: S) -> ClusterLimit<S> {
        ClusterLimit { cluster: self.cluster.clone(), inner }
    }
}

/// Admits a request under its cluster's `max_requests`.
#[derive(Clone, Debug)]
pub struct ClusterLimit<S> {
    cluster: Arc<Cluster>,
    inner: S,
}

impl<S> Service<UpstreamRequest> for ClusterLimit<S>
where
    S: Service<UpstreamRequest, Response = Response<ProxyBody>, Error = AttemptError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Answer<Result<Response<ProxyBody>, ProxyError>, Then<S::Future, Admitted>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx).map_err(|e| e.error)
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        let cluster = &self.cluster;
        let Some(slot) = cluster.requests.try_take() else {
            cluster.metrics.overflow(cluster.requests.overflow);
            return at_once(Err(ProxyError::Overflow(cluster.requests.overflow)));
        };
        cluster.metrics.requests.inc();
        cluster.budget.deposit();
        req.body().keep_for_replay(cluster.cfg.retry.max_body_bytes);
        after(self.inner.call(req), Admitted { slot, cluster: cluster.clone() })
    }
}

/// An admitted request's slot, held by its response body.
pub struct Admitted {
    slot: Slot,
    cluster: Arc<Cluster>,
}

impl Finish<Result<Response<ProxyBody>, AttemptError>> for Admitted {
    type Out = Result<Response<ProxyBody>, ProxyError>;

    fn finish(self, result: Result<Response<ProxyBody>, AttemptError>) -> Self::Out {
        match result {
            Ok(mut res) => {
                res.body_mut().hold(self.slot);
                Ok(res)
            }
            Err(e) => {
                // A connect refused at the cluster's pending or connection threshold.
                if let ProxyError::Overflow(cause) = e.error {
                    self.cluster.metrics.overflow(cause);
                }
                Err(e.error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::cluster::testing::{answer, cluster_with, get};
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn past_max_requests_a_request_is_refused_and_counted_and_the_slot_returns_with_the_body() {
        let cluster = cluster_with(1, |c| c.limits.max_requests = 1);
        let inner = tower::service_fn(|_req: UpstreamRequest| async { Ok::<_, AttemptError>(answer(200)) });
        let svc = ClusterLimitLayer::new(cluster.clone()).layer(inner);
        let first = svc.clone().oneshot(get()).await.unwrap();
        let refused = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(matches!(refused, ProxyError::Overflow("overflow-max-requests")), "{refused:?}");
        assert_eq!(cluster.metrics.overflows("overflow-max-requests"), 1);
        assert_eq!(cluster.metrics.requests.get(), 1, "only the admitted request is counted");
        drop(first);
        assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
        assert_eq!(cluster.metrics.requests.get(), 2);
    }

    #[tokio::test]
    async fn an_attempt_error_reaches_the_client_as_its_proxy_error_and_a_connect_overflow_is_counted() {
        let cluster = cluster_with(1, |_| {});
        let inner = tower::service_fn(|_req: UpstreamRequest| async {
            Err::<Response<ProxyBody>, _>(AttemptError::terminal(ProxyError::Overflow("overflow-max-connections")))
        });
        let err = ClusterLimitLayer::new(cluster.clone()).layer(inner).oneshot(get()).await.unwrap_err();
        assert!(matches!(err, ProxyError::Overflow("overflow-max-connections")), "{err:?}");
        assert_eq!(cluster.metrics.overflows("overflow-max-connections"), 1);
        assert_eq!(cluster.requests.used(), 0, "a failed request holds no slot");
    }
}
