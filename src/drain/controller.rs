//! The drain state machine: applies triggers, moves each direction through its phases on the timers
//! and on connections closing, and decides when the process may exit (docs/architecture.md §4, §5).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::Direction;
use crate::drain::{Drain, Phase, Report, Scope, Trigger, View, FORCE_GRACE};

const DIRECTIONS: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

/// One direction under drain.
#[derive(Clone, Copy, Debug)]
struct Lane {
    phase: Phase,
    /// Started after everything else had drained (the exit that follows an inbound drain): it ends
    /// as soon as it is empty, announcing or not, because only the app, which is stopping, uses it.
    eager: bool,
}

/// The state machine's state. All directions under drain share one deadline.
#[derive(Debug)]
struct Machine {
    lanes: [Option<Lane>; 2],
    scope: Scope,
    exit: bool,
    announce_end: Instant,
    deadline: Instant,
    /// Past the deadline, when the process stops waiting for connections' last words.
    hard_stop: Option<Instant>,
}

impl Machine {
    fn new(now: Instant) -> Self {
        Self { lanes: [None; 2], scope: Scope::Inbound, exit: false, announce_end: now, deadline: now, hard_stop: None }
    }

    fn active(&self) -> impl Iterator<Item = &Lane> {
        self.lanes.iter().flatten().filter(|l| l.phase < Phase::Drained)
    }

    /// Every direction under drain has drained (and at least one has been drained).
    fn all_drained(&self) -> bool {
        self.lanes.iter().any(Option::is_some) && self.active().next().is_none()
    }

    /// The drain as a whole: the least advanced direction under drain.
    fn phase(&self) -> Phase {
        self.lanes.iter().flatten().map(|l| l.phase).min().unwrap_or(Phase::Serving)
    }

    fn view(&self) -> View {
        let lanes = DIRECTIONS.map(|d| self.lanes[d as usize].map_or(Phase::Serving, |l| l.phase));
        View { phase: self.phase(), scope: self.scope, exit: self.exit, deadline: Some(self.deadline), lanes }
    }

    /// Applies a trigger: starts the directions it asks for, shortens (never lengthens) the deadline.
    fn apply(&mut self, t: &Trigger, now: Instant, cfg: &crate::config::DrainConfig) {
        // `trigger` refuses longer ones and validation bounds the config; a config built in code skips
        // both, and an overflowing `now + timeout` panics, so the cap is repeated where the sum is made.
        let timeout = t.timeout.unwrap_or(cfg.timeout).min(crate::config::MAX_DRAIN_TIMEOUT);
        let asked = if t.now { now } else { now + timeout };
        // Scope only widens; a trigger that exits drains whatever is left.
        if t.exit || t.scope == Some(Scope::All) {
            self.scope = Scope::All;
        }
        self.exit |= t.exit;
        let scope = self.scope;
        let wanted = move |d: Direction| d == Direction::Inbound || scope == Scope::All;
        let starts = DIRECTIONS.iter().any(|&d| wanted(d) && self.lanes[d as usize].is_none());
        let fresh = self.active().next().is_none();
        let eager = fresh && self.lanes.iter().any(Option::is_some);
        if fresh && starts {
            // Nothing under drain: a new drain (or the exit after an inbound drain) with its own clock.
            self.deadline = asked;
            self.announce_end = (now + cfg.announce.min(crate::config::MAX_DRAIN_TIMEOUT)).min(asked);
            self.hard_stop = None;
        } else if !fresh && asked < self.deadline && self.phase() < Phase::Deadline {
            self.deadline = asked;
            self.announce_end = self.announce_end.min(asked);
        }
        // A direction joining a drain under way takes its phase; acting on every phase up to it is the
        // connections' job.
        let joining = self.active().map(|l| l.phase).min().unwrap_or(Phase::Announcing);
        for d in DIRECTIONS {
            if wanted(d) && self.lanes[d as usize].is_none() {
                self.lanes[d as usize] = Some(Lane { phase: joining, eager });
            }
        }
    }

    /// Moves every direction as far as time and its open connections allow. The one place phases
    /// change; returns whether anything did.
    ///
    /// `live(d)` counts what holds direction `d`: its connections, listed or just accepted.
    /// `listening(d)` counts its listeners not yet closed: a lane is drained only once they are (the
    /// accept queue they serve as they close holds connections nobody has counted yet), except an eager
    /// lane, which ends with the process while its listener still accepts.
    fn advance(
        &mut self,
        now: Instant,
        live: impl Fn(Direction) -> usize,
        listening: impl Fn(Direction) -> usize,
    ) -> bool {
        let mut changed = false;
        loop {
            let mut moved = false;
            let (announce_end, deadline) = (self.announce_end, self.deadline);
            let mut hard_stop = self.hard_stop;
            for d in DIRECTIONS {
                let Some(lane) = self.lanes[d as usize].as_mut() else { continue };
                let next = match lane.phase {
                    Phase::Announcing | Phase::Closing if lane.eager && live(d) == 0 => Phase::Drained,
                    Phase::Announcing if now >= announce_end => Phase::Closing,
                    Phase::Closing | Phase::Deadline if live(d) == 0 && listening(d) == 0 => Phase::Drained,
                    Phase::Closing if now >= deadline => Phase::Deadline,
                    Phase::Deadline if hard_stop.is_some_and(|h| now >= h) => {
                        tracing::warn!(
                            direction = d.as_str(),
                            left = live(d),
                            "Connections still open after the deadline; giving up on them"
                        );
                        Phase::Drained
                    }
                    p => p,
                };
                if next == Phase::Deadline && hard_stop.is_none() {
                    hard_stop = Some(now + FORCE_GRACE * 4);
                }
                if next != lane.phase {
                    lane.phase = next;
                    moved = true;
                }
            }
            self.hard_stop = hard_stop;
            if !moved {
                return changed;
            }
            changed = true;
        }
    }

    /// Whether a cancel may undo the drain: every direction under drain still announcing, listeners
    /// open, and nothing asked for the process to end.
    fn cancellable(&self) -> bool {
        !self.exit
            && self.lanes.iter().any(Option::is_some)
            && self.lanes.iter().flatten().all(|l| l.phase == Phase::Announcing)
    }

    /// When a timer next moves a phase.
    fn next_timer(&self) -> Option<Instant> {
        self.active()
            .map(|l| match l.phase {
                Phase::Announcing => self.announce_end,
                Phase::Closing => self.deadline,
                _ => self.hard_stop.unwrap_or(self.deadline),
            })
            .min()
    }
}

/// Runs the state machine until a drain that exits has nothing left; returns the final report.
pub(super) async fn run(drain: Arc<Drain>) -> Report {
    let Some(mut rx) = drain.rx.lock().ok().and_then(|mut r| r.take()) else {
        return drain.report();
    };
    let track = drain.track.clone();
    let live = |d: Direction| track.live_or_pending(d);
    let listening = |d: Direction| track.listeners_open(d);
    let mut m = Machine::new(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Armed before the checks so a close between the two is not missed.
        let closed = track.changed();
        tokio::pin!(closed);
        closed.as_mut().enable();
        let was_drained = m.all_drained();
        if m.advance(Instant::now(), live, listening) {
            drain.publish(m.view());
        }
        if m.all_drained() {
            if !was_drained {
                let report = drain.report();
                tracing::info!(
                    scope = ?m.scope,
                    elapsed_ms = report.elapsed_ms,
                    closed_gracefully = report.closed_gracefully,
                    forced = report.forced_closes,
                    requests_completed = report.requests_completed,
                    linger_cut_short = report.linger_cut_short,
                    "Drained"
                );
                drain.close_span(&report);
            }
            if m.exit {
                return drain.report();
            }
        }
        tokio::select! {
            t = rx.recv() => {
                // The drain holds a sender itself, so the channel cannot close while this runs.
                let Some((t, ack)) = t else { return drain.report() };
                let now = Instant::now();
                if t.cancel {
                    if m.cancellable() {
                        m = Machine::new(now);
                        drain.mark_cancelled();
                        tracing::info!(trigger = %t.source, "Drain cancelled; serving again");
                        drain.publish(View::idle());
                    } else {
                        tracing::info!(trigger = %t.source, phase = m.phase().as_str(), "Drain past announcing: not cancelled");
                    }
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                    continue;
                }
                let first = m.lanes.iter().all(Option::is_none);
                let before = (m.deadline, m.scope, m.exit);
                m.apply(&t, now, drain.config());
                if first {
                    drain.mark_started(&t, m.scope, m.deadline);
                    tracing::info!(
                        trigger = %t.source,
                        deadline = ?m.deadline - now,
                        scope = ?m.scope,
                        exit = m.exit,
                        conns = live(Direction::Inbound) + live(Direction::Outbound),
                        "Drain started"
                    );
                } else {
                    drain.set_deadline(m.deadline);
                    tracing::info!(trigger = %t.source, changed = before != (m.deadline, m.scope, m.exit), "Drain triggered again");
                }
                m.advance(now, live, listening);
                drain.publish(m.view());
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            _ = crate::clock::sleep_until_opt(m.next_timer()) => {}
            _ = closed => {}
            _ = tick.tick(), if m.active().next().is_some() => {
                let c = track.counts();
                tracing::info!(phase = m.phase().as_str(), conns = c.connections, in_flight = c.in_flight_requests, "Drain progress");
            }
        }
    }
}
