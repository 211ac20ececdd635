//! The listener's `max_requests`: requests in flight through one listener at once, across its
//! connections, so that a burst cannot bury the app. Past it a request is refused at once with 503
//! `overflow-listener-max-requests` (gRPC: UNAVAILABLE) and counted for the listener; one admitted holds
//! its slot until its response body ends. The outermost layer: nothing below runs for a refused request.

use std::sync::Arc;

use http::Response;
use prometheus_client::metrics::counter::Counter;

use crate::http::body::ProxyBody;
use crate::http::client::UpstreamRequest;
use crate::http::error::ProxyError;
use crate::limits::{Limit, Slot};
use crate::upstream::wrap::{Finish, Step};

/// The `x-ebb-error` cause of a request refused at its listener's `max_requests`: not the cluster's
/// (`overflow-max-requests`), so an operator can tell which limit to raise.
pub const LISTENER_OVERFLOW: &str = "overflow-listener-max-requests";

/// A listener's request limit and its overflow counter, resolved once per listener.
#[derive(Clone, Debug)]
pub struct Admission {
    pub limit: Arc<Limit>,
    pub overflows: Counter,
}

/// Admits a request under its listener's `max_requests`; without a limit (a stack used outside a
/// listener) everything is admitted.
#[derive(Clone, Debug)]
pub struct Admit(pub Option<Arc<Admission>>);

impl Step<UpstreamRequest> for Admit {
    type InnerReq = UpstreamRequest;
    type InnerErr = ProxyError;
    type Error = ProxyError;
    type After = Hold;

    fn before(&self, req: UpstreamRequest) -> Result<(UpstreamRequest, Hold), ProxyError> {
        let slot = match &self.0 {
            Some(a) => match a.limit.try_take() {
                Some(slot) => Some(slot),
                None => {
                    a.overflows.inc();
                    return Err(ProxyError::Overflow(LISTENER_OVERFLOW));
                }
            },
            None => None,
        };
        Ok((req, Hold(slot)))
    }

    fn not_ready(e: ProxyError) -> ProxyError {
        e
    }
}

/// The listener slot, held by the response body.
pub struct Hold(Option<Slot>);

impl Finish<Result<Response<ProxyBody>, ProxyError>> for Hold {
    type Out = Result<Response<ProxyBody>, ProxyError>;

    fn finish(self, result: Result<Response<ProxyBody>, ProxyError>) -> Self::Out {
        result.map(|mut res| {
            if let Some(slot) = self.0 {
                res.body_mut().hold(slot);
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::cluster::testing::{answer, get};
    use crate::upstream::wrap;
    use tower::Layer as _;
    use tower::{Service, ServiceExt as _};

    fn origin(
    ) -> impl Service<UpstreamRequest, Response = Response<ProxyBody>, Error = ProxyError, Future: Send> + Clone {
        tower::service_fn(|_req: UpstreamRequest| async { Ok::<_, ProxyError>(answer(200)) })
    }

    #[tokio::test]
    async fn past_the_listener_limit_a_request_is_refused_counted_and_admitted_again_once_a_body_ends() {
        let a = Admission { limit: Arc::new(Limit::new(1, LISTENER_OVERFLOW)), overflows: Counter::default() };
        let svc = wrap::layer(Admit(Some(Arc::new(a.clone())))).layer(origin());
        let first = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(a.limit.used(), 1, "the first response's body holds its slot");
        let refused = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(matches!(refused, ProxyError::Overflow(LISTENER_OVERFLOW)), "{refused:?}");
        assert_eq!(a.overflows.get(), 1);
        drop(first);
        assert_eq!(a.limit.used(), 0, "given back with the body");
        assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
        assert_eq!(a.overflows.get(), 1);
    }

    #[tokio::test]
    async fn without_a_limit_everything_is_admitted() {
        let svc = wrap::layer(Admit(None)).layer(origin());
        let held: Vec<_> = futures_util::future::join_all((0..50).map(|_| svc.clone().oneshot(get()))).await;
        assert!(held.iter().all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
    }
}
