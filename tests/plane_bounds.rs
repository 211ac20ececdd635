//! The control plane within bounds (issue 23, part 2): it takes only drains a sidecar would take, a
//! refusal takes the drain (and the draining mark) back and ends `ebb ctl drain --wait`, and what it
//! keeps per node is bounded. A raw gRPC client plays the sidecar, so the test decides what it ACKs.

mod support;

use std::time::Duration;

use ebb::control::pb::mesh_control_client::MeshControlClient;
use ebb::control::pb::{self, DrainPhase};
use ebb::control::plane::Plane;
use ebb::control::source::{MeshConfig, StaticSource};
use ebb::control::DRAIN_TYPE;
use support::plane as cp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(5);

/// A sidecar's stream subscribed to drain directives, answered by the test.
struct RawSidecar {
    tx: mpsc::Sender<pb::DiscoveryRequest>,
    responses: tonic::Streaming<pb::DiscoveryResponse>,
}

impl RawSidecar {
    async fn connect(url: &str, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let node = pb::Node { id: node.into(), ..Default::default() };
        tx.send(pb::DiscoveryRequest { node: Some(node), type_url: DRAIN_TYPE.into(), ..Default::default() })
            .await
            .unwrap();
        let mut control = MeshControlClient::connect(url.to_string()).await.unwrap();
        let responses = control.stream_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Self { tx, responses }
    }

    /// The next directive set the plane sends, as drain ids.
    async fn next(&mut self) -> (pb::DiscoveryResponse, Vec<String>) {
        use prost::Message as _;
        let r =
            tokio::time::timeout(WAIT, self.responses.message()).await.expect("a response in time").unwrap().unwrap();
        let ids =
            r.resources.iter().map(|a| pb::DrainDirective::decode(a.value.as_slice()).unwrap().drain_id).collect();
        (r, ids)
    }

    async fn answer(&self, r: &pb::DiscoveryResponse, nack: Option<&str>) {
        let req = pb::DiscoveryRequest {
            version_info: r.version_info.clone(),
            type_url: DRAIN_TYPE.into(),
            response_nonce: r.nonce.clone(),
            error_detail: nack.map(|m| pb::ErrorDetail { code: 3, message: m.into() }),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }
}

async fn plane() -> (String, StaticSource) {
    let source = StaticSource::new(MeshConfig::default());
    let plane = Plane::new(&source);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(plane.serve(l));
    (url, source)
}

async fn marked_draining(url: &str, node: &str) -> Option<bool> {
    let list = cp::sidecars(url).await;
    list.iter().find(|s| s.node.as_ref().is_some_and(|n| n.id == node)).map(|s| s.marked_draining)
}

fn drain(node: &str, deadline: Option<(i64, i32)>, scope: i32) -> pb::DrainSidecarRequest {
    pb::DrainSidecarRequest {
        node_id: node.into(),
        deadline: deadline.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        reason: "test".into(),
        scope,
    }
}

/// What the sidecar would NACK the plane refuses, naming the field, and the node stays unmarked.
/// Before, a deadline of 3600 s + 999 999 999 ns (or 0 s + 2 000 000 000 ns) and an unknown scope
/// were accepted: the node was marked draining for every peer, the sidecar NACKed the set, and every
/// later valid drain of the node was NACKed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plane_refuses_a_drain_the_sidecar_would_refuse() {
    let (url, _source) = plane().await;
    let mut side = RawSidecar::connect(&url, "raw-0").await;
    let (first, ids) = side.next().await;
    assert!(ids.is_empty());
    side.answer(&first, None).await;
    let mut admin = cp::admin(&url).await;
    let inbound = pb::DrainScope::Inbound as i32;
    for (req, field) in [
        (drain("raw-0", Some((3600, 999_999_999)), inbound), "deadline: must be at most 1h"),
        (drain("raw-0", Some((0, 2_000_000_000)), inbound), "deadline: nanos must be below"),
        (drain("raw-0", None, 7), "scope: unknown value 7"),
    ] {
        let e = admin.drain_sidecar(req).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    assert_eq!(marked_draining(&url, "raw-0").await, Some(false));
    // A valid drain goes through, alone in the set the sidecar gets.
    let id = admin.drain_sidecar(drain("raw-0", Some((3600, 0)), inbound)).await.unwrap().into_inner().drain_id;
    let (_, ids) = side.next().await;
    assert_eq!(ids, [id]);
    assert_eq!(marked_draining(&url, "raw-0").await, Some(true));
}

/// A directive set the sidecar refuses (NACK) is taken back: the refused drain leaves the set, the node
/// its draining mark, and a watch of that drain ends with DRAIN_PHASE_REFUSED and the sidecar's reason;
/// `ebb ctl drain --wait` exits 4 saying why, and with `--timeout` it gives up (exit 5) on a drain
/// that never reports. Before, the mark stayed, the bad directive poisoned every later drain of the
/// node, and `--wait` printed nothing for ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_drain_is_taken_back_and_a_waiting_ctl_says_why() {
    let (url, _source) = plane().await;
    let mut side = RawSidecar::connect(&url, "raw-0").await;
    let (first, _) = side.next().await;
    side.answer(&first, None).await;
    let mut admin = cp::admin(&url).await;
    let inbound = pb::DrainScope::Inbound as i32;
    let id = admin.drain_sidecar(drain("raw-0", None, inbound)).await.unwrap().into_inner().drain_id;
    let (set, ids) = side.next().await;
    assert_eq!(ids, std::slice::from_ref(&id));
    assert_eq!(marked_draining(&url, "raw-0").await, Some(true), "marked as soon as ordered");
    side.answer(&set, Some("drain: not today")).await;
    // The set without it comes back, and the mark goes.
    let (again, ids) = side.next().await;
    assert!(ids.is_empty(), "{ids:?}");
    side.answer(&again, None).await;
    assert!(support::eventually(WAIT, async || marked_draining(&url, "raw-0").await == Some(false)).await);
    // A watch that starts after the refusal still hears it.
    let mut watch = admin
        .watch_drain(pb::WatchDrainRequest { node_id: "raw-0".into(), drain_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let p = tokio::time::timeout(WAIT, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((p.phase(), p.refused_reason.as_str()), (DrainPhase::Refused, "drain: not today"));

    // `ebb ctl drain --wait`: refused, exit 4 with the reason.
    let ctl_url = url.clone();
    let ctl =
        tokio::task::spawn_blocking(move || cp::ctl(&ctl_url, &["drain", "raw-0", "--wait"], Duration::from_secs(30)));
    let (set, ids) = side.next().await;
    assert_eq!(ids.len(), 1);
    side.answer(&set, Some("drain: still not")).await;
    let out = ctl.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("refused drain") && stderr.contains("drain: still not"), "{stderr}");
    let (again, _) = side.next().await;
    side.answer(&again, None).await;

    // Accepted but never reported: `--timeout` ends the wait, exit 5.
    let ctl_url = url.clone();
    let ctl = tokio::task::spawn_blocking(move || {
        cp::ctl(&ctl_url, &["drain", "raw-0", "--wait", "--timeout", "1s"], Duration::from_secs(30))
    });
    let (set, ids) = side.next().await;
    assert_eq!(ids.len(), 1);
    side.answer(&set, None).await;
    let out = ctl.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("did not end within 1s"), "{stderr}");
}

fn progress(node: &str, report: usize) -> pb::DrainProgress {
    pb::DrainProgress {
        node_id: node.into(),
        phase: DrainPhase::Drained as i32,
        final_report_json: format!("{{\"pad\":\"{}\"}}", "x".repeat(report)),
        ..Default::default()
    }
}

async fn report(url: &str, p: pb::DrainProgress) -> Result<(), tonic::Status> {
    let mut control = MeshControlClient::connect(url.to_string()).await.unwrap();
    control.report_drain(tokio_stream::iter([p])).await.map(|_| ())
}

/// The plane takes drain progress only for nodes it has had a stream from, refuses a message over
/// 1 MiB from its length, and keeps at most 256 KiB of a report. Before, 30 reports of 3 MB under new
/// node ids took it from 12 to 118 MB, never released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plane_keeps_nothing_for_strangers_and_bounds_what_it_keeps() {
    let (url, _source) = plane().await;
    let e = report(&url, progress("ghost-1", 10)).await.expect_err("a stranger's progress");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(cp::sidecars(&url).await.is_empty(), "nothing kept for ghost-1");

    let mut side = RawSidecar::connect(&url, "raw-0").await;
    let (first, _) = side.next().await;
    side.answer(&first, None).await;
    let e = report(&url, progress("raw-0", 3_000_000)).await.expect_err("3 MB");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    report(&url, progress("raw-0", 400 * 1024)).await.unwrap();
    let list = cp::sidecars(&url).await;
    let kept = &list[0].drain.as_ref().unwrap().final_report_json;
    assert!(kept.len() < 1024 && kept.contains("omitted"), "{kept}");
}
