//! The future every upstream layer returns: its inner service's future, then the layer's own
//! bookkeeping on the result (a slot held by the response body, a breaker told, an error counted).
//! Written once so that a layer costs no allocation per request: a boxed future per layer would add an
//! allocation each (BENCHMARKS.md, issue 19).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// What a layer does with its inner service's result.
pub trait Finish<In> {
    type Out;
    fn finish(self, result: In) -> Self::Out;
}

pin_project_lite::pin_project! {
    /// `inner`, then `then` applied to its output.
    pub struct Then<F, T> {
        #[pin]
        inner: F,
        then: Option<T>,
    }
}

impl<F, T> Then<F, T> {
    pub fn new(inner: F, then: T) -> Self {
        Self { inner, then: Some(then) }
    }
}

impl<F: Future, T: Finish<F::Output>> Future for Then<F, T> {
    type Output = T::Out;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Out> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        match this.then.take() {
            Some(then) => Poll::Ready(then.finish(out)),
            // Polled again after it completed: a caller's bug, which never completes twice.
            None => Poll::Pending,
        }
    }
}

/// A layer's future: its answer at once (a refusal), or its inner service's under way.
pub type Answer<T, F> = futures_util::future::Either<futures_util::future::Ready<T>, F>;

/// An answer given at once, without calling the inner service.
pub fn at_once<T, F>(value: T) -> Answer<T, F> {
    futures_util::future::Either::Left(futures_util::future::ready(value))
}

/// The inner service's answer, finished by `then`.
pub fn after<F: Future, T: Finish<F::Output>>(inner: F, then: T) -> Answer<T::Out, Then<F, T>> {
    futures_util::future::Either::Right(Then::new(inner, then))
}
