//! A time limit on the response headers, used twice in the stack: across every attempt (a cluster's
//! `request_timeout`, 504 `upstream-response-timeout`) and per attempt (`per_try_timeout`, 504
//! `upstream-per-try-timeout`, which the retry policy may retry). No limit costs nothing: the timer
//! exists only when one is set, boxed so that requests without one do not carry its room.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use tower::{Layer, Service};

/// Makes [`Timeout`] services; `on_elapsed` is the error a request that ran out of time ends with.
pub struct TimeoutLayer<E> {
    after: Option<Duration>,
    on_elapsed: fn(Duration) -> E,
}

impl<E> TimeoutLayer<E> {
    pub fn new(after: Option<Duration>, on_elapsed: fn(Duration) -> E) -> Self {
        Self { after, on_elapsed }
    }
}

impl<E> Clone for TimeoutLayer<E> {
    fn clone(&self) -> Self {
        Self { after: self.after, on_elapsed: self.on_elapsed }
    }
}

impl<S, E> Layer<S> for TimeoutLayer<E> {
    type Service = Timeout<S, E>;
    fn layer(&self, inner: S) -> Timeout<S, E> {
        Timeout { after: self.after, on_elapsed: self.on_elapsed, inner }
    }
}

/// Fails a request whose response headers have not come within the limit.
pub struct Timeout<S, E> {
    after: Option<Duration>,
    on_elapsed: fn(Duration) -> E,
    inner: S,
}

impl<S: Clone, E> Clone for Timeout<S, E> {
    fn clone(&self) -> Self {
        Self { after: self.after, on_elapsed: self.on_elapsed, inner: self.inner.clone() }
    }
}

impl<S: std::fmt::Debug, E> std::fmt::Debug for Timeout<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeout").field("after", &self.after).field("inner", &self.inner).finish()
    }
}

impl<S, R, E> Service<R> for Timeout<S, E>
where
    S: Service<R, Error = E>,
{
    type Response = S::Response;
    type Error = E;
    type Future = Either<S::Future, Limited<S::Future, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        match self.after {
            None => Either::Left(fut),
            Some(after) => Either::Right(Limited {
                inner: fut,
                sleep: Box::pin(tokio::time::sleep(after)),
                after,
                on_elapsed: self.on_elapsed,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future raced against its time limit.
    pub struct Limited<F, E> {
        #[pin]
        inner: F,
        sleep: Pin<Box<tokio::time::Sleep>>,
        after: Duration,
        on_elapsed: fn(Duration) -> E,
    }
}

impl<F, T, E> Future for Limited<F, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err((this.on_elapsed)(*this.after))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    #[derive(Debug, PartialEq)]
    struct Elapsed(Duration);

    /// Answers after `delay`.
    fn slow(delay: Duration) -> impl Service<(), Response = &'static str, Error = Elapsed, Future: Send> + Clone {
        tower::service_fn(move |()| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Elapsed>("answered")
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_within_the_limit_passes_and_a_late_one_fails_at_the_limit() {
        let limit = Duration::from_millis(100);
        let layer = TimeoutLayer::new(Some(limit), Elapsed);
        let start = tokio::time::Instant::now();
        let ok = layer.layer(slow(Duration::from_millis(99))).oneshot(()).await;
        assert_eq!(ok, Ok("answered"));
        let start_late = tokio::time::Instant::now();
        let late = layer.layer(slow(Duration::from_millis(101))).oneshot(()).await;
        assert_eq!(late, Err(Elapsed(limit)));
        assert_eq!(start_late - start, Duration::from_millis(99));
        assert_eq!(tokio::time::Instant::now() - start_late, limit, "failed at the limit, not at the answer");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_nothing_is_timed() {
        let layer = TimeoutLayer::new(None, Elapsed);
        let out = layer.layer(slow(Duration::from_secs(3600))).oneshot(()).await;
        assert_eq!(out, Ok("answered"));
    }
}
