//! Outlier ejection, the per-endpoint circuit breaker: an endpoint that fails several requests in a
//! row leaves the rotation for a while, comes back on probation (one request), and stays back when
//! that request succeeds (docs/architecture.md §12).
//!
//! The request path reads one atomic flag per endpoint; the mutex below is taken only while an
//! endpoint is ejected or changes state.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutlierConfig;

/// What the breaker says of an endpoint now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// In rotation.
    Closed,
    /// Out of rotation until its ejection time passes.
    Ejected,
    /// Ejection over: one request may go to it; its outcome decides.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Ejected => "ejected",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What a recorded failure did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed state.
    Unchanged,
    /// The endpoint was ejected for this long.
    Ejected(Duration),
    /// It should have been ejected, but the cluster already has as many ejected as it may.
    AtMaxEjected,
}

#[derive(Debug, Default)]
struct Ejection {
    /// Ejections in a row (reset once the endpoint has stayed healthy for `max_ejection_time`).
    count: u32,
    until: Option<Instant>,
    /// The half-open probe request has been sent and not yet answered.
    probing: bool,
    /// When probation last ended well.
    restored_at: Option<Instant>,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct Outlier {
    consecutive: AtomicU32,
    /// Fast path: false while the endpoint is in rotation.
    out: AtomicBool,
    ejection: Mutex<Ejection>,
}

impl Default for Outlier {
    fn default() -> Self {
        Self::new()
    }
}

/// A cluster's count of ejected endpoints, which `max_ejection_percent` bounds.
pub trait EjectionBudget {
    /// Takes a slot for one more ejected endpoint if the cluster has one.
    fn try_eject(&self) -> bool;
    /// Gives the slot back.
    fn restore(&self);
}

impl Outlier {
    pub fn new() -> Self {
        Self { consecutive: AtomicU32::new(0), out: AtomicBool::new(false), ejection: Mutex::new(Ejection::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ejection> {
        // Every change under it is a few field writes; a panic cannot leave it half done.
        match self.ejection.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The breaker's state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        if !self.out.load(Relaxed) {
            return BreakerState::Closed;
        }
        match self.lock().until {
            Some(until) if now < until => BreakerState::Ejected,
            Some(_) => BreakerState::HalfOpen,
            None => BreakerState::Closed,
        }
    }

    /// Whether a request may go to the endpoint now: closed, or half-open with its probe not taken.
    pub fn admits(&self, now: Instant) -> bool {
        if !self.out.load(Relaxed) {
            return true;
        }
        let e = self.lock();
        e.until.is_none_or(|until| now >= until && !e.probing)
    }

    /// Called for the request about to go to the endpoint: if it is half-open, this request becomes its
    /// probe. False when another request took the probe first (send this one elsewhere).
    pub fn begin(&self, now: Instant) -> bool {
        if !self.out.load(Relaxed) {
            return true;
        }
        let mut e = self.lock();
        match e.until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if e.probing => false,
            Some(_) => {
                e.probing = true;
                true
            }
        }
    }

    /// A request to the endpoint succeeded (any response but a gateway failure). Returns true when
    /// that ended probation.
    pub fn success(&self, now: Instant, budget: &dyn EjectionBudget) -> bool {
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, Relaxed);
        }
        if !self.out.load(Relaxed) {
            return false;
        }
        let mut e = self.lock();
        match e.until {
            Some(until) if now >= until => {
                e.until = None;
                e.probing = false;
                e.restored_at = Some(now);
                self.out.store(false, Relaxed);
                budget.restore();
                true
            }
            // A response to a request sent before the ejection: it changes nothing.
            _ => false,
        }
    }

    /// A request to the endpoint failed the way a failing endpoint fails (connect error, reset,
    /// 502/503/504, gRPC UNAVAILABLE).
    pub fn failure(&self, now: Instant, cfg: &OutlierConfig, budget: &dyn EjectionBudget) -> Verdict {
        if cfg.consecutive_failures == 0 {
            return Verdict::Unchanged;
        }
        let n = self.consecutive.fetch_add(1, Relaxed).saturating_add(1);
        let mut e = self.lock();
        let probation_failed = e.until.is_some_and(|until| now >= until) && e.probing;
        if e.until.is_some() && !probation_failed {
            // Already ejected: failures of requests sent before the ejection do not extend it.
            return Verdict::Unchanged;
        }
        if !probation_failed {
            if n < cfg.consecutive_failures {
                return Verdict::Unchanged;
            }
            if !budget.try_eject() {
                return Verdict::AtMaxEjected;
            }
            // Healthy for a whole maximum ejection since the last one: start the doubling again.
            if e.restored_at.is_some_and(|at| now.saturating_duration_since(at) >= cfg.max_ejection_time) {
                e.count = 0;
            }
        }
        e.count = e.count.saturating_add(1);
        let duration = ejection_time(cfg, e.count, fastrand::f64());
        e.until = Some(now + duration);
        e.probing = false;
        self.consecutive.store(0, Relaxed);
        self.out.store(true, Relaxed);
        Verdict::Ejected(duration)
    }

    /// Ejections in a row so far.
    pub fn ejections(&self) -> u32 {
        self.lock().count
    }
}

/// How long the `count`-th ejection in a row lasts: base × count, capped, plus up to `jitter` of it
/// (`unit` is a uniform sample in [0, 1)), never past the cap.
pub fn ejection_time(cfg: &OutlierConfig, count: u32, unit: f64) -> Duration {
    let base = cfg.base_ejection_time.saturating_mul(count.max(1)).min(cfg.max_ejection_time);
    let extra = base.mul_f64(cfg.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0));
    (base + extra).min(cfg.max_ejection_time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Slots {
        used: AtomicUsize,
        max: usize,
    }

    impl EjectionBudget for Slots {
        fn try_eject(&self) -> bool {
            self.used.fetch_update(Relaxed, Relaxed, |u| (u < self.max).then_some(u + 1)).is_ok()
        }
        fn restore(&self) {
            self.used.fetch_sub(1, Relaxed);
        }
    }

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(35),
            max_ejection_percent: 100,
            jitter: 0.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_half_opens_and_closes() {
        let (o, cfg, slots) = (Outlier::new(), cfg(), Slots { used: AtomicUsize::new(0), max: 1 });
        let now = Instant::now();
        assert_eq!(o.failure(now, &cfg, &slots), Verdict::Unchanged);
        assert_eq!(o.failure(now, &cfg, &slots), Verdict::Unchanged);
        // A success in between starts the count again.
        o.success(now, &slots);
        assert_eq!(o.failure(now, &cfg, &slots), Verdict::Unchanged);
        assert_eq!(o.failure(now, &cfg, &slots), Verdict::Unchanged);
        assert_eq!(o.failure(now, &cfg, &slots), Verdict::Ejected(Duration::from_secs(10)));
        assert_eq!(o.state(Instant::now()), BreakerState::Ejected);
        assert!(!o.admits(Instant::now()));

        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert_eq!(o.state(now), BreakerState::HalfOpen);
        assert!(o.admits(now));
        assert!(o.begin(now), "the first request after the ejection is the probe");
        assert!(!o.admits(now) && !o.begin(now), "only one probe at a time");
        assert!(o.success(now, &slots), "a good probe closes the breaker");
        assert_eq!(o.state(now), BreakerState::Closed);
        assert_eq!(slots.used.load(Relaxed), 0, "the ejection slot is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_doubles_per_ejection_in_a_row_and_is_capped() {
        let (o, cfg, slots) = (Outlier::new(), cfg(), Slots { used: AtomicUsize::new(0), max: 1 });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(o.failure(Instant::now(), &cfg, &slots));
        }
        // Probes that fail eject again, each time for longer: 10 s, 20 s, 30 s, then the 35 s cap.
        for _ in 0..3 {
            let Some(Verdict::Ejected(d)) = got.last().copied() else { panic!("{got:?}") };
            tokio::time::advance(d).await;
            assert!(o.begin(Instant::now()));
            got.push(o.failure(Instant::now(), &cfg, &slots));
        }
        let durations: Vec<_> = got
            .into_iter()
            .filter_map(|v| match v {
                Verdict::Ejected(d) => Some(d.as_secs()),
                _ => None,
            })
            .collect();
        assert_eq!(durations, [10, 20, 30, 35]);
        assert_eq!(o.ejections(), 4);
        assert_eq!(slots.used.load(Relaxed), 1, "one endpoint, one slot, however often it is ejected");
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_the_cap() {
        let cfg = OutlierConfig { jitter: 0.5, ..cfg() };
        for i in 0..=100 {
            let u = f64::from(i) / 100.0;
            let d = ejection_time(&cfg, 1, u);
            assert!(d >= Duration::from_secs(10) && d <= Duration::from_secs(15), "{d:?}");
            assert!(ejection_time(&cfg, 3, u) <= cfg.max_ejection_time);
        }
        assert_eq!(ejection_time(&cfg, 1, 0.0), Duration::from_secs(10));
        assert_eq!(ejection_time(&cfg, 1, 1.0), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cluster_limit_keeps_an_endpoint_in_rotation() {
        let (o, cfg, slots) = (Outlier::new(), cfg(), Slots { used: AtomicUsize::new(1), max: 1 });
        let now = Instant::now();
        let verdicts: Vec<_> = (0..3).map(|_| o.failure(now, &cfg, &slots)).collect();
        assert_eq!(verdicts.last(), Some(&Verdict::AtMaxEjected));
        assert_eq!(o.state(now), BreakerState::Closed);
    }
}
