//! Interim (1xx) responses a server's service sends before its final response.
//!
//! RFC 9110 §15.2: a proxy must forward the 1xx responses it did not ask for itself (`103 Early
//! Hints`, an origin's `100 Continue`). A service gets an [`InterimSender`] with each request's
//! body (`Incoming::take_interim_sender`, HTTP/1.1 and HTTP/2 servers); what it sends goes out
//! ahead of the final response.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;

use atomic_waker::AtomicWaker;
use http::{header, HeaderMap, HeaderName, Response};

/// Sends interim responses for the request it came with (taken from the request's body).
///
/// Only `1xx` statuses other than `101` are sent (a protocol switch is the final response's job);
/// once the final response has gone out, or the connection is gone, [`InterimSender::send`]
/// returns `false` and sends nothing. An HTTP/1.0 client is sent none (it cannot parse them), and
/// an HTTP/1.1 client at most one `100 Continue` (hyper sends its own when the service first reads
/// the body of a request that expects one).
#[derive(Clone)]
pub struct InterimSender {
    shared: Arc<Inner>,
    generation: u64,
}

/// Polled on every write of its connection: `pending` and `waker` keep that poll off the lock.
struct Inner {
    pending: AtomicBool,
    waker: AtomicWaker,
    state: Mutex<Shared>,
}

impl std::fmt::Debug for InterimSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterimSender").finish()
    }
}

#[derive(Default)]
struct Shared {
    queue: Vec<Response<()>>,
    /// Which request may send: each request a connection serves gets the next.
    generation: u64,
    /// The current request's final response is out (or the connection is gone).
    closed: bool,
}

impl InterimSender {
    /// Queues `res` to go out before the final response; `false` when it will not.
    /// Connection-specific fields of `res` (`Connection` and what it names, `Keep-Alive`,
    /// `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`) are removed: they described the hop
    /// it came over, if it was relayed.
    pub fn send(&self, mut res: Response<()>) -> bool {
        if !res.status().is_informational() || res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return false;
        }
        strip_connection_fields(res.headers_mut());
        {
            let mut shared = lock(&self.shared.state);
            if shared.closed || shared.generation != self.generation {
                return false;
            }
            shared.queue.push(res);
        }
        self.shared.pending.store(true, Ordering::Release);
        self.shared.waker.wake();
        true
    }
}

fn strip_connection_fields(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The connection's side: one per HTTP/1.1 connection (reused request after request) or per
/// HTTP/2 stream.
pub(crate) struct InterimReceiver {
    shared: Arc<Inner>,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl InterimReceiver {
    pub(crate) fn new() -> Self {
        Self {
            shared: Arc::new(Inner {
                pending: AtomicBool::new(false),
                waker: AtomicWaker::new(),
                state: Mutex::new(Shared {
                    closed: true,
                    ..Shared::default()
                }),
            }),
        }
    }

    /// Opens the window for the next request, and hands out its sender.
    pub(crate) fn open_next(&self) -> InterimSender {
        let mut shared = lock(&self.shared.state);
        shared.generation += 1;
        shared.closed = false;
        shared.queue.clear();
        InterimSender {
            shared: self.shared.clone(),
            generation: shared.generation,
        }
    }

    /// What was sent since the last call; with nothing, the task is woken by the next send.
    pub(crate) fn take(&self, cx: &mut Context<'_>) -> Vec<Response<()>> {
        if !self.shared.pending.load(Ordering::Acquire) {
            self.shared.waker.register(cx.waker());
            // A send between the check and the registration woke no one: look again.
            if !self.shared.pending.load(Ordering::Acquire) {
                return Vec::new();
            }
        }
        self.shared.pending.store(false, Ordering::Release);
        std::mem::take(&mut lock(&self.shared.state).queue)
    }

    /// The final response is out: later sends are refused.
    pub(crate) fn close(&self) {
        let mut shared = lock(&self.shared.state);
        shared.closed = true;
        shared.queue.clear();
        self.shared.pending.store(false, Ordering::Release);
    }
}

impl Drop for InterimReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

/// An interim response as HTTP/1.1 bytes: status line, fields, empty line.
#[cfg(feature = "http1")]
pub(crate) fn encode_h1(res: &Response<()>, dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(res.status().as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(res.status().canonical_reason().unwrap_or("Informational").as_bytes());
    dst.extend_from_slice(b"\r\n");
    for (name, value) in res.headers() {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}
