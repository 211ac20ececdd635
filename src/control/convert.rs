//! The wire form of resources and the Rust types the sidecar runs on: a cluster on the wire is a
//! `ClusterConfig` once decoded, checked by the same validation as the config file, so a bad field is
//! named the same way wherever it came from.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;

use crate::config::{
    validate_cluster_list, ClusterConfig, EndpointConfig, EndpointHealth, LbPolicy, RetryOn, UpstreamProtocol,
};
use crate::control::pb;
use crate::drain::Scope;

/// A resource set the sidecar cannot accept; the message names the resource and field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

fn dur(d: Option<prost_types::Duration>, path: &str) -> Result<Option<Duration>, Rejected> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(Rejected(format!("{path}: negative duration"))),
        // protobuf's Duration keeps nanos below a second; a larger value is not a normalised duration.
        Some(d) if d.nanos >= 1_000_000_000 => Err(Rejected(format!("{path}: nanos must be below 1000000000"))),
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

/// A drain directive's deadline: at most the longest drain a sidecar allows.
fn drain_deadline(d: Option<prost_types::Duration>, path: &str) -> Result<Option<Duration>, Rejected> {
    let deadline = dur(d, path)?;
    if deadline.is_some_and(|d| d > crate::config::MAX_DRAIN_TIMEOUT) {
        return Err(Rejected(format!("{path}: must be at most 1h")));
    }
    Ok(deadline)
}

fn to_pb_dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn addr(s: &str, path: &str) -> Result<SocketAddr, Rejected> {
    s.parse().map_err(|_| Rejected(format!("{path}: `{s}` is not an ip:port address")))
}

/// Decodes and checks one type's resources into clusters.
pub fn clusters(resources: &[prost_types::Any]) -> Result<Vec<ClusterConfig>, Rejected> {
    let mut out = Vec::with_capacity(resources.len());
    for (i, any) in resources.iter().enumerate() {
        if any.type_url != crate::control::CLUSTER_TYPE {
            return Err(Rejected(format!("resources[{i}]: type {} in a cluster response", any.type_url)));
        }
        let c = pb::Cluster::decode(any.value.as_slice())
            .map_err(|e| Rejected(format!("resources[{i}]: not a Cluster: {e}")))?;
        out.push(cluster_from_pb(c, i)?);
    }
    validate_cluster_list(&out, &|i| format!("cluster[{}]", out.get(i).map_or("?", |c| c.name.as_str())))
        .map_err(|e| Rejected(e.to_string()))?;
    Ok(out)
}

/// A cluster from the wire; defaults fill what it leaves unset.
pub fn cluster_from_pb(c: pb::Cluster, i: usize) -> Result<ClusterConfig, Rejected> {
    let p = format!("cluster[{}]", if c.name.is_empty() { i.to_string() } else { c.name.clone() });
    let mut cfg = ClusterConfig { name: c.name, ..ClusterConfig::default() };
    cfg.addresses = c
        .addresses
        .iter()
        .enumerate()
        .map(|(j, a)| addr(a, &format!("{p}.addresses[{j}]")))
        .collect::<Result<_, _>>()?;
    for (j, e) in c.endpoints.into_iter().enumerate() {
        let state = match pb::HealthStatus::try_from(e.health) {
            Ok(pb::HealthStatus::Draining) => EndpointHealth::Draining,
            Ok(_) => EndpointHealth::Healthy,
            Err(_) => return Err(Rejected(format!("{p}.endpoints[{j}].health: unknown value {}", e.health))),
        };
        cfg.endpoints.push(EndpointConfig {
            addr: addr(&e.address, &format!("{p}.endpoints[{j}].address"))?,
            weight: e.weight.max(1),
            state,
            node: (!e.node_id.is_empty()).then_some(e.node_id),
            identity: match e.identity {
                id if id.is_empty() => None,
                id if crate::domain::is_spiffe_id(&id) => Some(id),
                id => return Err(Rejected(format!("{p}.endpoints[{j}].identity: {id:?} is not a SPIFFE ID"))),
            },
        });
    }
    cfg.lb = match pb::LbPolicy::try_from(c.lb_policy) {
        Ok(pb::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(_) => LbPolicy::P2c,
        Err(_) => return Err(Rejected(format!("{p}.lb_policy: unknown value {}", c.lb_policy))),
    };
    cfg.protocol = match pb::UpstreamProtocol::try_from(c.protocol) {
        Ok(pb::UpstreamProtocol::Http1) => UpstreamProtocol::Http1,
        Ok(pb::UpstreamProtocol::Http2) => UpstreamProtocol::Http2,
        Ok(pb::UpstreamProtocol::Unspecified) => UpstreamProtocol::Auto,
        Err(_) => return Err(Rejected(format!("{p}.protocol: unknown value {}", c.protocol))),
    };
    cfg.connect_timeout = dur(c.connect_timeout, &format!("{p}.connect_timeout"))?;
    cfg.request_timeout = dur(c.request_timeout, &format!("{p}.request_timeout"))?;
    cfg.per_try_timeout = dur(c.per_try_timeout, &format!("{p}.per_try_timeout"))?;
    if let Some(d) = dur(c.draining_hold, &format!("{p}.draining_hold"))? {
        cfg.draining_hold = d;
    }
    if let Some(l) = c.limits {
        let lim = &mut cfg.limits;
        for (v, slot) in [
            (l.max_connections, &mut lim.max_connections),
            (l.max_pending_requests, &mut lim.max_pending_requests),
            (l.max_requests, &mut lim.max_requests),
            (l.max_retries, &mut lim.max_retries),
        ] {
            if let Some(v) = v {
                *slot = v as usize;
            }
        }
    }
    if let Some(o) = c.outlier {
        let out = &mut cfg.outlier;
        if let Some(v) = o.consecutive_failures {
            out.consecutive_failures = v;
        }
        if let Some(d) = dur(o.base_ejection_time, &format!("{p}.outlier.base_ejection_time"))? {
            out.base_ejection_time = d;
        }
        if let Some(d) = dur(o.max_ejection_time, &format!("{p}.outlier.max_ejection_time"))? {
            out.max_ejection_time = d;
        }
        if let Some(v) = o.max_ejection_percent {
            out.max_ejection_percent = v;
        }
        if let Some(v) = o.jitter {
            out.jitter = v;
        }
    }
    if let Some(r) = c.retry {
        let rc = &mut cfg.retry;
        if !r.retry_on.is_empty() {
            rc.retry_on = r
                .retry_on
                .iter()
                .enumerate()
                .map(|(j, v)| match pb::RetryOn::try_from(*v) {
                    Ok(pb::RetryOn::ConnectFailure) => Ok(RetryOn::ConnectFailure),
                    Ok(pb::RetryOn::RefusedStream) => Ok(RetryOn::RefusedStream),
                    Ok(pb::RetryOn::Reset) => Ok(RetryOn::Reset),
                    Ok(pb::RetryOn::GatewayError) => Ok(RetryOn::GatewayError),
                    Ok(pb::RetryOn::PerTryTimeout) => Ok(RetryOn::PerTryTimeout),
                    Ok(pb::RetryOn::RetriableStatusCodes) => Ok(RetryOn::RetriableStatusCodes),
                    Ok(pb::RetryOn::RetriableGrpcStatuses) => Ok(RetryOn::RetriableGrpcStatuses),
                    _ => Err(Rejected(format!("{p}.retry.retry_on[{j}]: unknown value {v}"))),
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = r.num_retries {
            rc.num_retries = v;
        }
        if !r.retriable_status_codes.is_empty() {
            rc.retriable_status_codes =
                r.retriable_status_codes.iter().map(|&v| v.min(u16::MAX as u32) as u16).collect();
        }
        if !r.retriable_grpc_statuses.is_empty() {
            rc.retriable_grpc_statuses = r.retriable_grpc_statuses;
        }
        if let Some(v) = r.idempotent_only {
            rc.idempotent_only = v;
        }
        if let Some(d) = dur(r.backoff_base, &format!("{p}.retry.backoff_base"))? {
            rc.backoff_base = d;
        }
        if let Some(d) = dur(r.backoff_max, &format!("{p}.retry.backoff_max"))? {
            rc.backoff_max = d;
        }
        if let Some(v) = r.max_body_bytes {
            rc.max_body_bytes = v.min(usize::MAX as u64) as usize;
        }
    }
    if let Some(b) = c.budget {
        if let Some(v) = b.ratio {
            cfg.budget.ratio = v as f32;
        }
        if let Some(v) = b.min_retries_per_second {
            cfg.budget.min_retries_per_second = v;
        }
        if let Some(d) = dur(b.window, &format!("{p}.budget.window"))? {
            cfg.budget.window = d;
        }
    }
    Ok(cfg)
}

/// A cluster for the wire: every value explicit, so the sidecar's defaults do not matter.
pub fn cluster_to_pb(c: &ClusterConfig) -> pb::Cluster {
    let retry_on = |r: &RetryOn| -> i32 {
        (match r {
            RetryOn::ConnectFailure => pb::RetryOn::ConnectFailure,
            RetryOn::RefusedStream => pb::RetryOn::RefusedStream,
            RetryOn::Reset => pb::RetryOn::Reset,
            RetryOn::GatewayError => pb::RetryOn::GatewayError,
            RetryOn::PerTryTimeout => pb::RetryOn::PerTryTimeout,
            RetryOn::RetriableStatusCodes => pb::RetryOn::RetriableStatusCodes,
            RetryOn::RetriableGrpcStatuses => pb::RetryOn::RetriableGrpcStatuses,
        }) as i32
    };
    pb::Cluster {
        name: c.name.clone(),
        addresses: c.addresses.iter().map(ToString::to_string).collect(),
        endpoints: c
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.addr.to_string(),
                weight: e.weight,
                health: match e.state {
                    EndpointHealth::Healthy => pb::HealthStatus::Healthy,
                    EndpointHealth::Draining => pb::HealthStatus::Draining,
                } as i32,
                node_id: e.node.clone().unwrap_or_default(),
                identity: e.identity.clone().unwrap_or_default(),
            })
            .collect(),
        lb_policy: match c.lb {
            LbPolicy::P2c => pb::LbPolicy::P2c,
            LbPolicy::RoundRobin => pb::LbPolicy::RoundRobin,
        } as i32,
        protocol: match c.protocol {
            UpstreamProtocol::Auto => pb::UpstreamProtocol::Unspecified,
            UpstreamProtocol::Http1 => pb::UpstreamProtocol::Http1,
            UpstreamProtocol::Http2 => pb::UpstreamProtocol::Http2,
        } as i32,
        connect_timeout: c.connect_timeout.map(to_pb_dur),
        request_timeout: c.request_timeout.map(to_pb_dur),
        per_try_timeout: c.per_try_timeout.map(to_pb_dur),
        limits: Some(pb::Limits {
            max_connections: Some(c.limits.max_connections as u32),
            max_pending_requests: Some(c.limits.max_pending_requests as u32),
            max_requests: Some(c.limits.max_requests as u32),
            max_retries: Some(c.limits.max_retries as u32),
        }),
        outlier: Some(pb::OutlierDetection {
            consecutive_failures: Some(c.outlier.consecutive_failures),
            base_ejection_time: Some(to_pb_dur(c.outlier.base_ejection_time)),
            max_ejection_time: Some(to_pb_dur(c.outlier.max_ejection_time)),
            max_ejection_percent: Some(c.outlier.max_ejection_percent),
            jitter: Some(c.outlier.jitter),
        }),
        retry: Some(pb::RetryPolicy {
            retry_on: c.retry.retry_on.iter().map(retry_on).collect(),
            num_retries: Some(c.retry.num_retries),
            retriable_status_codes: c.retry.retriable_status_codes.iter().map(|&s| u32::from(s)).collect(),
            retriable_grpc_statuses: c.retry.retriable_grpc_statuses.clone(),
            idempotent_only: Some(c.retry.idempotent_only),
            backoff_base: Some(to_pb_dur(c.retry.backoff_base)),
            backoff_max: Some(to_pb_dur(c.retry.backoff_max)),
            max_body_bytes: Some(c.retry.max_body_bytes as u64),
        }),
        budget: Some(pb::RetryBudget {
            ratio: Some(f64::from(c.budget.ratio)),
            min_retries_per_second: Some(c.budget.min_retries_per_second),
            window: Some(to_pb_dur(c.budget.window)),
        }),
        draining_hold: Some(to_pb_dur(c.draining_hold)),
    }
}

/// The inbound policy from the wire: at most one resource.
pub fn inbound(resources: &[prost_types::Any]) -> Result<Option<pb::InboundPolicy>, Rejected> {
    match resources {
        [] => Ok(None),
        [any] => {
            let p = pb::InboundPolicy::decode(any.value.as_slice())
                .map_err(|e| Rejected(format!("inbound: not an InboundPolicy: {e}")))?;
            if p.max_requests > 10_000_000 {
                return Err(Rejected("inbound.max_requests: must be at most 10000000".into()));
            }
            Ok(Some(p))
        }
        _ => Err(Rejected("inbound: more than one InboundPolicy".into())),
    }
}

/// A drain directive as the sidecar acts on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Directive {
    pub id: String,
    pub scope: Scope,
    pub deadline: Option<Duration>,
    pub reason: String,
}

/// Decodes and checks drain directives: the one rule for a valid drain, applied by the sidecar before it
/// takes a directive set and by the plane before it accepts a drain (`MeshAdmin.DrainSidecar`).
pub fn directives(resources: &[prost_types::Any]) -> Result<Vec<Directive>, Rejected> {
    let mut out: Vec<Directive> = Vec::new();
    for (i, any) in resources.iter().enumerate() {
        let d = pb::DrainDirective::decode(any.value.as_slice())
            .map_err(|e| Rejected(format!("resources[{i}]: not a DrainDirective: {e}")))?;
        let p = format!("drain[{}]", if d.drain_id.is_empty() { i.to_string() } else { d.drain_id.clone() });
        if d.drain_id.is_empty() {
            return Err(Rejected(format!("{p}.drain_id: must be non-empty")));
        }
        if out.iter().any(|o| o.id == d.drain_id) {
            return Err(Rejected(format!("{p}.drain_id: listed twice")));
        }
        let scope = match pb::DrainScope::try_from(d.scope) {
            Ok(pb::DrainScope::All) => Scope::All,
            Ok(_) => Scope::Inbound,
            Err(_) => return Err(Rejected(format!("{p}.scope: unknown value {}", d.scope))),
        };
        let deadline = drain_deadline(d.deadline, &format!("{p}.deadline"))?;
        out.push(Directive { id: d.drain_id, scope, deadline, reason: d.reason });
    }
    Ok(out)
}

/// Packs a message as a resource.
pub fn any<M: prost::Name>(m: &M) -> prost_types::Any {
    prost_types::Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

/// A duration for the wire.
pub fn pb_duration(d: Duration) -> prost_types::Duration {
    to_pb_dur(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ClusterConfig {
        ClusterConfig {
            name: "web".into(),
            addresses: vec!["10.96.0.10:80".parse().unwrap()],
            endpoints: vec![EndpointConfig {
                addr: "10.0.0.5:8080".parse().unwrap(),
                weight: 2,
                state: EndpointHealth::Draining,
                node: Some("web-0.default".into()),
                identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            }],
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn a_cluster_survives_the_wire_unchanged() {
        let c = web();
        let back = clusters(&[any(&cluster_to_pb(&c))]).unwrap();
        assert_eq!(serde_json::to_value(&back[0]).unwrap(), serde_json::to_value(&c).unwrap());
        assert_eq!(any(&cluster_to_pb(&c)).type_url, crate::control::CLUSTER_TYPE);
    }

    #[test]
    fn a_bad_field_on_the_wire_is_named() {
        let mut c = cluster_to_pb(&web());
        c.retry.as_mut().unwrap().num_retries = Some(50);
        let err = clusters(&[any(&c)]).unwrap_err().to_string();
        assert!(err.contains("cluster[web].retry.num_retries"), "{err}");
        let mut c = cluster_to_pb(&web());
        c.endpoints[0].address = "nowhere".into();
        let err = clusters(&[any(&c)]).unwrap_err().to_string();
        assert!(err.contains("cluster[web].endpoints[0].address"), "{err}");
    }
}
