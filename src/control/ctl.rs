//! `ebb ctl`: the operator's client of the reference control plane's `MeshAdmin`.

use std::io::IsTerminal as _;
use std::time::Duration;

use crate::control::pb::{self, mesh_admin_client::MeshAdminClient};
use crate::control::tls::{certified, ClientCert, Dial, DialTls};

/// How `ebb ctl` proves itself to a plane with a CA (`https://`).
#[derive(clap::Args, Debug, Clone)]
pub struct CtlTlsArgs {
    /// The CAs the plane's certificate chains to (the CA directory's ca.crt)
    #[arg(long, env = "EBB_PLANE_TRUST_BUNDLE")]
    pub trust_bundle: Option<std::path::PathBuf>,
    /// The operator's certificate (the CA directory's operator.crt)
    #[arg(long, env = "EBB_OPERATOR_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The operator's key (the CA directory's operator.key)
    #[arg(long, env = "EBB_OPERATOR_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// The SPIFFE ID the plane's certificate must carry
    #[arg(long, env = "EBB_PLANE_IDENTITY", default_value = "spiffe://cluster.local/ebb/control-plane")]
    pub plane_identity: String,
}

/// What `ebb ctl` can do.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// List connected sidecars (and nodes still marked draining after they left): node, since when,
    /// ACKed versions, drain progress and mark, last NACK
    Sidecars,
    /// Drain one sidecar through the control plane
    Drain {
        /// The sidecar's node id
        node: String,
        /// Deadline from when the sidecar receives it (default: its own drain.timeout)
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// `inbound` (default) or `all`
        #[arg(long, default_value = "inbound")]
        scope: String,
        /// Why (shown in the drain report)
        #[arg(long, default_value = "ebb ctl drain")]
        reason: String,
        /// Follow the drain, then print its report; exit 0 if nothing was forced, 2 if something
        /// was, 3 if it was cancelled, 4 if the sidecar refused it, 5 if it did not end in time
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to follow before giving up (default: the deadline, or the longest
        /// drain allowed, plus two minutes)
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// A cluster's endpoints as the plane sends them
    Endpoints { cluster: String },
    /// Change an endpoint
    Endpoint {
        #[command(subcommand)]
        action: EndpointAction,
    },
}

/// `ebb ctl endpoint ...`.
#[derive(clap::Subcommand, Debug)]
pub enum EndpointAction {
    /// Override an endpoint's health for every sidecar (`clear` removes the override)
    SetHealth {
        cluster: String,
        /// ip:port
        address: String,
        /// healthy, draining or clear
        health: String,
    },
}

/// Why `ebb ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control plane at {0}: {1}")]
    Connect(String, String),
    #[error("{0}")]
    Call(#[from] tonic::Status),
    #[error("{0}")]
    Usage(String),
}

fn health_name(h: i32) -> &'static str {
    match pb::HealthStatus::try_from(h) {
        Ok(pb::HealthStatus::Draining) => "draining",
        _ => "healthy",
    }
}

/// How long `drain --wait` follows a drain past its deadline before giving up: the drain's own
/// linger and the last report's trip through the plane take seconds, not minutes.
const WAIT_MARGIN: Duration = Duration::from_secs(120);

fn phase_of(p: &pb::DrainProgress) -> pb::DrainPhase {
    pb::DrainPhase::try_from(p.phase).unwrap_or(pb::DrainPhase::Unspecified)
}

fn phase_name(p: i32) -> &'static str {
    match pb::DrainPhase::try_from(p) {
        Ok(pb::DrainPhase::Announcing) => "announcing",
        Ok(pb::DrainPhase::Closing) => "closing",
        Ok(pb::DrainPhase::Deadline) => "deadline",
        Ok(pb::DrainPhase::Drained) => "drained",
        Ok(pb::DrainPhase::Cancelled) => "cancelled",
        Ok(pb::DrainPhase::Refused) => "refused",
        _ => "-",
    }
}

fn progress_json(p: &pb::DrainProgress) -> serde_json::Value {
    serde_json::json!({
        "node_id": p.node_id, "drain_id": p.drain_id, "phase": phase_name(p.phase), "trigger": p.trigger,
        "refused_reason": p.refused_reason,
        "elapsed_ms": p.elapsed_ms, "connections": p.active_connections, "http2_connections": p.http2_connections,
        "in_flight_requests": p.in_flight_requests, "goaway_sent": p.goaway_sent,
        "connection_close_sent": p.connection_close_sent, "forced_closes": p.forced_closes,
        "requests_completed": p.requests_completed,
    })
}

/// How `ebb ctl` dials `plane`: TLS for `https://`, with the operator's certificate when given.
fn dial(plane: &str, tls: &CtlTlsArgs) -> Result<Dial, CtlError> {
    let usage = |e: String| CtlError::Usage(e);
    let dial_tls = match &tls.trust_bundle {
        Some(bundle) => {
            let pem = std::fs::read(bundle).map_err(|e| usage(format!("--trust-bundle {}: {e}", bundle.display())))?;
            let client = match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    let read = |p: &std::path::Path| {
                        std::fs::read_to_string(p).map_err(|e| usage(format!("{}: {e}", p.display())))
                    };
                    let key = certified(&read(c)?, &read(k)?).map_err(|e| usage(format!("--cert/--key: {e}")))?;
                    let key = std::sync::Arc::new(key);
                    let f: ClientCert = std::sync::Arc::new(move || Some(key.clone()));
                    Some(f)
                }
                _ => None,
            };
            Some(DialTls::new(&pem, &tls.plane_identity, client).map_err(|e| usage(format!("--trust-bundle: {e}")))?)
        }
        None if plane.starts_with("https://") => return Err(usage("an https:// plane needs --trust-bundle".into())),
        None => None,
    };
    Dial::new(plane, Duration::from_secs(3), dial_tls).map_err(|e| usage(e.to_string()))
}

/// Runs one command against the plane at `plane`; returns the process exit code.
pub async fn run(plane: &str, tls: &CtlTlsArgs, json: bool, cmd: CtlCommand) -> Result<u8, CtlError> {
    let channel = dial(plane, tls)?.channel().await.map_err(|e| CtlError::Connect(plane.into(), e))?;
    let mut client = MeshAdminClient::new(channel);
    match cmd {
        CtlCommand::Sidecars => {
            let list = client.list_sidecars(pb::ListSidecarsRequest {}).await?.into_inner();
            if json {
                let v: Vec<_> = list
                    .sidecars
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "node_id": s.node.as_ref().map(|n| n.id.clone()),
                            "cluster": s.node.as_ref().map(|n| n.cluster.clone()),
                            "connected_since": s.connected_since.as_ref().map(|t| t.seconds),
                            "acked_versions": s.acked_versions,
                            "last_nack": s.last_nack,
                            "drain": s.drain.as_ref().map(progress_json),
                            "marked_draining": s.marked_draining,
                            "identity": s.identity,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(0);
            }
            println!(
                "{:<32} {:<16} {:<10} {:<12} {:<10} {:<8} LAST NACK",
                "NODE", "CLUSTER", "SINCE", "CLUSTERS@", "DRAIN", "MARKED"
            );
            for s in &list.sidecars {
                let node = s.node.clone().unwrap_or_default();
                let age = match &s.connected_since {
                    Some(t) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        format!("{}s", now.saturating_sub(t.seconds))
                    }
                    None => "gone".to_string(),
                };
                let version = s.acked_versions.get(crate::control::CLUSTER_TYPE).map_or("-", |v| v.as_str());
                println!(
                    "{:<32} {:<16} {:<10} {:<12} {:<10} {:<8} {}",
                    node.id,
                    if node.cluster.is_empty() { "-" } else { &node.cluster },
                    age,
                    &version[..version.len().min(12)],
                    s.drain.as_ref().map_or("-", |d| phase_name(d.phase)),
                    if s.marked_draining { "draining" } else { "-" },
                    if s.last_nack.is_empty() { "-" } else { &s.last_nack }
                );
            }
            Ok(0)
        }
        CtlCommand::Drain { node, deadline, scope, reason, wait, timeout } => {
            let scope = match scope.as_str() {
                "inbound" => pb::DrainScope::Inbound,
                "all" => pb::DrainScope::All,
                other => return Err(CtlError::Usage(format!("--scope: `{other}` is not inbound or all"))),
            };
            let req = pb::DrainSidecarRequest {
                node_id: node.clone(),
                deadline: deadline.map(crate::control::convert::pb_duration),
                reason,
                scope: scope as i32,
            };
            let drain_id = client.drain_sidecar(req).await?.into_inner().drain_id;
            if !wait {
                if json {
                    println!("{}", serde_json::json!({ "drain_id": drain_id }));
                } else {
                    println!("drain {drain_id} sent to {node}");
                }
                return Ok(0);
            }
            let mut stream = client
                .watch_drain(pb::WatchDrainRequest { node_id: node.clone(), drain_id: drain_id.clone() })
                .await?
                .into_inner();
            let tty = std::io::stdout().is_terminal() && !json;
            let mut last: Option<pb::DrainProgress> = None;
            let limit = timeout.unwrap_or(deadline.unwrap_or(crate::config::MAX_DRAIN_TIMEOUT) + WAIT_MARGIN);
            let give_up = tokio::time::Instant::now() + limit;
            loop {
                let p = match tokio::time::timeout_at(give_up, stream.message()).await {
                    Ok(Ok(Some(p))) => p,
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        if tty {
                            println!();
                        }
                        eprintln!(
                            "ebb ctl: drain {drain_id} of {node} did not end within {}",
                            humantime::format_duration(limit)
                        );
                        return Ok(5);
                    }
                };
                if phase_of(&p) == pb::DrainPhase::Refused {
                    if json {
                        println!("{}", progress_json(&p));
                    }
                    eprintln!("ebb ctl: {node} refused drain {drain_id}: {}", p.refused_reason);
                    return Ok(4);
                }
                if json {
                    println!("{}", progress_json(&p));
                } else {
                    let line = format!(
                        "{node} {:<10} {:>6.1}s  connections {:<5} in flight {:<5} GOAWAY {:<4} close {:<4} forced {}",
                        phase_name(p.phase),
                        p.elapsed_ms as f64 / 1000.0,
                        p.active_connections,
                        p.in_flight_requests,
                        p.goaway_sent,
                        p.connection_close_sent,
                        p.forced_closes
                    );
                    if tty {
                        print!("\r\x1b[2K{line}");
                        let _ = std::io::Write::flush(&mut std::io::stdout());
                    } else {
                        println!("{line}");
                    }
                }
                last = Some(p);
            }
            if tty {
                println!();
            }
            let Some(last) = last else {
                return Err(CtlError::Usage(format!("the plane ended the watch of {drain_id} without a report")));
            };
            if !last.final_report_json.is_empty() && !json {
                let pretty = serde_json::from_str::<serde_json::Value>(&last.final_report_json)
                    .ok()
                    .and_then(|v| serde_json::to_string_pretty(&v).ok())
                    .unwrap_or(last.final_report_json.clone());
                println!("{pretty}");
            }
            Ok(match pb::DrainPhase::try_from(last.phase) {
                Ok(pb::DrainPhase::Cancelled) => 3,
                _ if last.forced_closes > 0 => 2,
                _ => 0,
            })
        }
        CtlCommand::Endpoints { cluster } => {
            let eps = client.list_endpoints(pb::ListEndpointsRequest { cluster }).await?.into_inner().endpoints;
            if json {
                let v: Vec<_> = eps
                    .iter()
                    .map(|e| serde_json::json!({ "address": e.address, "weight": e.weight, "health": health_name(e.health), "node_id": e.node_id }))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(0);
            }
            println!("{:<24} {:<8} {:<10} NODE", "ADDRESS", "WEIGHT", "HEALTH");
            for e in &eps {
                println!(
                    "{:<24} {:<8} {:<10} {}",
                    e.address,
                    e.weight,
                    health_name(e.health),
                    if e.node_id.is_empty() { "-" } else { &e.node_id }
                );
            }
            Ok(0)
        }
        CtlCommand::Endpoint { action: EndpointAction::SetHealth { cluster, address, health } } => {
            let health = match health.as_str() {
                "healthy" => pb::HealthStatus::Healthy,
                "draining" => pb::HealthStatus::Draining,
                "clear" => pb::HealthStatus::Unspecified,
                other => return Err(CtlError::Usage(format!("health `{other}` is not healthy, draining or clear"))),
            };
            client
                .set_endpoint_health(pb::SetEndpointHealthRequest {
                    cluster: cluster.clone(),
                    address: address.clone(),
                    health: health as i32,
                })
                .await?;
            if !json {
                println!(
                    "{cluster} {address}: {}",
                    if health == pb::HealthStatus::Unspecified {
                        "override cleared"
                    } else {
                        health_name(health as i32)
                    }
                );
            }
            Ok(0)
        }
    }
}
