//! Counted places with a ceiling, taken without waiting: a listener's and a cluster's thresholds, an
//! upstream HTTP/2 connection's streams. Past a ceiling the request is refused at once (503
//! `overflow-<which>`): queueing behind an overloaded upstream only turns its trouble into the caller's
//! latency (docs/architecture.md §12). Below every other module: HTTP and upstream code both hold slots.

use std::sync::atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Relaxed};
use std::sync::Arc;

/// One counted resource with its ceiling.
#[derive(Debug)]
pub struct Limit {
    used: Arc<AtomicUsize>,
    /// Changeable at run time (the control plane's inbound policy); a lower ceiling refuses new
    /// requests until enough old ones finish.
    max: AtomicUsize,
    /// The `x-ebb-error` cause when the ceiling is hit.
    pub overflow: &'static str,
}

impl Limit {
    pub fn new(max: usize, overflow: &'static str) -> Self {
        Self { used: Arc::new(AtomicUsize::new(0)), max: AtomicUsize::new(max), overflow }
    }

    /// A slot if one is free.
    pub fn try_take(&self) -> Option<Slot> {
        let max = self.max.load(Relaxed);
        self.used.fetch_update(AcqRel, Relaxed, |u| (u < max).then_some(u + 1)).ok()?;
        Some(Slot(self.used.clone()))
    }

    /// Sets a new ceiling.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    /// The ceiling now.
    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }
}

/// A taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place on `used` whatever its ceiling, for a count whose ceiling the caller checked.
    pub fn take_on(used: &Arc<AtomicUsize>) -> Self {
        used.fetch_add(1, AcqRel);
        Self(used.clone())
    }

    /// Whether this slot counts on `used`.
    pub fn counts_on(&self, used: &Arc<AtomicUsize>) -> bool {
        Arc::ptr_eq(&self.0, used)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AcqRel);
    }
}

/// What opening an upstream connection takes: a place among the requests waiting for a connection
/// (given back once it is open) and a place among the cluster's connections (kept while it is open).
#[derive(Debug)]
pub struct ConnectLimits {
    pub pending: Limit,
    pub connections: Limit,
}

/// The two slots of a connect.
#[derive(Debug)]
pub struct ConnectSlots {
    pub pending: Slot,
    pub connection: Slot,
}

impl ConnectLimits {
    /// Both slots, or the cause of the overflow.
    pub fn begin(&self) -> Result<ConnectSlots, &'static str> {
        let pending = self.pending.try_take().ok_or(self.pending.overflow)?;
        let connection = self.connections.try_take().ok_or(self.connections.overflow)?;
        Ok(ConnectSlots { pending, connection })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_limit_refuses_until_a_slot_is_given_back() {
        let l = Limit::new(2, "overflow-max-requests");
        let a = l.try_take().unwrap();
        let _b = l.try_take().unwrap();
        assert!(l.try_take().is_none());
        drop(a);
        assert!(l.try_take().is_some());
    }
}
