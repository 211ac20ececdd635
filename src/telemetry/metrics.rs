//! Prometheus metrics: one registry, with per-(direction, protocol) handles resolved up front so the
//! per-request path is a few relaxed atomic adds and never a label lookup.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType};
use prometheus_client::registry::Registry;

use crate::domain::Direction;
use crate::domain::Protocol;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum DirectionLabel {
    inbound,
    outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ProtocolLabel {
    http1,
    http2,
    opaque,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    direction: DirectionLabel,
    protocol: ProtocolLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: DirectionLabel,
    protocol: ProtocolLabel,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: DirectionLabel,
}

/// Label set for drain phase durations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// Label set for lingering closes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LingerLabels {
    pub outcome: &'static str,
}

/// Label set for connections a listener turned away or failed to accept.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    pub reason: &'static str,
}

/// Label set for connections closed for being idle.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdleLabels {
    pub protocol: &'static str,
}

/// Label set for requests refused as the client's fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientErrorLabels {
    pub reason: &'static str,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the request-duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A histogram of atomics: observing is lock-free (prometheus-client's own takes a mutex).
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
pub struct HistogramCells {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(DURATION_BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        self.0.count.fetch_add(1, Relaxed);
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.buckets.iter().map(|b| b.load(Relaxed)))
            .collect();
        let sum = self.0.sum_micros.load(Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, self.0.count.load(Relaxed), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The handles one kind of connection updates.
#[derive(Clone, Debug)]
pub struct ProtoMetrics {
    pub opened: Counter,
    pub closed: Counter,
    pub active: Gauge,
    requests: [Counter; 5],
    pub duration: AtomicHistogram,
}

impl ProtoMetrics {
    /// Counts a finished request by its status class.
    pub fn request(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
        self.duration.observe(elapsed);
    }
}

/// Drain counters (docs/architecture.md §4.8).
#[derive(Clone, Debug, Default)]
pub struct DrainMetrics {
    pub state: Gauge,
    pub phase_seconds: Family<PhaseLabels, Gauge<f64, AtomicU64>>,
    pub goaway_sent: Counter,
    pub connection_close_sent: Counter,
    pub idle_closes: Counter,
    pub forced_closes: Counter,
    pub accepted_during_announce: Counter,
}

/// Label set naming a cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

/// Label set for retries by why they were made.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub cluster: String,
    pub reason: &'static str,
}

/// Label set for requests refused at a cluster's threshold.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub cluster: String,
    pub kind: &'static str,
}

/// Label set naming one endpoint of a cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub cluster: String,
    pub endpoint: String,
}

/// Label set for an endpoint's state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub cluster: String,
    pub endpoint: String,
    pub state: &'static str,
}

/// Per-cluster and per-endpoint upstream metrics. Endpoint series exist for configured clusters only:
/// passthrough meets as many destinations as the app dials.
#[derive(Debug, Default)]
pub struct ClusterFamilies {
    pub requests: Family<ClusterLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<ClusterLabels, Counter>,
    pub overflows: Family<OverflowLabels, Counter>,
    pub no_healthy_endpoint: Family<ClusterLabels, Counter>,
    pub endpoint_requests: Family<EndpointLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub endpoint_state: Family<EndpointStateLabels, Gauge>,
    pub outstanding: Family<EndpointLabels, Gauge>,
}

impl ClusterFamilies {
    fn register(&self, registry: &mut Registry) {
        registry.register("cluster_requests", "Requests sent to a cluster (first attempts)", self.requests.clone());
        registry.register(
            "cluster_retries",
            "Attempts after the first, by reason (unprocessed and refused_stream: the upstream never saw it)",
            self.retries.clone(),
        );
        registry.register(
            "cluster_retry_budget_exhausted",
            "Retries not made because the cluster's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        registry.register(
            "cluster_overflows",
            "Requests refused at a cluster threshold, by kind (x-ebb-error overflow-<kind>)",
            self.overflows.clone(),
        );
        registry.register(
            "cluster_no_healthy_endpoint",
            "Requests failed fast because every endpoint of the cluster was ejected",
            self.no_healthy_endpoint.clone(),
        );
        registry.register("endpoint_requests", "Attempts sent to an endpoint", self.endpoint_requests.clone());
        registry.register("endpoint_ejections", "Times an endpoint was ejected by its breaker", self.ejections.clone());
        registry.register(
            "endpoint_state",
            "1 for an endpoint's current state (healthy, draining, ejected, half_open), 0 for the others",
            self.endpoint_state.clone(),
        );
        registry.register(
            "endpoint_outstanding_requests",
            "Requests sent to an endpoint whose response has not finished",
            self.outstanding.clone(),
        );
    }
}

/// Label set for config updates from the control plane.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    pub r#type: &'static str,
    pub result: &'static str,
}

/// Label set for dropped spans.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceDropLabels {
    pub reason: &'static str,
}

/// `ebb_trace_spans_dropped_total{reason}`, read from the trace pipeline's counters when rendered.
#[derive(Debug)]
struct TraceDrops;

impl EncodeMetric for TraceDrops {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let t = &*crate::telemetry::traces::COUNTERS;
        for (reason, c) in [("queue_full", &t.dropped_queue_full), ("export_failed", &t.dropped_export_failed)] {
            let labels = TraceDropLabels { reason };
            c.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Label set of mesh TLS outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MtlsLabels {
    direction: DirectionLabel,
    cause: &'static str,
}

/// Label set of connections refused by an inbound listener's mTLS mode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    reason: &'static str,
}

/// Label set of authorization denials: who was refused (a SPIFFE ID, or `plaintext`), and on what port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    identity: String,
    port: u16,
}

/// Mesh mTLS (docs/architecture.md §15).
#[derive(Debug, Default)]
pub struct MtlsMetrics {
    handshakes: Family<MtlsLabels, Counter>,
    handshake_errors: Family<MtlsLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    /// Seconds until this workload's certificate expires (set at each look at the identity files).
    pub expiry_seconds: Gauge,
    /// New identities loaded since the start.
    pub reloads: Counter,
}

impl MtlsMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("mtls_handshakes", "Mesh TLS handshakes completed, by direction", self.handshakes.clone());
        registry.register(
            "mtls_handshake_errors",
            "Mesh TLS handshakes that failed, by direction and cause (wrong-identity, expired, untrusted, no-client-certificate, ...)",
            self.handshake_errors.clone(),
        );
        registry.register(
            "mtls_refused",
            "Inbound connections closed by `mtls: strict` (plaintext, or TLS that is not the mesh's)",
            self.refused.clone(),
        );
        registry.register(
            "authorization_denied",
            "Connections refused by inbound.authorization (once per connection; each request on it gets 403), by caller identity and port",
            self.denied.clone(),
        );
        registry.register(
            "identity_expiry_seconds",
            "Seconds until this workload's certificate expires",
            self.expiry_seconds.clone(),
        );
        registry.register("identity_reloads", "Identities loaded after the start (rotations)", self.reloads.clone());
    }
}

/// The sidecar's control plane connection.
#[derive(Debug, Default)]
pub struct PlaneMetrics {
    /// 1 while the stream to the control plane is up.
    pub connected: Gauge,
    updates: Family<UpdateLabels, Counter>,
}

impl PlaneMetrics {
    /// Counts a response applied (`ack`) or refused (`nack`).
    pub fn update(&self, r#type: &'static str, result: &'static str) {
        self.updates.get_or_create(&UpdateLabels { r#type, result }).inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "control_plane_connected",
            "1 while the stream to the control plane is up; 0 while serving the last good config without it",
            self.connected.clone(),
        );
        registry.register(
            "control_plane_updates",
            "Responses from the control plane by resource type, applied (ack) or refused (nack)",
            self.updates.clone(),
        );
    }
}

/// Every metric Ebb exports, with the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    table: [[ProtoMetrics; 3]; 2],
    bytes_received: [Counter; 2],
    bytes_sent: [Counter; 2],
    pub drain: DrainMetrics,
    pub upstream_connect_errors: Counter,
    linger_closes: Family<LingerLabels, Counter>,
    client_errors: Family<ClientErrorLabels, Counter>,
    listener_rejects: Family<ListenerLabels, Counter>,
    request_rejects: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    idle_timeouts: Family<IdleLabels, Counter>,
    /// Client connections that ended in an error the client caused (a malformed request, a protocol
    /// violation): logged at debug, so that a misbehaving client cannot fill the log.
    pub downstream_errors: Counter,
    /// Clusters and their endpoints.
    pub clusters: ClusterFamilies,
    /// The control plane connection.
    pub control_plane: PlaneMetrics,
    /// Mesh mTLS.
    pub mtls: MtlsMetrics,
}

fn direction_label(d: Direction) -> DirectionLabel {
    match d {
        Direction::Inbound => DirectionLabel::inbound,
        Direction::Outbound => DirectionLabel::outbound,
    }
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Http1 => 0,
        Protocol::Http2 => 1,
        Protocol::Opaque => 2,
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ebb");
        let opened = Family::<ConnLabels, Counter>::default();
        let closed = Family::<ConnLabels, Counter>::default();
        let active = Family::<ConnLabels, Gauge>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<ConnLabels, AtomicHistogram>::default();
        let received = Family::<DirectionLabels, Counter>::default();
        let sent = Family::<DirectionLabels, Counter>::default();
        let dirs = [DirectionLabel::inbound, DirectionLabel::outbound];
        let protos = [ProtocolLabel::http1, ProtocolLabel::http2, ProtocolLabel::opaque];
        let table = dirs.clone().map(|direction| {
            protos.clone().map(|protocol| {
                let l = ConnLabels { direction: direction.clone(), protocol: protocol.clone() };
                ProtoMetrics {
                    opened: opened.get_or_create(&l).clone(),
                    closed: closed.get_or_create(&l).clone(),
                    active: active.get_or_create(&l).clone(),
                    requests: STATUS_CLASSES.map(|status_class| {
                        requests
                            .get_or_create(&RequestLabels {
                                direction: direction.clone(),
                                protocol: protocol.clone(),
                                status_class,
                            })
                            .clone()
                    }),
                    duration: duration.get_or_create(&l).clone(),
                }
            })
        });
        let bytes_received =
            dirs.clone().map(|direction| received.get_or_create(&DirectionLabels { direction }).clone());
        let bytes_sent = dirs.map(|direction| sent.get_or_create(&DirectionLabels { direction }).clone());
        registry.register("connections_opened", "Connections accepted, by protocol once detected", opened);
        registry.register("connections_closed", "Connections closed", closed);
        registry.register("connections_active", "Connections open now", active);
        registry.register("requests", "HTTP requests answered, by status class", requests);
        registry.register("request_duration_seconds", "Time from request to response headers", duration);
        registry.register("received_bytes", "Bytes read from clients", received);
        registry.register("sent_bytes", "Bytes written to clients", sent);
        let drain = DrainMetrics::default();
        registry.register(
            "drain_state",
            "0 serving, 1 announcing, 2 closing, 3 deadline, 4 drained",
            drain.state.clone(),
        );
        registry.register(
            "drain_phase_seconds",
            "Duration of each phase of the last drain",
            drain.phase_seconds.clone(),
        );
        registry.register("drain_goaway_sent", "HTTP/2 graceful GOAWAYs sent", drain.goaway_sent.clone());
        registry.register(
            "drain_connection_close_sent",
            "HTTP/1.1 responses sent with Connection: close because of a drain",
            drain.connection_close_sent.clone(),
        );
        registry.register(
            "drain_idle_closes",
            "Idle HTTP/1.1 connections closed by a drain",
            drain.idle_closes.clone(),
        );
        registry.register(
            "drain_forced_closes",
            "Connections closed at the drain deadline",
            drain.forced_closes.clone(),
        );
        registry.register(
            "drain_accepted_during_announce",
            "Connections accepted while announcing a drain",
            drain.accepted_during_announce.clone(),
        );
        let upstream_connect_errors = Counter::default();
        registry.register(
            "upstream_connect_errors",
            "Failed upstream connection attempts",
            upstream_connect_errors.clone(),
        );
        let linger_closes = Family::<LingerLabels, Counter>::default();
        registry.register(
            "linger_closes",
            "Client connections Ebb closed first, by how the lingering close ended",
            linger_closes.clone(),
        );
        let listener_rejects = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_rejected",
            "Connections a listener closed as soon as it accepted them (limit: max_connections; loop: aimed at Ebb itself)",
            listener_rejects.clone(),
        );
        let request_rejects = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "requests_rejected",
            "Requests a listener refused at once (max_requests: its requests in flight at the limit; 503 overflow-listener-max-requests)",
            request_rejects.clone(),
        );
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_errors",
            "Failed accepts (fd_exhausted: the process or system is out of file descriptors)",
            accept_errors.clone(),
        );
        let idle_timeouts = Family::<IdleLabels, Counter>::default();
        registry.register(
            "idle_timeouts",
            "Client connections closed for being idle (downstream.*_idle_timeout)",
            idle_timeouts.clone(),
        );
        let downstream_errors = Counter::default();
        registry.register(
            "downstream_errors",
            "Client connections that ended in an error (malformed request, protocol violation)",
            downstream_errors.clone(),
        );
        let client_errors = Family::<ClientErrorLabels, Counter>::default();
        registry.register(
            "client_errors",
            "Requests answered with an error the client caused (malformed body, bad Host, CONNECT), by cause",
            client_errors.clone(),
        );
        let clusters = ClusterFamilies::default();
        clusters.register(&mut registry);
        let control_plane = PlaneMetrics::default();
        control_plane.register(&mut registry);
        let mtls = MtlsMetrics::default();
        mtls.register(&mut registry);
        let t = &*crate::telemetry::traces::COUNTERS;
        registry.register("trace_spans_exported", "Spans sent to the OTLP collector", t.exported.clone());
        // A view over the pipeline's own counters (they exist before the registry does).
        registry.register(
            "trace_spans_dropped",
            "Sampled spans not delivered: the export queue was full (a slow or absent collector), or the export failed",
            TraceDrops,
        );
        Self {
            registry,
            clusters,
            control_plane,
            mtls,
            client_errors,
            table,
            bytes_received,
            bytes_sent,
            drain,
            upstream_connect_errors,
            linger_closes,
            listener_rejects,
            request_rejects,
            accept_errors,
            idle_timeouts,
            downstream_errors,
        }
    }

    /// Counts a completed mesh TLS handshake.
    pub fn mtls_handshake(&self, direction: Direction) {
        let l = MtlsLabels { direction: direction_label(direction), cause: "ok" };
        self.mtls.handshakes.get_or_create(&l).inc();
    }

    /// Counts a failed mesh TLS handshake by its cause (`TlsCause::as_str`).
    pub fn mtls_handshake_error(&self, direction: Direction, cause: &'static str) {
        let l = MtlsLabels { direction: direction_label(direction), cause };
        self.mtls.handshake_errors.get_or_create(&l).inc();
    }

    /// Counts a connection `mtls: strict` refused.
    pub fn mtls_refused(&self, listener: &str, reason: &'static str) {
        self.mtls.refused.get_or_create(&RefusedLabels { listener: listener.to_string(), reason }).inc();
    }

    /// Counts a caller refused by `inbound.authorization`.
    pub fn authorization_denied(&self, identity: &str, port: u16) {
        self.mtls.denied.get_or_create(&DeniedLabels { identity: identity.to_string(), port }).inc();
    }

    /// The handles for one kind of connection.
    pub fn proto(&self, direction: Direction, protocol: Protocol) -> &ProtoMetrics {
        &self.table[dir_index(direction)][proto_index(protocol)]
    }

    /// Adds a closed connection's bytes.
    pub fn bytes(&self, direction: Direction, received: u64, sent: u64) {
        self.bytes_received[dir_index(direction)].inc_by(received);
        self.bytes_sent[dir_index(direction)].inc_by(sent);
    }

    /// Counts a lingering close by how it ended.
    pub fn linger_close(&self, outcome: crate::domain::LingerOutcome) {
        self.linger_closes.get_or_create(&LingerLabels { outcome: outcome.as_str() }).inc();
    }

    /// Lingering closes that ended before the client closed its side (time ran out, the deadline, a
    /// socket error): the ones where a response's last bytes may not have arrived.
    pub fn linger_cut_short(&self) -> u64 {
        use crate::domain::LingerOutcome as Outcome;
        [Outcome::TimedOut, Outcome::Deadline, Outcome::Error]
            .iter()
            .map(|o| self.linger_closes.get_or_create(&LingerLabels { outcome: o.as_str() }).get())
            .sum()
    }

    /// The counter of connections `listener` turned away for `reason`; resolve it once per listener.
    pub fn rejected(&self, listener: &str, reason: &'static str) -> Counter {
        self.listener_rejects.get_or_create(&ListenerLabels { listener: listener.to_string(), reason }).clone()
    }

    /// The counter of requests `listener` refused for `reason`; resolve it once per listener.
    pub fn requests_rejected(&self, listener: &str, reason: &'static str) -> Counter {
        self.request_rejects.get_or_create(&ListenerLabels { listener: listener.to_string(), reason }).clone()
    }

    /// The counter of `listener`'s failed accepts for `reason`.
    pub fn accept_error(&self, listener: &str, reason: &'static str) -> Counter {
        self.accept_errors.get_or_create(&ListenerLabels { listener: listener.to_string(), reason }).clone()
    }

    /// Counts a client connection closed for being idle.
    pub fn idle_timeout(&self, protocol: Protocol) {
        self.idle_timeouts.get_or_create(&IdleLabels { protocol: protocol.as_str() }).inc();
    }

    /// An upgraded connection ended for being idle (`downstream.upgrade_idle_timeout`), counted
    /// with the idle timeouts under protocol `websocket` or `upgraded`.
    pub fn upgrade_idle_timeout(&self, websocket: bool) {
        let protocol = if websocket { "websocket" } else { "upgraded" };
        self.idle_timeouts.get_or_create(&IdleLabels { protocol }).inc();
    }

    /// A request ended for moving nothing for `downstream.stream_idle_timeout`, counted with the idle
    /// timeouts under protocol `http1-stream` or `http2-stream`.
    pub fn stream_idle_timeout(&self, h2: bool) {
        let protocol = if h2 { "http2-stream" } else { "http1-stream" };
        self.idle_timeouts.get_or_create(&IdleLabels { protocol }).inc();
    }

    /// Counts a request refused as the client's fault; `reason` is its `x-ebb-error` cause.
    pub fn client_error(&self, reason: &'static str) {
        self.client_errors.get_or_create(&ClientErrorLabels { reason }).inc();
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_by_label() {
        let m = Metrics::new();
        let p = m.proto(Direction::Inbound, Protocol::Http1);
        p.opened.inc();
        p.request(200, Duration::from_millis(3));
        p.request(503, Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains(r#"ebb_connections_opened_total{direction="inbound",protocol="http1"} 1"#), "{text}");
        assert!(text.contains(r#"status_class="5xx"} 1"#), "{text}");
        assert!(
            text.contains(r#"ebb_request_duration_seconds_count{direction="inbound",protocol="http1"} 2"#),
            "{text}"
        );
    }
}
