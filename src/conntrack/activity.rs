//! One in-flight request's liveness for `downstream.stream_idle_timeout` (docs/architecture.md §11):
//! its bodies count the frames they move, its connection's coarse idle tick compares the count with
//! the last one it saw, and marks a stream that moved nothing for the timeout as expired, which wakes
//! whichever part of the request was waiting so that it ends.
//!
//! Counting is one relaxed add per frame and waiting one waker registration: no timer per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// The part of a request that waits. The response and its body run on the request's task, one after
/// the other, and share a waker; the request body runs on the task that sends it upstream.
#[derive(Clone, Copy, Debug)]
pub enum Part {
    /// Waiting for the upstream's response head.
    Response,
    /// The response body, waiting for the upstream.
    ResponseBody,
    /// The request body, waiting for the client.
    RequestBody,
}

impl Part {
    fn slot(self) -> usize {
        match self {
            Self::Response | Self::ResponseBody => 0,
            Self::RequestBody => 1,
        }
    }
}

/// A request's moved-frame count and idle verdict, shared by its parts and its connection's record.
#[derive(Debug, Default)]
pub struct StreamActivity {
    frames: AtomicU64,
    expired: AtomicBool,
    /// The request body is waiting for the client's next bytes (an idle stream is then the client's
    /// doing: 408, not 504).
    client_stalled: AtomicBool,
    waiting: [AtomicWaker; 2],
}

impl StreamActivity {
    /// A body frame went through, either way.
    pub fn moved(&self) {
        self.frames.fetch_add(1, Relaxed);
    }

    /// Whether the request body is waiting on the client; `moved` is called for each frame it gets.
    pub fn set_client_stalled(&self, stalled: bool) {
        if self.client_stalled.load(Relaxed) != stalled {
            self.client_stalled.store(stalled, Relaxed);
        }
    }

    /// Whether the stream went idle while its request body waited on the client.
    pub fn client_stalled(&self) -> bool {
        self.client_stalled.load(Relaxed)
    }

    pub fn frames(&self) -> u64 {
        self.frames.load(Relaxed)
    }

    pub fn is_expired(&self) -> bool {
        self.expired.load(Acquire)
    }

    /// Ready once the stream has been found idle; otherwise `part`'s waker is kept to hear of it.
    pub fn poll_expired(&self, part: Part, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_expired() {
            return Poll::Ready(());
        }
        self.waiting[part.slot()].register(cx.waker());
        // Expired between the check and the registration: its wake-up may have missed this waker.
        if self.is_expired() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Marks the stream idle and wakes every part that waits.
    pub fn expire(&self) {
        self.expired.store(true, Release);
        for w in &self.waiting {
            w.wake();
        }
    }
}

/// Why a body ended early: its stream moved nothing for `downstream.stream_idle_timeout`. Its source
/// is an HTTP/2 CANCEL, which hyper then resets the stream with.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes either way for downstream.stream_idle_timeout")]
pub struct StreamIdle(#[source] h2::Error);

impl StreamIdle {
    pub fn new() -> Self {
        Self(h2::Error::from(h2::Reason::CANCEL))
    }
}

impl Default for StreamIdle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn expiring_wakes_a_waiting_part() {
        let a = std::sync::Arc::new(StreamActivity::default());
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { poll_fn(|cx| a.poll_expired(Part::ResponseBody, cx)).await }
        });
        // The waiter registers before it can see the flag: yield until it has run once.
        tokio::task::yield_now().await;
        a.moved();
        assert_eq!(a.frames(), 1);
        a.expire();
        assert!(waiter.await.is_ok());
        assert!(a.is_expired());
    }
}
