//! Cluster configuration: the services an app dials, their endpoints, and the policy Ebb applies to
//! every request it sends them (docs/architecture.md §12).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, MAX_TIMEOUT};

/// One upstream service: the addresses an app dials for it, where Ebb sends those requests instead,
/// and how.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub name: String,
    /// Service addresses (VIP:port) an app dials; an outbound connection whose original destination
    /// is one of them is served by this cluster.
    pub addresses: Vec<SocketAddr>,
    pub endpoints: Vec<EndpointConfig>,
    pub lb: LbPolicy,
    /// The upstream's protocol; `auto` speaks what the client spoke.
    pub protocol: UpstreamProtocol,
    /// Connect timeout per attempt; omitted, `upstream.connect_timeout`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Time for a response's headers, across every attempt; omitted, `upstream.response_timeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Time for one attempt's response headers; a try that exceeds it is retried when `retry_on`
    /// has `per-try-timeout`. Omitted: none.
    #[serde(with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    pub limits: LimitsConfig,
    pub outlier: OutlierConfig,
    pub retry: RetryConfig,
    pub budget: BudgetConfig,
    /// How long an endpoint that sent GOAWAY or `Connection: close` stays marked draining (renewed by
    /// each such signal): no new request goes to it while another endpoint can take it.
    #[serde(with = "humantime_serde")]
    pub draining_hold: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            addresses: Vec::new(),
            endpoints: Vec::new(),
            lb: LbPolicy::P2c,
            protocol: UpstreamProtocol::Auto,
            connect_timeout: None,
            request_timeout: None,
            per_try_timeout: None,
            limits: LimitsConfig::default(),
            outlier: OutlierConfig::default(),
            retry: RetryConfig::default(),
            budget: BudgetConfig::default(),
            draining_hold: Duration::from_secs(10),
        }
    }
}

/// One endpoint of a cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: EndpointHealth,
    /// The sidecar in front of this endpoint (its node id), if meshed: the control plane marks the
    /// endpoint draining for everyone when that sidecar drains. Ignored by the sidecar itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The SPIFFE ID the endpoint must prove: given, it is dialled over mesh TLS (docs/architecture.md
    /// §15); absent, plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// What the config (or the control plane) says of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointHealth {
    #[default]
    Healthy,
    /// Going away: no new requests while another endpoint can take them; in-flight ones finish.
    Draining,
}

/// How a cluster picks an endpoint for each request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices: two endpoints at random, the one with fewer outstanding requests per
    /// unit of weight.
    #[default]
    P2c,
    /// Each endpoint in turn, weighted.
    RoundRobin,
}

/// The protocol Ebb speaks to a cluster's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Auto,
    Http1,
    Http2,
}

/// Thresholds that protect a cluster: past one, a request is answered 503 at once rather than queued.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Upstream connections open to the cluster's endpoints.
    pub max_connections: usize,
    /// Requests waiting for a connection to be opened.
    pub max_pending_requests: usize,
    /// Requests outstanding (sent, response not finished).
    pub max_requests: usize,
    /// Retries under way at once (resends of requests the upstream never processed do not count).
    pub max_retries: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 64 }
    }
}

/// Outlier ejection: an endpoint that keeps failing is taken out of rotation for a while.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Gateway failures in a row (connect error, reset, 502/503/504, gRPC UNAVAILABLE) that eject an
    /// endpoint; 0 disables ejection.
    pub consecutive_failures: u32,
    /// Ejection time for the first ejection; the n-th in a row lasts n times as long.
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// Most of a cluster's endpoints ejected at once, in percent (one of several may always be; a
    /// lone endpoint only at 100).
    pub max_ejection_percent: u32,
    /// Random extra ejection time, up to this fraction of it, so endpoints ejected together do not
    /// return together.
    pub jitter: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            jitter: 0.1,
        }
    }
}

/// When a failed request is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection could not be opened (nothing was sent).
    ConnectFailure,
    /// The upstream refused the stream (HTTP/2 REFUSED_STREAM: it did not process it).
    RefusedStream,
    /// The connection or stream was reset before a response arrived.
    Reset,
    /// 502, 503 or 504.
    GatewayError,
    /// The per-try timeout passed.
    PerTryTimeout,
    /// A status in `retriable_status_codes`.
    RetriableStatusCodes,
    /// A gRPC status in `retriable_grpc_statuses` (trailers-only responses).
    RetriableGrpcStatuses,
}

/// Retries of failed requests.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub retry_on: Vec<RetryOn>,
    /// Retries after the first attempt (resends of unprocessed requests are not counted).
    pub num_retries: u32,
    pub retriable_status_codes: Vec<u16>,
    /// gRPC status codes by number (14 = UNAVAILABLE).
    pub retriable_grpc_statuses: Vec<u32>,
    /// Conditions under which the upstream may have processed the request (reset, statuses, per-try
    /// timeout) retry only idempotent methods unless this is false; connect failures and refused
    /// streams retry any method.
    pub idempotent_only: bool,
    /// Full-jitter exponential backoff: the n-th retry waits a random time in [0, min(max, base × 2^n)).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Request bodies up to this size are kept for a replay; a larger body is not retried.
    pub max_body_bytes: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Reset,
                RetryOn::GatewayError,
                RetryOn::RetriableGrpcStatuses,
            ],
            num_retries: 2,
            retriable_status_codes: Vec::new(),
            retriable_grpc_statuses: vec![14],
            idempotent_only: true,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            max_body_bytes: 64 * 1024,
        }
    }
}

/// The retry budget: retries may add at most `ratio` to the requests of the last `window`, beyond a
/// floor of `min_retries_per_second`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub ratio: f32,
    pub min_retries_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self { ratio: 0.2, min_retries_per_second: 10, window: Duration::from_secs(10) }
    }
}

impl ClusterConfig {
    /// The policy for destinations no cluster names. Each is a lone endpoint: its breaker may eject it
    /// (100 %), for a short time, so a failing destination gets fast 503s and a probe every few seconds.
    pub fn passthrough() -> Self {
        let mut c = Self { name: "passthrough".into(), ..Self::default() };
        c.outlier.max_ejection_percent = 100;
        c.outlier.base_ejection_time = Duration::from_secs(5);
        c
    }

    /// Checks one cluster; `path` is its key (`clusters[0]`, `passthrough`).
    pub fn validate(&self, path: &str, passthrough: bool) -> Result<(), ConfigError> {
        let field = |k: &str| format!("{path}.{k}");
        if self.name.is_empty() {
            return Err(ConfigError::field(field("name"), "must be non-empty"));
        }
        if passthrough {
            if !self.addresses.is_empty() {
                return Err(ConfigError::field(field("addresses"), "passthrough serves every unmatched destination"));
            }
            if !self.endpoints.is_empty() {
                return Err(ConfigError::field(field("endpoints"), "passthrough goes to the original destination"));
            }
        } else {
            if self.addresses.is_empty() {
                return Err(ConfigError::field(field("addresses"), "a cluster needs at least one address"));
            }
            if self.endpoints.is_empty() {
                return Err(ConfigError::field(field("endpoints"), "a cluster needs at least one endpoint"));
            }
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.port() == 0 {
                return Err(ConfigError::field(format!("{path}.addresses[{i}]"), "port 0 is not a destination"));
            }
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.addr.port() == 0 {
                return Err(ConfigError::field(format!("{path}.endpoints[{i}].addr"), "port 0 is not a destination"));
            }
            if e.weight == 0 || e.weight > 1000 {
                return Err(ConfigError::field(format!("{path}.endpoints[{i}].weight"), "must be 1 to 1000"));
            }
            if self.endpoints[..i].iter().any(|o| o.addr == e.addr) {
                return Err(ConfigError::field(format!("{path}.endpoints[{i}].addr"), "listed twice"));
            }
        }
        for (k, v) in [
            ("limits.max_connections", self.limits.max_connections),
            ("limits.max_pending_requests", self.limits.max_pending_requests),
            ("limits.max_requests", self.limits.max_requests),
        ] {
            if v == 0 {
                return Err(ConfigError::field(field(k), "must be at least 1"));
            }
        }
        let o = &self.outlier;
        if o.max_ejection_percent > 100 {
            return Err(ConfigError::field(field("outlier.max_ejection_percent"), "must be 0 to 100"));
        }
        if !(0.0..=1.0).contains(&o.jitter) {
            return Err(ConfigError::field(field("outlier.jitter"), "must be between 0 and 1"));
        }
        if o.consecutive_failures > 0 && o.base_ejection_time.is_zero() {
            return Err(ConfigError::field(field("outlier.base_ejection_time"), "must be greater than 0"));
        }
        if o.max_ejection_time < o.base_ejection_time {
            return Err(ConfigError::field(field("outlier.max_ejection_time"), "must be at least base_ejection_time"));
        }
        let r = &self.retry;
        if r.num_retries > 10 {
            return Err(ConfigError::field(field("retry.num_retries"), "must be at most 10"));
        }
        for (i, s) in r.retriable_status_codes.iter().enumerate() {
            if !(100..=599).contains(s) {
                return Err(ConfigError::field(
                    format!("{path}.retry.retriable_status_codes[{i}]"),
                    "not an HTTP status",
                ));
            }
        }
        for (i, s) in r.retriable_grpc_statuses.iter().enumerate() {
            if *s == 0 || *s > 16 {
                return Err(ConfigError::field(
                    format!("{path}.retry.retriable_grpc_statuses[{i}]"),
                    "not a gRPC error status (1-16)",
                ));
            }
        }
        if r.backoff_base.is_zero() || r.backoff_max < r.backoff_base {
            return Err(ConfigError::field(field("retry.backoff_max"), "needs 0 < backoff_base <= backoff_max"));
        }
        if r.max_body_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::field(field("retry.max_body_bytes"), "must be at most 16 MiB"));
        }
        let b = &self.budget;
        if !(0.0..=1000.0).contains(&b.ratio) || b.ratio.is_nan() {
            return Err(ConfigError::field(field("budget.ratio"), "must be between 0 and 1000"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&b.window) {
            return Err(ConfigError::field(field("budget.window"), "must be 1s to 60s"));
        }
        if self.connect_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::field(field("connect_timeout"), "must be greater than 0"));
        }
        for (k, t) in [("request_timeout", self.request_timeout), ("per_try_timeout", self.per_try_timeout)] {
            if t.is_some_and(|t| t.is_zero()) {
                return Err(ConfigError::field(field(k), "must be greater than 0 (omit it for none)"));
            }
        }
        Ok(())
    }

    /// Every duration key under `path` with its value and ceiling.
    pub fn durations(&self, path: &str) -> Vec<(String, Duration, Duration)> {
        let mut all = vec![
            (format!("{path}.outlier.base_ejection_time"), self.outlier.base_ejection_time, MAX_TIMEOUT),
            (format!("{path}.outlier.max_ejection_time"), self.outlier.max_ejection_time, MAX_TIMEOUT),
            (format!("{path}.retry.backoff_base"), self.retry.backoff_base, MAX_TIMEOUT),
            (format!("{path}.retry.backoff_max"), self.retry.backoff_max, MAX_TIMEOUT),
            (format!("{path}.draining_hold"), self.draining_hold, MAX_TIMEOUT),
        ];
        for (k, t) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("per_try_timeout", self.per_try_timeout),
        ] {
            if let Some(t) = t {
                all.push((format!("{path}.{k}"), t, MAX_TIMEOUT));
            }
        }
        all
    }
}
