//! The sidecar's side of the control plane: subscribes to every resource type on one stream, applies
//! what it can accept and ACKs it, NACKs what it cannot (naming the field) and keeps its last good
//! config, reconnects with jittered backoff, and reports drain progress back (docs/architecture.md §13).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::ControlPlaneConfig;
use crate::control::convert::{self, Rejected};
use crate::control::pb::{self, mesh_control_client::MeshControlClient};
use crate::control::tls::Dial;
use crate::control::{CLUSTER_TYPE, DRAIN_TYPE, INBOUND_TYPE, TYPES};
use crate::drain::{Drain, Phase, Trigger};
use crate::limits::Limit;
use crate::telemetry::metrics::Metrics;
use crate::upstream::cluster::Clusters;
use crate::upstream::retry::full_jitter;

/// What `/status` and readiness read of the control plane connection.
#[derive(Debug)]
pub struct PlaneStatus {
    pub address: String,
    pub node_id: String,
    connected: AtomicBool,
    /// Every resource type has been received and applied once.
    synced: AtomicBool,
    /// `initial_fetch_timeout` passed without a complete config: the static config serves.
    gave_up: AtomicBool,
    /// The last drain's progress stream has delivered its end (or given up on the plane).
    reported: tokio::sync::watch::Sender<bool>,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Detail {
    /// type_url → version accepted.
    versions: HashMap<String, String>,
    last_error: Option<String>,
    last_nack: Option<String>,
}

/// `/status`'s view of the control plane.
#[derive(Debug, Serialize)]
pub struct PlaneView {
    pub address: String,
    pub node_id: String,
    pub connected: bool,
    pub synced: bool,
    /// Serving the last good (or static) config because the plane is not reachable now.
    pub serving_last_good: bool,
    pub versions: HashMap<String, String>,
    pub last_error: Option<String>,
    pub last_nack: Option<String>,
}

impl PlaneStatus {
    /// Whether readiness may say ready as far as the plane is concerned.
    pub fn ready(&self) -> bool {
        self.synced.load(Relaxed) || self.gave_up.load(Relaxed)
    }

    /// Why readiness waits, or what it serves on.
    pub fn readiness_note(&self) -> &'static str {
        if self.synced.load(Relaxed) {
            "control plane config applied"
        } else if self.gave_up.load(Relaxed) {
            "control plane not reached within initial_fetch_timeout: serving the static config"
        } else {
            "waiting for the first config from the control plane"
        }
    }

    pub fn view(&self) -> PlaneView {
        let d = self.detail.lock().map(|d| d.clone()).unwrap_or_default();
        let connected = self.connected.load(Relaxed);
        PlaneView {
            address: self.address.clone(),
            node_id: self.node_id.clone(),
            connected,
            synced: self.synced.load(Relaxed),
            serving_last_good: !connected,
            versions: d.versions,
            last_error: d.last_error,
            last_nack: d.last_nack,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Detail)) {
        if let Ok(mut d) = self.detail.lock() {
            f(&mut d);
        }
    }
}

/// Everything the client changes when config arrives.
#[derive(Debug)]
pub struct Targets {
    pub clusters: Arc<Clusters>,
    /// The inbound listeners' request limits, with their configured ceilings (restored when the
    /// plane's inbound policy leaves `max_requests` unset).
    pub inbound_limits: Vec<(Arc<Limit>, usize)>,
    pub drain: Arc<Drain>,
    pub metrics: Arc<Metrics>,
}

/// The client's memory across reconnects.
#[derive(Debug, Default)]
struct Memory {
    /// type_url → last accepted version (sent again after a reconnect).
    accepted: HashMap<String, String>,
    /// Types received at least once on any stream.
    received: std::collections::HashSet<String>,
    /// Drain ids already acted on: a replay after a reconnect does not restart the clock.
    seen_drains: std::collections::HashSet<String>,
    /// The directive that started the drain under way, if one did.
    active_drain: Option<String>,
    /// The active directive has been listed on the current stream. Only then does its absence from a
    /// later response mean the operator withdrew it: a plane that restarted and lost it is not a
    /// cancellation.
    active_listed_on_stream: bool,
}

impl PlaneStatus {
    /// Waits (at most `limit`) until the drain that just ended has had its progress, end included,
    /// delivered to the plane (the reporter may not even have seen a drain that ended at once).
    pub async fn delivered(&self, limit: Duration) {
        let mut reported = self.reported.subscribe();
        let _ = tokio::time::timeout(limit, reported.wait_for(|r| *r)).await;
    }
}

/// Starts the client: the subscription loop, the drain progress reporter, and the initial-fetch
/// timer. Returns the status handle for `/status` and readiness.
pub fn start(cfg: ControlPlaneConfig, dial: Dial, targets: Targets) -> Arc<PlaneStatus> {
    let address = cfg.address.clone().unwrap_or_default();
    let node_id = cfg.node_id();
    let status = Arc::new(PlaneStatus {
        address: address.clone(),
        node_id: node_id.clone(),
        connected: AtomicBool::new(false),
        synced: AtomicBool::new(false),
        gave_up: AtomicBool::new(false),
        reported: tokio::sync::watch::Sender::new(false),
        detail: Mutex::new(Detail::default()),
    });
    let cluster =
        if cfg.cluster.is_empty() { std::env::var("POD_SERVICE").unwrap_or_default() } else { cfg.cluster.clone() };
    let mut metadata = HashMap::new();
    for (k, env) in [("pod", "POD_NAME"), ("namespace", "POD_NAMESPACE"), ("node", "NODE_NAME")] {
        if let Ok(v) = std::env::var(env) {
            metadata.insert(k.to_string(), v);
        }
    }
    let node = pb::Node { id: node_id, cluster, metadata, build_version: env!("CARGO_PKG_VERSION").into() };
    let targets = Arc::new(targets);
    let timeout = cfg.initial_fetch_timeout;
    let s = status.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if !s.synced.load(Relaxed) {
            s.gave_up.store(true, Relaxed);
            tracing::warn!(address = %s.address, ?timeout, "No config from the control plane yet; serving the static config");
        }
    });
    tokio::spawn(subscribe_loop(cfg.clone(), dial.clone(), node.clone(), targets.clone(), status.clone()));
    tokio::spawn(report_drains(dial, node.id.clone(), targets, status.clone()));
    status
}

/// Connects, subscribes and serves the stream until it ends; then backs off and does it again,
/// forever. The last good config stays in force meanwhile.
async fn subscribe_loop(
    cfg: ControlPlaneConfig,
    dial: Dial,
    node: pb::Node,
    targets: Arc<Targets>,
    status: Arc<PlaneStatus>,
) {
    let mut memory = Memory::default();
    let mut failures: u32 = 0;
    let gauge = &targets.metrics.control_plane.connected;
    loop {
        let result = session(&dial, &node, &targets, &status, &mut memory, &mut failures).await;
        let was_connected = status.connected.swap(false, Relaxed);
        gauge.set(0);
        let why = match &result {
            Ok(()) => "the control plane closed the stream".to_string(),
            Err(e) => e.clone(),
        };
        status.set(|d| d.last_error = Some(why.clone()));
        // Said on the change from connected to not, and on the first failure: not once per retry.
        if was_connected || failures == 0 {
            tracing::warn!(address = %status.address, error = %why, "Control plane unreachable; serving the last good config");
        } else {
            tracing::debug!(address = %status.address, error = %why, attempt = failures, "Control plane still unreachable");
        }
        let wait =
            full_jitter(cfg.backoff_base, cfg.backoff_max, failures, fastrand::f64()).max(Duration::from_millis(10));
        failures = failures.saturating_add(1);
        tokio::time::sleep(wait).await;
    }
}

/// One stream: subscribe to every type, then apply and answer each response.
async fn session(
    dial: &Dial,
    node: &pb::Node,
    targets: &Targets,
    status: &PlaneStatus,
    memory: &mut Memory,
    failures: &mut u32,
) -> Result<(), String> {
    let channel = dial.channel().await?;
    let mut client = MeshControlClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::DiscoveryRequest>(16);
    for (i, t) in TYPES.iter().enumerate() {
        let req = pb::DiscoveryRequest {
            version_info: memory.accepted.get(*t).cloned().unwrap_or_default(),
            node: (i == 0).then(|| {
                let mut node = node.clone();
                let phase = targets.drain.view().phase.as_str();
                node.metadata.insert(crate::control::DRAIN_PHASE_KEY.to_string(), phase.to_string());
                node.metadata.insert(crate::control::INSTANCE_KEY.to_string(), crate::control::instance().to_string());
                node
            }),
            type_url: t.to_string(),
            ..Default::default()
        };
        let _ = tx.send(req).await;
    }
    memory.active_listed_on_stream = false;
    let mut responses =
        client.stream_resources(ReceiverStream::new(rx)).await.map_err(|e| format!("subscribe: {e}"))?.into_inner();
    status.connected.store(true, Relaxed);
    targets.metrics.control_plane.connected.set(1);
    if *failures > 0 {
        tracing::info!(address = %status.address, "Control plane reachable again");
    } else {
        tracing::info!(address = %status.address, node = %node.id, "Connected to the control plane");
    }
    *failures = 0;
    status.set(|d| d.last_error = None);
    loop {
        let res = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("stream: {e}")),
        };
        let type_url = res.type_url.clone();
        let outcome = apply(&res, targets, memory, status, dial).await;
        let label = match type_url.as_str() {
            CLUSTER_TYPE => "cluster",
            INBOUND_TYPE => "inbound",
            DRAIN_TYPE => "drain",
            _ => "unknown",
        };
        let reply = match outcome {
            Ok(()) => {
                memory.accepted.insert(type_url.clone(), res.version_info.clone());
                memory.received.insert(type_url.clone());
                status.set(|d| {
                    d.versions.insert(type_url.clone(), res.version_info.clone());
                });
                targets.metrics.control_plane.update(label, "ack");
                tracing::info!(r#type = label, version = %res.version_info, resources = res.resources.len(), "Config from the control plane applied");
                pb::DiscoveryRequest {
                    version_info: res.version_info.clone(),
                    type_url: type_url.clone(),
                    response_nonce: res.nonce.clone(),
                    ..Default::default()
                }
            }
            Err(Rejected(message)) => {
                targets.metrics.control_plane.update(label, "nack");
                tracing::warn!(r#type = label, version = %res.version_info, error = %message, "Config from the control plane refused; keeping the last good one");
                status.set(|d| d.last_nack = Some(message.clone()));
                pb::DiscoveryRequest {
                    version_info: memory.accepted.get(&type_url).cloned().unwrap_or_default(),
                    type_url: type_url.clone(),
                    response_nonce: res.nonce.clone(),
                    error_detail: Some(pb::ErrorDetail { code: tonic::Code::InvalidArgument as i32, message }),
                    ..Default::default()
                }
            }
        };
        if TYPES.iter().all(|t| memory.received.contains(*t)) && !status.synced.swap(true, Relaxed) {
            tracing::info!("First complete config from the control plane applied");
        }
        if tx.send(reply).await.is_err() {
            return Err("request stream closed".into());
        }
    }
}

/// Applies one response whole, or nothing of it. `status` names this sidecar and its plane (for a
/// progress report sent from here).
async fn apply(
    res: &pb::DiscoveryResponse,
    targets: &Targets,
    memory: &mut Memory,
    status: &PlaneStatus,
    dial: &Dial,
) -> Result<(), Rejected> {
    match res.type_url.as_str() {
        CLUSTER_TYPE => {
            let clusters = convert::clusters(&res.resources)?;
            if !targets.clusters.has_identity() {
                let meshed = clusters.iter().find_map(|c| {
                    let j = c.endpoints.iter().position(|e| e.identity.is_some())?;
                    Some(format!("cluster[{}].endpoints[{j}].identity", c.name))
                });
                if let Some(key) = meshed {
                    return Err(Rejected(format!("{key}: this sidecar has no identity to dial mTLS with")));
                }
            }
            targets.clusters.update(&clusters);
            Ok(())
        }
        INBOUND_TYPE => {
            let policy = convert::inbound(&res.resources)?;
            for (limit, configured) in &targets.inbound_limits {
                let max = policy.as_ref().map(|p| p.max_requests as usize).filter(|&m| m > 0).unwrap_or(*configured);
                limit.set_max(max);
            }
            Ok(())
        }
        DRAIN_TYPE => {
            let directives = convert::directives(&res.resources)?;
            for d in &directives {
                if !memory.seen_drains.insert(d.id.clone()) {
                    continue;
                }
                tracing::info!(drain_id = %d.id, reason = %d.reason, scope = ?d.scope, deadline = ?d.deadline, "Drain directive from the control plane");
                let trigger = Trigger {
                    timeout: d.deadline,
                    scope: Some(d.scope),
                    id: Some(d.id.clone()),
                    reason: (!d.reason.is_empty()).then(|| d.reason.clone()),
                    ..Trigger::new("control-plane")
                };
                let before = targets.drain.view().phase;
                targets.drain.trigger_applied(trigger).await.map_err(|e| Rejected(format!("drain[{}]: {e}", d.id)))?;
                if before == Phase::Drained && targets.drain.view().phase == Phase::Drained {
                    // Already drained: nothing new starts, so this directive's report is the one
                    // there is, sent once under its id (whoever waits for it hears the end).
                    let mut p = progress(&status.node_id, &targets.drain, pb::DrainPhase::Drained, true);
                    p.drain_id = d.id.clone();
                    tokio::spawn(send_progress_once(dial.clone(), p));
                    continue;
                }
                memory.active_drain = Some(d.id.clone());
                memory.active_listed_on_stream = true;
            }
            if let Some(active) = memory.active_drain.clone() {
                if directives.iter().any(|d| d.id == active) {
                    memory.active_listed_on_stream = true;
                } else if memory.active_listed_on_stream {
                    memory.active_drain = None;
                    let cancel = Trigger { cancel: true, id: Some(active.clone()), ..Trigger::new("control-plane") };
                    tracing::info!(drain_id = %active, "Drain directive withdrawn");
                    let _ = targets.drain.trigger_applied(cancel).await;
                }
            }
            Ok(())
        }
        other => Err(Rejected(format!("unknown resource type {other}"))),
    }
}

fn pb_phase(p: Phase) -> pb::DrainPhase {
    match p {
        Phase::Serving => pb::DrainPhase::Unspecified,
        Phase::Announcing => pb::DrainPhase::Announcing,
        Phase::Closing => pb::DrainPhase::Closing,
        Phase::Deadline => pb::DrainPhase::Deadline,
        Phase::Drained => pb::DrainPhase::Drained,
    }
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// One progress message from the drain as it is now.
fn progress(node_id: &str, drain: &Drain, phase: pb::DrainPhase, last: bool) -> pb::DrainProgress {
    let r = drain.report();
    pb::DrainProgress {
        node_id: node_id.to_string(),
        drain_id: r.drain_id.clone().unwrap_or_default(),
        phase: phase as i32,
        started_at: r.started_at.as_deref().and_then(|s| humantime::parse_rfc3339(s).ok()).map(timestamp),
        observed_at: Some(timestamp(SystemTime::now())),
        active_connections: r.now.connections as u64,
        http2_connections: r.now.http2_connections as u64,
        in_flight_requests: r.now.in_flight_requests as u64,
        goaway_sent: r.goaway_sent,
        forced_closes: r.forced_closes,
        trigger: r.trigger.clone().unwrap_or_default(),
        connection_close_sent: r.connection_close_sent,
        requests_completed: r.requests_completed,
        elapsed_ms: r.elapsed_ms,
        final_report_json: if last { serde_json::to_string(&r).unwrap_or_default() } else { String::new() },
        instance: crate::control::instance().to_string(),
        refused_reason: String::new(),
    }
}

/// Sends one progress message on a stream of its own (best effort).
async fn send_progress_once(dial: Dial, p: pb::DrainProgress) {
    let Ok(channel) = dial.channel().await else { return };
    let mut client = MeshControlClient::new(channel);
    let _ = client.report_drain(tokio_stream::iter([p])).await;
}

/// Streams each drain's progress to the plane: on every phase change and once a second, ending with
/// the final report; a cancelled drain ends with CANCELLED. Best effort: a plane that is down misses
/// the progress of this drain, never delays it.
async fn report_drains(dial: Dial, node_id: String, targets: Arc<Targets>, status: Arc<PlaneStatus>) {
    let mut views = targets.drain.subscribe();
    loop {
        // Wait for a drain to start.
        if views.wait_for(|v| v.phase > Phase::Serving).await.is_err() {
            return;
        }
        status.reported.send_replace(false);
        let (tx, rx) = mpsc::channel::<pb::DrainProgress>(64);
        let dial = dial.clone();
        let send = tokio::spawn(async move {
            let Ok(channel) = dial.channel().await else { return };
            let mut client = MeshControlClient::new(channel);
            if let Err(e) = client.report_drain(ReceiverStream::new(rx)).await {
                tracing::debug!(error = %e, "Drain progress not delivered");
            }
        });
        // The first tick a second from now: the phase change itself is reported at once below.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
        let mut last_phase = Phase::Serving;
        // What the drain was, for the cancellation message (a cancel forgets the drain's record).
        let mut last_sent: Option<pb::DrainProgress> = None;
        loop {
            let phase = views.borrow_and_update().phase;
            if phase == Phase::Serving {
                let mut p = last_sent
                    .clone()
                    .unwrap_or_else(|| progress(&node_id, &targets.drain, pb::DrainPhase::Cancelled, false));
                p.phase = pb::DrainPhase::Cancelled as i32;
                p.observed_at = Some(timestamp(SystemTime::now()));
                let _ = tx.try_send(p);
                break;
            }
            let changed = phase != last_phase;
            last_phase = phase;
            if phase == Phase::Drained {
                let _ = tx.try_send(progress(&node_id, &targets.drain, pb_phase(phase), true));
                break;
            }
            if changed {
                let p = progress(&node_id, &targets.drain, pb_phase(phase), false);
                last_sent = Some(p.clone());
                let _ = tx.try_send(p);
            }
            tokio::select! {
                r = views.changed() => if r.is_err() { break },
                _ = tick.tick() => {
                    let p = progress(&node_id, &targets.drain, pb_phase(phase), false);
                    last_sent = Some(p.clone());
                    let _ = tx.try_send(p);
                }
            }
        }
        drop(tx);
        // Let the last message go out; bounded, so a plane that does not read cannot hold this. A process
        // that exits after its drain waits for this (`PlaneStatus::delivered`): the plane keeps a
        // node's endpoints draining until it hears the drain ended, and the node's next process
        // (same pod name) would otherwise come up behind that mark.
        let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
        status.reported.send_replace(true);
        // A drained process that keeps serving (inbound scope) waits for the next drain; one that was
        // cancelled is serving again.
        if views.wait_for(|v| v.phase != Phase::Drained).await.is_err() {
            return;
        }
    }
}
