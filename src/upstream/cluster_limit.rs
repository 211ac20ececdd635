//! The cluster's `max_requests`: a request past it is refused at once (503 `overflow-max-requests`);
//! one admitted is counted, deposits into the retry budget, has its body kept for a replay up to the
//! cluster's `retry.max_body_bytes`, and holds its slot until its response body ends. Below it the
//! stack speaks in attempts ([`AttemptError`]); above it, in what the client gets ([`ProxyError`]).

use std::sync::Arc;

use http::Response;
use tower::retry::budget::Budget as _;

use crate::http::body::ProxyBody;
use crate::http::client::UpstreamRequest;
use crate::http::error::ProxyError;
use crate::limits::Slot;
use crate::upstream::cluster::Cluster;
use crate::upstream::endpoint::AttemptError;
use crate::upstream::wrap::{Finish, Step};

/// Admits a request under its cluster's `max_requests`.
#[derive(Clone, Debug)]
pub struct ClusterLimit(pub Arc<Cluster>);

impl Step<UpstreamRequest> for ClusterLimit {
    type InnerReq = UpstreamRequest;
    type InnerErr = AttemptError;
    type Error = ProxyError;
    type After = Admitted;

    fn before(&self, req: UpstreamRequest) -> Result<(UpstreamRequest, Admitted), ProxyError> {
        let cluster = &self.0;
        let Some(slot) = cluster.requests.try_take() else {
            cluster.metrics.overflow(cluster.requests.overflow);
            return Err(ProxyError::Overflow(cluster.requests.overflow));
        };
        cluster.metrics.requests.inc();
        cluster.budget.deposit();
        req.body().keep_for_replay(cluster.cfg.retry.max_body_bytes);
        Ok((req, Admitted { slot, cluster: cluster.clone() }))
    }

    fn not_ready(e: AttemptError) -> ProxyError {
        e.error
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
    use crate::upstream::wrap;
    use tower::Layer as _;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn past_max_requests_a_request_is_refused_and_counted_and_the_slot_returns_with_the_body() {
        let cluster = cluster_with(1, |c| c.limits.max_requests = 1);
        let inner = tower::service_fn(|_req: UpstreamRequest| async { Ok::<_, AttemptError>(answer(200)) });
        let svc = wrap::layer(ClusterLimit(cluster.clone())).layer(inner);
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
        let err = wrap::layer(ClusterLimit(cluster.clone())).layer(inner).oneshot(get()).await.unwrap_err();
        assert!(matches!(err, ProxyError::Overflow("overflow-max-connections")), "{err:?}");
        assert_eq!(cluster.metrics.overflows("overflow-max-connections"), 1);
        assert_eq!(cluster.requests.used(), 0, "a failed request holds no slot");
    }
}
