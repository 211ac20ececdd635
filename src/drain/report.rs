//! The drain report: what a drain did, for `GET /drain`, `ebb drain --wait` and the final log line.

use serde::Serialize;

use crate::conntrack::{ConnId, ConnSnapshot, Counts, RequestSnapshot};
use crate::domain::Direction;
use crate::drain::{Phase, Scope};

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

/// When the drain as a whole reached a phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseTime {
    pub phase: Phase,
    /// Milliseconds since the drain started.
    pub at_ms: u64,
}

/// Counters the drain moves, read together so a report subtracts like from like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrainCounters {
    pub goaway_sent: u64,
    pub connection_close_sent: u64,
    pub idle_closes: u64,
    pub accepted_during_announce: u64,
    pub linger_cut_short: u64,
}

impl DrainCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            goaway_sent: self.goaway_sent.saturating_sub(earlier.goaway_sent),
            connection_close_sent: self.connection_close_sent.saturating_sub(earlier.connection_close_sent),
            idle_closes: self.idle_closes.saturating_sub(earlier.idle_closes),
            accepted_during_announce: self.accepted_during_announce.saturating_sub(earlier.accepted_during_announce),
            linger_cut_short: self.linger_cut_short.saturating_sub(earlier.linger_cut_short),
        }
    }
}

/// The drain report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub phase: Phase,
    /// Each direction's phase.
    pub inbound: Phase,
    pub outbound: Phase,
    pub trigger: Option<String>,
    /// The control plane's directive id, when it started the drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_id: Option<String>,
    /// Why, as the operator said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub scope: Option<Scope>,
    /// The process exits once drained (SIGTERM, `--exit`); otherwise it keeps serving outbound.
    pub exit: bool,
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
    /// Connections Ebb closed first whose client did not close its side within the linger time (or
    /// the deadline): the closes where the client may have missed a response's last bytes. Zero means
    /// every connection Ebb ended was closed by its client after reading everything.
    pub linger_cut_short: u64,
    /// What is holding the drain: the oldest connections still open.
    pub holding: Vec<ConnSnapshot>,
}
