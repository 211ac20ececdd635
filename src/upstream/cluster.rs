//! A cluster at run time: its endpoints with their breakers, draining marks and outstanding counts,
//! the choice of an endpoint per request, and the cluster's limits and retry budget; and the table
//! that maps an outbound original destination to its cluster (docs/architecture.md §12).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;

use crate::config::{ClusterConfig, EndpointHealth, LbPolicy, UpstreamConfig};
use crate::domain::Direction;
use crate::http::client::{Endpoint as Pool, Upstreams};
use crate::limits::{ConnectLimits, Limit, Slot};
use crate::telemetry::metrics::{
    ClusterLabels, EndpointLabels, EndpointStateLabels, Metrics, OverflowLabels, RetryLabels,
};
use crate::upstream::outlier::{BreakerState, EjectionBudget, Outlier, Verdict};
use crate::upstream::retry::Failure;

/// Name of the cluster that serves outbound destinations no configured cluster names.
pub const PASSTHROUGH: &str = "passthrough";
/// Name of the cluster that serves inbound connections (the local app).
pub const INBOUND: &str = "inbound";

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct ClusterEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its connections (shared with any other cluster that has the same address).
    pub pool: Arc<Pool>,
    /// What the config or control plane says (`EndpointHealth` as a number, changeable in place).
    configured: AtomicU8,
    /// Requests sent to it whose responses have not ended; shared with each request's [`Slot`].
    outstanding: Arc<AtomicUsize>,
    pub outlier: Outlier,
    /// Resolved metric handles; `None` for passthrough, which has no endpoint series.
    requests: Option<Counter>,
    ejections: Option<Counter>,
}

impl ClusterEndpoint {
    /// Whether the endpoint is going away: configured draining, or it told Ebb so itself (GOAWAY,
    /// `Connection: close`) within `hold`.
    pub fn is_draining(&self, now: Instant, hold: Duration) -> bool {
        self.configured.load(Relaxed) == EndpointHealth::Draining as u8 || self.pool.signalled_draining(now, hold)
    }

    /// Sets what the config says of it.
    pub fn set_configured(&self, h: EndpointHealth) {
        self.configured.store(h as u8, Relaxed);
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Relaxed)
    }

    /// Counts a request on it until the returned slot drops (it travels with the response body).
    pub fn begin(&self) -> Slot {
        if let Some(c) = &self.requests {
            c.inc();
        }
        Slot::take_on(&self.outstanding)
    }
}

/// One level of [`Cluster::pick`]'s preference: whether endpoint `i` qualifies.
type Preference<'a> = dyn Fn(usize, &ClusterEndpoint) -> bool + 'a;

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoHealthyEndpoint;

/// A retry under way, counted against `limits.max_retries` until dropped.
#[derive(Debug)]
pub struct RetryPermit(#[allow(dead_code)] Slot);

/// The `x-ebb-error` causes of a request refused at one of a cluster's thresholds, in the order of
/// [`ClusterMetrics`]'s overflow counters.
const OVERFLOW_CAUSES: [&str; 4] =
    ["overflow-max-requests", "overflow-max-pending-requests", "overflow-max-connections", "overflow-max-retries"];

/// Per-cluster metric handles, every label set resolved when the cluster is built: counting a retry
/// or an overflow on the request path takes no lock and allocates nothing, exactly when an overloaded
/// upstream makes them frequent.
#[derive(Debug)]
pub struct ClusterMetrics {
    pub requests: Counter,
    pub budget_exhausted: Counter,
    pub no_healthy_endpoint: Counter,
    /// By [`Failure::index`].
    retries: [Counter; Failure::KINDS.len()],
    /// By [`OVERFLOW_CAUSES`].
    overflows: [Counter; OVERFLOW_CAUSES.len()],
}

impl ClusterMetrics {
    fn new(name: &str, metrics: &Metrics) -> Self {
        let l = ClusterLabels { cluster: name.to_string() };
        let f = &metrics.clusters;
        let requests = f.requests.get_or_create(&l).clone();
        let budget_exhausted = f.budget_exhausted.get_or_create(&l).clone();
        let no_healthy_endpoint = f.no_healthy_endpoint.get_or_create(&l).clone();
        let retries = Failure::KINDS
            .map(|reason| f.retries.get_or_create(&RetryLabels { cluster: name.to_string(), reason }).clone());
        let overflows = OVERFLOW_CAUSES.map(|cause| {
            let kind = cause.strip_prefix("overflow-").unwrap_or(cause);
            f.overflows.get_or_create(&OverflowLabels { cluster: name.to_string(), kind }).clone()
        });
        Self { requests, budget_exhausted, no_healthy_endpoint, retries, overflows }
    }

    /// Counts a retry (or resend) made for `failure`.
    pub fn retry(&self, failure: Failure) {
        self.retries[failure.index()].inc();
    }

    /// Counts a request refused at a threshold; `cause` is its `x-ebb-error` (`overflow-<kind>`).
    pub fn overflow(&self, cause: &'static str) {
        if let Some(i) = OVERFLOW_CAUSES.iter().position(|c| *c == cause) {
            self.overflows[i].inc();
        }
    }

    /// Requests refused for `cause` so far.
    pub fn overflows(&self, cause: &str) -> u64 {
        OVERFLOW_CAUSES.iter().position(|c| *c == cause).map_or(0, |i| self.overflows[i].get())
    }

    /// Retries made for failures of `failure`'s kind so far.
    pub fn retries(&self, failure: Failure) -> u64 {
        self.retries[failure.index()].get()
    }
}

/// A cluster ready to serve requests.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub cfg: ClusterConfig,
    pub endpoints: Vec<Arc<ClusterEndpoint>>,
    /// Resolved from the cluster's own key or `upstream.*`.
    pub connect_timeout: Duration,
    pub request_timeout: Option<Duration>,
    pub requests: Limit,
    pub connect: Arc<ConnectLimits>,
    retries: Limit,
    pub budget: TpsBudget,
    ejected: AtomicUsize,
    rr: AtomicUsize,
    pub metrics: ClusterMetrics,
}

impl EjectionBudget for Cluster {
    fn try_eject(&self) -> bool {
        let n = self.endpoints.len();
        let pct = self.cfg.outlier.max_ejection_percent as usize;
        // A percentage of a small cluster rounds down; one endpoint of several may always be
        // ejected, but the last one in rotation only when 100 % says so: ejecting a lone endpoint
        // turns its trouble (one bad connection) into an outage of the whole service.
        let max = match pct {
            0 => 0,
            100.. => n,
            _ if n >= 2 => (n * pct / 100).max(1),
            _ => 0,
        };
        self.ejected.fetch_update(Relaxed, Relaxed, |e| (e < max).then_some(e + 1)).is_ok()
    }

    fn restore(&self) {
        let _ = self.ejected.fetch_update(Relaxed, Relaxed, |e| e.checked_sub(1));
    }
}

/// An endpoint as `/status` shows it.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub weight: u32,
    /// healthy, draining, ejected or half_open.
    pub state: &'static str,
    pub outstanding: usize,
    pub ejections: u32,
}

/// A cluster as `/status` shows it.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub name: String,
    pub addresses: Vec<SocketAddr>,
    pub lb: LbPolicy,
    pub requests_in_flight: usize,
    pub connections: usize,
    pub endpoints: Vec<EndpointView>,
}

impl Cluster {
    /// Builds a cluster; `endpoints` are the addresses to send to (passthrough: the one destination).
    pub fn new(
        cfg: ClusterConfig,
        endpoints: &[(SocketAddr, u32, EndpointHealth)],
        upstreams: &Upstreams,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::build(cfg, endpoints, None, upstreams, upstream, metrics)
    }

    /// Builds a cluster, keeping from `previous` (the same cluster before a config change) every
    /// endpoint still listed with the same weight: its breaker, its outstanding count, and so its
    /// requests in flight, carry over; only its configured health is updated.
    fn build(
        cfg: ClusterConfig,
        endpoints: &[(SocketAddr, u32, EndpointHealth)],
        previous: Option<&Cluster>,
        upstreams: &Upstreams,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let passthrough = cfg.name == PASSTHROUGH || cfg.name == INBOUND;
        let now = Instant::now();
        let mut ejected = 0;
        let endpoints = endpoints
            .iter()
            .map(|&(addr, weight, state)| {
                // Passthrough's endpoint is the destination itself: never one with an identity.
                let identity: Option<Arc<str>> =
                    cfg.endpoints.iter().find(|e| e.addr == addr).and_then(|e| e.identity.as_deref()).map(Arc::from);
                let kept = previous.and_then(|p| {
                    p.endpoints
                        .iter()
                        .find(|e| e.addr == addr && e.weight == weight.max(1) && e.pool.identity() == identity.as_ref())
                });
                if let Some(e) = kept {
                    e.set_configured(state);
                    if e.outlier.state(now) != BreakerState::Closed {
                        ejected += 1;
                    }
                    return e.clone();
                }
                let labels = EndpointLabels { cluster: cfg.name.clone(), endpoint: addr.to_string() };
                let f = &metrics.clusters;
                Arc::new(ClusterEndpoint {
                    addr,
                    weight: weight.max(1),
                    pool: upstreams.endpoint(addr, identity),
                    configured: AtomicU8::new(state as u8),
                    outstanding: Arc::new(AtomicUsize::new(0)),
                    outlier: Outlier::new(),
                    requests: (!passthrough).then(|| f.endpoint_requests.get_or_create(&labels).clone()),
                    ejections: (!passthrough).then(|| f.ejections.get_or_create(&labels).clone()),
                })
            })
            .collect();
        let l = &cfg.limits;
        let b = &cfg.budget;
        // Validation keeps these within what `TpsBudget::new` asserts; a config built in code is
        // clamped the same way rather than trusted.
        let budget = TpsBudget::new(
            b.window.clamp(Duration::from_secs(1), Duration::from_secs(60)),
            b.min_retries_per_second.min(1_000_000),
            if b.ratio.is_nan() { 0.0 } else { b.ratio.clamp(0.0, 1000.0) },
        );
        Arc::new(Self {
            name: cfg.name.as_str().into(),
            connect_timeout: cfg.connect_timeout.unwrap_or(upstream.connect_timeout),
            request_timeout: cfg.request_timeout.or(upstream.response_timeout),
            requests: Limit::new(l.max_requests, OVERFLOW_CAUSES[0]),
            connect: Arc::new(ConnectLimits {
                pending: Limit::new(l.max_pending_requests, OVERFLOW_CAUSES[1]),
                connections: Limit::new(l.max_connections, OVERFLOW_CAUSES[2]),
            }),
            retries: Limit::new(l.max_retries, OVERFLOW_CAUSES[3]),
            budget,
            ejected: AtomicUsize::new(ejected),
            rr: AtomicUsize::new(0),
            metrics: ClusterMetrics::new(&cfg.name, &metrics),
            endpoints,
            cfg,
        })
    }

    /// A slot among the retries under way, if one is free.
    pub fn retry_permit(&self) -> Option<RetryPermit> {
        self.retries.try_take().map(RetryPermit)
    }

    /// Chooses the endpoint for one attempt. Preference order: an endpoint in rotation that is not
    /// draining and not in `avoid` (the ones this request already failed on); then one in `avoid`;
    /// then a draining one (it still serves while it drains; better than failing). Ejected endpoints
    /// never, except the one half-open probe.
    pub fn pick(&self, now: Instant, avoid: &[usize]) -> Result<usize, NoHealthyEndpoint> {
        let hold = self.cfg.draining_hold;
        let levels: [&Preference; 3] =
            [&|i, e| !avoid.contains(&i) && !e.is_draining(now, hold), &|_, e| !e.is_draining(now, hold), &|_, _| true];
        for level in levels {
            let eligible = |i: usize| {
                let e = &self.endpoints[i];
                level(i, e) && e.outlier.admits(now)
            };
            // A half-open endpoint takes one request at a time: if another request took its probe
            // between the look and the claim, choose again.
            for _ in 0..4 {
                // A retry does not move the round-robin rotation on: otherwise the first attempts of
                // alternate requests would all land on whichever endpoint follows the retry's.
                let Some(i) = self.choose(&eligible, avoid.is_empty()) else { break };
                if self.endpoints[i].outlier.begin(now) {
                    return Ok(i);
                }
            }
        }
        self.metrics.no_healthy_endpoint.inc();
        Err(NoHealthyEndpoint)
    }

    fn choose(&self, eligible: &dyn Fn(usize) -> bool, advance: bool) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 1 {
            return eligible(0).then_some(0);
        }
        match self.cfg.lb {
            LbPolicy::P2c => {
                // Two distinct endpoints at random: both eligible whenever the cluster is healthy, and
                // then the pick costs two looks, not a pass over the endpoints.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = if eligible(a) && eligible(b) {
                    (a, b)
                } else {
                    // Else a pair drawn evenly among the eligible, in one pass (reservoir sampling of
                    // two). Together the two draws still choose every eligible pair equally often.
                    let (mut a, mut b, mut seen) = (None, None, 0usize);
                    for i in (0..n).filter(|&i| eligible(i)) {
                        seen += 1;
                        match seen {
                            1 => a = Some(i),
                            2 => b = Some(i),
                            _ => match fastrand::usize(..seen) {
                                0 => a = Some(i),
                                1 => b = Some(i),
                                _ => {}
                            },
                        }
                    }
                    match (a?, b) {
                        // The slots fill in index order: a coin decides which one a tie favours.
                        (a, Some(b)) if fastrand::bool() => (b, a),
                        (a, Some(b)) => (a, b),
                        (a, None) => return Some(a),
                    }
                };
                // Fewer outstanding requests per unit of weight wins (compared without division).
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let la = (ea.outstanding() as u64 + 1) * u64::from(eb.weight);
                let lb = (eb.outstanding() as u64 + 1) * u64::from(ea.weight);
                Some(if lb < la { b } else { a })
            }
            LbPolicy::RoundRobin => {
                let total: u64 = self.endpoints.iter().map(|e| u64::from(e.weight)).sum();
                let counter = if advance { self.rr.fetch_add(1, Relaxed) } else { self.rr.load(Relaxed) };
                let tick = counter as u64 % total.max(1);
                let mut acc = 0u64;
                let start = self
                    .endpoints
                    .iter()
                    .position(|e| {
                        acc += u64::from(e.weight);
                        tick < acc
                    })
                    .unwrap_or(0);
                (0..n).map(|k| (start + k) % n).find(|&i| eligible(i))
            }
        }
    }

    /// Records an attempt's outcome on endpoint `i`'s breaker.
    pub fn record(&self, i: usize, gateway_failure: bool) {
        let Some(e) = self.endpoints.get(i) else { return };
        let now = Instant::now();
        if !gateway_failure {
            if e.outlier.success(now, self) {
                tracing::info!(cluster = %self.name, endpoint = %e.addr, "Endpoint back in rotation");
            }
            return;
        }
        match e.outlier.failure(now, &self.cfg.outlier, self) {
            Verdict::Ejected(d) => {
                if let Some(c) = &e.ejections {
                    c.inc();
                }
                tracing::warn!(cluster = %self.name, endpoint = %e.addr, ejection = ?d, "Endpoint ejected");
            }
            Verdict::AtMaxEjected => {
                tracing::debug!(cluster = %self.name, endpoint = %e.addr, "Endpoint failing; cluster at max ejected")
            }
            Verdict::Unchanged => {}
        }
    }

    /// State of endpoint `e` for `/status` and the metrics.
    fn state_of(&self, e: &ClusterEndpoint, now: Instant) -> &'static str {
        match e.outlier.state(now) {
            BreakerState::Ejected => "ejected",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Closed if e.is_draining(now, self.cfg.draining_hold) => "draining",
            BreakerState::Closed => "healthy",
        }
    }

    /// The cluster as `/status` shows it.
    pub fn view(&self) -> ClusterView {
        let now = Instant::now();
        ClusterView {
            name: self.name.to_string(),
            addresses: self.cfg.addresses.clone(),
            lb: self.cfg.lb,
            requests_in_flight: self.requests.used(),
            connections: self.connect.connections.used(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    addr: e.addr,
                    weight: e.weight,
                    state: self.state_of(e, now),
                    outstanding: e.outstanding(),
                    ejections: e.outlier.ejections(),
                })
                .collect(),
        }
    }

    /// Sets the endpoint gauges (state, outstanding) as of now; run before each scrape.
    fn refresh_metrics(&self, metrics: &Metrics) {
        let now = Instant::now();
        for e in &self.endpoints {
            let state = self.state_of(e, now);
            for s in ["healthy", "draining", "ejected", "half_open"] {
                let l = EndpointStateLabels { cluster: self.name.to_string(), endpoint: e.addr.to_string(), state: s };
                metrics.clusters.endpoint_state.get_or_create(&l).set(i64::from(s == state));
            }
            let l = EndpointLabels { cluster: self.name.to_string(), endpoint: e.addr.to_string() };
            metrics.clusters.outstanding.get_or_create(&l).set(e.outstanding() as i64);
        }
    }
}

/// A cluster's place in the table: its current run-time state, replaced whole when its config
/// changes. Connections hold the slot, so every request sees the cluster as it is now.
#[derive(Debug)]
pub struct ClusterSlot(ArcSwap<Cluster>);

impl ClusterSlot {
    fn new(c: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(c)))
    }

    /// Whether `cluster` is the one in force (no reference count taken).
    pub fn is(&self, cluster: &Arc<Cluster>) -> bool {
        Arc::ptr_eq(&self.0.load(), cluster)
    }

    /// The cluster as it is now.
    pub fn load(&self) -> Arc<Cluster> {
        self.0.load_full()
    }
}

/// The configured clusters, replaced whole on a config change.
#[derive(Debug, Default)]
struct Table {
    by_addr: HashMap<SocketAddr, Arc<ClusterSlot>>,
    configured: Vec<Arc<ClusterSlot>>,
}

/// Every cluster, by the addresses that reach it, and the passthrough clusters made on demand.
#[derive(Debug)]
pub struct Clusters {
    table: ArcSwap<Table>,
    passthrough_cfg: ClusterConfig,
    /// The passthrough policy for the local app, without outlier ejection: the app is the only
    /// endpoint there is, and ejecting it would turn a few errors into seconds of 503s.
    inbound_cfg: ClusterConfig,
    /// One per direction and destination dialled; forgotten once nothing uses it (see `reap`).
    passthrough: Mutex<HashMap<(Direction, SocketAddr), Arc<ClusterSlot>>>,
    /// Removed clusters that connections still hold, by name: a cluster that comes back (a source
    /// that briefly served no clusters, a remove and re-add) is stored in the same holder, so those
    /// connections follow its updates again instead of keeping a copy no push reaches.
    retired: Mutex<HashMap<String, std::sync::Weak<ClusterSlot>>>,
    upstreams: Arc<Upstreams>,
    upstream: UpstreamConfig,
    metrics: Arc<Metrics>,
}

impl Clusters {
    /// Whether this sidecar has an identity to dial mesh TLS with.
    pub fn has_identity(&self) -> bool {
        self.upstreams.mesh().is_some()
    }

    pub fn new(
        configs: &[ClusterConfig],
        passthrough: ClusterConfig,
        upstream: UpstreamConfig,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut inbound_cfg = passthrough.clone();
        inbound_cfg.name = INBOUND.into();
        inbound_cfg.outlier.consecutive_failures = 0;
        let clusters = Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            inbound_cfg,
            passthrough_cfg: passthrough,
            passthrough: Mutex::new(HashMap::new()),
            retired: Mutex::new(HashMap::new()),
            upstreams,
            upstream,
            metrics,
        });
        clusters.update(configs);
        clusters
    }

    /// Applies a new set of clusters (already validated). An unchanged cluster is left alone; a
    /// changed one is rebuilt keeping its surviving endpoints' state (and the pools, which belong to
    /// the addresses); a removed endpoint gets no new request, and what it has in flight finishes.
    /// A removed cluster's addresses go to passthrough for new connections.
    pub fn update(&self, configs: &[ClusterConfig]) {
        let old = self.table.load_full();
        let mut retired = match self.retired.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut table = Table::default();
        for c in configs {
            let eps: Vec<_> = c.endpoints.iter().map(|e| (e.addr, e.weight, e.state)).collect();
            let kept = old
                .configured
                .iter()
                .find(|s| *s.load().name == *c.name)
                .cloned()
                .or_else(|| retired.remove(&c.name).and_then(|w| w.upgrade()));
            let slot = match kept {
                Some(slot) => {
                    let current = slot.load();
                    if current.cfg != *c {
                        let next = Cluster::build(
                            c.clone(),
                            &eps,
                            Some(&current),
                            &self.upstreams,
                            &self.upstream,
                            self.metrics.clone(),
                        );
                        slot.0.store(next);
                        tracing::info!(cluster = %c.name, endpoints = eps.len(), "Cluster updated");
                    }
                    slot
                }
                None => ClusterSlot::new(Cluster::new(
                    c.clone(),
                    &eps,
                    &self.upstreams,
                    &self.upstream,
                    self.metrics.clone(),
                )),
            };
            for a in &c.addresses {
                table.by_addr.insert(*a, slot.clone());
            }
            table.configured.push(slot);
        }
        for gone in old.configured.iter().filter(|s| !table.configured.iter().any(|n| Arc::ptr_eq(n, s))) {
            retired.insert(gone.load().cfg.name.clone(), Arc::downgrade(gone));
        }
        retired.retain(|_, w| w.strong_count() > 0);
        self.table.store(Arc::new(table));
    }

    /// The cluster that serves connections to `dst`: for outbound, the one that lists it, or
    /// passthrough to it; for inbound, the local app. Looked up once per downstream connection, not
    /// per request.
    pub fn route(&self, direction: Direction, dst: SocketAddr) -> Arc<ClusterSlot> {
        if direction == Direction::Outbound {
            if let Some(c) = self.table.load().by_addr.get(&dst) {
                return c.clone();
            }
        }
        let mut map = match self.passthrough.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry((direction, dst))
            .or_insert_with(|| {
                let cfg = match direction {
                    Direction::Outbound => &self.passthrough_cfg,
                    Direction::Inbound => &self.inbound_cfg,
                };
                ClusterSlot::new(Cluster::new(
                    cfg.clone(),
                    &[(dst, 1, EndpointHealth::Healthy)],
                    &self.upstreams,
                    &self.upstream,
                    self.metrics.clone(),
                ))
            })
            .clone()
    }

    /// Forgets passthrough clusters nothing uses and whose breaker is closed (an ejected destination
    /// is remembered until it is back, or forgetting it would end its ejection); run periodically.
    pub fn reap(&self) {
        let Ok(mut map) = self.passthrough.lock() else { return };
        let now = Instant::now();
        map.retain(|_, c| {
            Arc::strong_count(c) > 1 || c.load().endpoints.iter().any(|e| e.outlier.state(now) != BreakerState::Closed)
        });
    }

    /// The configured clusters as `/status` shows them.
    pub fn views(&self) -> Vec<ClusterView> {
        self.table.load().configured.iter().map(|c| c.load().view()).collect()
    }

    /// A configured cluster by name, as it is now.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.table.load().configured.iter().map(|s| s.load()).find(|c| &*c.name == name)
    }

    /// The configured clusters' configs, as now in force.
    pub fn configs(&self) -> Vec<ClusterConfig> {
        self.table.load().configured.iter().map(|s| s.load().cfg.clone()).collect()
    }

    /// Brings the endpoint gauges up to date; called before metrics are rendered.
    pub fn refresh_metrics(&self) {
        for c in &self.table.load().configured {
            c.load().refresh_metrics(&self.metrics);
        }
    }
}

/// Clusters, requests and answers for the layers' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A cluster `web` of `n` endpoints on `127.0.0.1:10000..`, its config changed by `tweak`.
    pub fn cluster_with(n: usize, tweak: impl FnOnce(&mut ClusterConfig)) -> Arc<Cluster> {
        let metrics = Arc::new(Metrics::new());
        let upstream = UpstreamConfig::default();
        let upstreams = Upstreams::new(upstream.clone(), metrics.clone(), None);
        let endpoints: Vec<_> = (0..n)
            .map(|i| (SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)), 1, EndpointHealth::Healthy))
            .collect();
        let mut cfg = ClusterConfig { name: "web".into(), ..ClusterConfig::default() };
        tweak(&mut cfg);
        Cluster::new(cfg, &endpoints, &upstreams, &upstream, metrics)
    }

    pub fn cluster(n: usize) -> Arc<Cluster> {
        cluster_with(n, |_| {})
    }

    /// A bodiless GET, boxed as the stack carries it.
    pub fn get() -> crate::http::client::UpstreamRequest {
        Box::new(http::Request::get("/").body(crate::http::body::RequestBody::empty()).unwrap())
    }

    /// An upstream's answer with `status` and an empty body.
    pub fn answer(status: u16) -> http::Response<crate::http::body::ProxyBody> {
        let mut res = http::Response::new(crate::http::body::ProxyBody::empty());
        *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
        res
    }
}

#[cfg(test)]
mod tests {
    use super::testing::cluster;
    use super::*;

    /// How often each endpoint is chosen in `draws` picks among the `eligible` ones, all equally loaded.
    fn spread(c: &Cluster, eligible: &dyn Fn(usize) -> bool, draws: usize) -> Vec<usize> {
        let mut counts = vec![0; c.endpoints.len()];
        for _ in 0..draws {
            if let Some(i) = c.choose(eligible, true) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn p2c_spreads_evenly_over_the_eligible_endpoints_and_never_picks_another() {
        let c = cluster(5);
        // All eligible (the two-look path), then two of five left out (the one-pass path).
        for (eligible, expect) in [
            (&(|_| true) as &dyn Fn(usize) -> bool, vec![true; 5]),
            (&|i| i != 1 && i != 3, vec![true, false, true, false, true]),
        ] {
            let counts = spread(&c, eligible, 6000);
            let share = 6000 / expect.iter().filter(|e| **e).count();
            for (i, (&n, &ok)) in counts.iter().zip(&expect).enumerate() {
                if ok {
                    assert!(n > share * 8 / 10 && n < share * 12 / 10, "endpoint {i}: {n} of 6000 ({counts:?})");
                } else {
                    assert_eq!(n, 0, "endpoint {i} is not eligible ({counts:?})");
                }
            }
        }
        assert_eq!(spread(&c, &|i| i == 4, 100)[4], 100, "the one eligible endpoint, every time");
        assert_eq!(spread(&c, &|_| false, 100).iter().sum::<usize>(), 0, "none eligible: no pick");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_of_its_two() {
        let c = cluster(2);
        let _busy: Vec<_> = (0..3).map(|_| c.endpoints[0].begin()).collect();
        assert_eq!(spread(&c, &|_| true, 200)[1], 200, "with two endpoints the pair is both: the idle one wins");
    }

    /// A connection holds its cluster's slot for its whole life. A push without the cluster and then
    /// one with it again (a control-plane source that read a half-written file) must leave that
    /// connection following the cluster, not a copy no later push reaches: the connection's next
    /// request must see the endpoints of the latest push.
    #[test]
    fn a_cluster_removed_and_added_back_is_followed_by_connections_that_held_it() {
        let metrics = Arc::new(Metrics::new());
        let upstream = UpstreamConfig::default();
        let upstreams = Upstreams::new(upstream.clone(), metrics.clone(), None);
        let vip = SocketAddr::from(([10, 96, 0, 1], 80));
        let web = |ports: &[u16]| ClusterConfig {
            name: "web".into(),
            addresses: vec![vip],
            endpoints: ports
                .iter()
                .map(|p| crate::config::EndpointConfig {
                    addr: SocketAddr::from(([127, 0, 0, 1], *p)),
                    weight: 1,
                    state: EndpointHealth::Healthy,
                    node: None,
                    identity: None,
                })
                .collect(),
            ..ClusterConfig::default()
        };
        let clusters = Clusters::new(&[web(&[10_001, 10_002])], ClusterConfig::default(), upstream, upstreams, metrics);
        let held = clusters.route(Direction::Outbound, vip);
        clusters.update(&[]);
        assert_eq!(held.load().endpoints.len(), 2, "a removed cluster keeps serving the connections that hold it");
        clusters.update(&[web(&[10_001, 10_003])]);
        let ports: Vec<u16> = held.load().endpoints.iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [10_001, 10_003], "the held slot follows the cluster once it is back");
        assert!(Arc::ptr_eq(&held, &clusters.route(Direction::Outbound, vip)), "new connections share it");
        clusters.update(&[web(&[10_004])]);
        assert_eq!(held.load().endpoints[0].addr.port(), 10_004, "and every push after");
    }
}
