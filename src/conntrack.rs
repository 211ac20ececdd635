//! Every live connection and in-flight request, cheap to update and cheap to list.
//!
//! The registry lock is taken once when a connection opens and once when it closes (sharded, so
//! accepts on different threads rarely meet); a request touches only its own connection's record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::Direction;
use crate::domain::Protocol;
use crate::telemetry::metrics::Metrics;

pub mod activity;

pub use activity::StreamActivity;

const SHARDS: usize = 16;

pub use crate::domain::ConnId;

/// What a connection is doing, as far as a drain cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Detecting,
    Serving,
    /// An HTTP/1.1 upgrade (WebSocket) spliced as bytes.
    Upgraded,
    /// Opaque TCP, forwarded as bytes.
    Forwarding,
    /// Closed by Ebb, waiting for the client's FIN so that no response byte is lost to a reset.
    Lingering,
}

impl ConnState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Serving,
            2 => Self::Upgraded,
            3 => Self::Forwarding,
            4 => Self::Lingering,
            _ => Self::Detecting,
        }
    }
}

/// Lifetime totals, read together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub closed: u64,
    pub forced: u64,
    pub requests_completed: u64,
}

/// One live connection's record.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    pub direction: Direction,
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    started: Instant,
    started_wall: SystemTime,
    protocol: AtomicU8,
    state: AtomicU8,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    requests: AtomicU64,
    next_request: AtomicU64,
    in_flight: Mutex<Vec<InFlight>>,
    /// The last finished request's activity record, reused by the next request once nothing else
    /// holds it: an HTTP/1.1 connection's requests take turns, and then allocate none (BENCHMARKS.md,
    /// "Streams inside their connection's task").
    spare_activity: Mutex<Option<Arc<StreamActivity>>>,
    /// Told to go by a drain (GOAWAY or `Connection: close` sent).
    told_to_go: AtomicBool,
    forced: AtomicBool,
    /// Mesh TLS: the SPIFFE ID the peer proved (inbound: the client; outbound: not tracked here).
    peer_identity: std::sync::OnceLock<Arc<str>>,
}

#[derive(Clone, Debug)]
struct InFlight {
    id: u64,
    method: http::Method,
    uri: http::Uri,
    started: Instant,
    activity: Arc<StreamActivity>,
    /// The activity's frame count at the last idle tick that saw it change, and when.
    seen: u64,
    moved_at: Instant,
}

impl Conn {
    /// A new request's activity record: the spare one if no earlier request still holds it.
    fn fresh_activity(&self) -> Arc<StreamActivity> {
        let spare = self.spare_activity.lock().ok().and_then(|mut s| s.take());
        if let Some(mut a) = spare {
            if let Some(record) = Arc::get_mut(&mut a) {
                *record = StreamActivity::default();
                return a;
            }
        }
        Arc::new(StreamActivity::default())
    }

    pub fn protocol(&self) -> Option<Protocol> {
        match self.protocol.load(Relaxed) {
            1 => Some(Protocol::Http1),
            2 => Some(Protocol::Http2),
            3 => Some(Protocol::Opaque),
            _ => None,
        }
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }

    pub fn set_state(&self, s: ConnState) {
        self.state.store(s as u8, Relaxed);
    }

    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Requests completed on this connection.
    pub fn requests_done(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map(|v| v.len()).unwrap_or(0)
    }

    pub fn told_to_go(&self) -> bool {
        self.told_to_go.load(Relaxed)
    }

    pub fn mark_told_to_go(&self) -> bool {
        !self.told_to_go.swap(true, Relaxed)
    }

    /// Marks the connection as forced closed; false if it already was.
    pub fn mark_forced(&self) -> bool {
        !self.forced.swap(true, Relaxed)
    }

    /// At an idle tick: marks expired each in-flight request whose bodies moved nothing for `idle`,
    /// and says how many it marked now and whether one marked at an earlier tick is still here (its
    /// bodies are not being polled: flow control stopped them, so only closing the connection ends it).
    pub fn expire_idle_streams(&self, idle: std::time::Duration) -> (usize, bool) {
        let now = Instant::now();
        let (mut marked, mut stuck) = (0, false);
        if let Ok(mut v) = self.in_flight.lock() {
            for r in v.iter_mut() {
                let frames = r.activity.frames();
                if frames != r.seen {
                    r.seen = frames;
                    r.moved_at = now;
                } else if now.saturating_duration_since(r.moved_at) >= idle {
                    if r.activity.is_expired() {
                        stuck = true;
                    } else {
                        r.activity.expire();
                        marked += 1;
                    }
                }
            }
        }
        (marked, stuck)
    }

    /// Describes the connection for listings and drain reports.
    pub fn snapshot(&self) -> ConnSnapshot {
        let now = Instant::now();
        let in_flight = self
            .in_flight
            .lock()
            .map(|v| {
                v.iter()
                    .map(|r| RequestSnapshot {
                        id: r.id,
                        method: r.method.to_string(),
                        uri: r.uri.to_string(),
                        age_ms: now.saturating_duration_since(r.started).as_millis() as u64,
                    })
                    .collect()
            })
            .unwrap_or_default();
        ConnSnapshot {
            id: self.id,
            direction: self.direction,
            listener: self.listener.to_string(),
            client_addr: self.client,
            orig_dst: self.orig_dst,
            protocol: self.protocol().map(Protocol::as_str).unwrap_or("detecting"),
            state: self.state(),
            started_at: humantime::format_rfc3339_millis(self.started_wall).to_string(),
            age_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            requests: self.requests.load(Relaxed),
            told_to_go: self.told_to_go.load(Relaxed),
            peer_identity: self.peer_identity.get().map(|p| p.to_string()),
            in_flight,
        }
    }

    /// The SPIFFE ID the client proved with mesh TLS, if it did.
    pub fn peer_identity(&self) -> Option<&Arc<str>> {
        self.peer_identity.get()
    }
}

/// A connection as listed by `GET /connections`.
#[derive(Clone, Debug, Serialize)]
pub struct ConnSnapshot {
    pub id: ConnId,
    pub direction: Direction,
    pub listener: String,
    pub client_addr: SocketAddr,
    pub orig_dst: SocketAddr,
    pub protocol: &'static str,
    pub state: ConnState,
    pub started_at: String,
    pub age_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
    pub told_to_go: bool,
    /// Mesh TLS: the identity the client proved; absent on plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    pub in_flight: Vec<RequestSnapshot>,
}

/// An in-flight request as listed.
#[derive(Clone, Debug, Serialize)]
pub struct RequestSnapshot {
    pub id: u64,
    pub method: String,
    pub uri: String,
    pub age_ms: u64,
}

/// Live counts, for status, drain progress and early exit.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub connections: usize,
    pub inbound: usize,
    pub outbound: usize,
    pub http2_connections: usize,
    pub in_flight_requests: usize,
}

/// A counter alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PaddedCount(AtomicU64);

/// The registry of live connections.
#[derive(Debug)]
pub struct ConnTrack {
    shards: Vec<Mutex<HashMap<u64, Arc<Conn>>>>,
    next_id: AtomicU64,
    live: [AtomicUsize; 2],
    /// Per direction: open listeners, and connections accepted but not yet listed (see `Hold`).
    listeners_open: [AtomicUsize; 2],
    pending: [AtomicUsize; 2],
    closed: AtomicU64,
    forced: AtomicU64,
    /// Requests completed, counted in the shard of their connection's id: one counter per cache line,
    /// so that connections on different threads do not bounce a single line on every request.
    requests_completed: [PaddedCount; SHARDS],
    changed: Notify,
    metrics: Arc<Metrics>,
}

impl ConnTrack {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            live: [AtomicUsize::new(0), AtomicUsize::new(0)],
            listeners_open: [AtomicUsize::new(0), AtomicUsize::new(0)],
            pending: [AtomicUsize::new(0), AtomicUsize::new(0)],
            closed: AtomicU64::new(0),
            forced: AtomicU64::new(0),
            requests_completed: std::array::from_fn(|_| PaddedCount::default()),
            changed: Notify::new(),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Keeps `direction`'s drain from ending while `what` lasts: a listener until it has closed (the
    /// connections it takes from the accept queue as it closes are not listed yet), or a connection
    /// from its accept until its task ends (listing it waits for its original destination).
    pub fn hold(self: &Arc<Self>, direction: Direction, what: HoldKind) -> Hold {
        self.held(what)[direction as usize].fetch_add(1, SeqCst);
        Hold { track: self.clone(), direction, what }
    }

    fn held(&self, what: HoldKind) -> &[AtomicUsize; 2] {
        match what {
            HoldKind::Listener => &self.listeners_open,
            HoldKind::Accepted => &self.pending,
        }
    }

    /// Connections in `direction` that are listed or on their way to being listed.
    pub fn live_or_pending(&self, direction: Direction) -> usize {
        self.live(direction) + self.pending[direction as usize].load(SeqCst)
    }

    /// Listeners of `direction` not closed yet.
    pub fn listeners_open(&self, direction: Direction) -> usize {
        self.listeners_open[direction as usize].load(SeqCst)
    }

    /// Registers a new connection; it is listed until the returned handle (and every clone) drops.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        listener: Arc<str>,
        client: SocketAddr,
        orig_dst: SocketAddr,
    ) -> ConnHandle {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn {
            id: ConnId(id),
            direction,
            listener,
            client,
            orig_dst,
            started: Instant::now(),
            started_wall: SystemTime::now(),
            protocol: AtomicU8::new(0),
            state: AtomicU8::new(ConnState::Detecting as u8),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            next_request: AtomicU64::new(1),
            in_flight: Mutex::new(Vec::new()),
            spare_activity: Mutex::new(None),
            told_to_go: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            peer_identity: std::sync::OnceLock::new(),
        });
        if let Ok(mut shard) = self.shard(id).lock() {
            shard.insert(id, conn.clone());
        }
        self.live[direction as usize].fetch_add(1, Relaxed);
        ConnHandle { conn, track: self.clone() }
    }

    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Conn>>> {
        &self.shards[id as usize % SHARDS]
    }

    /// Every live connection, oldest first.
    pub fn snapshot(&self) -> Vec<ConnSnapshot> {
        let mut all: Vec<ConnSnapshot> = self.conns().iter().map(|c| c.snapshot()).collect();
        all.sort_by_key(|c| c.id.0);
        all
    }

    /// The live connection records themselves.
    pub fn conns(&self) -> Vec<Arc<Conn>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                out.extend(shard.values().cloned());
            }
        }
        out
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            inbound: self.live[Direction::Inbound as usize].load(Relaxed),
            outbound: self.live[Direction::Outbound as usize].load(Relaxed),
            ..Default::default()
        };
        c.connections = c.inbound + c.outbound;
        for conn in self.conns() {
            if conn.protocol() == Some(Protocol::Http2) {
                c.http2_connections += 1;
            }
            c.in_flight_requests += conn.in_flight();
        }
        c
    }

    /// Live connections in one direction (no lock).
    pub fn live(&self, direction: Direction) -> usize {
        self.live[direction as usize].load(Relaxed)
    }

    /// Totals since start: (closed connections, of which forced, requests completed).
    pub fn totals(&self) -> Totals {
        Totals {
            closed: self.closed.load(Relaxed),
            forced: self.forced.load(Relaxed),
            requests_completed: self.requests_completed.iter().map(|c| c.0.load(Relaxed)).sum(),
        }
    }

    /// Resolves after the next connection closes.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// What a `Hold` stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    Listener,
    Accepted,
}

/// See `ConnTrack::hold`; dropping it lets the drain see the direction as empty.
#[derive(Debug)]
pub struct Hold {
    track: Arc<ConnTrack>,
    direction: Direction,
    what: HoldKind,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.track.held(self.what)[self.direction as usize].fetch_sub(1, SeqCst);
        self.track.changed.notify_waiters();
    }
}

/// Keeps a connection listed; dropping the last clone removes it.
#[derive(Debug)]
pub struct ConnHandle {
    conn: Arc<Conn>,
    track: Arc<ConnTrack>,
}

impl std::ops::Deref for ConnHandle {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl ConnHandle {
    /// Records the detected protocol and counts the connection under it.
    pub fn set_protocol(&self, p: Protocol) {
        let v = match p {
            Protocol::Http1 => 1,
            Protocol::Http2 => 2,
            Protocol::Opaque => 3,
        };
        self.conn.protocol.store(v, Relaxed);
        let m = self.track.metrics.proto(self.direction, p);
        m.opened.inc();
        m.active.inc();
    }

    pub fn metrics(&self) -> &Metrics {
        self.track.metrics()
    }

    /// Records the identity the client proved with mesh TLS (once: a connection's peer does not change).
    pub fn set_peer_identity(&self, id: Arc<str>) {
        let _ = self.conn.peer_identity.set(id);
    }

    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(&self, method: &http::Method, uri: &http::Uri) -> RequestGuard {
        let id = self.conn.next_request.fetch_add(1, Relaxed);
        let activity = self.conn.fresh_activity();
        if let Ok(mut v) = self.conn.in_flight.lock() {
            let now = Instant::now();
            v.push(InFlight {
                id,
                method: method.clone(),
                uri: uri.clone(),
                started: now,
                activity: activity.clone(),
                seen: 0,
                moved_at: now,
            });
        }
        RequestGuard { conn: self.conn.clone(), track: self.track.clone(), id, activity }
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let id = self.conn.id.0;
        if let Ok(mut shard) = self.track.shard(id).lock() {
            shard.remove(&id);
        }
        self.track.live[self.conn.direction as usize].fetch_sub(1, Relaxed);
        self.track.closed.fetch_add(1, Relaxed);
        if self.conn.forced.load(Relaxed) {
            self.track.forced.fetch_add(1, Relaxed);
        }
        if let Some(p) = self.conn.protocol() {
            let m = self.track.metrics.proto(self.conn.direction, p);
            m.active.dec();
            m.closed.inc();
        }
        self.track.metrics.bytes(
            self.conn.direction,
            self.conn.bytes_in.load(Relaxed),
            self.conn.bytes_out.load(Relaxed),
        );
        self.track.changed.notify_waiters();
    }
}

/// Keeps a request listed as in flight; dropped when its response has been sent whole (or abandoned).
#[derive(Debug)]
pub struct RequestGuard {
    conn: Arc<Conn>,
    track: Arc<ConnTrack>,
    id: u64,
    activity: Arc<StreamActivity>,
}

impl RequestGuard {
    /// The request's id, unique within its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The request's liveness, which its bodies report to (see [`activity`]).
    pub fn activity(&self) -> &Arc<StreamActivity> {
        &self.activity
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Ok(mut v) = self.conn.in_flight.lock() {
            if let Some(i) = v.iter().position(|r| r.id == self.id) {
                v.swap_remove(i);
            }
        }
        if let Ok(mut spare) = self.conn.spare_activity.lock() {
            if spare.is_none() {
                *spare = Some(self.activity.clone());
            }
        }
        self.conn.requests.fetch_add(1, Relaxed);
        self.track.requests_completed[self.conn.id.0 as usize % SHARDS].0.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_finished_requests_activity_record_is_reused_once_nothing_holds_it() {
        let track = ConnTrack::new(Arc::new(Metrics::new()));
        let a = "127.0.0.1:1".parse().unwrap();
        let h = track.open(Direction::Inbound, "in".into(), a, a);
        let get = |path: &str| h.request(&http::Method::GET, &path.parse().unwrap());
        let first = get("/1");
        // A body still holds the first request's record when the second starts.
        let held = first.activity().clone();
        drop(first);
        let second = get("/2");
        assert!(!Arc::ptr_eq(second.activity(), &held), "a record still held is not handed out again");
        second.activity().moved();
        second.activity().set_client_stalled(true);
        let second_record = Arc::as_ptr(second.activity());
        drop((held, second));
        let third = get("/3");
        assert_eq!(Arc::as_ptr(third.activity()), second_record, "the free record is reused");
        assert_eq!(third.activity().frames(), 0, "and starts afresh");
        assert!(!third.activity().client_stalled());
    }

    #[tokio::test]
    async fn closed_connection_disappears() {
        let track = ConnTrack::new(Arc::new(Metrics::new()));
        let a = "127.0.0.1:1".parse().unwrap();
        let h = track.open(Direction::Inbound, "in".into(), a, a);
        h.set_protocol(Protocol::Http1);
        let r = h.request(&http::Method::GET, &"/x".parse().unwrap());
        assert_eq!(track.counts().in_flight_requests, 1);
        assert_eq!(track.snapshot()[0].in_flight[0].uri, "/x");
        drop(r);
        assert_eq!(track.counts().in_flight_requests, 0);
        assert_eq!(track.live(Direction::Inbound), 1);
        drop(h);
        assert!(track.snapshot().is_empty());
        assert_eq!(track.live(Direction::Inbound), 0);
        assert_eq!(track.totals(), Totals { closed: 1, forced: 0, requests_completed: 1 });
    }
}
