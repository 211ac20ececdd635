//! Typed configuration: embedded defaults, a YAML file, `EBB_*` environment variables and flags.
//!
//! Precedence is flag > env > file > default. The file is strict: an unknown key is an error, and every
//! error names the key's full path (`drain.timeout`), so an operator can fix it without guessing.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub mod cluster;
pub mod tracing;
pub use crate::domain::Direction;
pub use cluster::{
    BudgetConfig, ClusterConfig, EndpointConfig, EndpointHealth, LbPolicy, LimitsConfig, OutlierConfig, RetryConfig,
    RetryOn, UpstreamProtocol,
};

/// Longest drain deadline we accept: an hour is already far past any pod's grace period.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

// Every duration has a ceiling. Deadlines on the data path are `Instant + duration`, which panics on
// overflow (and a release build aborts on a panic), so no value a config can hold may come near it.

/// Longest wait for a client's first bytes: a client silent this long is opaque TCP anyway.
pub const MAX_DETECT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest upstream timeout and drain phase.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest idle timeout for client connections (some default to an hour).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A configuration that could not be loaded; the process exits 64 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config field `{field}`: {message}")]
    Field { field: String, message: String },
}

impl ConfigError {
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field { field: field.into(), message: message.into() }
    }
}

/// Everything `ebb run` needs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Inbound capture: traffic redirected by PREROUTING, sent to the local app.
    pub inbound: Capture,
    /// Outbound capture: traffic redirected by OUTPUT, sent to its original destination.
    pub outbound: Capture,
    /// Listeners with a fixed target, for running without iptables.
    pub listeners: Vec<ListenerConfig>,
    pub admin: Endpoint,
    pub telemetry: Endpoint,
    pub health: Endpoint,
    pub drain: DrainConfig,
    pub upstream: UpstreamConfig,
    /// Idle timeouts and liveness checks for client connections (docs/architecture.md §2).
    pub downstream: DownstreamConfig,
    /// Upstream services the app dials by address, and how Ebb spreads and protects their requests
    /// (docs/architecture.md §12).
    pub clusters: Vec<ClusterConfig>,
    /// The policy for outbound destinations no cluster names: the original destination, under the
    /// same breaker, limits and timeouts.
    pub passthrough: ClusterConfig,
    /// Where clusters, inbound policy and drain directives come from at run time; none: static mode
    /// (docs/architecture.md §13).
    pub control_plane: ControlPlaneConfig,
    /// OpenTelemetry trace export (docs/architecture.md §10); the `OTEL_*` variables override it.
    pub tracing: tracing::TracingConfig,
    pub log: LogConfig,
    /// Runtime worker threads; 0 = one per CPU. With 1 the proxy runs on a single-threaded runtime.
    pub workers: usize,
    /// This workload's mesh identity; absent: no mTLS anywhere (docs/architecture.md §15).
    pub identity: Option<IdentityConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            inbound: Capture::new("0.0.0.0:15006"),
            outbound: Capture::new("0.0.0.0:15001"),
            listeners: Vec::new(),
            admin: Endpoint::new("127.0.0.1:15000"),
            telemetry: Endpoint::new("0.0.0.0:15020"),
            health: Endpoint::new("0.0.0.0:15021"),
            drain: DrainConfig::default(),
            upstream: UpstreamConfig::default(),
            downstream: DownstreamConfig::default(),
            clusters: Vec::new(),
            passthrough: ClusterConfig::passthrough(),
            control_plane: ControlPlaneConfig::default(),
            tracing: Default::default(),
            log: LogConfig::default(),
            workers: 0,
            identity: None,
        }
    }
}

/// Lays `top` over `base`: mappings merge key by key (so an omitted key keeps its default), anything
/// else given replaces what was there, and an empty value (`inbound:` with nothing under it) keeps it.
fn overlay(base: &mut serde_yaml_ng::Value, top: serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match (base, top) {
        (_, Value::Null) => {}
        (Value::Mapping(base), Value::Mapping(top)) => {
            for (k, v) in top {
                match base.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (slot, top) => *slot = top,
    }
}

/// One capture listener (fed by iptables REDIRECT; targets come from SO_ORIGINAL_DST).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capture {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP.
    #[serde(with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Original-destination ports that are never sniffed (server-first protocols: MySQL, SMTP, ...).
    pub opaque_ports: Vec<u16>,
    /// Connections this listener serves at once; more are closed as soon as they are accepted, so a
    /// flood costs one file descriptor per connection served, not two.
    pub max_connections: usize,
    /// Requests in flight at once through this listener; more are answered 503
    /// (`x-ebb-error: overflow-max-requests`), so a burst cannot bury the app behind it.
    pub max_requests: usize,
    /// Where inbound connections go (ignored by outbound, which always goes to the original
    /// destination).
    pub target: InboundTarget,
    /// Inbound only: whether mesh TLS is terminated, and whether anything else is refused.
    pub mtls: MtlsMode,
    /// Inbound only: per port, the identities that may call it; a port not listed is open to all.
    pub authorization: Vec<AuthorizationRule>,
}

/// How an inbound listener treats mesh TLS (docs/architecture.md §15).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Mesh TLS is not terminated: every TLS connection passes through as opaque TCP.
    Off,
    /// Mesh TLS is terminated; plaintext and the app's own TLS are served as well. The default with an
    /// identity, so a mesh can move to mTLS one workload at a time.
    #[default]
    Permissive,
    /// Only mesh TLS with a verified client certificate is served; anything else is closed.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

/// Who may call one inbound port.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationRule {
    pub port: u16,
    /// SPIFFE IDs allowed; a caller without a verified identity (plaintext) is refused.
    pub allow: Vec<String>,
}

/// Where this workload's certificate, key and trust bundle are (PEM files, reloaded on change).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The chain, leaf first; the leaf has one URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The CAs a peer's certificate must chain to.
    pub trust_bundle: std::path::PathBuf,
}

/// Where inbound capture sends a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundTarget {
    /// The address the client dialled (the pod IP): an app port bound only to loopback stays
    /// unreachable from the network, as it is without a sidecar.
    #[default]
    OriginalDst,
    /// `127.0.0.1` (or `::1`) on the original port: reaches loopback-only ports too.
    Loopback,
}

impl Capture {
    fn new(bind: &str) -> Self {
        Self {
            enabled: true,
            bind: bind.parse().unwrap_or_else(|_| unreachable!("embedded default address")),
            detect_timeout: Duration::from_secs(10),
            opaque_ports: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_requests: DEFAULT_MAX_REQUESTS,
            target: InboundTarget::OriginalDst,
            mtls: MtlsMode::Permissive,
            authorization: Vec::new(),
        }
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self::new("0.0.0.0:0")
    }
}

/// A listener with a fixed upstream, for tests, the demo and plain reverse-proxy use.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub target: SocketAddr,
    pub direction: Direction,
    #[serde(default = "default_detect_timeout", with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Skip detection: every connection is opaque TCP.
    #[serde(default)]
    pub opaque: bool,
    /// Connections this listener serves at once (see [`Capture::max_connections`]).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests in flight at once through this listener (see [`Capture::max_requests`]).
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Inbound listeners: mesh TLS handling (see [`Capture::mtls`]); `inbound.authorization` applies.
    #[serde(default)]
    pub mtls: MtlsMode,
}

fn default_detect_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Per listener: far above what one pod's sidecar serves, far below the default fd limit's reach.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// Per listener: requests in flight at once. Above what one app instance serves well, so the limit
/// only bites on a flood, and then the app keeps answering the requests it has.
pub const DEFAULT_MAX_REQUESTS: usize = 10_000;

fn default_max_requests() -> usize {
    DEFAULT_MAX_REQUESTS
}

/// A plain HTTP endpoint of Ebb's own (admin, telemetry, health).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Endpoint {
    pub enabled: bool,
    pub bind: SocketAddr,
}

impl Endpoint {
    fn new(bind: &str) -> Self {
        Self { enabled: true, bind: bind.parse().unwrap_or_else(|_| unreachable!("embedded default address")) }
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Self::new("127.0.0.1:0")
    }
}

/// Drain timing (docs/architecture.md §4).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// The one deadline: everything left is closed when it passes.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long listeners keep accepting while every connection is told to go.
    #[serde(with = "humantime_serde")]
    pub announce: Duration,
    /// Idle HTTP/1.1 connections are closed at random points within this window, not all at once.
    #[serde(with = "humantime_serde")]
    pub idle_close_window: Duration,
    /// When Ebb closes a client connection first, how long it waits for the client's FIN while
    /// discarding what the client still sends, so the close never turns into a reset that eats the
    /// response (docs/architecture.md §6). Zero closes at once.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(25),
            announce: Duration::from_secs(5),
            idle_close_window: Duration::from_secs(1),
            linger: Duration::from_secs(1),
        }
    }
}

/// How Ebb talks to upstreams.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream's response headers; none by default (streams may be long-lived).
    #[serde(with = "humantime_serde")]
    pub response_timeout: Option<Duration>,
    /// Idle pooled connections are closed after this; keep it below the upstreams' keep-alive timeout.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Whether error responses Ebb makes say which upstream failed (its address, the OS error). Off,
    /// they name only the cause (`x-ebb-error`): the address stays in the logs, away from clients.
    pub expose_errors: bool,
    /// PING interval on upstream HTTP/2 connections, so a dead peer is noticed; 0 disables.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// A PING unanswered this long closes the upstream HTTP/2 connection.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            response_timeout: None,
            idle_timeout: Duration::from_secs(4),
            max_idle_per_endpoint: 256,
            expose_errors: false,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Bounds on client connections that have stopped doing anything. Each value 0 disables its timeout.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamConfig {
    /// Opaque TCP (and detection fallbacks): closed, with a FIN both ways, after this long without a
    /// byte in either direction.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// HTTP/1.1: closed after this long with no request in flight and none arriving (this also bounds
    /// a client that trickles its request headers).
    #[serde(with = "humantime_serde")]
    pub http1_idle_timeout: Duration,
    /// HTTP/2: GOAWAY after this long with no stream open and none opened.
    #[serde(with = "humantime_serde")]
    pub http2_idle_timeout: Duration,
    /// An upgraded connection (WebSocket, or another protocol switched to after a 101): ended after
    /// this long without a byte either way, a WebSocket with a Close 1001 each way first, then FIN.
    #[serde(with = "humantime_serde")]
    pub upgrade_idle_timeout: Duration,
    /// An HTTP request (an HTTP/2 stream) that moves no body byte either way for this long ends: 408
    /// if its body was waiting on the client, 504 if the upstream had not answered, else a reset
    /// stream (HTTP/2) or a closed connection (HTTP/1.1). The connection's other streams live on.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// HTTP/2 PING interval towards clients, so a vanished client's connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// A PING unanswered this long closes the client's HTTP/2 connection.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            tcp_idle_timeout: Duration::from_secs(3600),
            http1_idle_timeout: Duration::from_secs(300),
            http2_idle_timeout: Duration::from_secs(3600),
            upgrade_idle_timeout: Duration::from_secs(3600),
            stream_idle_timeout: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

impl DownstreamConfig {
    /// `d`, or none when it is zero (the timeout is disabled).
    pub fn enabled(d: Duration) -> Option<Duration> {
        (!d.is_zero()).then_some(d)
    }
}

/// The SPIFFE ID a sidecar expects of an `https://` control plane by default (the one `ebb
/// control-plane --ca-dir` gives itself in the default trust domain).
pub const DEFAULT_PLANE_IDENTITY: &str = "spiffe://cluster.local/ebb/control-plane";

/// The sidecar's bootstrap for the control plane.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// The plane's gRPC address (`http://host:port`); none: static mode, the file is all there is.
    pub address: Option<String>,
    /// This sidecar's id; none: `<POD_NAME>.<POD_NAMESPACE>` from the Downward API variables, else
    /// the host name.
    pub node_id: Option<String>,
    /// The workload this pod serves (`POD_SERVICE` env var when unset here).
    pub cluster: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long readiness waits for the first complete config; after it the static config serves and
    /// readiness says so.
    #[serde(with = "humantime_serde")]
    pub initial_fetch_timeout: Duration,
    /// Reconnects back off with full jitter between these.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// `https://` addresses: the CAs the plane's certificate must chain to (PEM).
    pub trust_bundle: Option<std::path::PathBuf>,
    /// `https://` addresses: the SPIFFE ID the plane's certificate must carry.
    pub identity: String,
    /// This sidecar's bootstrap token file: set, the plane's CA issues this workload's identity
    /// (a key made here, a CSR, a certificate renewed at ~70 % of its life) instead of `identity`'s
    /// files (docs/architecture.md §15).
    pub token: Option<std::path::PathBuf>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            address: None,
            node_id: None,
            cluster: String::new(),
            connect_timeout: Duration::from_secs(1),
            initial_fetch_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            trust_bundle: None,
            identity: DEFAULT_PLANE_IDENTITY.into(),
            token: None,
        }
    }
}

impl ControlPlaneConfig {
    /// The node id in force: configured, else from the pod's Downward API variables, else the host
    /// name.
    pub fn node_id(&self) -> String {
        if let Some(id) = self.node_id.as_ref().filter(|s| !s.is_empty()) {
            return id.clone();
        }
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (env("POD_NAME"), env("POD_NAMESPACE")) {
            (Some(pod), Some(ns)) => format!("{pod}.{ns}"),
            (Some(pod), None) => pod,
            _ => env("HOSTNAME")
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
                .unwrap_or_else(|| "ebb".into()),
        }
    }
}

/// Log output.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `ebb=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Values given as flags or `EBB_*` variables; each, when set, overrides the file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Inbound capture listener address
    #[arg(long, env = "EBB_INBOUND_BIND", value_name = "ADDR")]
    pub inbound_bind: Option<SocketAddr>,
    /// Outbound capture listener address
    #[arg(long, env = "EBB_OUTBOUND_BIND", value_name = "ADDR")]
    pub outbound_bind: Option<SocketAddr>,
    /// Admin API address (keep it on loopback)
    #[arg(long, env = "EBB_ADMIN_BIND", value_name = "ADDR")]
    pub admin_bind: Option<SocketAddr>,
    /// Prometheus metrics address
    #[arg(long, env = "EBB_TELEMETRY_BIND", value_name = "ADDR")]
    pub telemetry_bind: Option<SocketAddr>,
    /// Health probe address
    #[arg(long, env = "EBB_HEALTH_BIND", value_name = "ADDR")]
    pub health_bind: Option<SocketAddr>,
    /// Drain deadline (0s-1h)
    #[arg(long, env = "EBB_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Option<Duration>,
    /// Drain announce phase
    #[arg(long, env = "EBB_DRAIN_ANNOUNCE", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_announce: Option<Duration>,
    /// Window over which idle HTTP/1.1 connections are closed during a drain
    #[arg(long, env = "EBB_DRAIN_IDLE_CLOSE_WINDOW", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_idle_close_window: Option<Duration>,
    /// Longest lingering close (wait for the client's FIN after Ebb closes first)
    #[arg(long, env = "EBB_DRAIN_LINGER", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_linger: Option<Duration>,
    /// Protocol detection timeout for both capture listeners
    #[arg(long, env = "EBB_DETECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub detect_timeout: Option<Duration>,
    /// Upstream connect timeout
    #[arg(long, env = "EBB_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub connect_timeout: Option<Duration>,
    /// Log format
    #[arg(long, env = "EBB_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing directive)
    #[arg(long, env = "EBB_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Control plane address (http://host:port); unset: static config only
    #[arg(long, env = "EBB_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<String>,
    /// This sidecar's node id for the control plane
    #[arg(long, env = "EBB_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Worker threads (0 = one per CPU)
    #[arg(long, env = "EBB_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
}

impl Config {
    /// Parses a YAML document; errors name the offending field. A section given in part keeps the
    /// embedded default of every key it leaves out: the document is laid over the defaults before it
    /// is read, so no nested type's own `Default` (which knows nothing of its section) ever fills in.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::field("(document)", e.to_string()))?;
        let mut merged =
            serde_yaml_ng::to_value(Self::default()).map_err(|e| ConfigError::field("(defaults)", e.to_string()))?;
        overlay(&mut merged, doc);
        let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let field = field_path(e.path());
            ConfigError::field(field, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a YAML file; a missing path means the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
                Self::from_yaml(&text)
            }
        }
    }

    /// What this config would run, a line each: listeners, operator endpoints, clusters, control plane
    /// and drain timing (`ebb check-config`).
    pub fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (name, cap) in [("inbound", &self.inbound), ("outbound", &self.outbound)] {
            if cap.enabled {
                lines.push(format!("{name} capture listener on {} (needs sidecar-init's iptables rules)", cap.bind));
            }
        }
        for l in &self.listeners {
            lines.push(format!("listener {} on {} -> {} ({:?})", l.name, l.bind, l.target, l.direction));
        }
        for (name, ep) in [("admin", &self.admin), ("telemetry", &self.telemetry), ("health", &self.health)] {
            if ep.enabled {
                lines.push(format!("{name} on {}", ep.bind));
            }
        }
        for c in &self.clusters {
            let addrs: Vec<String> = c.addresses.iter().map(ToString::to_string).collect();
            lines.push(format!("cluster {} for {}: {} endpoint(s)", c.name, addrs.join(", "), c.endpoints.len()));
        }
        lines.push(match &self.control_plane.address {
            Some(a) => format!("control plane {a}, as node {}", self.control_plane.node_id()),
            None => "no control plane: static mode".to_string(),
        });
        match (&self.identity, &self.control_plane.token) {
            (Some(i), _) => lines.push(format!("identity from {} (mTLS)", i.cert.display())),
            (None, Some(t)) => {
                lines.push(format!("identity from the control plane's CA, token {} (mTLS)", t.display()))
            }
            (None, None) => {}
        }
        lines.push(format!(
            "drain: deadline {}, announce {}",
            humantime::format_duration(self.drain.timeout),
            humantime::format_duration(self.drain.announce)
        ));
        lines
    }

    /// Applies flag/env overrides, then checks the result again.
    pub fn apply(mut self, o: &Overrides) -> Result<Self, ConfigError> {
        fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *dst = v.clone();
            }
        }
        set(&mut self.inbound.bind, &o.inbound_bind);
        set(&mut self.outbound.bind, &o.outbound_bind);
        set(&mut self.admin.bind, &o.admin_bind);
        set(&mut self.telemetry.bind, &o.telemetry_bind);
        set(&mut self.health.bind, &o.health_bind);
        set(&mut self.drain.timeout, &o.drain_timeout);
        set(&mut self.drain.announce, &o.drain_announce);
        set(&mut self.drain.idle_close_window, &o.drain_idle_close_window);
        set(&mut self.drain.linger, &o.drain_linger);
        set(&mut self.inbound.detect_timeout, &o.detect_timeout);
        set(&mut self.outbound.detect_timeout, &o.detect_timeout);
        set(&mut self.upstream.connect_timeout, &o.connect_timeout);
        set(&mut self.log.format, &o.log_format);
        set(&mut self.log.level, &o.log_level);
        set(&mut self.workers, &o.workers);
        if o.control_plane.is_some() {
            self.control_plane.address = o.control_plane.clone();
        }
        if o.node_id.is_some() {
            self.control_plane.node_id = o.node_id.clone();
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value, max) in self.durations() {
            if value > max {
                let (max, value) = (humantime::format_duration(max), humantime::format_duration(value));
                return Err(ConfigError::field(field, format!("must be at most {max} (got {value})")));
            }
        }
        if self.upstream.response_timeout.is_some_and(|t| t.is_zero()) {
            // Zero would time every request out at once; "no timeout" is the key left out.
            return Err(ConfigError::field("upstream.response_timeout", "must be greater than 0 (omit it for none)"));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(ConfigError::field("upstream.connect_timeout", "must be greater than 0"));
        }
        if self.upstream.idle_timeout.is_zero() {
            return Err(ConfigError::field("upstream.idle_timeout", "must be greater than 0"));
        }
        if self.admin.enabled && !self.admin.bind.ip().is_loopback() {
            return Err(ConfigError::field("admin.bind", "the admin API binds to loopback only"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() || !names.insert(l.name.as_str()) {
                return Err(ConfigError::field(format!("listeners[{i}].name"), "must be non-empty and unique"));
            }
        }
        self.validate_clusters()?;
        let t = &self.tracing;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::field("tracing.sample_ratio", "must be between 0 and 1"));
        }
        if t.queue_size == 0 || t.queue_size > 1_000_000 {
            return Err(ConfigError::field("tracing.queue_size", "must be 1 to 1000000"));
        }
        if let Some(e) = &t.endpoint {
            if e.parse::<http::Uri>().ok().and_then(|u| u.scheme().cloned()).is_none() {
                return Err(ConfigError::field("tracing.endpoint", "must be a URL like http://collector:4317"));
            }
        }
        let cp = &self.control_plane;
        if let Some(a) = &cp.address {
            if !(a.starts_with("http://") || a.starts_with("https://")) || a.parse::<http::Uri>().is_err() {
                return Err(ConfigError::field("control_plane.address", "must be a URL like http://10.0.0.2:15010"));
            }
        }
        let https = cp.address.as_deref().is_some_and(|a| a.starts_with("https://"));
        if https && cp.trust_bundle.is_none() {
            return Err(ConfigError::field(
                "control_plane.trust_bundle",
                "an https:// plane needs the CAs its certificate chains to",
            ));
        }
        if https && !crate::domain::is_spiffe_id(&cp.identity) {
            return Err(ConfigError::field(
                "control_plane.identity",
                "must be the plane's SPIFFE ID (spiffe://<trust-domain>/ebb/control-plane)",
            ));
        }
        if cp.token.is_some() && !https {
            return Err(ConfigError::field(
                "control_plane.token",
                "an identity from the plane needs an https:// control_plane.address",
            ));
        }
        if cp.token.is_some() && self.identity.is_some() {
            return Err(ConfigError::field(
                "control_plane.token",
                "the identity comes from `identity`'s files or from the plane, not both",
            ));
        }
        if cp.connect_timeout.is_zero() || cp.backoff_base.is_zero() || cp.backoff_max < cp.backoff_base {
            return Err(ConfigError::field(
                "control_plane.backoff_max",
                "needs connect_timeout > 0 and 0 < backoff_base <= backoff_max",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::field("log.level", e.to_string()))?;
        self.validate_mtls()?;
        self.validate_addresses()
    }

    /// Whether this workload has a mesh identity: from files, or from the plane's CA.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some() || self.control_plane.token.is_some()
    }

    /// mTLS keys: what needs an identity has one, and identities are SPIFFE IDs.
    fn validate_mtls(&self) -> Result<(), ConfigError> {
        if self.outbound.mtls != MtlsMode::Permissive {
            return Err(ConfigError::field("outbound.mtls", "only inbound terminates mesh TLS (set inbound.mtls)"));
        }
        if !self.outbound.authorization.is_empty() {
            return Err(ConfigError::field("outbound.authorization", "authorization applies to inbound only"));
        }
        let mut ports = std::collections::HashSet::new();
        for (i, rule) in self.inbound.authorization.iter().enumerate() {
            if !ports.insert(rule.port) {
                return Err(ConfigError::field(
                    format!("inbound.authorization[{i}].port"),
                    format!("port {} has another rule; put every identity in one `allow`", rule.port),
                ));
            }
            for (j, id) in rule.allow.iter().enumerate() {
                if !crate::domain::is_spiffe_id(id) {
                    return Err(ConfigError::field(
                        format!("inbound.authorization[{i}].allow[{j}]"),
                        format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
                    ));
                }
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.mtls == MtlsMode::Strict && l.direction == Direction::Outbound {
                return Err(ConfigError::field(
                    format!("listeners[{i}].mtls"),
                    "only inbound listeners terminate mesh TLS",
                ));
            }
        }
        if !self.has_identity() {
            let strict = std::iter::once(("inbound.mtls".to_string(), self.inbound.mtls))
                .chain(self.listeners.iter().enumerate().map(|(i, l)| (format!("listeners[{i}].mtls"), l.mtls)))
                .find(|(_, m)| *m == MtlsMode::Strict);
            if let Some((key, _)) = strict {
                return Err(ConfigError::field(key, "strict needs `identity` (this workload's certificate)"));
            }
            if !self.inbound.authorization.is_empty() {
                return Err(ConfigError::field(
                    "inbound.authorization",
                    "needs `identity`: callers prove theirs with mTLS",
                ));
            }
        }
        let clusters = self.clusters.iter().enumerate().map(|(i, c)| (format!("clusters[{i}]"), c));
        for (key, c) in clusters.chain(std::iter::once(("passthrough".to_string(), &self.passthrough))) {
            for (j, ep) in c.endpoints.iter().enumerate() {
                let Some(id) = &ep.identity else { continue };
                let key = format!("{key}.endpoints[{j}].identity");
                if !crate::domain::is_spiffe_id(id) {
                    return Err(ConfigError::field(
                        key,
                        format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
                    ));
                }
                if !self.has_identity() {
                    return Err(ConfigError::field(
                        key,
                        "dialling mTLS needs `identity` (this workload's certificate)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every duration key, its value and the most it may be.
    fn durations(&self) -> Vec<(String, Duration, Duration)> {
        let mut all: Vec<(String, Duration, Duration)> = [
            ("drain.timeout", self.drain.timeout, MAX_DRAIN_TIMEOUT),
            ("drain.announce", self.drain.announce, MAX_DRAIN_TIMEOUT),
            ("drain.idle_close_window", self.drain.idle_close_window, MAX_DRAIN_TIMEOUT),
            ("drain.linger", self.drain.linger, MAX_DRAIN_TIMEOUT),
            ("inbound.detect_timeout", self.inbound.detect_timeout, MAX_DETECT_TIMEOUT),
            ("outbound.detect_timeout", self.outbound.detect_timeout, MAX_DETECT_TIMEOUT),
            ("upstream.connect_timeout", self.upstream.connect_timeout, MAX_TIMEOUT),
            ("upstream.idle_timeout", self.upstream.idle_timeout, MAX_TIMEOUT),
            ("upstream.http2_keepalive_interval", self.upstream.http2_keepalive_interval, MAX_TIMEOUT),
            ("upstream.http2_keepalive_timeout", self.upstream.http2_keepalive_timeout, MAX_TIMEOUT),
            ("downstream.tcp_idle_timeout", self.downstream.tcp_idle_timeout, MAX_IDLE_TIMEOUT),
            ("downstream.upgrade_idle_timeout", self.downstream.upgrade_idle_timeout, MAX_IDLE_TIMEOUT),
            ("downstream.stream_idle_timeout", self.downstream.stream_idle_timeout, MAX_IDLE_TIMEOUT),
            ("downstream.http1_idle_timeout", self.downstream.http1_idle_timeout, MAX_IDLE_TIMEOUT),
            ("downstream.http2_idle_timeout", self.downstream.http2_idle_timeout, MAX_IDLE_TIMEOUT),
            ("downstream.http2_keepalive_interval", self.downstream.http2_keepalive_interval, MAX_TIMEOUT),
            ("downstream.http2_keepalive_timeout", self.downstream.http2_keepalive_timeout, MAX_TIMEOUT),
            ("control_plane.connect_timeout", self.control_plane.connect_timeout, MAX_TIMEOUT),
            ("control_plane.initial_fetch_timeout", self.control_plane.initial_fetch_timeout, MAX_TIMEOUT),
            ("control_plane.backoff_base", self.control_plane.backoff_base, MAX_TIMEOUT),
            ("control_plane.backoff_max", self.control_plane.backoff_max, MAX_TIMEOUT),
        ]
        .into_iter()
        .map(|(k, v, max)| (k.to_string(), v, max))
        .collect();
        if let Some(t) = self.upstream.response_timeout {
            all.push(("upstream.response_timeout".into(), t, MAX_TIMEOUT));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            all.push((format!("listeners[{i}].detect_timeout"), l.detect_timeout, MAX_DETECT_TIMEOUT));
        }
        // Clusters' own are checked with the rest of each cluster (`validate_cluster_list`).
        all.extend(self.passthrough.durations("passthrough"));
        all
    }

    /// Each cluster on its own, then what they must not share: a name, or an address (a destination
    /// served by two clusters would depend on their order).
    fn validate_clusters(&self) -> Result<(), ConfigError> {
        self.passthrough.validate("passthrough", true)?;
        for (i, l) in [("inbound", &self.inbound), ("outbound", &self.outbound)] {
            if l.max_requests == 0 {
                return Err(ConfigError::field(format!("{i}.max_requests"), "must be at least 1"));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.max_requests == 0 {
                return Err(ConfigError::field(format!("listeners[{i}].max_requests"), "must be at least 1"));
            }
        }
        validate_cluster_list(&self.clusters, &|i| format!("clusters[{i}]"))?;
        Ok(())
    }

    /// Every socket Ebb listens on, with the key that sets it, in the order the keys are read.
    pub fn own_binds(&self) -> Vec<(String, SocketAddr)> {
        let mut binds = Vec::new();
        for (key, cap) in [("inbound.bind", &self.inbound), ("outbound.bind", &self.outbound)] {
            if cap.enabled {
                binds.push((key.to_string(), cap.bind));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            binds.push((format!("listeners[{i}].bind"), l.bind));
        }
        for (key, ep) in
            [("admin.bind", &self.admin), ("telemetry.bind", &self.telemetry), ("health.bind", &self.health)]
        {
            if ep.enabled {
                binds.push((key.to_string(), ep.bind));
            }
        }
        binds
    }

    /// Two sockets on one address fail at bind time (exit 69) although the config is what is wrong;
    /// a fixed target that is one of Ebb's own sockets sends every connection back into Ebb, hop after
    /// hop, until file descriptors run out (or, at the admin port, exposes the admin API).
    fn validate_addresses(&self) -> Result<(), ConfigError> {
        let binds = self.own_binds();
        for (i, (key, addr)) in binds.iter().enumerate() {
            if let Some((other, _)) = binds[..i].iter().find(|(_, earlier)| binds_collide(*earlier, *addr)) {
                return Err(ConfigError::field(key, format!("{addr} is already taken by `{other}`")));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.target.port() == 0 {
                return Err(ConfigError::field(format!("listeners[{i}].target"), "port 0 is not a destination"));
            }
            if let Some(own) = own_address(l.target, &binds) {
                return Err(ConfigError::field(
                    format!("listeners[{i}].target"),
                    format!("{} is Ebb's own `{own}`: every connection would loop back into Ebb", l.target),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a set of clusters on its own (as the config file or the control plane delivers it): each
/// cluster, its durations' ceilings, and what clusters must not share (a name, an address: a
/// destination served by two clusters would depend on their order). `key(i)` names cluster `i` in
/// errors (`clusters[0]`, `cluster[web]`).
pub fn validate_cluster_list(clusters: &[ClusterConfig], key: &dyn Fn(usize) -> String) -> Result<(), ConfigError> {
    for (i, c) in clusters.iter().enumerate() {
        let path = key(i);
        // Each value within its ceiling first, then how the values relate.
        for (field, value, max) in c.durations(&path) {
            if value > max {
                let (max, value) = (humantime::format_duration(max), humantime::format_duration(value));
                return Err(ConfigError::field(field, format!("must be at most {max} (got {value})")));
            }
        }
        c.validate(&path, false)?;
        let earlier = &clusters[..i];
        if c.name == "passthrough" || c.name == "inbound" || earlier.iter().any(|o| o.name == c.name) {
            return Err(ConfigError::field(format!("{path}.name"), format!("`{}` is taken", c.name)));
        }
        for (j, a) in c.addresses.iter().enumerate() {
            if let Some(o) = earlier.iter().find(|o| o.addresses.contains(a)) {
                return Err(ConfigError::field(
                    format!("{path}.addresses[{j}]"),
                    format!("{a} already belongs to cluster `{}`", o.name),
                ));
            }
        }
    }
    Ok(())
}

/// Whether sockets bound to `a` and `b` cannot both listen (port 0 always gets a port of its own).
fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a == b || covers(a, b) || covers(b, a)
}

/// Whether a socket bound to `bound` also takes connections to `ip`: `0.0.0.0` takes every IPv4
/// address, and `[::]` every address, as Ebb binds it dual-stack.
fn covers(bound: IpAddr, ip: IpAddr) -> bool {
    match bound {
        IpAddr::V4(b) => b.is_unspecified() && ip.is_ipv4(),
        IpAddr::V6(b) => b.is_unspecified(),
    }
}

/// The key of the socket of Ebb's own (`own`: key and address, as bound) that a connection to `target`
/// reaches, if any. An unspecified bind is reached through any local address on its port.
pub fn own_address(target: SocketAddr, own: &[(String, SocketAddr)]) -> Option<&str> {
    let ip = target.ip().to_canonical();
    own.iter()
        .find(|(_, a)| {
            let bound = a.ip().to_canonical();
            a.port() != 0
                && a.port() == target.port()
                // Connecting to an unspecified address reaches this host.
                && (bound == ip || ip.is_unspecified() || (covers(bound, ip) && is_local_ip(ip)))
        })
        .map(|(key, _)| key.as_str())
}

/// Whether `ip` belongs to this host. The kernel binds only addresses some interface has, so a bind
/// attempt answers without listing interfaces.
pub fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// How a refusal names the field it is about: the path serde reached (`clusters[0].retry`), with
/// the cases whose plain rendering says nothing spelled out: the document itself, and a key that is
/// the empty string (`'': 1` at the top level renders as nothing at all).
pub fn field_path(path: &serde_path_to_error::Path) -> String {
    match path.to_string().as_str() {
        "." => "(top level)".to_string(),
        "" => "\"\" (an empty key)".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::default();
        assert_eq!(c.inbound.bind.port(), 15006);
        assert_eq!(c.outbound.bind.port(), 15001);
        assert_eq!(c.admin.bind, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.drain.timeout, Duration::from_secs(25));
        c.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::from_yaml("drain:\n  timeuot: 3s\n").unwrap_err().to_string();
        assert!(err.contains("drain"), "{err}");
        assert!(err.contains("timeuot"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = Config::from_yaml("drain:\n  timeout: soon\n").unwrap_err().to_string();
        assert!(err.contains("drain.timeout"), "{err}");
    }

    #[test]
    fn out_of_range_deadline_is_refused() {
        let err = Config::from_yaml("drain:\n  timeout: 2h\n").unwrap_err().to_string();
        assert!(err.contains("drain.timeout"), "{err}");
    }

    #[test]
    fn listener_fields_parse() {
        let c = Config::from_yaml(
            "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    target: 127.0.0.1:8080\n    direction: inbound\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].direction, Direction::Inbound);
        let err = Config::from_yaml("listeners:\n  - name: web\n    bind: nowhere\n").unwrap_err().to_string();
        assert!(err.contains("listeners[0].bind"), "{err}");
    }

    #[test]
    fn partial_sections_keep_every_omitted_default() {
        // (document, section, the one key it sets)
        let cases = [
            ("inbound: { opaque_ports: [3306] }", "inbound", "opaque_ports"),
            ("outbound: { detect_timeout: 3s }", "outbound", "detect_timeout"),
            ("admin: { enabled: false }", "admin", "enabled"),
            ("telemetry: { enabled: false }", "telemetry", "enabled"),
            ("health: { bind: 0.0.0.0:9999 }", "health", "bind"),
            ("drain: { announce: 2s }", "drain", "announce"),
            ("upstream: { idle_timeout: 9s }", "upstream", "idle_timeout"),
            ("log: { format: json }", "log", "format"),
        ];
        let defaults = serde_yaml_ng::to_value(Config::default()).unwrap();
        for (doc, section, key) in cases {
            let parsed = serde_yaml_ng::to_value(Config::from_yaml(doc).unwrap()).unwrap();
            let (got, want) = (&parsed[section], &defaults[section]);
            let keys = want.as_mapping().unwrap().keys().filter_map(|k| k.as_str());
            for k in keys {
                if k == key {
                    assert_ne!(got[k], want[k], "{doc}: `{section}.{k}` was set");
                } else {
                    assert_eq!(got[k], want[k], "{doc}: `{section}.{k}` must keep its default");
                }
            }
        }
        // The bug this guards against: a partial section bound port 0.
        let c = Config::from_yaml("inbound:\n  opaque_ports: [3306]\n").unwrap();
        assert_eq!(c.inbound.bind, "0.0.0.0:15006".parse().unwrap());
        let c = Config::from_yaml("inbound:\n").unwrap();
        assert_eq!(c.inbound.bind.port(), 15006);
    }

    #[test]
    fn wrong_type_for_a_section_is_named() {
        let err = Config::from_yaml("drain: 5\n").unwrap_err().to_string();
        assert!(err.contains("drain"), "{err}");
        let err = Config::from_yaml("inbound: { bind: 1.2.3.4 }\n").unwrap_err().to_string();
        assert!(err.contains("inbound.bind"), "{err}");
    }

    #[test]
    fn a_cluster_takes_every_omitted_key_from_its_defaults() {
        let c = Config::from_yaml(
            "clusters:\n  - name: web\n    addresses: [10.96.0.10:80]\n    endpoints: [{ addr: 10.0.0.5:8080 }]\n    retry: { num_retries: 1 }\n",
        )
        .unwrap();
        let web = &c.clusters[0];
        let d = ClusterConfig::default();
        assert_eq!(web.retry.num_retries, 1);
        assert_eq!(web.retry.retry_on, d.retry.retry_on, "the rest of `retry` keeps its defaults");
        assert_eq!(web.lb, LbPolicy::P2c);
        assert_eq!(web.limits.max_requests, d.limits.max_requests);
        assert_eq!(web.endpoints[0].weight, 1);
        assert_eq!(web.endpoints[0].state, EndpointHealth::Healthy);
        let c = Config::from_yaml("passthrough: { outlier: { consecutive_failures: 9 } }\n").unwrap();
        assert_eq!(c.passthrough.name, "passthrough");
        assert_eq!(c.passthrough.outlier.consecutive_failures, 9);
        // The rest of passthrough's own defaults stay (not the generic cluster's).
        let p = ClusterConfig::passthrough();
        assert_eq!(c.passthrough.outlier.base_ejection_time, p.outlier.base_ejection_time);
        assert_eq!(c.passthrough.outlier.max_ejection_percent, 100);
    }

    #[test]
    fn a_bad_cluster_value_names_its_path() {
        let base = "clusters:\n  - name: web\n    addresses: [10.96.0.10:80]\n";
        let endpoints = "    endpoints: [{ addr: 10.0.0.5:8080 }]\n";
        let cases = [
            ("    lb: fastest\n", "clusters[0].lb"),
            ("    retry: { retry_on: [sometimes] }\n", "clusters[0].retry.retry_on"),
            ("    retry: { num_retries: 50 }\n", "clusters[0].retry.num_retries"),
            ("    retry: { backoff_base: 1s, backoff_max: 10ms }\n", "clusters[0].retry.backoff_max"),
            ("    retry: { retriable_status_codes: [700] }\n", "clusters[0].retry.retriable_status_codes[0]"),
            ("    outlier: { max_ejection_percent: 101 }\n", "clusters[0].outlier.max_ejection_percent"),
            ("    outlier: { base_ejection_time: 2h }\n", "clusters[0].outlier.base_ejection_time"),
            ("    budget: { window: 0s }\n", "clusters[0].budget.window"),
            ("    limits: { max_requests: 0 }\n", "clusters[0].limits.max_requests"),
            ("    per_try_timeout: 0s\n", "clusters[0].per_try_timeout"),
            ("    endpoints: [{ addr: 10.0.0.5:8080, weight: 0 }]\n", "clusters[0].endpoints[0].weight"),
            ("    endpoints: [{ addr: 10.0.0.5:8080, state: sleepy }]\n", "clusters[0].endpoints[0].state"),
            ("    endpoints: []\n", "clusters[0].endpoints"),
            (
                "  - name: api\n    addresses: [10.96.0.10:80]\n    endpoints: [{ addr: 10.0.0.6:80 }]\n",
                "clusters[1].addresses[0]",
            ),
            (
                "  - name: web\n    addresses: [10.96.0.11:80]\n    endpoints: [{ addr: 10.0.0.6:80 }]\n",
                "clusters[1].name",
            ),
        ];
        for (extra, path) in cases {
            let doc = if extra.starts_with("    endpoints") {
                format!("{base}{extra}")
            } else {
                format!("{base}{endpoints}{extra}")
            };
            let err = Config::from_yaml(&doc).expect_err(&doc).to_string();
            assert!(err.contains(path), "{doc}\n=> {err}");
        }
        let err = Config::from_yaml("passthrough: { addresses: [10.0.0.1:80] }\n").unwrap_err().to_string();
        assert!(err.contains("passthrough.addresses"), "{err}");
        let err = Config::from_yaml("inbound: { max_requests: 0 }\n").unwrap_err().to_string();
        assert!(err.contains("inbound.max_requests"), "{err}");
    }

    #[test]
    fn overrides_win() {
        let o = Overrides { drain_timeout: Some(Duration::from_secs(3)), ..Default::default() };
        let c = Config::from_yaml("drain:\n  timeout: 9s\n").unwrap().apply(&o).unwrap();
        assert_eq!(c.drain.timeout, Duration::from_secs(3));
    }
}
