//! The control plane (docs/architecture.md §13): the protocol (`proto/ebb/mesh/v1`), the sidecar's
//! client, the reference control plane (`ebb control-plane`) and the operator CLI (`ebb ctl`).

pub mod ca;
pub mod convert;
pub mod ctl;
pub mod enroll;
pub mod plane;
pub mod sidecar;
pub mod source;
pub mod tls;

/// The generated protocol types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ebb.mesh.v1");
}

/// Type URL of cluster resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/ebb.mesh.v1.Cluster";
/// Type URL of the inbound policy resource.
pub const INBOUND_TYPE: &str = "type.googleapis.com/ebb.mesh.v1.InboundPolicy";
/// Type URL of drain directives.
pub const DRAIN_TYPE: &str = "type.googleapis.com/ebb.mesh.v1.DrainDirective";
/// Every type a sidecar subscribes to, in the order it applies them.
pub const TYPES: [&str; 3] = [CLUSTER_TYPE, INBOUND_TYPE, DRAIN_TYPE];
/// `Node.metadata` key: the sidecar's drain phase when it opened the stream (`serving`, `announcing`,
/// ...). A sidecar that says `serving` is not draining, whatever the plane last heard from that node
/// id (a restarted pod reuses its predecessor's id).
pub const DRAIN_PHASE_KEY: &str = "ebb.drain_phase";
/// `Node.metadata` key: this process's instance id, random per process. Drain progress carries it, so the
/// plane can tell a node's current process from the one it replaced.
pub const INSTANCE_KEY: &str = "ebb.instance";

/// This process's instance id (random, fixed for its life).
pub fn instance() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", fastrand::u64(..)))
}
