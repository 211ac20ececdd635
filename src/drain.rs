//! The drain: one state machine, one deadline, fed by every trigger (signals, admin API, CLI, control
//! plane) and watched by every listener and connection.
//!
//! `serving → announcing → closing → deadline → drained`. Announcing tells every connection in scope to
//! go while listeners keep accepting; closing stops accepting and closes idle connections; at the
//! deadline whatever is left is closed and named in the report. The process exits as soon as nothing is
//! left once announcing is over, never waiting for the deadline for nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{Direction, DrainConfig, MAX_DRAIN_TIMEOUT};
use crate::conntrack::{Conn, ConnId, ConnTrack, Counts, RequestSnapshot};
use crate::telemetry::metrics::{Metrics, PhaseLabels};

/// After the deadline, how long connections get to flush their last words (gRPC trailers, GOAWAY)
/// before the process stops waiting for them.
pub const FORCE_GRACE: Duration = Duration::from_millis(250);

/// Where a drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Serving = 0,
    Announcing = 1,
    Closing = 2,
    Deadline = 3,
    Drained = 4,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Announcing => "announcing",
            Self::Closing => "closing",
            Self::Deadline => "deadline",
            Self::Drained => "drained",
        }
    }
}

/// Which connections a drain acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Inbound actively; outbound stays fully available to the app until the process exits.
    Inbound,
    /// Both directions actively.
    All,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inbound" => Ok(Self::Inbound),
            "all" => Ok(Self::All),
            other => Err(format!("unknown scope `{other}` (expected `inbound` or `all`)")),
        }
    }
}

/// What listeners and connections see of the drain.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub phase: Phase,
    pub scope: Scope,
    pub deadline: Option<Instant>,
}

impl View {
    /// The phase as it applies to one direction: out of scope, nothing happens before the deadline.
    pub fn phase_for(&self, direction: Direction) -> Phase {
        let in_scope = self.scope == Scope::All || direction == Direction::Inbound;
        if in_scope || self.phase >= Phase::Deadline {
            self.phase
        } else {
            Phase::Serving
        }
    }
}

/// A drain watch for one direction, held by every listener and connection.
#[derive(Clone, Debug)]
pub struct Watch {
    rx: watch::Receiver<View>,
    direction: Direction,
}

impl Watch {
    /// The current phase for this direction.
    pub fn phase(&self) -> Phase {
        self.rx.borrow().phase_for(self.direction)
    }

    /// Waits until this direction's phase moves past `seen`, and returns the new phase.
    /// Never resolves if the drain controller is gone (the process is exiting anyway).
    pub async fn next(&mut self, seen: Phase) -> Phase {
        let direction = self.direction;
        let next = self.rx.wait_for(|v| v.phase_for(direction) > seen).await.map(|v| v.phase_for(direction));
        match next {
            Ok(p) => p,
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits for a phase at or past `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        if self.phase() < phase {
            let mut seen = self.phase();
            while seen < phase {
                seen = self.next(seen).await;
            }
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }
}

/// A request to drain.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// Who asked: `sigterm`, `sigint`, `admin`, `control-plane`, ...
    pub source: String,
    /// Deadline from now; the configured `drain.timeout` when absent.
    pub timeout: Option<Duration>,
    pub scope: Option<Scope>,
    /// Close everything at once.
    pub now: bool,
}

impl Trigger {
    pub fn new(source: impl Into<String>) -> Self {
        Self { source: source.into(), timeout: None, scope: None, now: false }
    }
}

/// Why a trigger was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("timeout must be between 0s and 1h")]
    TimeoutOutOfRange,
    #[error("the drain controller has stopped")]
    Stopped,
}

/// A connection closed at the deadline, as the report names it.
#[derive(Clone, Debug, Serialize)]
pub struct ForcedClose {
    pub conn_id: ConnId,
    pub direction: Direction,
    pub client_addr: std::net::SocketAddr,
    pub orig_dst: std::net::SocketAddr,
    pub protocol: &'static str,
    pub age_ms: u64,
    /// What it was doing: `idle`, `N requests in flight`, `upgraded`, `forwarding`.
    pub doing: String,
    pub in_flight: Vec<RequestSnapshot>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseTime {
    pub phase: Phase,
    /// Milliseconds since the drain started.
    pub at_ms: u64,
}

/// The drain report: admin `GET /drain`, `ebb drain --wait`, the final log line.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub phase: Phase,
    pub trigger: Option<String>,
    pub scope: Option<Scope>,
    pub started_at: Option<String>,
    pub elapsed_ms: u64,
    pub deadline_ms: Option<u64>,
    pub time_to_deadline_ms: Option<u64>,
    pub phases: Vec<PhaseTime>,
    pub at_start: Counts,
    pub now: Counts,
    pub closed_gracefully: u64,
    pub forced_closes: u64,
    pub forced: Vec<ForcedClose>,
    pub requests_completed: u64,
    pub goaway_sent: u64,
    pub connection_close_sent: u64,
    pub idle_closes: u64,
    pub accepted_during_announce: u64,
    /// What is holding the drain: the oldest connections still open.
    pub holding: Vec<crate::conntrack::ConnSnapshot>,
}

#[derive(Debug, Default)]
struct Started {
    at: Option<Instant>,
    wall: Option<SystemTime>,
    trigger: Option<String>,
    deadline: Option<Instant>,
    phases: Vec<PhaseTime>,
    at_start: Counts,
    totals_at_start: (u64, u64, u64),
    counters_at_start: [u64; 4],
    forced: Vec<ForcedClose>,
    finished_ms: Option<u64>,
}

/// Sent back once a trigger has been applied.
type Ack = tokio::sync::oneshot::Sender<()>;
/// Triggers on their way to the state machine.
type TriggerRx = mpsc::UnboundedReceiver<(Trigger, Option<Ack>)>;

/// The drain state machine's shared half: triggers go in, a watch and reports come out.
#[derive(Debug)]
pub struct Drain {
    cfg: DrainConfig,
    tx: watch::Sender<View>,
    triggers: mpsc::UnboundedSender<(Trigger, Option<Ack>)>,
    rx: Mutex<Option<TriggerRx>>,
    state: Mutex<Started>,
    track: Arc<ConnTrack>,
}

impl Drain {
    pub fn new(cfg: DrainConfig, track: Arc<ConnTrack>) -> Arc<Self> {
        let (tx, _) = watch::channel(View { phase: Phase::Serving, scope: Scope::Inbound, deadline: None });
        let (triggers, rx) = mpsc::unbounded_channel();
        Arc::new(Self { cfg, tx, triggers, rx: Mutex::new(Some(rx)), state: Mutex::default(), track })
    }

    /// A watch for listeners and connections of one direction.
    pub fn watch(&self, direction: Direction) -> Watch {
        Watch { rx: self.tx.subscribe(), direction }
    }

    /// The global view (not direction-filtered).
    pub fn view(&self) -> View {
        *self.tx.borrow()
    }

    pub fn config(&self) -> &DrainConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        self.track.metrics()
    }

    /// Starts a drain, or shortens the one under way. Idempotent.
    pub fn trigger(&self, t: Trigger) -> Result<(), TriggerError> {
        if t.timeout.is_some_and(|d| d > MAX_DRAIN_TIMEOUT) {
            return Err(TriggerError::TimeoutOutOfRange);
        }
        self.triggers.send((t, None)).map_err(|_| TriggerError::Stopped)
    }

    /// Like `trigger`, and returns once the state machine has applied it (so a report taken next
    /// shows it).
    pub async fn trigger_applied(&self, t: Trigger) -> Result<(), TriggerError> {
        if t.timeout.is_some_and(|d| d > MAX_DRAIN_TIMEOUT) {
            return Err(TriggerError::TimeoutOutOfRange);
        }
        let (ack, applied) = tokio::sync::oneshot::channel();
        self.triggers.send((t, Some(ack))).map_err(|_| TriggerError::Stopped)?;
        applied.await.map_err(|_| TriggerError::Stopped)
    }

    /// Records a connection cut short at the deadline (once per connection, whatever cut it).
    pub fn record_forced(&self, conn: &Conn) {
        if !conn.mark_forced() {
            return;
        }
        self.metrics().drain.forced_closes.inc();
        let snap = conn.snapshot();
        let doing = match snap.state {
            crate::conntrack::ConnState::Upgraded => "upgraded".to_string(),
            crate::conntrack::ConnState::Forwarding => "forwarding".to_string(),
            _ if snap.in_flight.is_empty() => "idle".to_string(),
            _ => format!("{} requests in flight", snap.in_flight.len()),
        };
        tracing::warn!(conn.id = %conn.id, client.addr = %conn.client, protocol = snap.protocol, doing = %doing, "Forced close at drain deadline");
        if let Ok(mut st) = self.state.lock() {
            st.forced.push(ForcedClose {
                conn_id: conn.id,
                direction: conn.direction,
                client_addr: conn.client,
                orig_dst: conn.orig_dst,
                protocol: snap.protocol,
                age_ms: snap.age_ms,
                doing,
                in_flight: snap.in_flight,
            });
        }
    }

    fn counters(&self) -> [u64; 4] {
        let d = &self.metrics().drain;
        [d.goaway_sent.get(), d.connection_close_sent.get(), d.idle_closes.get(), d.accepted_during_announce.get()]
    }

    /// The report as of now.
    pub fn report(&self) -> Report {
        let view = self.view();
        let now = Instant::now();
        let counts = self.track.counts();
        let (closed, forced_total, completed) = self.track.totals();
        let counters = self.counters();
        let st = match self.state.lock() {
            Ok(st) => st,
            Err(p) => p.into_inner(),
        };
        let since = |t: Instant, at: Instant| t.saturating_duration_since(at).as_millis() as u64;
        let mut holding = if view.phase > Phase::Serving { self.track.snapshot() } else { Vec::new() };
        holding.truncate(20);
        let forced_closes = forced_total - st.totals_at_start.1;
        Report {
            phase: view.phase,
            trigger: st.trigger.clone(),
            scope: st.at.map(|_| view.scope),
            started_at: st.wall.map(|w| humantime::format_rfc3339_millis(w).to_string()),
            elapsed_ms: st.at.map(|at| st.finished_ms.unwrap_or_else(|| since(now, at))).unwrap_or(0),
            deadline_ms: st.at.zip(st.deadline).map(|(at, d)| since(d, at)),
            time_to_deadline_ms: st.deadline.map(|d| since(d, now)),
            phases: st.phases.clone(),
            at_start: st.at_start,
            now: counts,
            closed_gracefully: (closed - st.totals_at_start.0).saturating_sub(forced_closes),
            forced_closes,
            forced: st.forced.clone(),
            requests_completed: completed - st.totals_at_start.2,
            goaway_sent: counters[0] - st.counters_at_start[0],
            connection_close_sent: counters[1] - st.counters_at_start[1],
            idle_closes: counters[2] - st.counters_at_start[2],
            accepted_during_announce: counters[3] - st.counters_at_start[3],
            holding,
        }
    }

    fn set_phase(&self, phase: Phase, scope: Scope, deadline: Instant) {
        let prev = self.view().phase;
        if let Ok(mut st) = self.state.lock() {
            if let Some(at) = st.at {
                let now = Instant::now();
                let last = st.phases.last().map(|p| p.at_ms).unwrap_or(0);
                let at_ms = now.saturating_duration_since(at).as_millis() as u64;
                let label = PhaseLabels { phase: prev.as_str() };
                self.metrics().drain.phase_seconds.get_or_create(&label).set((at_ms - last) as f64 / 1000.0);
                st.phases.push(PhaseTime { phase, at_ms });
                if phase == Phase::Drained {
                    st.finished_ms = Some(at_ms);
                }
            }
        }
        self.metrics().drain.state.set(phase as i64);
        tracing::info!(phase = phase.as_str(), scope = ?scope, "Drain phase");
        self.tx.send_replace(View { phase, scope, deadline: Some(deadline) });
    }

    /// Runs the state machine: waits for the first trigger, then drives the drain to its end.
    /// Returns the final report once nothing is left (or the deadline has passed).
    pub async fn run(self: Arc<Self>) -> Report {
        let Some(mut rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return self.report();
        };
        let Some((first, first_ack)) = rx.recv().await else { return self.report() };
        let start = Instant::now();
        let mut scope = first.scope.unwrap_or(Scope::Inbound);
        let mut deadline = start + if first.now { Duration::ZERO } else { first.timeout.unwrap_or(self.cfg.timeout) };
        let mut announce_end = (start + self.cfg.announce).min(deadline);
        if let Ok(mut st) = self.state.lock() {
            st.at = Some(start);
            st.wall = Some(SystemTime::now());
            st.trigger = Some(first.source.clone());
            st.deadline = Some(deadline);
            st.at_start = self.track.counts();
            st.totals_at_start = self.track.totals();
            st.counters_at_start = self.counters();
        }
        tracing::info!(
            trigger = %first.source,
            deadline = ?deadline - start,
            conns = self.track.live(Direction::Inbound) + self.track.live(Direction::Outbound),
            "Drain started"
        );
        let mut phase = Phase::Announcing;
        self.set_phase(phase, scope, deadline);
        if let Some(ack) = first_ack {
            let _ = ack.send(());
        }
        let mut hard_stop = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Armed before the check so a close between the two is not missed.
            let closed = self.track.changed();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if phase >= Phase::Closing
                && self.track.live(Direction::Inbound) == 0
                && self.track.live(Direction::Outbound) == 0
            {
                break;
            }
            let next_timer = match phase {
                Phase::Announcing => announce_end,
                Phase::Closing => deadline,
                _ => hard_stop.unwrap_or(deadline),
            };
            tokio::select! {
                t = rx.recv() => {
                    let Some((t, ack)) = t else { continue };
                    let now = Instant::now();
                    let asked = if t.now { now } else { now + t.timeout.unwrap_or(self.cfg.timeout) };
                    let mut changed = false;
                    if asked < deadline && phase < Phase::Deadline {
                        deadline = asked;
                        announce_end = announce_end.min(deadline);
                        if let Ok(mut st) = self.state.lock() {
                            st.deadline = Some(deadline);
                        }
                        changed = true;
                    }
                    if t.scope == Some(Scope::All) && scope != Scope::All {
                        scope = Scope::All;
                        changed = true;
                    }
                    tracing::info!(trigger = %t.source, shortened = changed, "Drain triggered again");
                    if changed {
                        self.set_phase(phase, scope, deadline);
                    }
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
                _ = tokio::time::sleep_until(next_timer) => {
                    match phase {
                        Phase::Announcing => {
                            phase = Phase::Closing;
                            self.set_phase(phase, scope, deadline);
                        }
                        Phase::Closing => {
                            phase = Phase::Deadline;
                            hard_stop = Some(Instant::now() + FORCE_GRACE * 4);
                            self.set_phase(phase, scope, deadline);
                        }
                        _ => {
                            tracing::warn!(left = self.track.live(Direction::Inbound) + self.track.live(Direction::Outbound), "Connections still open after the deadline; exiting");
                            break;
                        }
                    }
                }
                _ = closed => {}
                _ = tick.tick() => {
                    let c = self.track.counts();
                    tracing::info!(phase = phase.as_str(), conns = c.connections, in_flight = c.in_flight_requests, "Drain progress");
                }
            }
            // A timer may have fired late; catch up in order.
            let now = Instant::now();
            if phase == Phase::Announcing && now >= announce_end {
                phase = Phase::Closing;
                self.set_phase(phase, scope, deadline);
            }
            if phase == Phase::Closing && now >= deadline {
                phase = Phase::Deadline;
                hard_stop = Some(now + FORCE_GRACE * 4);
                self.set_phase(phase, scope, deadline);
            }
        }
        self.set_phase(Phase::Drained, scope, deadline);
        let report = self.report();
        tracing::info!(
            elapsed_ms = report.elapsed_ms,
            closed_gracefully = report.closed_gracefully,
            forced = report.forced_closes,
            requests_completed = report.requests_completed,
            "Drained"
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    fn drain(timeout: u64, announce: u64) -> (Arc<Drain>, Arc<ConnTrack>) {
        let track = ConnTrack::new(Arc::new(Metrics::new()));
        let cfg = DrainConfig {
            timeout: Duration::from_secs(timeout),
            announce: Duration::from_secs(announce),
            idle_close_window: Duration::from_secs(1),
        };
        (Drain::new(cfg, track.clone()), track)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_drain_ends_right_after_announce() {
        let (d, _track) = drain(25, 5);
        let task = tokio::spawn(d.clone().run());
        let t0 = Instant::now();
        d.trigger(Trigger::new("test")).unwrap();
        let report = task.await.unwrap();
        assert_eq!(report.phase, Phase::Drained);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn open_connection_holds_until_it_closes() {
        let (d, track) = drain(25, 5);
        let a = "127.0.0.1:1".parse().unwrap();
        let conn = track.open(Direction::Inbound, "in".into(), a, a);
        let task = tokio::spawn(d.clone().run());
        let t0 = Instant::now();
        d.trigger(Trigger::new("test")).unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(d.view().phase, Phase::Closing);
        drop(conn);
        let report = task.await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(7));
        assert_eq!(report.closed_gracefully, 1);
        assert_eq!(report.at_start.connections, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn second_trigger_shortens_never_lengthens() {
        let (d, track) = drain(25, 5);
        let a = "127.0.0.1:1".parse().unwrap();
        let _conn = track.open(Direction::Inbound, "in".into(), a, a);
        let task = tokio::spawn(d.clone().run());
        let t0 = Instant::now();
        d.trigger(Trigger::new("first")).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.trigger(Trigger { timeout: Some(Duration::from_secs(10)), ..Trigger::new("shorter") }).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.trigger(Trigger { timeout: Some(Duration::from_secs(60)), ..Trigger::new("longer") }).unwrap();
        let mut w = d.watch(Direction::Inbound);
        w.reached(Phase::Deadline).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(11));
        drop(_conn);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn outbound_untouched_by_inbound_scope_until_deadline() {
        let (d, _track) = drain(25, 5);
        let _task = tokio::spawn(d.clone().run());
        d.trigger(Trigger::new("test")).unwrap();
        let mut inbound = d.watch(Direction::Inbound);
        inbound.reached(Phase::Announcing).await;
        let outbound = d.watch(Direction::Outbound);
        assert_eq!(outbound.phase(), Phase::Serving);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_timeout_closes_at_once() {
        let (d, track) = drain(25, 5);
        let a = "127.0.0.1:1".parse().unwrap();
        let conn = track.open(Direction::Inbound, "in".into(), a, a);
        let _task = tokio::spawn(d.clone().run());
        let t0 = Instant::now();
        d.trigger(Trigger { now: true, ..Trigger::new("now") }).unwrap();
        d.watch(Direction::Outbound).reached(Phase::Deadline).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        drop(conn);
    }
}
