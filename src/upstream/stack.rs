//! The upstream request path, composed in one place: every request a client connection sends upstream
//! goes down this stack of tower layers, built once per connection (and again only when the control
//! plane replaces the connection's cluster), never per request (docs/architecture.md §12).
//!
//! Where a new concern goes: a rule about the whole request (a header rewrite, a rate limit, an
//! authorization check) is a layer above the retry, where it runs once per request; a rule about one
//! try on one endpoint (TLS origination, a per-endpoint header) is a layer between the endpoint choice
//! and the pool, where it runs per attempt. The request travels boxed (`UpstreamRequest`: the head moves
//! as a pointer, BENCHMARKS.md issue 13) and the response is an `http::Response` whose extensions say
//! what the attempt was; a tower-http layer, written for `Request<B>`, goes in with
//! `tower::util::MapRequestLayer` on either side of it (unbox, rebox).

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::Response;
use tower::retry::{Retry, RetryLayer};
use tower::util::Oneshot;
use tower::{Service, ServiceBuilder, ServiceExt as _};

use crate::http::body::ProxyBody;
use crate::http::client::{Dispatch, Session, UpstreamRequest};
use crate::http::error::ProxyError;
use crate::upstream::admission::{Admission, Admit};
use crate::upstream::cluster::{Cluster, ClusterSlot};
use crate::upstream::cluster_limit::ClusterLimit;
use crate::upstream::endpoint::{AttemptError, ChooseEndpoint};
use crate::upstream::retry::RetryPolicy;
use crate::upstream::timeout::{Timeout, TimeoutLayer};
use crate::upstream::wrap::{self, Wrapped};

/// The stack's type, outermost layer first (the order of [`stack`]).
pub type Stack = Wrapped<
    Admit,
    Wrapped<
        ClusterLimit,
        Timeout<Retry<RetryPolicy, Wrapped<ChooseEndpoint, Timeout<Dispatch, ProxyError>>>, AttemptError>,
    >,
>;

/// The layers a request goes through on its way upstream, top to bottom as the request meets them.
pub fn stack(
    cluster: &Arc<Cluster>,
    admission: Option<Arc<Admission>>,
    session: &Arc<Session>,
    orig_dst: SocketAddr,
) -> Stack {
    ServiceBuilder::new()
        // The listener's max_requests: refused here, nothing below runs.
        .layer(wrap::layer(Admit(admission)))
        // The cluster's max_requests; the request is counted, deposits into the retry budget, and
        // has its body kept for a replay.
        .layer(wrap::layer(ClusterLimit(cluster.clone())))
        // The response headers across every attempt (the cluster's request_timeout).
        .layer(TimeoutLayer::new(cluster.request_timeout, |t| AttemptError::terminal(ProxyError::ResponseTimeout(t))))
        // Another attempt after a retriable failure: backoff, budget, resends of unprocessed requests.
        .layer(RetryLayer::new(RetryPolicy::new(cluster.clone())))
        // Each attempt's endpoint (P2C or round robin), its span, and its breaker's verdict.
        .layer(wrap::layer(ChooseEndpoint(cluster.clone())))
        // One attempt's response headers (per_try_timeout).
        .layer(TimeoutLayer::new(cluster.cfg.per_try_timeout, ProxyError::PerTryTimeout))
        // The endpoint's pool, in the hop's protocol, through the client connection's session.
        .service(Dispatch::new(
            session.clone(),
            cluster.cfg.protocol,
            orig_dst,
            cluster.connect_timeout,
            cluster.connect.clone(),
        ))
}

/// A client connection's way to its cluster: the service `http::server` sends every request of the
/// connection to. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct Route(Arc<RouteInner>);

#[derive(Debug)]
struct RouteInner {
    slot: Arc<ClusterSlot>,
    admission: Option<Arc<Admission>>,
    session: Arc<Session>,
    orig_dst: SocketAddr,
    built: ArcSwap<Built>,
}

/// The stack built for one version of the cluster.
#[derive(Debug)]
struct Built {
    cluster: Arc<Cluster>,
    stack: Stack,
}

impl Route {
    pub fn new(
        slot: Arc<ClusterSlot>,
        admission: Option<Admission>,
        session: Arc<Session>,
        orig_dst: SocketAddr,
    ) -> Self {
        let admission = admission.map(Arc::new);
        let cluster = slot.load();
        let stack = stack(&cluster, admission.clone(), &session, orig_dst);
        let built = ArcSwap::from_pointee(Built { cluster, stack });
        Self(Arc::new(RouteInner { slot, admission, session, orig_dst, built }))
    }

    /// The stack for the cluster as it is now: the one built, unless a config change replaced the
    /// cluster since (then one is built for the new cluster; requests under way finish on the old).
    fn current(&self) -> Stack {
        let r = &self.0;
        let built = r.built.load();
        if r.slot.is(&built.cluster) {
            return built.stack.clone();
        }
        let cluster = r.slot.load();
        let stack = stack(&cluster, r.admission.clone(), &r.session, r.orig_dst);
        r.built.store(Arc::new(Built { cluster, stack: stack.clone() }));
        stack
    }
}

impl Service<UpstreamRequest> for Route {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Either<<Stack as Service<UpstreamRequest>>::Future, Oneshot<Stack, UpstreamRequest>>;

    /// Always ready: each request takes the stack as it is when it is called.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: UpstreamRequest) -> Self::Future {
        let mut stack = self.current();
        // Every layer is ready at once (none waits: limits refuse, pools connect on demand), so the
        // readiness check needs no task to wake; a stack that ever said Pending would still be
        // driven properly by the `Oneshot`.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match stack.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Either::Left(stack.call(req)),
            _ => Either::Right(stack.oneshot(req)),
        }
    }
}
