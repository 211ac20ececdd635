//! Idleness measured on a coarse tick: a connection is idle once a progress count (bytes relayed,
//! requests finished) has not moved for its timeout. Looked at every quarter of the timeout rather
//! than re-arming a timer on every read or request, so a busy connection costs one comparison per
//! tick and an idle one is closed between `idle` and `idle * 1.25` after its last progress.

use std::time::Duration;

use tokio::time::Instant;

/// The idle state of one connection.
#[derive(Debug)]
pub struct Idleness {
    idle: Duration,
    tick: Duration,
    /// The progress count at the last tick that saw it change.
    seen: u64,
    last_progress: Instant,
}

impl Idleness {
    pub fn new(idle: Duration) -> Self {
        Self { idle, tick: (idle / 4).max(Duration::from_millis(1)), seen: 0, last_progress: Instant::now() }
    }

    /// The idle timeout itself.
    pub fn timeout(&self) -> Duration {
        self.idle
    }

    /// How often to look.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Whether the last tick found the connection quiet for a whole tick (its progress unmoved and
    /// nothing busy since the tick before).
    pub fn quiet(&self) -> bool {
        self.last_progress.elapsed() >= self.tick
    }

    /// At a tick: true once `progress` has not moved, and nothing was `busy`, for the idle timeout.
    pub fn expired(&mut self, progress: u64, busy: bool) -> bool {
        let now = Instant::now();
        if progress != self.seen || busy {
            self.seen = progress;
            self.last_progress = now;
            return false;
        }
        self.last_progress.checked_add(self.idle).is_some_and(|at| now >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn progress_or_busy_keeps_it_alive() {
        let mut i = Idleness::new(Duration::from_secs(4));
        assert_eq!(i.tick(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!i.expired(1, false), "progress");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!i.expired(1, true), "busy");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!i.expired(1, false));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(i.expired(1, false));
    }
}
