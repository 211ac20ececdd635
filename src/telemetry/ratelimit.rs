//! Rate-limited logging: a warning that a flood of peers can trigger (accept failures, refused
//! connections, an exhausted connection limit) is written at most once per interval per call site, and
//! what was held back is counted and reported, so a reconnect loop cannot fill the disk with log.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The interval the call sites use: one line a second is plenty to see that something is wrong.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One call site's limiter; a `static`, so that every connection hitting the site shares it.
#[derive(Debug)]
pub struct LogLimit {
    /// Names the site in the summary line.
    site: &'static str,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last line (or summary) was written.
    last: Option<Instant>,
    /// Events held back since then.
    suppressed: u64,
    /// A task will write the summary when the interval ends.
    flush_pending: bool,
}

/// What an event should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// Write the line; this many were held back before it.
    Log(u64),
    /// Hold it back; `true` when the caller must arrange the summary at the interval's end.
    Suppress(bool),
}

impl State {
    fn on_event(&mut self, now: Instant, interval: Duration) -> Decision {
        match self.last {
            Some(last) if now < last + interval => {
                self.suppressed += 1;
                let schedule = !self.flush_pending;
                self.flush_pending = true;
                Decision::Suppress(schedule)
            }
            _ => {
                self.last = Some(now);
                Decision::Log(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The interval is over: how many were held back since the last line, if any (then the summary
    /// counts as this interval's line).
    fn on_flush(&mut self, now: Instant) -> Option<u64> {
        self.flush_pending = false;
        let n = std::mem::take(&mut self.suppressed);
        if n > 0 {
            self.last = Some(now);
            Some(n)
        } else {
            None
        }
    }
}

impl LogLimit {
    /// A limiter for the call site `site`, allowing one line per `interval`.
    pub const fn new(site: &'static str, interval: Duration) -> Self {
        Self { site, interval, state: Mutex::new(State { last: None, suppressed: 0, flush_pending: false }) }
    }

    /// `Some(n)` when the caller should write its line now (`n` lines were held back before it; put
    /// it in the line as `suppressed`); `None` when the line is held back. Held-back lines not
    /// followed by another within the interval are reported by a summary line when it ends.
    pub fn check(&'static self) -> Option<u64> {
        let now = Instant::now();
        let decision = match self.state.lock() {
            Ok(mut s) => s.on_event(now, self.interval),
            // A poisoned lock only means another thread panicked mid-update; logging must go on.
            Err(p) => p.into_inner().on_event(now, self.interval),
        };
        match decision {
            Decision::Log(n) => Some(n),
            Decision::Suppress(schedule) => {
                if schedule {
                    self.schedule_summary(now);
                }
                None
            }
        }
    }

    fn schedule_summary(&'static self, now: Instant) {
        let at = match self.state.lock() {
            Ok(s) => s.last.unwrap_or(now) + self.interval,
            Err(p) => p.into_inner().last.unwrap_or(now) + self.interval,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep_until(at).await;
                    self.flush();
                });
            }
            // Outside a runtime nothing can wait; the next line written carries the count instead.
            Err(_) => {
                if let Ok(mut s) = self.state.lock() {
                    s.flush_pending = false;
                }
            }
        }
    }

    /// Writes the summary of what the interval held back, if anything was.
    fn flush(&self) {
        let n = match self.state.lock() {
            Ok(mut s) => s.on_flush(Instant::now()),
            Err(p) => p.into_inner().on_flush(Instant::now()),
        };
        if let Some(n) = n {
            tracing::warn!(site = self.site, suppressed = n, "Repeated log lines suppressed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_then_the_count_held_back() {
        let mut s = State::default();
        let t0 = Instant::now();
        assert_eq!(s.on_event(t0, INTERVAL), Decision::Log(0));
        // A flood within the interval: held back, and only the first asks for a summary.
        assert_eq!(s.on_event(t0, INTERVAL), Decision::Suppress(true));
        for _ in 0..998 {
            assert_eq!(s.on_event(t0 + INTERVAL / 2, INTERVAL), Decision::Suppress(false));
        }
        // The interval ends: the summary reports all 999 and stands for that interval's line.
        tokio::time::advance(INTERVAL).await;
        assert_eq!(s.on_flush(Instant::now()), Some(999));
        assert_eq!(s.on_event(Instant::now(), INTERVAL), Decision::Suppress(true));
        tokio::time::advance(INTERVAL).await;
        assert_eq!(s.on_flush(Instant::now()), Some(1));
        // Quiet for an interval: the next event is written, with nothing held back before it.
        tokio::time::advance(INTERVAL).await;
        assert_eq!(s.on_flush(Instant::now()), None);
        assert_eq!(s.on_event(Instant::now(), INTERVAL), Decision::Log(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_through_the_limiter_writes_two_lines_per_interval_at_most() {
        static SITE: LogLimit = LogLimit::new("test", INTERVAL);
        let mut written = 0;
        for _ in 0..1000 {
            if SITE.check().is_some() {
                written += 1;
            }
        }
        assert_eq!(written, 1);
        // Time passes: the summary task runs and takes this interval's line.
        tokio::time::sleep(INTERVAL + Duration::from_millis(1)).await;
        let s = SITE.state.lock().unwrap();
        assert_eq!((s.suppressed, s.flush_pending), (0, false), "the summary reported the 999: {s:?}");
    }
}
