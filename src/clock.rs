//! Deadlines from durations that cannot overflow: `Instant + Duration` panics past the clock's range,
//! and a release build aborts on it, so a duration from config or a peer goes through `after`.

use std::time::Duration;

use tokio::time::Instant;

/// A point so far ahead that nothing waits that long: about 30 years.
const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `Instant::now() + d`, or a point beyond any wait when that sum would not fit.
pub fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// Sleeps until `at`; never resolves without one (a `select!` branch for an optional timer).
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_do_not_panic() {
        let t = after(Duration::MAX);
        assert!(t > Instant::now() + Duration::from_secs(3600));
        assert!(after(Duration::ZERO) <= Instant::now());
    }
}
