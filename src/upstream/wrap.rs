//! One tower `Service` for every layer of the upstream stack: a layer is a [`Step`], what it does
//! before its inner service (check, count, choose, or refuse at once) and after it (hold a slot in the
//! response body, tell a breaker, map an error). Writing the service, its future and its layer once
//! keeps each layer's file to its own rule, and costs no allocation per layer and request: a boxed
//! future per layer would add one each (BENCHMARKS.md, issue 19).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::future::{Either, Ready};
use http::Response;
use tower::{Layer, Service};

use crate::http::body::ProxyBody;

/// What a layer does around its inner service for a request of type `Req`. Every layer answers with a
/// response on its way to the client, `Response<ProxyBody>`.
pub trait Step<Req>: Clone {
    /// The inner service's request and error.
    type InnerReq;
    type InnerErr;
    /// This layer's error.
    type Error;
    /// What the layer keeps for after the inner service answered.
    type After: Finish<Result<Response<ProxyBody>, Self::InnerErr>, Out = Result<Response<ProxyBody>, Self::Error>>;

    /// Before the inner service: the request to send it and what to do after, or this layer's answer
    /// at once.
    fn before(&self, req: Req) -> Result<(Self::InnerReq, Self::After), Self::Error>;

    /// The inner service could not become ready.
    fn not_ready(e: Self::InnerErr) -> Self::Error;
}

/// What a layer does with its inner service's result.
pub trait Finish<In> {
    type Out;
    fn finish(self, result: In) -> Self::Out;

    /// The span the inner service runs in, if the layer opened one (entered on each poll). None costs
    /// nothing: a wrapper future per layer would cost every request a span check per poll.
    fn span(&self) -> Option<&tracing::Span> {
        None
    }
}

/// A [`Step`] in front of a service.
#[derive(Clone, Debug)]
pub struct Wrapped<T, S> {
    step: T,
    inner: S,
}

/// The layer that puts `step` in front of a service.
pub fn layer<T: Clone, S>(step: T) -> impl Layer<S, Service = Wrapped<T, S>> + Clone {
    tower::layer::layer_fn(move |inner| Wrapped { step: step.clone(), inner })
}

impl<T, S, Req> Service<Req> for Wrapped<T, S>
where
    T: Step<Req>,
    S: Service<T::InnerReq, Response = Response<ProxyBody>, Error = T::InnerErr>,
{
    type Response = Response<ProxyBody>;
    type Error = T::Error;
    type Future = Either<Ready<Result<Response<ProxyBody>, T::Error>>, Then<S::Future, T::After>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), T::Error>> {
        self.inner.poll_ready(cx).map_err(T::not_ready)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.step.before(req) {
            Ok((req, after)) => {
                // Called inside the layer's span too: what the inner service does at once is in it.
                let inner = match after.span() {
                    Some(span) => span.in_scope(|| self.inner.call(req)),
                    None => self.inner.call(req),
                };
                Either::Right(Then { inner, then: Some(after) })
            }
            Err(answer) => Either::Left(futures_util::future::ready(Err(answer))),
        }
    }
}

pin_project_lite::pin_project! {
    /// `inner`, then `then` applied to its output.
    pub struct Then<F, T> {
        #[pin]
        inner: F,
        then: Option<T>,
    }
}

impl<F: Future, T: Finish<F::Output>> Future for Then<F, T> {
    type Output = T::Out;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Out> {
        let this = self.project();
        let out = {
            let _entered = this.then.as_ref().and_then(Finish::span).map(tracing::Span::enter);
            ready!(this.inner.poll(cx))
        };
        match this.then.take() {
            Some(then) => Poll::Ready(then.finish(out)),
            // Polled again after it completed: a caller's bug, which never completes twice.
            None => Poll::Pending,
        }
    }
}
