//! The drain: one state machine fed by every trigger (signals, admin API, CLI, control plane) and
//! watched by every listener and connection (docs/architecture.md §4, §5).
//!
//! `serving → announcing → closing → deadline → drained`, per direction. Announcing tells every
//! connection in scope to go while listeners keep accepting; closing stops accepting and closes idle
//! connections; at the deadline whatever is left is closed and named in the report. A drain of inbound
//! alone leaves the process serving outbound; a drain asked to exit (SIGTERM) drains what is left and
//! ends the process as soon as nothing is, never waiting for the deadline for nothing.
//!
//! `watch` is what connections see, `controller` the state machine, `report` what it tells operators.

mod controller;
pub mod report;
pub mod watch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::time::Instant;

use crate::config::{DrainConfig, MAX_DRAIN_TIMEOUT};
use crate::conntrack::{Conn, ConnTrack, Counts, Totals};
use crate::domain::Direction;
use crate::telemetry::metrics::Metrics;

pub use report::{DrainCounters, ForcedClose, PhaseTime, Report};
pub use watch::{Phase, Scope, View, Watch};

/// How many forced closes a drain report names (`forced_closes` counts them all).
pub const MAX_FORCED_LISTED: usize = 100;
/// How many of a forced connection's in-flight requests its entry names.
const MAX_IN_FLIGHT_LISTED: usize = 8;
/// How much of a request's URI a forced close's entry keeps, in bytes.
const MAX_URI_LISTED: usize = 256;

/// After the deadline, how long connections get to flush their last words (gRPC trailers, GOAWAY,
/// WebSocket close frames) before the process stops waiting for them.
pub const FORCE_GRACE: Duration = Duration::from_millis(250);

/// A request to drain.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// Who asked: `sigterm`, `sigint`, `admin`, `control-plane`, ...
    pub source: String,
    /// Deadline from now; the configured `drain.timeout` when absent.
    pub timeout: Option<Duration>,
    /// `inbound` when absent. A trigger that exits always drains everything.
    pub scope: Option<Scope>,
    /// Close everything at once.
    pub now: bool,
    /// End the process once drained (SIGTERM). Without it the process keeps serving what is out of
    /// scope (outbound, for the app's own shutdown) until a trigger that exits arrives.
    pub exit: bool,
    /// The control plane's directive id, for the report.
    pub id: Option<String>,
    /// Why, as the operator said, for the report.
    pub reason: Option<String>,
    /// Not a drain but its cancellation: honoured only while every direction under drain is still
    /// announcing and the drain does not end the process.
    pub cancel: bool,
}

impl Trigger {
    /// A drain of the default scope that leaves the process up.
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            timeout: None,
            scope: None,
            now: false,
            exit: false,
            id: None,
            reason: None,
            cancel: false,
        }
    }

    /// A drain of everything that ends the process (what SIGTERM asks).
    pub fn exit(source: impl Into<String>) -> Self {
        Self { exit: true, ..Self::new(source) }
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

/// What the report measures from: the drain's start.
#[derive(Debug, Default)]
struct Started {
    at: Option<Instant>,
    wall: Option<SystemTime>,
    trigger: Option<String>,
    id: Option<String>,
    reason: Option<String>,
    deadline: Option<Instant>,
    phases: Vec<PhaseTime>,
    at_start: Counts,
    totals_at_start: Totals,
    counters_at_start: DrainCounters,
    forced: Vec<ForcedClose>,
    finished_ms: Option<u64>,
    /// The drain's trace span: phases, forced closes and the report end up on it.
    span: Option<tracing::Span>,
}

/// Sent back once a trigger has been applied.
type Ack = tokio::sync::oneshot::Sender<()>;
/// Triggers on their way to the state machine.
type TriggerRx = mpsc::UnboundedReceiver<(Trigger, Option<Ack>)>;

/// The drain's shared half: triggers go in, a watch and reports come out.
#[derive(Debug)]
pub struct Drain {
    cfg: DrainConfig,
    tx: tokio_watch::Sender<View>,
    triggers: mpsc::UnboundedSender<(Trigger, Option<Ack>)>,
    rx: Mutex<Option<TriggerRx>>,
    state: Mutex<Started>,
    track: Arc<ConnTrack>,
}

impl Drain {
    pub fn new(cfg: DrainConfig, track: Arc<ConnTrack>) -> Arc<Self> {
        let (tx, _) = tokio_watch::channel(View::idle());
        let (triggers, rx) = mpsc::unbounded_channel();
        Arc::new(Self { cfg, tx, triggers, rx: Mutex::new(Some(rx)), state: Mutex::default(), track })
    }

    /// A watch for listeners and connections of one direction.
    pub fn watch(&self, direction: Direction) -> Watch {
        Watch { rx: self.tx.subscribe(), direction }
    }

    /// The drain as a whole, as published last.
    pub fn view(&self) -> View {
        *self.tx.borrow()
    }

    pub fn config(&self) -> &DrainConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Metrics {
        self.track.metrics()
    }

    /// Starts a drain, or shortens or widens the one under way. Idempotent.
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

    /// Waits until the drain under way (whatever its scope) has nothing left, and returns the report.
    /// Never resolves before a drain has started.
    pub async fn drained(&self) -> Report {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| v.phase == Phase::Drained).await;
        self.report()
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
            crate::conntrack::ConnState::Lingering => "lingering".to_string(),
            _ if snap.in_flight.is_empty() => "idle".to_string(),
            _ => format!("{} requests in flight", snap.in_flight.len()),
        };
        tracing::warn!(conn.id = %conn.id, client.addr = %conn.client, protocol = snap.protocol, doing = %doing, "Forced close at drain deadline");
        let (id, client) = (conn.id.0, conn.client);
        self.span_event(|| tracing::debug!(target: "ebb::trace", conn_id = id, client_addr = %client, doing = %doing, "forced close"));
        if let Ok(mut st) = self.state.lock() {
            // The count says how many; the list names the first few, so a drain that cuts ten
            // thousand connections does not make a report (and a plane message) of megabytes.
            if st.forced.len() >= MAX_FORCED_LISTED {
                return;
            }
            let mut in_flight = snap.in_flight;
            in_flight.truncate(MAX_IN_FLIGHT_LISTED);
            for r in &mut in_flight {
                if r.uri.len() > MAX_URI_LISTED {
                    let mut end = MAX_URI_LISTED;
                    while !r.uri.is_char_boundary(end) {
                        end -= 1;
                    }
                    r.uri.truncate(end);
                    r.uri.push('…');
                }
            }
            st.forced.push(ForcedClose {
                conn_id: conn.id,
                direction: conn.direction,
                client_addr: conn.client,
                orig_dst: conn.orig_dst,
                protocol: snap.protocol,
                age_ms: snap.age_ms,
                doing,
                in_flight,
            });
        }
    }

    fn counters(&self) -> DrainCounters {
        let d = &self.metrics().drain;
        DrainCounters {
            goaway_sent: d.goaway_sent.get(),
            connection_close_sent: d.connection_close_sent.get(),
            idle_closes: d.idle_closes.get(),
            accepted_during_announce: d.accepted_during_announce.get(),
            linger_cut_short: self.metrics().linger_cut_short(),
        }
    }

    /// The report as of now.
    pub fn report(&self) -> Report {
        let view = self.view();
        let now = Instant::now();
        let counts = self.track.counts();
        let totals = self.track.totals();
        let counters = self.counters();
        let st = match self.state.lock() {
            Ok(st) => st,
            Err(p) => p.into_inner(),
        };
        let since = |t: Instant, at: Instant| t.saturating_duration_since(at).as_millis() as u64;
        let mut holding = if view.phase > Phase::Serving { self.track.snapshot() } else { Vec::new() };
        holding.truncate(20);
        let forced_closes = totals.forced - st.totals_at_start.forced;
        let moved = counters.since(st.counters_at_start);
        Report {
            phase: view.phase,
            inbound: view.phase_for(Direction::Inbound),
            outbound: view.phase_for(Direction::Outbound),
            trigger: st.trigger.clone(),
            drain_id: st.id.clone(),
            reason: st.reason.clone(),
            scope: st.at.map(|_| view.scope),
            exit: view.exit,
            started_at: st.wall.map(|w| humantime::format_rfc3339_millis(w).to_string()),
            elapsed_ms: st.at.map(|at| st.finished_ms.unwrap_or_else(|| since(now, at))).unwrap_or(0),
            deadline_ms: st.at.zip(st.deadline).map(|(at, d)| since(d, at)),
            time_to_deadline_ms: st.deadline.map(|d| since(d, now)),
            phases: st.phases.clone(),
            at_start: st.at_start,
            now: counts,
            closed_gracefully: (totals.closed - st.totals_at_start.closed).saturating_sub(forced_closes),
            forced_closes,
            forced: st.forced.clone(),
            requests_completed: totals.requests_completed - st.totals_at_start.requests_completed,
            goaway_sent: moved.goaway_sent,
            connection_close_sent: moved.connection_close_sent,
            idle_closes: moved.idle_closes,
            accepted_during_announce: moved.accepted_during_announce,
            linger_cut_short: moved.linger_cut_short,
            holding,
        }
    }

    /// Forgets a cancelled drain: the next one reports from its own start.
    fn mark_cancelled(&self) {
        if let Ok(mut st) = self.state.lock() {
            if let Some(span) = st.span.take() {
                span.in_scope(|| tracing::debug!(target: "ebb::trace", "drain cancelled"));
            }
            *st = Started::default();
        }
    }

    /// Ends the drain's span with the report as its attributes.
    fn close_span(&self, r: &Report) {
        let span = self.state.lock().ok().and_then(|mut st| st.span.take());
        if let Some(span) = span {
            span.record("report.elapsed_ms", r.elapsed_ms)
                .record("report.closed_gracefully", r.closed_gracefully)
                .record("report.forced_closes", r.forced_closes)
                .record("report.requests_completed", r.requests_completed)
                .record("report.goaway_sent", r.goaway_sent)
                .record("report.connection_close_sent", r.connection_close_sent)
                .record("report.idle_closes", r.idle_closes)
                .record("report.linger_cut_short", r.linger_cut_short);
            if r.forced_closes > 0 {
                span.record("otel.status_code", "ERROR");
            }
        }
    }

    /// Adds an event to the drain's span (for traces; not a log line).
    fn span_event(&self, f: impl FnOnce()) {
        let span = self.state.lock().ok().and_then(|st| st.span.clone());
        if let Some(span) = span {
            span.in_scope(f);
        }
    }

    /// A receiver of every change of the drain's view (for progress reports).
    pub fn subscribe(&self) -> tokio_watch::Receiver<View> {
        self.tx.subscribe()
    }

    /// Notes the drain's start for the report; `scope` as the controller settled it (an exit drains
    /// both directions whatever the trigger named).
    fn mark_started(&self, t: &Trigger, scope: Scope, deadline: Instant) {
        if let Ok(mut st) = self.state.lock() {
            st.at = Some(Instant::now());
            st.wall = Some(SystemTime::now());
            st.trigger = Some(t.source.clone());
            st.id = t.id.clone();
            st.reason = t.reason.clone();
            // Its own trace: a drain is not part of whatever request or connection triggered it.
            st.span = Some(tracing::info_span!(
                target: crate::telemetry::traces::TARGET,
                parent: None,
                "drain",
                ebb.drain.trigger = %t.source,
                ebb.drain.id = t.id.as_deref().unwrap_or(""),
                ebb.drain.reason = t.reason.as_deref().unwrap_or(""),
                ebb.drain.scope = ?scope,
                ebb.drain.deadline_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
                otel.status_code = tracing::field::Empty,
                report.elapsed_ms = tracing::field::Empty,
                report.closed_gracefully = tracing::field::Empty,
                report.forced_closes = tracing::field::Empty,
                report.requests_completed = tracing::field::Empty,
                report.goaway_sent = tracing::field::Empty,
                report.connection_close_sent = tracing::field::Empty,
                report.idle_closes = tracing::field::Empty,
                report.linger_cut_short = tracing::field::Empty,
            ));
            st.deadline = Some(deadline);
            st.at_start = self.track.counts();
            st.totals_at_start = self.track.totals();
            st.counters_at_start = self.counters();
        }
    }

    fn set_deadline(&self, deadline: Instant) {
        if let Ok(mut st) = self.state.lock() {
            st.deadline = Some(deadline);
            // The span's deadline, like the one it started with, counts from the drain's start.
            if let (Some(span), Some(at)) = (&st.span, st.at) {
                span.record("ebb.drain.deadline_ms", deadline.saturating_duration_since(at).as_millis() as u64);
            }
        }
    }

    /// Publishes a new view; a change of the drain's overall phase is logged, timed and counted.
    fn publish(&self, view: View) {
        let prev = self.view();
        if view.phase != prev.phase {
            if let Ok(mut st) = self.state.lock() {
                if let Some(at) = st.at {
                    let at_ms = Instant::now().saturating_duration_since(at).as_millis() as u64;
                    let last = st.phases.last().map(|p| p.at_ms).unwrap_or(0);
                    let label = crate::telemetry::metrics::PhaseLabels { phase: prev.phase.as_str() };
                    self.metrics()
                        .drain
                        .phase_seconds
                        .get_or_create(&label)
                        .set(at_ms.saturating_sub(last) as f64 / 1000.0);
                    st.phases.push(PhaseTime { phase: view.phase, at_ms });
                    st.finished_ms = (view.phase == Phase::Drained).then_some(at_ms);
                }
            }
            self.metrics().drain.state.set(view.phase as i64);
            self.span_event(|| {
                // Counted from the drain's start, as its report counts them.
                let c = self.track.counts();
                let (moved, forced) = match self.state.lock() {
                    Ok(st) => (
                        self.counters().since(st.counters_at_start),
                        self.track.totals().forced - st.totals_at_start.forced,
                    ),
                    Err(_) => return,
                };
                tracing::debug!(
                    target: "ebb::trace",
                    phase = view.phase.as_str(),
                    connections = c.connections,
                    in_flight = c.in_flight_requests,
                    goaway_sent = moved.goaway_sent,
                    connection_close_sent = moved.connection_close_sent,
                    idle_closes = moved.idle_closes,
                    forced_closes = forced,
                    "drain phase"
                )
            });
        }
        if view.phase != prev.phase || view.lanes != prev.lanes || view.scope != prev.scope {
            tracing::info!(
                phase = view.phase.as_str(),
                inbound = view.phase_for(Direction::Inbound).as_str(),
                outbound = view.phase_for(Direction::Outbound).as_str(),
                scope = ?view.scope,
                exit = view.exit,
                "Drain phase"
            );
        }
        self.tx.send_replace(view);
    }

    /// Runs the state machine until a drain that exits is done; returns its final report.
    pub async fn run(self: Arc<Self>) -> Report {
        controller::run(self).await
    }
}

#[cfg(test)]
mod tests;
