//! A hyper executor whose futures run inside the task of the connection that made them, not as tasks
//! of their own: what an HTTP/2 connection starts per stream (a server's stream, a client's wait for
//! a response, a request body's pipe) then costs no task, and hands nothing over between tasks
//! (docs/architecture.md §12, BENCHMARKS.md "Streams inside their connection's task").
//!
//! A tokio task is allocated 128-byte aligned, which glibc's `posix_memalign` serves at about six
//! times the cost of a `malloc`; on h2c that was two of them per proxied request. Each stream's
//! wake-ups now go to the connection's task, which polls only the futures that were woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::task::AtomicWaker;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor handed to hyper's HTTP/2 builders: it queues what hyper starts for the connection's
/// [`Tasks`] to run.
#[derive(Clone)]
pub struct Inline(Arc<Queue>);

struct Queue {
    started: Mutex<Vec<Task>>,
    /// Set with each start, so that a poll with nothing started takes no lock.
    queued: AtomicBool,
    /// The connection's task, woken when a future is started from outside it (hyper starts them
    /// while it is polled, so this is insurance, not the common path).
    waker: AtomicWaker,
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inline").finish_non_exhaustive()
    }
}

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.started.lock().unwrap_or_else(|p| p.into_inner()).push(Box::pin(fut));
        self.0.queued.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// The futures a connection's [`Inline`] executor was given, run by whoever polls the connection.
pub struct Tasks {
    queue: Arc<Queue>,
    running: FuturesUnordered<Task>,
    /// Swapped with the queue on each poll, so that neither allocates once warm.
    spare: Vec<Task>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("running", &self.running.len()).finish_non_exhaustive()
    }
}

impl Tasks {
    /// An executor for hyper and the tasks it will start.
    pub fn new() -> (Inline, Tasks) {
        let queue = Arc::new(Queue {
            started: Mutex::new(Vec::new()),
            queued: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        (Inline(queue.clone()), Tasks { queue, running: FuturesUnordered::new(), spare: Vec::new() })
    }

    /// Runs what is ready, including what was started since the last call; `Ready` once nothing is
    /// left running or queued.
    pub fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.queue.waker.register(cx.waker());
        loop {
            if self.queue.queued.swap(false, Ordering::AcqRel) {
                {
                    let mut started = self.queue.started.lock().unwrap_or_else(|p| p.into_inner());
                    std::mem::swap(&mut *started, &mut self.spare);
                }
                for task in self.spare.drain(..) {
                    self.running.push(task);
                }
            }
            let polled = self.running.poll_next_unpin(cx);
            // A task started another (an upgrade's pipe): run it in this poll too.
            if self.queue.queued.load(Ordering::Acquire) {
                continue;
            }
            match polled {
                // One finished: look for the next (FuturesUnordered yields to the runtime by itself
                // after polling as many futures as it holds).
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// How many futures are running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

pin_project_lite::pin_project! {
    /// A connection future and the futures it starts, run as one: the output is the connection's,
    /// once its futures have ended as well (they answer requests the connection took).
    pub struct WithTasks<C: Future> {
        #[pin]
        conn: C,
        done: Option<C::Output>,
        tasks: Tasks,
    }
}

impl<C: Future> WithTasks<C> {
    pub fn new(conn: C, tasks: Tasks) -> Self {
        Self { conn, done: None, tasks }
    }

    /// The connection, for what the caller asks of it (a graceful shutdown).
    pub fn conn(self: Pin<&mut Self>) -> Pin<&mut C> {
        self.project().conn
    }
}

impl<C: Future> Future for WithTasks<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        // The connection first: the streams it accepted are then run in this same poll.
        if this.done.is_none() {
            if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                *this.done = Some(out);
            }
        }
        let idle = this.tasks.poll_run(cx).is_ready();
        match this.done.take() {
            Some(out) if idle => Poll::Ready(out),
            other => {
                *this.done = other;
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn started_futures_run_and_the_set_ends_when_they_do() {
        let (exec, mut tasks) = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let r = ran.clone();
        exec.execute(async move {
            let _ = rx.await;
            r.fetch_add(1, Ordering::SeqCst);
        });
        let r = ran.clone();
        let inner = exec.clone();
        exec.execute(async move {
            // A future that starts another, as an upgrade does: it runs without another wake-up.
            let r2 = r.clone();
            inner.execute(async move {
                r2.fetch_add(10, Ordering::SeqCst);
            });
            r.fetch_add(100, Ordering::SeqCst);
        });
        assert!(std::future::poll_fn(|cx| Poll::Ready(tasks.poll_run(cx))).await.is_pending());
        assert_eq!(ran.load(Ordering::SeqCst), 110, "the ready futures ran, the nested one included");
        assert_eq!(tasks.len(), 1, "the one waiting is still held");
        tx.send(()).ok();
        std::future::poll_fn(|cx| tasks.poll_run(cx)).await;
        assert_eq!(ran.load(Ordering::SeqCst), 111);
        assert!(tasks.is_empty());
    }

    #[tokio::test]
    async fn a_connection_with_tasks_ends_after_its_last_task() {
        let (exec, tasks) = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicUsize::new(0));
        let f = finished.clone();
        let conn = async move {
            // The connection starts a stream's future and ends before it does.
            exec.execute(async move {
                let _ = rx.await;
                f.fetch_add(1, Ordering::SeqCst);
            });
            7
        };
        let mut both = Box::pin(WithTasks::new(conn, tasks));
        let polled = std::future::poll_fn(|cx| Poll::Ready(both.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the connection ended, its stream has not");
        tx.send(()).ok();
        assert_eq!(both.await, 7);
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the stream ran to its end first");
    }
}
