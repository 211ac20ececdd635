//! The response body Ebb sends: the upstream's, streamed frame by frame, or one Ebb made. It keeps its
//! request listed as in flight, and the counted places the response took (its upstream stream, its
//! request slots), until the last frame is out; tells a [`BodyObserver`] how the body ended; and can end
//! a gRPC stream with `grpc-status: 14` at the drain deadline instead of letting it be reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conntrack::activity::{Part, StreamActivity, StreamIdle};
use crate::conntrack::RequestGuard;
use crate::limits::Slot;

/// Why a response body Ebb sends failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream's body failed; an HTTP/2 reset reason in it is passed on to the client.
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// The stream moved nothing for `downstream.stream_idle_timeout`.
    #[error(transparent)]
    Idle(#[from] StreamIdle),
}

/// Told once how a proxied response body ended, so that whoever sent the request (the upstream stack's
/// breaker) learns it without this module knowing who listens. Implemented by something long-lived
/// (a cluster) and handed over as a shared pointer with a key (see [`Observer`]): watching a body
/// allocates nothing.
pub trait BodyObserver: Send + Sync + 'static {
    /// The body ended, or was dropped before it did; `failed` when it failed on the upstream's side
    /// (the connection died mid-stream, or its trailers said so).
    fn ended(&self, key: usize, failed: bool);
    /// Whether a body's trailers report the upstream's failure.
    fn trailers_failed(&self, trailers: &HeaderMap) -> bool;
}

/// A [`BodyObserver`] watching one body, with the key it gave; tells it once, when dropped.
pub struct Observer {
    target: Arc<dyn BodyObserver>,
    key: usize,
    failed: bool,
}

impl Observer {
    pub fn new(target: Arc<dyn BodyObserver>, key: usize) -> Self {
        Self { target, key, failed: false }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.target.ended(self.key, self.failed);
    }
}

/// Counted places a response holds until its body has been sent whole, not just until its headers
/// arrived: its HTTP/2 stream under the upstream connection's limit, its place on the endpoint's
/// outstanding count, its request under the cluster's and the listener's `max_requests`.
const HELD_SLOTS: usize = 4;

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
    slots: [Option<Slot>; HELD_SLOTS],
    observer: Option<Observer>,
    grpc_deadline: Option<Deadline>,
    ended: bool,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody").field("kind", &self.kind).field("ended", &self.ended).finish()
    }
}

impl ProxyBody {
    fn of(kind: Kind) -> Self {
        Self { kind, guard: None, slots: Default::default(), observer: None, grpc_deadline: None, ended: false }
    }

    pub fn upstream(body: Incoming) -> Self {
        Self::of(Kind::Upstream(body))
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::of(Kind::Full(Some(bytes)))
    }

    pub fn empty() -> Self {
        Self::of(Kind::Full(None))
    }

    /// Keeps `guard` (the request's in-flight entry) alive until the body ends.
    pub fn with_guard(mut self, guard: RequestGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Keeps `slot` taken until the body ends. A response holds at most four (its stream, its place on
    /// the endpoint, its cluster's and its listener's request slots); a fifth is released at once, so
    /// the debug assertion is there to catch a layer added without room made for it.
    pub fn hold(&mut self, slot: Slot) {
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(free) => *free = Some(slot),
            None => debug_assert!(false, "a response holds at most {HELD_SLOTS} slots"),
        }
    }

    /// Tells `observer` how the body ends (replacing any earlier one, which is dropped).
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }

    /// The same response without content: for a response that must end with its header section
    /// (204, 304, an answer to HEAD) whatever the upstream sent after it. An unfinished upstream body
    /// is dropped, which cancels its HTTP/2 stream.
    pub fn without_content(mut self) -> Self {
        self.kind = Kind::Full(None);
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
        self.slots = Default::default();
        self.observer = None;
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
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // Only an upstream's body can stall; one Ebb made (an error it answers with) goes out whole.
        let upstream = matches!(this.kind, Kind::Upstream(_));
        if upstream && this.guard.as_ref().is_some_and(|g| g.activity().is_expired()) {
            // The client is told the stream was cancelled (HTTP/2), or the connection ends (HTTP/1.1);
            // the upstream's stream goes with the dropped body.
            this.finish();
            this.kind = Kind::Full(None);
            return Poll::Ready(Some(Err(StreamIdle::new().into())));
        }
        if let Some(d) = this.grpc_deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                this.finish();
                return Poll::Ready(Some(Ok(Frame::trailers(unavailable_trailers()))));
            }
        }
        let mut polled = match &mut this.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        match &mut polled {
            Poll::Pending => {
                let expired =
                    this.guard.as_ref().is_some_and(|g| g.activity().poll_expired(Part::ResponseBody, cx).is_ready());
                if expired {
                    // Found idle since the check above: end at the next poll, which this asks for.
                    cx.waker().wake_by_ref();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(o) = this.observer.as_mut() {
                    o.failed = true;
                }
                this.finish()
            }
            Poll::Ready(Some(Ok(f))) => {
                if let Some(g) = &this.guard {
                    g.activity().moved();
                }
                if let Some(t) = f.trailers_mut() {
                    crate::http::headers::clean_trailers(t);
                    if let Some(o) = this.observer.as_mut() {
                        o.failed |= o.target.trailers_failed(t);
                    }
                    this.finish()
                }
            }
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
/// `http::server`), records when the client's side of the body fails (so that the send error hyper
/// reports for it is answered as the client's fault, not the upstream's), and keeps what it has sent,
/// up to a limit, so that a retry can send the same body again ([`RequestBody::replay`]).
pub struct RequestBody {
    /// `None` for a request without a body: nothing to share, nothing allocated.
    shared: Option<Arc<Mutex<Tee>>>,
    /// Frames of the body this copy has yielded.
    pos: usize,
    hint: SizeHint,
    failure: ClientFailure,
    /// The client's 1xx sender (hyper's server hands it over in the body): it goes with every copy
    /// and is handed to the upstream connection when a copy is sent (`http::client::Dispatch`), so
    /// no request carries an extension map for it.
    interim: Option<hyper::ext::InterimSender>,
}

/// What every copy of one request body shares: the client's body, and the frames taken from it.
struct Tee {
    source: Incoming,
    first: Option<Frame<Bytes>>,
    /// Frames read from the client so far, kept while their data stays within `limit`.
    kept: Vec<Kept>,
    /// Frames read from the client so far.
    read: usize,
    bytes: usize,
    limit: usize,
    /// More than `limit` was read: the frames are gone and the body cannot be sent again.
    overflowed: bool,
    ended: bool,
    /// The request's liveness: frames read from the client count as its stream moving.
    activity: Option<Arc<StreamActivity>>,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Self::Data(b) => Frame::data(b.clone()),
            Self::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

/// Tells, after a send failed, whether the request body had failed first (on the client's side), and
/// whether that was the stream idle timeout. Kept beside the send's error rather than read from it:
/// hyper hands the body's error back only when it fails before the stream is open; after that the
/// send fails with the stream's reset, which no longer carries it.
#[derive(Clone, Debug, Default)]
pub struct ClientFailure(Option<Arc<AtomicU8>>);

/// [`ClientFailure`]'s states.
const BODY_OK: u8 = 0;
const BODY_FAILED: u8 = 1;
const BODY_IDLE: u8 = 2;

impl ClientFailure {
    /// Whether the client's body yielded an error.
    pub fn failed(&self) -> bool {
        self.state() != BODY_OK
    }

    /// Whether that error was the client stalling past the stream idle timeout.
    pub fn stalled(&self) -> bool {
        self.state() == BODY_IDLE
    }

    fn state(&self) -> u8 {
        self.0.as_ref().map_or(BODY_OK, |f| f.load(Ordering::Relaxed))
    }

    fn record(&self, state: u8) {
        if let Some(f) = &self.0 {
            f.store(state, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody").field("pos", &self.pos).field("failure", &self.failure).finish()
    }
}

impl RequestBody {
    /// Wraps the client's body; `first` is a frame already read from it, sent before the rest. Nothing
    /// is kept for a resend until [`RequestBody::keep_for_replay`] says how much may be. Frames read
    /// count on `activity`, and the body fails once that is found idle.
    pub fn new(mut inner: Incoming, first: Option<Frame<Bytes>>, activity: Option<Arc<StreamActivity>>) -> Self {
        let interim = inner.take_interim_sender();
        let mut hint = inner.size_hint();
        let first_len = first.as_ref().and_then(|f| f.data_ref()).map_or(0, |d| d.len() as u64);
        if first_len > 0 {
            // Upper first: raising the lower bound past the old upper would panic.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(first_len));
            }
            hint.set_lower(hint.lower().saturating_add(first_len));
        }
        // A body that is already over cannot fail and needs no copy: skip the allocations on the
        // common bodiless request.
        if first.is_none() && inner.is_end_stream() {
            return Self { shared: None, pos: 0, hint, failure: ClientFailure(None), interim };
        }
        let tee = Tee {
            source: inner,
            first,
            kept: Vec::new(),
            read: 0,
            bytes: 0,
            limit: 0,
            overflowed: false,
            ended: false,
            activity,
        };
        Self {
            shared: Some(Arc::new(Mutex::new(tee))),
            pos: 0,
            hint,
            failure: ClientFailure(Some(Arc::new(AtomicU8::new(BODY_OK)))),
            interim,
        }
    }

    /// A request without a body (a request Ebb makes itself; tests).
    pub fn empty() -> Self {
        Self { shared: None, pos: 0, hint: SizeHint::with_exact(0), failure: ClientFailure(None), interim: None }
    }

    /// Keeps up to `limit` bytes of the body for a resend: set by whoever may resend it (the retry
    /// layer, from its cluster's `retry.max_body_bytes`) before the body is first read.
    pub fn keep_for_replay(&self, limit: usize) {
        if let Some(shared) = &self.shared {
            let mut tee = lock(shared);
            if tee.read == 0 {
                tee.limit = limit;
            }
        }
    }

    /// The client's 1xx sender, to hand to the upstream connection this copy is sent on.
    pub fn take_interim(&mut self) -> Option<hyper::ext::InterimSender> {
        self.interim.take()
    }

    /// The handle that tells whether this body failed on the client's side.
    pub fn failure(&self) -> ClientFailure {
        self.failure.clone()
    }

    /// Another copy of the body from its start, for a retry; `None` once more than the replay limit
    /// has been read from the client (what was sent is gone).
    pub fn replay(&self) -> Option<Self> {
        if let Some(shared) = &self.shared {
            if lock(shared).overflowed {
                return None;
            }
        }
        Some(Self {
            shared: self.shared.clone(),
            pos: 0,
            hint: self.hint,
            failure: self.failure.clone(),
            interim: self.interim.clone(),
        })
    }
}

fn lock(tee: &Mutex<Tee>) -> std::sync::MutexGuard<'_, Tee> {
    // Per request, never held across an await; a panic under it leaves counts that only stop replays.
    match tee.lock() {
        Ok(t) => t,
        Err(p) => p.into_inner(),
    }
}

/// A copy of the body that fell behind what is kept: another copy read past the replay limit.
#[derive(Debug, thiserror::Error)]
#[error("request body can no longer be replayed")]
struct ReplayLost;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(shared) = &this.shared else { return Poll::Ready(None) };
        let mut tee = lock(shared);
        if this.pos < tee.kept.len() {
            let frame = tee.kept[this.pos].frame();
            this.pos += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.pos != tee.read {
            return Poll::Ready(Some(Err(Box::new(ReplayLost))));
        }
        if tee.ended {
            return Poll::Ready(None);
        }
        if let Some(a) = &tee.activity {
            if a.is_expired() {
                // Idle while waiting on the client: the client's fault (408), as a failing body is.
                if a.client_stalled() {
                    this.failure.record(BODY_IDLE);
                }
                return Poll::Ready(Some(Err(Box::new(StreamIdle::new()))));
            }
        }
        let polled = match tee.first.take() {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None => Pin::new(&mut tee.source).poll_frame(cx),
        };
        if let Some(a) = &tee.activity {
            a.set_client_stalled(polled.is_pending());
            match &polled {
                Poll::Ready(Some(Ok(_))) => a.moved(),
                Poll::Pending if a.poll_expired(Part::RequestBody, cx).is_ready() => cx.waker().wake_by_ref(),
                _ => {}
            }
        }
        match polled {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(t) = frame.trailers_mut() {
                    crate::http::headers::clean_trailers(t);
                }
                tee.read += 1;
                this.pos += 1;
                if !tee.overflowed {
                    let kept = match frame.data_ref() {
                        Some(d) => {
                            tee.bytes = tee.bytes.saturating_add(d.len());
                            Kept::Data(d.clone())
                        }
                        None => match frame.trailers_ref() {
                            Some(t) => Kept::Trailers(t.clone()),
                            None => Kept::Data(Bytes::new()),
                        },
                    };
                    if tee.bytes > tee.limit {
                        tee.overflowed = true;
                        tee.kept = Vec::new();
                    } else {
                        tee.kept.push(kept);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.failure.record(BODY_FAILED);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                tee.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => {
                let tee = lock(shared);
                self.pos == tee.read && (tee.ended || (tee.first.is_none() && tee.source.is_end_stream()))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
