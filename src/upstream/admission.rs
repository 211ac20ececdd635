//! The listener's `max_requests`: requests in flight through one listener at once, across its
//! connections, so that a burst cannot bury the app. Past it a request is refused at once with 503
//! `overflow-listener-max-requests` (gRPC: UNAVAILABLE) and counted for the listener; one admitted holds
//! its slot until its response body ends. The outermost layer: nothing below runs for a refused request.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use crate::http::body::ProxyBody;
use crate::http::client::UpstreamRequest;
use crate::http::error::ProxyError;
use crate::limits::{Limit, Slot};
use crate::upstream::future::{after, at_once, Answer, Finish, Then};

/// The `x-ebb-error` cause of a request refused at its listener's `max_requests`: not the cluster's
/// (`overflow-max-requests`), so an operator can tell which limit to raise.
pub const LISTENER_OVERFLOW: &str = "overflow-listener-max-requests";

/// A listener's request limit and its overflow counter, resolved once per listener.
#[derive(Clone, Debug)]
pub struct Admission {
    pub limit: Arc<Limit>,
    pub overflows: Counter,
}

/// Makes [`Admit`] services; without a limit (a stack used outside a listener) everything is admitted.
#[derive(Clone, Debug)]
pub struct AdmissionLayer {
    admission: Option<Admission>,
}

impl AdmissionLayer {
    pub fn new(admission: Option<Admission>) -> Self {
        Self { admission }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admit<S>;
    fn layer(&self, inner: S) -> Admit<S> {
        Admit { admission: self.admission.clone(), inner }
    }
}

/// Admits a request under its listener's `max_requests`.
#[derive(Clone, Debug)]
pub struct Admit<S> {
    admission: Option<Admission>,
    inner: S,
}

impl<S> Service<UpstreamRequest> for Admit<S>
where
    S: Service<UpstreamRequest, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Answer<Result<Response<ProxyBody>, ProxyError>, Then<S::Future, Hold>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        let slot = match &self.admission {
            Some(a) => match a.limit.try_take() {
                Some(slot) => Some(slot),
                None => {
                    a.overflows.inc();
                    return at_once(Err(ProxyError::Overflow(LISTENER_OVERFLOW)));
                }
            },
            None => None,
        };
        after(self.inner.call(req), Hold(slot))
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
