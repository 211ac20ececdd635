//! The response body Ebb sends: the upstream's, streamed frame by frame, or one Ebb made. It keeps its
//! request listed as in flight until the last frame is out, and can end a gRPC stream with
//! `grpc-status: 14` at the drain deadline instead of letting it be reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conntrack::RequestGuard;
use crate::http::client::StreamClaim;

type Deadline = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Debug)]
enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// A proxied or locally made response body.
pub struct ProxyBody {
    kind: Kind,
    guard: Option<RequestGuard>,
    claim: Option<StreamClaim>,
    grpc_deadline: Option<Deadline>,
    ended: bool,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody").field("kind", &self.kind).field("ended", &self.ended).finish()
    }
}

impl ProxyBody {
    pub fn upstream(body: Incoming) -> Self {
        Self { kind: Kind::Upstream(body), guard: None, claim: None, grpc_deadline: None, ended: false }
    }

    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)), guard: None, claim: None, grpc_deadline: None, ended: false }
    }

    pub fn empty() -> Self {
        Self { kind: Kind::Full(None), guard: None, claim: None, grpc_deadline: None, ended: false }
    }

    /// Keeps `guard` (the request's in-flight entry) alive until the body ends.
    pub fn with_guard(mut self, guard: RequestGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Keeps the upstream HTTP/2 stream counted against its connection's limit until the body ends,
    /// so the pool does not put more streams on that connection than the upstream allows. `claim` is
    /// the one `Session::send_h2` returned with the response.
    pub fn with_stream_claim(mut self, claim: Option<StreamClaim>) -> Self {
        self.claim = claim;
        self
    }

    /// Ends the body with gRPC UNAVAILABLE trailers when `deadline` resolves.
    pub fn with_grpc_deadline(mut self, deadline: impl Future<Output = ()> + Send + 'static) -> Self {
        self.grpc_deadline = Some(Box::pin(deadline));
        self
    }

    fn finish(&mut self) {
        self.ended = true;
        self.guard = None;
        self.claim = None;
        self.grpc_deadline = None;
    }
}

/// Trailers that end a gRPC stream cut short by a drain: UNAVAILABLE is the status clients retry.
fn unavailable_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("14"));
    t.insert("grpc-message", HeaderValue::from_static("sidecar is draining; retry on another endpoint"));
    t
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(d) = this.grpc_deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                this.finish();
                return Poll::Ready(Some(Ok(Frame::trailers(unavailable_trailers()))));
            }
        }
        let polled = match &mut this.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        match polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Ready(Some(Ok(ref f))) if f.is_trailers() => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || match &self.kind {
                Kind::Upstream(b) => b.is_end_stream(),
                Kind::Full(b) => b.is_none(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body on its way upstream. It replays a first frame read ahead (see
/// `http::server`), and records when the client's side of the body fails, so that the send error
/// hyper reports for it is answered as the client's fault and not as the upstream's.
pub struct RequestBody {
    inner: Incoming,
    first: Option<Frame<Bytes>>,
    failure: ClientFailure,
}

/// Tells, after a send failed, whether the request body had failed first (on the client's side).
#[derive(Clone, Debug, Default)]
pub struct ClientFailure(Option<Arc<AtomicBool>>);

impl ClientFailure {
    /// Whether the client's body yielded an error.
    pub fn failed(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    fn record(&self) {
        if let Some(f) = &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("inner", &self.inner).field("failure", &self.failure).finish()
    }
}

impl RequestBody {
    /// Wraps the client's body; `first` is a frame already read from it, sent before the rest.
    pub fn new(inner: Incoming, first: Option<Frame<Bytes>>) -> Self {
        // A body that is already over cannot fail: skip the allocation on the common bodiless request.
        let failure = if first.is_none() && inner.is_end_stream() {
            ClientFailure(None)
        } else {
            ClientFailure(Some(Arc::new(AtomicBool::new(false))))
        };
        Self { inner, first, failure }
    }

    /// The handle that tells whether this body failed on the client's side.
    pub fn failure(&self) -> ClientFailure {
        self.failure.clone()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(f) = this.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.failure.record();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let first = self.first.as_ref().and_then(|f| f.data_ref()).map_or(0, |d| d.len() as u64);
        if first > 0 {
            // Upper first: raising the lower bound past the old upper would panic.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(first));
            }
            hint.set_lower(hint.lower().saturating_add(first));
        }
        hint
    }
}
