//! The reference control plane (`ebb control-plane`): serves every connected sidecar a snapshot of
//! the mesh over `MeshControl.StreamResources`, tracks what each has ACKed and how its drain goes,
//! marks a draining sidecar's endpoints draining for everyone else, and answers operators on
//! `MeshAdmin` (docs/architecture.md §13).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::EndpointHealth;
use crate::control::ca::Ca;
use crate::control::convert::{any, cluster_to_pb};
use crate::control::pb;
use crate::control::pb::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use crate::control::pb::mesh_control_server::{MeshControl, MeshControlServer};
use crate::control::pb::mesh_identity_server::{MeshIdentity, MeshIdentityServer};
use crate::control::source::{ConfigSource, MeshConfig};
use crate::control::tls::{caller, Caller};
use crate::control::{CLUSTER_TYPE, DRAIN_TYPE, INBOUND_TYPE};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A connected sidecar.
#[derive(Debug, Clone)]
struct Sidecar {
    node: pb::Node,
    /// Which stream registered it (a reconnect replaces it; the old stream's end must not remove it).
    stream: u64,
    connected_since: SystemTime,
    acked: HashMap<String, String>,
    /// Drain ids of the directive set the sidecar last accepted.
    acked_drains: HashSet<String>,
    last_nack: String,
    drain: Option<pb::DrainProgress>,
    /// Who its stream proved to be.
    caller: Caller,
}

#[derive(Debug, Default)]
struct State {
    sidecars: HashMap<String, Sidecar>,
    /// Drain directives by node.
    directives: HashMap<String, Vec<pb::DrainDirective>>,
    /// Nodes whose endpoints every other sidecar sees as draining.
    draining: HashSet<String>,
    /// Operator overrides of an endpoint's health, by cluster and address.
    health: HashMap<(String, SocketAddr), EndpointHealth>,
    /// Last drain progress by node, kept after it disconnects (so a restarted pod is recognised);
    /// bounded by [`MAX_DEPARTED`] entries for nodes no longer connected.
    last_progress: HashMap<String, pb::DrainProgress>,
    /// The last directive each node refused (NACK), for a watch that starts after the refusal.
    last_refused: HashMap<String, pb::DrainProgress>,
}

/// The most drain reports (`final_report_json`) the plane keeps, in bytes: a sidecar's report is far
/// smaller (it names at most `drain::MAX_FORCED_LISTED` connections); a larger one is replaced by a
/// note, so no caller can make the plane hold megabytes per node id.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

/// How many nodes that have disconnected the plane keeps drain progress for (so that a restarted pod
/// is recognised, and `ebb ctl sidecars` shows a node that left while marked draining); the oldest
/// report goes first.
pub const MAX_DEPARTED: usize = 1024;

/// The largest message a sidecar may send the plane (tonic's default is 4 MiB).
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// What makes a plane trust identities instead of claims (docs/architecture.md §15): its CA, how long
/// the certificates it issues last, and who may operate it.
#[derive(Debug)]
pub struct Security {
    pub ca: Arc<Ca>,
    /// Life of a workload certificate (and of the plane's own serving certificate).
    pub cert_life: std::time::Duration,
    /// SPIFFE IDs allowed `MeshAdmin`.
    pub operators: Vec<String>,
    /// DNS names and IPs in the plane's serving certificate, for clients that check those.
    pub names: Vec<String>,
}

/// The plane's state, shared by every stream and admin call.
#[derive(Debug)]
pub struct Plane {
    id: String,
    security: Option<Security>,
    /// Certificates issued since start, for the operator and the demo's verdict.
    issued: AtomicU64,
    mesh: watch::Receiver<Arc<MeshConfig>>,
    state: Mutex<State>,
    /// Bumped on every change that can change a snapshot; streams wait on it.
    changed: watch::Sender<u64>,
    progress: broadcast::Sender<pb::DrainProgress>,
    counter: AtomicU64,
}

fn phase_of(p: &pb::DrainProgress) -> pb::DrainPhase {
    pb::DrainPhase::try_from(p.phase).unwrap_or(pb::DrainPhase::Unspecified)
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

impl Plane {
    /// A plane without TLS serving what `source` says, now and as it changes: it cannot tell one
    /// caller from another, so `MeshAdmin` answers loopback callers only.
    pub fn new(source: &dyn ConfigSource) -> Arc<Self> {
        Self::with_security(source, None)
    }

    /// A plane serving what `source` says over TLS when `security` is given, its CA issuing identities.
    pub fn with_security(source: &dyn ConfigSource, security: Option<Security>) -> Arc<Self> {
        let mesh = source.watch();
        let plane = Arc::new(Self {
            id: format!("ebb-control-plane-{}", std::process::id()),
            security,
            issued: AtomicU64::new(0),
            mesh,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
            progress: broadcast::channel(1024).0,
            counter: AtomicU64::new(0),
        });
        // A new mesh file wakes every stream.
        let (weak, mut rx) = (Arc::downgrade(&plane), plane.mesh.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(p) = weak.upgrade() else { return };
                p.bump();
            }
        });
        plane
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Relaxed) + 1
    }

    /// The clusters as every sidecar gets them now: an endpoint is draining when its config says
    /// so, an operator said so, or the sidecar in front of it is draining.
    fn clusters_now(&self, st: &State) -> Vec<pb::Cluster> {
        let mesh = self.mesh.borrow().clone();
        mesh.clusters
            .iter()
            .map(|c| {
                let mut c = c.clone();
                for e in &mut c.endpoints {
                    // A draining sidecar's endpoint drains whatever else says; then an operator's
                    // override; then the file.
                    let node_draining = e.node.as_ref().is_some_and(|n| st.draining.contains(n));
                    if node_draining {
                        e.state = EndpointHealth::Draining;
                    } else if let Some(h) = st.health.get(&(c.name.clone(), e.addr)) {
                        e.state = *h;
                    }
                }
                cluster_to_pb(&c)
            })
            .collect()
    }

    /// One type's resources for one node, and their version (a hash of their bytes: equal content,
    /// equal version, so nothing is resent for a change that changed nothing for this node).
    fn snapshot(&self, node: &str, type_url: &str) -> (String, Vec<prost_types::Any>) {
        let st = self.lock();
        let resources: Vec<prost_types::Any> = match type_url {
            CLUSTER_TYPE => self.clusters_now(&st).iter().map(any).collect(),
            INBOUND_TYPE => {
                let mesh = self.mesh.borrow().clone();
                mesh.inbound.iter().map(|p| any(&pb::InboundPolicy { max_requests: p.max_requests })).collect()
            }
            DRAIN_TYPE => st.directives.get(node).map(|ds| ds.iter().map(any).collect()).unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in &resources {
            r.type_url.hash(&mut h);
            r.value.hash(&mut h);
        }
        (format!("{:016x}", h.finish()), resources)
    }

    /// A sidecar connected (or reconnected). A node whose last drain had ended is a new process (a
    /// restarted pod): its old directives and its draining mark go.
    fn register(&self, node: pb::Node, stream: u64, caller: Caller) -> Result<(), Status> {
        let mut st = self.lock();
        let id = node.id.clone();
        // A second stream for a connected node: with TLS the caller has proved the node already (it
        // is the same sidecar reconnecting before the plane saw its old stream die); without, only a
        // caller from the same address may take the node over, so another pod cannot evict it.
        if let Some(old) = st.sidecars.get(&id) {
            let same_host = old.caller.remote.map(|a| a.ip()) == caller.remote.map(|a| a.ip());
            if self.security.is_none() && !same_host {
                return Err(Status::already_exists(format!(
                    "node `{id}` is connected from another address; a plane without TLS cannot tell which is real"
                )));
            }
        }
        // Its last drain is over when it said so, or when the sidecar now says it is serving: a pod
        // restarted under the same node id must not inherit a mark whose `drained` report never
        // came (its process exited first), or every peer keeps avoiding its new endpoints.
        let serving = node.metadata.get(crate::control::DRAIN_PHASE_KEY).is_some_and(|p| p == "serving");
        let ended = serving
            || st
                .last_progress
                .get(&id)
                .is_none_or(|p| matches!(phase_of(p), pb::DrainPhase::Drained | pb::DrainPhase::Cancelled));
        if ended {
            // Its last drain is history; a watch of this node waits for the next one.
            st.last_progress.remove(&id);
        }
        if ended && (st.draining.remove(&id) | st.directives.remove(&id).is_some()) {
            drop(st);
            self.bump();
            st = self.lock();
        }
        st.sidecars.insert(
            id,
            Sidecar {
                node,
                stream,
                connected_since: SystemTime::now(),
                acked: HashMap::new(),
                acked_drains: HashSet::new(),
                last_nack: String::new(),
                drain: None,
                caller,
            },
        );
        Ok(())
    }

    /// Whether `caller` may speak for `node` (its stream, its drain progress, its certificate).
    ///
    /// With TLS: a certificate from this plane's CA naming the node (its common name), or a verified
    /// identity the mesh file gives the node. Without TLS nothing is proven; the stream and report
    /// rules make up for what they can.
    fn vouch(&self, caller: &Caller, node: &str) -> Result<(), Status> {
        if self.security.is_none() {
            return Ok(());
        }
        let Some(identity) = &caller.identity else {
            return Err(Status::unauthenticated(format!(
                "speaking for node `{node}` needs a client certificate from the mesh CA"
            )));
        };
        if caller.node.as_deref() == Some(node) {
            return Ok(());
        }
        let mesh = self.mesh.borrow().clone();
        if mesh.identities.iter().any(|e| e.matches(node) && e.identity == *identity) {
            return Ok(());
        }
        Err(Status::permission_denied(format!("{identity} may not speak for node `{node}`")))
    }

    /// Whether `caller` may report progress for `p.node_id`. Without TLS: only from the address of
    /// the node's own stream, or, for a node not connected, only the end of a drain (which can clear
    /// a mark but never set one).
    fn admit_report(&self, caller: &Caller, p: &pb::DrainProgress) -> Result<(), Status> {
        self.vouch(caller, &p.node_id)?;
        let st = self.lock();
        // A node the plane has never had a stream from has no drain to report, and keeping reports
        // for any id a caller makes up would let it grow the plane's memory without end.
        let known = st.sidecars.contains_key(&p.node_id)
            || st.last_progress.contains_key(&p.node_id)
            || st.draining.contains(&p.node_id);
        if !known {
            return Err(Status::failed_precondition(format!(
                "node `{}` has never connected to this plane; its drain progress is not taken",
                p.node_id
            )));
        }
        if self.security.is_some() {
            return Ok(());
        }
        match st.sidecars.get(&p.node_id) {
            Some(s) if s.caller.remote.map(|a| a.ip()) == caller.remote.map(|a| a.ip()) => Ok(()),
            Some(_) => {
                Err(Status::permission_denied(format!("node `{}` is connected from another address", p.node_id)))
            }
            None if matches!(phase_of(p), pb::DrainPhase::Drained | pb::DrainPhase::Cancelled) => Ok(()),
            None => Err(Status::permission_denied(format!(
                "node `{}` has no stream open; only its own stream's host may report its drain",
                p.node_id
            ))),
        }
    }

    /// Whether `caller` may use `MeshAdmin`: an operator identity, or, without TLS, loopback.
    fn admit_operator(&self, caller: &Caller) -> Result<(), Status> {
        match &self.security {
            Some(sec) => match &caller.identity {
                Some(id) if sec.operators.iter().any(|o| o == id) => Ok(()),
                Some(id) => Err(Status::permission_denied(format!("{id} is not an operator of this mesh"))),
                None => Err(Status::unauthenticated("MeshAdmin needs an operator's client certificate")),
            },
            None if caller.remote.is_none_or(|a| a.ip().is_loopback()) => Ok(()),
            None => Err(Status::permission_denied(
                "MeshAdmin answers loopback callers only on a plane without TLS (start it with --ca-dir)",
            )),
        }
    }

    /// Certificates this plane's CA has issued since it started.
    pub fn issued(&self) -> u64 {
        self.issued.load(Relaxed)
    }

    fn unregister(&self, node: &str, stream: u64) {
        let mut st = self.lock();
        if st.sidecars.get(node).is_some_and(|s| s.stream == stream) {
            st.sidecars.remove(node);
            tracing::info!(node, "Sidecar disconnected");
        }
    }

    fn record(&self, node: &str, stream: u64, f: impl FnOnce(&mut Sidecar)) {
        let mut st = self.lock();
        if let Some(s) = st.sidecars.get_mut(node).filter(|s| s.stream == stream) {
            f(s);
        }
    }

    /// A sidecar refused a directive set (NACK): the directives in it it had not accepted before go,
    /// and so does the draining mark they put on the node, unless the node is draining anyway (an
    /// accepted directive, or its own report). Otherwise every peer would keep avoiding a sidecar
    /// that never drained, and each later drain of it would be refused with the bad one. Watchers of
    /// a refused drain hear `DRAIN_PHASE_REFUSED` with the sidecar's reason.
    fn refuse_drains(&self, node: &str, stream: u64, sent: &[String], reason: &str) {
        let mut refused = Vec::new();
        let changed = {
            let mut st = self.lock();
            let Some(s) = st.sidecars.get(node).filter(|s| s.stream == stream) else { return };
            let accepted = s.acked_drains.clone();
            let rejected: Vec<&String> = sent.iter().filter(|d| !accepted.contains(*d)).collect();
            let mut changed = false;
            if let Some(ds) = st.directives.get_mut(node) {
                let before = ds.len();
                ds.retain(|d| !rejected.contains(&&d.drain_id));
                changed |= ds.len() != before;
                if ds.is_empty() {
                    st.directives.remove(node);
                }
            }
            let reported = st.last_progress.get(node).is_some_and(|p| {
                matches!(phase_of(p), pb::DrainPhase::Announcing | pb::DrainPhase::Closing | pb::DrainPhase::Deadline)
            });
            if !st.directives.contains_key(node) && !reported {
                changed |= st.draining.remove(node);
            }
            for id in rejected {
                let p = pb::DrainProgress {
                    node_id: node.to_string(),
                    drain_id: id.clone(),
                    phase: pb::DrainPhase::Refused as i32,
                    observed_at: Some(timestamp(SystemTime::now())),
                    refused_reason: reason.to_string(),
                    ..Default::default()
                };
                st.last_refused.insert(node.to_string(), p.clone());
                refused.push(p);
            }
            changed
        };
        if changed {
            tracing::info!(node, "Refused drain directives withdrawn");
            self.bump();
        }
        for p in refused {
            let _ = self.progress.send(p);
        }
    }

    /// Keeps what is held for departed nodes within [`MAX_DEPARTED`]: the oldest reports of nodes
    /// neither connected nor marked draining go first, then the oldest of any departed node.
    fn evict_departed(st: &mut State) {
        let departed = |st: &State| st.last_progress.keys().filter(|n| !st.sidecars.contains_key(*n)).count();
        while departed(st) > MAX_DEPARTED {
            let observed = |p: &pb::DrainProgress| p.observed_at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
            let oldest = st
                .last_progress
                .iter()
                .filter(|(n, _)| !st.sidecars.contains_key(*n))
                .min_by_key(|(n, p)| (st.draining.contains(*n), observed(p)))
                .map(|(n, _)| n.clone());
            let Some(node) = oldest else { break };
            st.last_progress.remove(&node);
            st.last_refused.remove(&node);
        }
        st.last_refused.retain(|n, _| st.sidecars.contains_key(n) || st.last_progress.contains_key(n));
    }

    /// Takes in a sidecar's drain progress: a draining sidecar's endpoints become draining for
    /// everyone; a drain that ended takes its directives with it.
    fn on_progress(&self, p: pb::DrainProgress) {
        let phase = phase_of(&p);
        let mut changed = false;
        let p = {
            let mut st = self.lock();
            let node = p.node_id.clone();
            // Late progress of a process the node has already replaced (its connection is not the new
            // process's, so nothing orders the two): it must not mark the new process draining.
            let current = st.sidecars.get(&node).and_then(|s| s.node.metadata.get(crate::control::INSTANCE_KEY));
            if current.is_some_and(|c| !p.instance.is_empty() && *c != p.instance) {
                tracing::info!(node = %node, instance = %p.instance, phase = ?phase, "Progress of a replaced process ignored");
                drop(st);
                let _ = self.progress.send(p);
                return;
            }
            match phase {
                pb::DrainPhase::Announcing | pb::DrainPhase::Closing | pb::DrainPhase::Deadline => {
                    changed |= st.draining.insert(node.clone());
                }
                pb::DrainPhase::Cancelled => {
                    changed |= st.draining.remove(&node);
                    changed |= st.directives.remove(&node).is_some();
                }
                pb::DrainPhase::Drained => {
                    changed |= st.directives.remove(&node).is_some();
                }
                pb::DrainPhase::Unspecified | pb::DrainPhase::Refused => {}
            }
            let mut p = p;
            if p.final_report_json.len() > MAX_REPORT_BYTES {
                tracing::warn!(node = %node, bytes = p.final_report_json.len(), "Drain report too large; not kept");
                p.final_report_json = serde_json::json!({
                    "omitted": format!("the report had {} bytes; the plane keeps at most {MAX_REPORT_BYTES}",
                        p.final_report_json.len())
                })
                .to_string();
            }
            if let Some(s) = st.sidecars.get_mut(&node) {
                s.drain = Some(p.clone());
            }
            st.last_progress.insert(node, p.clone());
            Self::evict_departed(&mut st);
            p
        };
        if changed {
            self.bump();
        }
        let _ = self.progress.send(p);
    }

    /// Serves every service on `listener` until the process ends: over TLS with a certificate from
    /// its own CA (renewed at 70 % of its life) when the plane has one.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), PlaneError> {
        let tls = match &self.security {
            None => None,
            Some(sec) => {
                let cert = Arc::new(crate::control::tls::ServingCert(arc_swap::ArcSwap::from_pointee(
                    serving_cert(sec).map_err(PlaneError::Tls)?,
                )));
                let roots = crate::control::tls::roots(sec.ca.bundle_pem().as_bytes()).map_err(PlaneError::Tls)?;
                let config = crate::control::tls::server_config(cert.clone(), roots).map_err(PlaneError::Tls)?;
                let weak = Arc::downgrade(&self);
                tokio::spawn(async move {
                    loop {
                        let Some(plane) = weak.upgrade() else { return };
                        let Some(sec) = &plane.security else { return };
                        let wait = sec.cert_life.mul_f64(0.7);
                        drop(plane);
                        tokio::time::sleep(wait).await;
                        let Some(plane) = weak.upgrade() else { return };
                        let Some(sec) = &plane.security else { return };
                        match serving_cert(sec) {
                            Ok(k) => {
                                cert.0.store(Arc::new(k));
                                tracing::info!("Control plane serving certificate renewed");
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "Cannot renew the control plane's serving certificate")
                            }
                        }
                    }
                });
                Some(config)
            }
        };
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // A sidecar that vanished without a FIN is noticed, and its node freed for its successor.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            // A sidecar's messages are small (its drain report is capped well below this): a larger
            // one is refused from its length prefix, before it is read into memory.
            .add_service(MeshControlServer::new(Handle(self.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .add_service(MeshAdminServer::new(Handle(self.clone())))
            .add_service(MeshIdentityServer::new(Handle(self)))
            .serve_with_incoming(crate::control::tls::incoming(listener, tls))
            .await
            .map_err(PlaneError::Serve)
    }
}

/// Why the plane stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Serve(#[from] tonic::transport::Error),
}

/// A new serving certificate for the plane, from its own CA.
fn serving_cert(sec: &Security) -> Result<rustls::sign::CertifiedKey, String> {
    let id = crate::control::ca::plane_id(sec.ca.trust_domain());
    let (issued, key) =
        sec.ca.issue_with_key(&id, "ebb-control-plane", sec.cert_life, &sec.names).map_err(|e| e.to_string())?;
    crate::control::tls::certified(&format!("{}{}", issued.cert_pem, sec.ca.bundle_pem()), &key)
}

/// The services' handle on the plane.
#[derive(Debug, Clone)]
pub struct Handle(pub Arc<Plane>);

/// One type's place on one stream.
#[derive(Debug, Default)]
struct Subscription {
    sent_version: Option<String>,
    sent_nonce: String,
    /// For the drain type: the drain ids of the set last sent, to know which a NACK refused.
    sent_drains: Vec<String>,
}

/// The drain ids of a directive set as sent.
fn drain_ids(resources: &[prost_types::Any]) -> Vec<String> {
    use prost::Message as _;
    resources.iter().filter_map(|a| pb::DrainDirective::decode(a.value.as_slice()).ok()).map(|d| d.drain_id).collect()
}

/// Serves one sidecar's stream until it ends.
async fn serve_stream(
    plane: Arc<Plane>,
    who: Caller,
    mut inbound: Streaming<pb::DiscoveryRequest>,
    tx: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
) {
    let first = match inbound.message().await {
        Ok(Some(m)) => m,
        _ => return,
    };
    let Some(node) = first.node.clone().filter(|n| !n.id.is_empty()) else {
        let _ = tx.send(Err(Status::invalid_argument("the first request must carry node.id"))).await;
        return;
    };
    let id = node.id.clone();
    let stream = plane.next();
    let identity = who.identity.clone().unwrap_or_default();
    if let Err(refused) = plane.vouch(&who, &id).and_then(|()| plane.register(node, stream, who)) {
        tracing::warn!(node = %id, %identity, reason = %refused.message(), "Sidecar stream refused");
        let _ = tx.send(Err(refused)).await;
        return;
    }
    tracing::info!(node = %id, %identity, "Sidecar connected");
    let mut subs: HashMap<String, Subscription> = HashMap::new();
    let mut changes = plane.changed.subscribe();
    let mut pending = Some(first);
    loop {
        let req = match pending.take() {
            Some(r) => Some(r),
            None => tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => Some(m),
                    _ => break,
                },
                c = changes.changed() => {
                    if c.is_err() { break }
                    None
                }
            },
        };
        let mut push: Vec<String> = Vec::new();
        match req {
            Some(r) => {
                let t = r.type_url.clone();
                match subs.get_mut(&t) {
                    None if r.response_nonce.is_empty() => {
                        subs.insert(t.clone(), Subscription::default());
                        push.push(t);
                    }
                    // A nonce the plane did not send last on this type: an answer to something
                    // superseded. Ignored, as xDS does.
                    Some(s) if !r.response_nonce.is_empty() && r.response_nonce != s.sent_nonce => {
                        tracing::debug!(node = %id, r#type = %t, nonce = %r.response_nonce, "Stale nonce ignored");
                    }
                    None => tracing::debug!(node = %id, r#type = %t, "Answer to a type never subscribed; ignored"),
                    Some(_) if r.response_nonce.is_empty() => push.push(t),
                    Some(sub) => match r.error_detail {
                        Some(e) => {
                            tracing::warn!(node = %id, r#type = %t, error = %e.message, "Sidecar refused config (NACK)");
                            plane.record(&id, stream, |s| s.last_nack = e.message.clone());
                            if t == DRAIN_TYPE {
                                plane.refuse_drains(&id, stream, &sub.sent_drains, &e.message);
                            }
                        }
                        None => plane.record(&id, stream, |s| {
                            s.acked.insert(t.clone(), r.version_info.clone());
                            if t == DRAIN_TYPE {
                                s.acked_drains = sub.sent_drains.iter().cloned().collect();
                            }
                        }),
                    },
                }
            }
            None => push.extend(subs.keys().cloned()),
        }
        for t in push {
            let (version, resources) = plane.snapshot(&id, &t);
            let Some(sub) = subs.get_mut(&t) else { continue };
            if sub.sent_version.as_deref() == Some(version.as_str()) {
                continue;
            }
            let nonce = plane.next().to_string();
            let res_resources = if t == DRAIN_TYPE { resources.clone() } else { Vec::new() };
            let res = pb::DiscoveryResponse {
                version_info: version.clone(),
                resources,
                type_url: t.clone(),
                nonce: nonce.clone(),
                control_plane_id: plane.id.clone(),
            };
            if tx.send(Ok(res)).await.is_err() {
                plane.unregister(&id, stream);
                return;
            }
            sub.sent_version = Some(version);
            sub.sent_nonce = nonce;
            if t == DRAIN_TYPE {
                sub.sent_drains = drain_ids(&res_resources);
            }
        }
    }
    plane.unregister(&id, stream);
}

#[tonic::async_trait]
impl MeshControl for Handle {
    type StreamResourcesStream = BoxStream<pb::DiscoveryResponse>;

    async fn stream_resources(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamResourcesStream>, Status> {
        // Bounded: a sidecar that stops reading blocks only its own stream's task.
        let (tx, rx) = mpsc::channel(16);
        let who = caller(&request);
        tokio::spawn(serve_stream(self.0.clone(), who, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_drain(
        &self,
        request: Request<Streaming<pb::DrainProgress>>,
    ) -> Result<Response<pb::ReportDrainResponse>, Status> {
        let who = caller(&request);
        let mut stream = request.into_inner();
        while let Some(p) = stream.message().await? {
            if let Err(refused) = self.0.admit_report(&who, &p) {
                tracing::warn!(node = %p.node_id, reason = %refused.message(), "Drain progress refused");
                return Err(refused);
            }
            tracing::info!(
                node = %p.node_id,
                drain_id = %p.drain_id,
                phase = ?phase_of(&p),
                connections = p.active_connections,
                in_flight = p.in_flight_requests,
                "Drain progress"
            );
            self.0.on_progress(p);
        }
        Ok(Response::new(pb::ReportDrainResponse {}))
    }
}

#[tonic::async_trait]
impl MeshAdmin for Handle {
    type WatchDrainStream = BoxStream<pb::DrainProgress>;

    async fn list_sidecars(
        &self,
        request: Request<pb::ListSidecarsRequest>,
    ) -> Result<Response<pb::ListSidecarsResponse>, Status> {
        self.0.admit_operator(&caller(&request))?;
        let st = self.0.lock();
        let mut sidecars: Vec<pb::SidecarInfo> = st
            .sidecars
            .values()
            .map(|s| pb::SidecarInfo {
                node: Some(s.node.clone()),
                connected_since: Some(timestamp(s.connected_since)),
                acked_versions: s.acked.clone(),
                last_nack: s.last_nack.clone(),
                drain: s.drain.clone(),
                marked_draining: st.draining.contains(&s.node.id),
                identity: s.caller.identity.clone().unwrap_or_default(),
            })
            .collect();
        // A node gone while marked draining still steers every peer away from its endpoints: shown.
        for node in st.draining.iter().filter(|n| !st.sidecars.contains_key(*n)) {
            sidecars.push(pb::SidecarInfo {
                node: Some(pb::Node { id: node.clone(), ..Default::default() }),
                drain: st.last_progress.get(node).cloned(),
                marked_draining: true,
                ..Default::default()
            });
        }
        sidecars.sort_by(|a, b| a.node.as_ref().map(|n| &n.id).cmp(&b.node.as_ref().map(|n| &n.id)));
        Ok(Response::new(pb::ListSidecarsResponse { sidecars }))
    }

    async fn drain_sidecar(
        &self,
        request: Request<pb::DrainSidecarRequest>,
    ) -> Result<Response<pb::DrainSidecarResponse>, Status> {
        self.0.admit_operator(&caller(&request))?;
        let r = request.into_inner();
        let drain_id = format!("{}-{}", r.node_id, self.0.next());
        let directive = pb::DrainDirective {
            drain_id: drain_id.clone(),
            scope: r.scope,
            deadline: r.deadline,
            reason: r.reason,
            issued_at: Some(timestamp(SystemTime::now())),
        };
        // The sidecar's own check, so that what the plane accepts the sidecar never refuses: a
        // directive it refused would stay in the node's set, and the set is taken all or nothing.
        crate::control::convert::directives(&[any(&directive)]).map_err(|e| Status::invalid_argument(e.0))?;
        let drain_id = {
            let mut st = self.0.lock();
            if !st.sidecars.contains_key(&r.node_id) {
                return Err(Status::not_found(format!("no sidecar `{}` is connected", r.node_id)));
            }
            st.directives.entry(r.node_id.clone()).or_default().push(directive);
            // Peers learn at once, before the sidecar has even started: they stop sending it new
            // requests while its listener still accepts.
            st.draining.insert(r.node_id.clone());
            drain_id
        };
        tracing::info!(node = %r.node_id, %drain_id, "Drain ordered");
        self.0.bump();
        Ok(Response::new(pb::DrainSidecarResponse { drain_id }))
    }

    async fn watch_drain(
        &self,
        request: Request<pb::WatchDrainRequest>,
    ) -> Result<Response<Self::WatchDrainStream>, Status> {
        self.0.admit_operator(&caller(&request))?;
        let req = request.into_inner();
        let (node, want) = (req.node_id, req.drain_id);
        let mut rx = self.0.progress.subscribe();
        let current = {
            let st = self.0.lock();
            let refused = st.last_refused.get(&node).filter(|p| !want.is_empty() && p.drain_id == want);
            refused.or_else(|| st.last_progress.get(&node)).cloned().filter(|p| want.is_empty() || p.drain_id == want)
        };
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            if let Some(p) = current {
                let last = matches!(
                    phase_of(&p),
                    pb::DrainPhase::Drained | pb::DrainPhase::Cancelled | pb::DrainPhase::Refused
                );
                if tx.send(Ok(p)).await.is_err() || last {
                    return;
                }
            }
            loop {
                let p = match rx.recv().await {
                    Ok(p) => p,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if p.node_id != node || (!want.is_empty() && p.drain_id != want) {
                    continue;
                }
                let last = matches!(
                    phase_of(&p),
                    pb::DrainPhase::Drained | pb::DrainPhase::Cancelled | pb::DrainPhase::Refused
                );
                if tx.send(Ok(p)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn set_endpoint_health(
        &self,
        request: Request<pb::SetEndpointHealthRequest>,
    ) -> Result<Response<pb::SetEndpointHealthResponse>, Status> {
        self.0.admit_operator(&caller(&request))?;
        let r = request.into_inner();
        let addr: SocketAddr =
            r.address.parse().map_err(|_| Status::invalid_argument(format!("`{}` is not ip:port", r.address)))?;
        let known = self
            .0
            .mesh
            .borrow()
            .clusters
            .iter()
            .any(|c| c.name == r.cluster && c.endpoints.iter().any(|e| e.addr == addr));
        if !known {
            return Err(Status::not_found(format!("cluster `{}` has no endpoint {addr}", r.cluster)));
        }
        {
            let mut st = self.0.lock();
            match pb::HealthStatus::try_from(r.health) {
                Ok(pb::HealthStatus::Healthy) => st.health.insert((r.cluster.clone(), addr), EndpointHealth::Healthy),
                Ok(pb::HealthStatus::Draining) => st.health.insert((r.cluster.clone(), addr), EndpointHealth::Draining),
                Ok(pb::HealthStatus::Unspecified) => st.health.remove(&(r.cluster.clone(), addr)),
                Err(_) => return Err(Status::invalid_argument("unknown health")),
            };
        }
        tracing::info!(cluster = %r.cluster, endpoint = %addr, health = r.health, "Endpoint health set");
        self.0.bump();
        Ok(Response::new(pb::SetEndpointHealthResponse {}))
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        self.0.admit_operator(&caller(&request))?;
        let name = request.into_inner().cluster;
        let st = self.0.lock();
        let cluster = self.0.clusters_now(&st).into_iter().find(|c| c.name == name);
        match cluster {
            Some(c) => Ok(Response::new(pb::ListEndpointsResponse { endpoints: c.endpoints })),
            None => Err(Status::not_found(format!("no cluster `{name}`"))),
        }
    }
}

/// SHA-256 of a token, hex: what the mesh file keeps instead of the token.
pub fn token_sha256(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl MeshIdentity for Handle {
    async fn issue_certificate(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        let who = caller(&request);
        let r = request.into_inner();
        let plane = &self.0;
        let Some(sec) = &plane.security else {
            return Err(Status::failed_precondition("this control plane has no CA (start it with --ca-dir)"));
        };
        if r.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id is required"));
        }
        let mesh = plane.mesh.borrow().clone();
        let entry = mesh.identities.iter().find(|e| e.matches(&r.node_id));
        // The node is proven by its token, or by the certificate it holds (a renewal).
        let identity = if !r.token.is_empty() {
            let hash = token_sha256(&r.token);
            match entry {
                Some(e) if e.token_sha256.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(&hash)) => {
                    e.identity.clone()
                }
                _ => {
                    tracing::warn!(node = %r.node_id, peer = ?who.remote, "Certificate refused: the bootstrap token is not this node's");
                    return Err(Status::permission_denied(format!(
                        "the bootstrap token is not valid for node `{}`",
                        r.node_id
                    )));
                }
            }
        } else {
            plane.vouch(&who, &r.node_id)?;
            match (entry, &who.identity) {
                (Some(e), _) => e.identity.clone(),
                (None, Some(id)) => id.clone(),
                (None, None) => return Err(Status::unauthenticated("a bootstrap token or a certificate is required")),
            }
        };
        let issued = sec
            .ca
            .sign_csr(&r.csr_pem, &identity, &r.node_id, sec.cert_life)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let n = plane.issued.fetch_add(1, Relaxed) + 1;
        tracing::info!(node = %r.node_id, %identity, renewal = r.token.is_empty(), issued = n, "Certificate issued");
        Ok(Response::new(pb::IssueCertificateResponse {
            certificate_chain_pem: issued.cert_pem,
            trust_bundle_pem: sec.ca.bundle_pem().to_string(),
            identity,
            not_before: Some(timestamp(issued.not_before)),
            not_after: Some(timestamp(issued.not_after)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, at: i64) -> pb::DrainProgress {
        pb::DrainProgress {
            node_id: node.into(),
            phase: pb::DrainPhase::Drained as i32,
            observed_at: Some(prost_types::Timestamp { seconds: at, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn what_is_kept_for_departed_nodes_is_bounded_oldest_first_marked_last() {
        let mut st = State::default();
        for i in 0..MAX_DEPARTED + 10 {
            st.last_progress.insert(format!("gone-{i}"), report(&format!("gone-{i}"), i as i64));
        }
        // The oldest is still marked draining: it outlives older-than-it unmarked ones.
        st.draining.insert("gone-0".into());
        st.last_refused.insert("gone-1".into(), report("gone-1", 1));
        Plane::evict_departed(&mut st);
        assert_eq!(st.last_progress.len(), MAX_DEPARTED);
        assert!(st.last_progress.contains_key("gone-0"), "a node marked draining is kept longest");
        for i in 1..=10 {
            assert!(!st.last_progress.contains_key(&format!("gone-{i}")), "gone-{i} is among the oldest");
        }
        assert!(st.last_refused.is_empty(), "a refusal goes with its node's report");
    }
}
