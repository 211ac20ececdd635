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
use crate::control::convert::{any, cluster_to_pb};
use crate::control::pb;
use crate::control::pb::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use crate::control::pb::mesh_control_server::{MeshControl, MeshControlServer};
use crate::control::source::{ConfigSource, MeshConfig};
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
    last_nack: String,
    drain: Option<pb::DrainProgress>,
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
    /// Last drain progress by node, kept after it disconnects (so a restarted pod is recognised).
    last_progress: HashMap<String, pb::DrainProgress>,
}

/// The plane's state, shared by every stream and admin call.
#[derive(Debug)]
pub struct Plane {
    id: String,
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
    /// A plane serving what `source` says, now and as it changes.
    pub fn new(source: &dyn ConfigSource) -> Arc<Self> {
        let mesh = source.watch();
        let plane = Arc::new(Self {
            id: format!("ebb-control-plane-{}", std::process::id()),
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
    fn register(&self, node: pb::Node, stream: u64) {
        let mut st = self.lock();
        let id = node.id.clone();
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
                last_nack: String::new(),
                drain: None,
            },
        );
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

    /// Takes in a sidecar's drain progress: a draining sidecar's endpoints become draining for
    /// everyone; a drain that ended takes its directives with it.
    fn on_progress(&self, p: pb::DrainProgress) {
        let phase = phase_of(&p);
        let mut changed = false;
        {
            let mut st = self.lock();
            let node = p.node_id.clone();
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
                pb::DrainPhase::Unspecified => {}
            }
            if let Some(s) = st.sidecars.get_mut(&node) {
                s.drain = Some(p.clone());
            }
            st.last_progress.insert(node, p.clone());
        }
        if changed {
            self.bump();
        }
        let _ = self.progress.send(p);
    }

    /// Serves both services on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(MeshControlServer::new(Handle(self.clone())))
            .add_service(MeshAdminServer::new(Handle(self)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    }
}

/// The services' handle on the plane.
#[derive(Debug, Clone)]
pub struct Handle(pub Arc<Plane>);

/// One type's place on one stream.
#[derive(Debug, Default)]
struct Subscription {
    sent_version: Option<String>,
    sent_nonce: String,
}

/// Serves one sidecar's stream until it ends.
async fn serve_stream(
    plane: Arc<Plane>,
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
    plane.register(node, stream);
    tracing::info!(node = %id, "Sidecar connected");
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
                    Some(_) => match r.error_detail {
                        Some(e) => {
                            tracing::warn!(node = %id, r#type = %t, error = %e.message, "Sidecar refused config (NACK)");
                            plane.record(&id, stream, |s| s.last_nack = e.message.clone());
                        }
                        None => plane.record(&id, stream, |s| {
                            s.acked.insert(t.clone(), r.version_info.clone());
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
        tokio::spawn(serve_stream(self.0.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_drain(
        &self,
        request: Request<Streaming<pb::DrainProgress>>,
    ) -> Result<Response<pb::ReportDrainResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(p) = stream.message().await? {
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
        _request: Request<pb::ListSidecarsRequest>,
    ) -> Result<Response<pb::ListSidecarsResponse>, Status> {
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
            })
            .collect();
        sidecars.sort_by(|a, b| a.node.as_ref().map(|n| &n.id).cmp(&b.node.as_ref().map(|n| &n.id)));
        Ok(Response::new(pb::ListSidecarsResponse { sidecars }))
    }

    async fn drain_sidecar(
        &self,
        request: Request<pb::DrainSidecarRequest>,
    ) -> Result<Response<pb::DrainSidecarResponse>, Status> {
        let r = request.into_inner();
        let drain_id = {
            let mut st = self.0.lock();
            if !st.sidecars.contains_key(&r.node_id) {
                return Err(Status::not_found(format!("no sidecar `{}` is connected", r.node_id)));
            }
            if let Some(d) = &r.deadline {
                if d.seconds < 0 || d.nanos < 0 || d.seconds > 3600 {
                    return Err(Status::invalid_argument("deadline must be between 0s and 1h"));
                }
            }
            let drain_id = format!("{}-{}", r.node_id, self.0.next());
            let directive = pb::DrainDirective {
                drain_id: drain_id.clone(),
                scope: r.scope,
                deadline: r.deadline,
                reason: r.reason,
                issued_at: Some(timestamp(SystemTime::now())),
            };
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
        let req = request.into_inner();
        let (node, want) = (req.node_id, req.drain_id);
        let mut rx = self.0.progress.subscribe();
        let current = self.0.lock().last_progress.get(&node).cloned().filter(|p| want.is_empty() || p.drain_id == want);
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            if let Some(p) = current {
                let last = matches!(phase_of(&p), pb::DrainPhase::Drained | pb::DrainPhase::Cancelled);
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
                let last = matches!(phase_of(&p), pb::DrainPhase::Drained | pb::DrainPhase::Cancelled);
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
        let name = request.into_inner().cluster;
        let st = self.0.lock();
        let cluster = self.0.clusters_now(&st).into_iter().find(|c| c.name == name);
        match cluster {
            Some(c) => Ok(Response::new(pb::ListEndpointsResponse { endpoints: c.endpoints })),
            None => Err(Status::not_found(format!("no cluster `{name}`"))),
        }
    }
}
