//! What listeners and connections see of a drain: the phase of their own direction, as a watch.

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::Direction;

/// Where a drain stands (docs/architecture.md §4).
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

/// Which directions a drain acts on (docs/architecture.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Inbound only; outbound keeps serving the app until the process is told to exit.
    Inbound,
    /// Both directions.
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

/// The drain as published to everything that watches it.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// The drain as a whole: the least advanced of the directions being drained.
    pub phase: Phase,
    pub scope: Scope,
    /// The process exits once everything is drained.
    pub exit: bool,
    pub deadline: Option<Instant>,
    /// Each direction's own phase, indexed by `Direction as usize`; a direction out of scope serves.
    pub(crate) lanes: [Phase; 2],
}

impl View {
    pub(crate) fn idle() -> Self {
        Self { phase: Phase::Serving, scope: Scope::Inbound, exit: false, deadline: None, lanes: [Phase::Serving; 2] }
    }

    /// The phase as it applies to one direction.
    pub fn phase_for(&self, direction: Direction) -> Phase {
        self.lanes[direction as usize]
    }
}

/// A drain watch for one direction, held by every listener and connection.
#[derive(Clone, Debug)]
pub struct Watch {
    pub(crate) rx: watch::Receiver<View>,
    pub(crate) direction: Direction,
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
        let mut seen = self.phase();
        while seen < phase {
            seen = self.next(seen).await;
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }
}
