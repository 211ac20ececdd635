//! The response body Ebb sends: the upstream's, streamed frame by frame, or one Ebb made. It keeps its
//! request listed as in flight until the last frame is out, and can end a gRPC stream with
//! `grpc-status: 14` at the drain deadline instead of letting it be reset.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conntrack::RequestGuard;

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
        Self { kind: Kind::Upstream(body), guard: None, grpc_deadline: None, ended: false }
    }

    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)), guard: None, grpc_deadline: None, ended: false }
    }

    pub fn empty() -> Self {
        Self { kind: Kind::Full(None), guard: None, grpc_deadline: None, ended: false }
    }

    /// Keeps `guard` (the request's in-flight entry) alive until the body ends.
    pub fn with_guard(mut self, guard: RequestGuard) -> Self {
        self.guard = Some(guard);
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
