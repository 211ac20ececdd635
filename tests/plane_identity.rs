//! The control plane's CA and a plane that trusts identities, not claims (docs/architecture.md §15):
//! sidecars get their mesh identity from the plane with a bootstrap token, serve mTLS with it, renew it
//! under load without losing a request, and keep it across a plane restart; a caller can no longer speak
//! for a node it has not proved (a spoofed drain report, a second stream for a connected node), and
//! `MeshAdmin` wants an operator's certificate. The plane runs as the real `ebb control-plane` process
//! with a CA it makes itself; sidecars are real proxies on loopback.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ebb::config::{Config, Direction, MtlsMode};
use ebb::control::pb::{self, mesh_admin_client::MeshAdminClient, mesh_control_client::MeshControlClient};
use ebb::control::tls::{certified, ClientCert, Dial, DialTls};
use http::{Request, StatusCode};
use http_body_util::Full;
use support::plane::PlaneProcess;
use support::process::tempdir::Dir;
use support::{base_config, client, eventually, listener, origin};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const PLANE_ID: &str = "spiffe://cluster.local/ebb/control-plane";
const VIP: &str = "127.0.0.1:9";
const WEB_TOKEN: &str = "web-bootstrap-token-7f3a";
const CLIENT_TOKEN: &str = "client-bootstrap-token-91c2";
const WAIT: Duration = Duration::from_secs(10);

/// A plane with its own CA (made in `dir/ca` on first start), and the token files its sidecars hold.
struct Mesh {
    plane: PlaneProcess,
    dir: Dir,
}

impl Mesh {
    fn start(cert_life: &str) -> Self {
        let dir = Dir::new();
        std::fs::write(dir.0.join("web.token"), format!("{WEB_TOKEN}\n")).unwrap();
        std::fs::write(dir.0.join("client.token"), CLIENT_TOKEN).unwrap();
        std::fs::write(dir.0.join("wrong.token"), "not-a-token-of-this-mesh").unwrap();
        let extra =
            ["--ca-dir".to_string(), dir.0.join("ca").display().to_string(), "--cert-life".into(), cert_life.into()];
        let plane = PlaneProcess::start_with(&mesh_yaml(None), &extra);
        Self { plane, dir }
    }

    fn ca(&self, file: &str) -> PathBuf {
        self.dir.0.join("ca").join(file)
    }

    fn token(&self, name: &str) -> PathBuf {
        self.dir.0.join(format!("{name}.token"))
    }

    /// A sidecar config for `node`: the plane over TLS, its identity from the plane's CA.
    fn sidecar(&self, node: &str, token: &str) -> Config {
        let mut cfg = base_config();
        let cp = &mut cfg.control_plane;
        cp.address = Some(self.plane.https_url());
        cp.node_id = Some(node.into());
        cp.trust_bundle = Some(self.ca("ca.crt"));
        cp.token = Some(self.token(token));
        cp.backoff_base = Duration::from_millis(50);
        cp.backoff_max = Duration::from_millis(500);
        cfg
    }

    /// The server side, node `web-0`: an inbound listener in front of `app`, strict mTLS.
    async fn server(&self, app: SocketAddr) -> ebb::app::Running {
        let mut cfg = self.sidecar("web-0", "web");
        let mut l = listener("in", app, Direction::Inbound);
        l.detect_timeout = Duration::from_millis(300);
        l.mtls = MtlsMode::Strict;
        cfg.listeners.push(l);
        cfg.validate().expect("valid server config");
        ebb::telemetry::init_logging(&cfg.log);
        ebb::app::start(cfg).await.expect("server Ebb starts")
    }

    /// The client side, node `client-0`: an outbound listener; the `web` cluster comes from the plane.
    async fn client(&self) -> ebb::app::Running {
        let mut cfg = self.sidecar("client-0", "client");
        let mut l = listener("out", VIP.parse().unwrap(), Direction::Outbound);
        l.detect_timeout = Duration::from_millis(300);
        cfg.listeners.push(l);
        cfg.validate().expect("valid client config");
        ebb::app::start(cfg).await.expect("client Ebb starts")
    }

    /// A dial of the plane over TLS presenting `cert` (none: no client certificate).
    fn dial(&self, cert: Option<Arc<rustls::sign::CertifiedKey>>) -> Dial {
        let bundle = std::fs::read(self.ca("ca.crt")).unwrap();
        let client: Option<ClientCert> = cert.map(|k| Arc::new(move || Some(k.clone())) as ClientCert);
        Dial::new(&self.plane.https_url(), WAIT, Some(DialTls::new(&bundle, PLANE_ID, client).unwrap())).unwrap()
    }

    /// The operator, with the certificate the plane wrote beside its CA.
    async fn operator(&self) -> MeshAdminClient<tonic::transport::Channel> {
        let read = |f: &str| std::fs::read_to_string(self.ca(f)).unwrap();
        let key = Arc::new(certified(&read("operator.crt"), &read("operator.key")).unwrap());
        MeshAdminClient::new(self.dial(Some(key)).channel().await.unwrap())
    }
}

/// The mesh file: which identity each node gets and the hash of its token; `web` at `web_in`.
fn mesh_yaml(web_in: Option<SocketAddr>) -> String {
    let hash = ebb::control::plane::token_sha256;
    let mut y = format!(
        "identities:\n  - {{ node: \"web-*\", identity: \"{WEB}\", token_sha256: \"{}\" }}\n  \
         - {{ node: \"client-*\", identity: \"{CLIENT}\", token_sha256: \"{}\" }}\n",
        hash(WEB_TOKEN),
        hash(CLIENT_TOKEN)
    );
    match web_in {
        Some(addr) => y.push_str(&format!(
            "clusters:\n  - name: web\n    addresses: [\"{VIP}\"]\n    endpoints:\n      \
             - {{ addr: \"{addr}\", identity: \"{WEB}\", node: web-0 }}\n"
        )),
        None => y.push_str("clusters: []\n"),
    }
    y
}

/// One GET on a fresh HTTP/1.1 connection: status and `x-ebb-error`.
async fn get(addr: SocketAddr) -> (StatusCode, String) {
    let (mut tx, _task) = client::h1(addr).await;
    let req = Request::get("/").header("host", "web.test").body(Full::new(Bytes::new())).unwrap();
    match tx.send_request(req).await {
        Ok(res) => {
            let cause = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
            (res.status(), cause)
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("client error: {e}")),
    }
}

async fn identity(ebb: &ebb::app::Running) -> serde_json::Value {
    client::json(ebb.admin.unwrap(), "/status").await["identity"].clone()
}

async fn serial(ebb: &ebb::app::Running) -> String {
    identity(ebb).await["serial"].as_str().unwrap_or_default().to_string()
}

/// A server and a client sidecar with plane-issued identities, `web` pointing at the server.
async fn two_sidecars(mesh: &Mesh) -> (origin::Origin, ebb::app::Running, ebb::app::Running) {
    let app = origin::http1("web").await;
    let server = mesh.server(app.addr).await;
    mesh.plane.write_mesh(&mesh_yaml(server.addr("in")));
    let client = mesh.client().await;
    let out = client.addr("out").unwrap();
    assert!(eventually(WAIT, async || get(out).await.0 == StatusCode::OK).await, "the mesh serves over mTLS");
    (app, server, client)
}

fn token_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_its_token_gets_an_identity_and_the_mesh_serves_mtls_with_it() {
    let mesh = Mesh::start("24h");
    let (_app, server, client) = two_sidecars(&mesh).await;
    assert_eq!(identity(&server).await["id"], WEB);
    assert_eq!(identity(&client).await["id"], CLIENT);
    let expires = identity(&client).await["seconds_to_expiry"].as_i64().unwrap();
    assert!((86_000..=86_400).contains(&expires), "a 24 h certificate: {expires} s left");
    // The server knows its caller by the identity the plane gave it.
    let peers: Vec<_> = server.track.snapshot().into_iter().filter_map(|c| c.peer_identity).collect();
    assert!(peers.iter().any(|p| p == CLIENT), "{peers:?}");

    // A token that is not the node's: no identity, and the start says why.
    let mut cfg = mesh.sidecar("web-1", "wrong");
    cfg.listeners.push(listener("in", "127.0.0.1:9".parse().unwrap(), Direction::Inbound));
    let err = ebb::app::start(cfg).await.expect_err("a bad token does not start");
    assert!(err.to_string().contains("the bootstrap token is not valid for node `web-1`"), "{err}");
    // Nor does the right token for another node's family.
    let mut cfg = mesh.sidecar("web-1", "client");
    cfg.listeners.push(listener("in", "127.0.0.1:9".parse().unwrap(), Direction::Inbound));
    assert!(ebb::app::start(cfg).await.is_err(), "client's token cannot make a web identity");

    // The operator lists both sidecars with the identities their streams proved; `ebb ctl` needs
    // the operator's certificate to do so.
    let url = mesh.plane.https_url();
    let (ca, cert, key) = (mesh.ca("ca.crt"), mesh.ca("operator.crt"), mesh.ca("operator.key"));
    let args = |with_cert: bool| {
        let mut a = vec!["--trust-bundle".to_string(), ca.display().to_string()];
        if with_cert {
            a.extend(["--cert".into(), cert.display().to_string(), "--key".into(), key.display().to_string()]);
        }
        a.extend(["--json".into(), "sidecars".into()]);
        a
    };
    let run = |with_cert: bool| {
        let a = args(with_cert);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        support::plane::ctl(&url, &a, WAIT)
    };
    let out = run(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["node_id"].as_str().unwrap().to_string(), s["identity"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(ids, [("client-0".to_string(), CLIENT.to_string()), ("web-0".to_string(), WEB.to_string())]);
    let out = run(false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MeshAdmin needs an operator's client certificate"));
}

/// The two attacks an unauthenticated plane allowed, each refused: a drain report for another node
/// (which marked its endpoints draining for every peer), and a second stream claiming a connected
/// node (which replaced the real sidecar, then removed it when the impostor left). A workload's own
/// certificate is not an operator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_speak_for_a_node_it_has_not_proved() {
    let mesh = Mesh::start("24h");
    let (_app, server, _client) = two_sidecars(&mesh).await;
    let mut operator = mesh.operator().await;

    // An impostor with a genuine identity of the mesh (the client family's token), and one with none.
    let anonymous = mesh.dial(None);
    let loaded = ebb::control::enroll::obtain(&anonymous, "client-9", &token_of(&mesh.token("client"))).await.unwrap();
    assert_eq!(loaded.info.id, CLIENT);
    let impostor = mesh.dial(Some(loaded.key.clone()));

    let spoof = || pb::DrainProgress {
        node_id: "web-0".into(),
        phase: pb::DrainPhase::Announcing as i32,
        ..Default::default()
    };
    let mut c = MeshControlClient::new(anonymous.channel().await.unwrap());
    let refused = c.report_drain(tokio_stream::iter([spoof()])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let mut c = MeshControlClient::new(impostor.channel().await.unwrap());
    let refused = c.report_drain(tokio_stream::iter([spoof()])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("may not speak for node `web-0`"), "{}", refused.message());

    // The impostor claims web-0's stream.
    let node = pb::Node { id: "web-0".into(), ..Default::default() };
    let first =
        pb::DiscoveryRequest { node: Some(node), type_url: ebb::control::CLUSTER_TYPE.into(), ..Default::default() };
    let mut res = c.stream_resources(tokio_stream::iter([first])).await.unwrap().into_inner();
    let refused = tokio::time::timeout(WAIT, res.message()).await.expect("an answer in time").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    drop(res);

    // Nothing changed: web-0's endpoint is healthy for its peers, web-0 is the sidecar listed (with
    // its identity), not draining, and a drain through the plane reaches it.
    let eps = operator.list_endpoints(pb::ListEndpointsRequest { cluster: "web".into() }).await.unwrap().into_inner();
    assert_eq!(eps.endpoints[0].health, pb::HealthStatus::Healthy as i32, "{eps:?}");
    let list = operator.list_sidecars(pb::ListSidecarsRequest {}).await.unwrap().into_inner().sidecars;
    let web0 = list.iter().find(|s| s.node.as_ref().unwrap().id == "web-0").expect("web-0 listed");
    assert_eq!((web0.identity.as_str(), web0.marked_draining), (WEB, false));
    assert!(web0.connected_since.is_some());
    let drain = pb::DrainSidecarRequest { node_id: "web-0".into(), reason: "test".into(), ..Default::default() };
    operator.drain_sidecar(drain).await.expect("web-0 is connected and drains");
    assert!(
        eventually(WAIT, async || client::json(server.admin.unwrap(), "/drain").await["phase"] != "serving").await,
        "the real web-0 got the directive"
    );

    // MeshAdmin: a workload certificate is not an operator's; no certificate is nobody.
    let refused = MeshAdminClient::new(impostor.channel().await.unwrap())
        .list_sidecars(pb::ListSidecarsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = MeshAdminClient::new(anonymous.channel().await.unwrap())
        .list_sidecars(pb::ListSidecarsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
}

/// Without TLS nothing is proven, but another host still cannot take a connected node's place or
/// report its drain (the test's "other host" is 127.0.0.2, the sidecar's is 127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plane_without_tls_refuses_another_hosts_claims_on_a_connected_node() {
    let app = origin::http1("web").await;
    let plane = PlaneProcess::start(&support::plane::mesh_yaml(&[]));
    let mut cfg = base_config();
    cfg.listeners.push(listener("in", app.addr, Direction::Inbound));
    cfg.control_plane.address = Some(plane.url());
    cfg.control_plane.node_id = Some("web-0".into());
    let _web0 = ebb::app::start(cfg).await.expect("sidecar starts");
    assert!(
        eventually(WAIT, async || support::plane::node_ids(&support::plane::sidecars(&plane.url()).await) == ["web-0"])
            .await
    );

    let other = tonic::transport::Endpoint::from_shared(plane.url())
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    let mut c = MeshControlClient::new(other);
    let spoof =
        pb::DrainProgress { node_id: "web-0".into(), phase: pb::DrainPhase::Announcing as i32, ..Default::default() };
    let refused = c.report_drain(tokio_stream::iter([spoof])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let node = pb::Node { id: "web-0".into(), ..Default::default() };
    let first =
        pb::DiscoveryRequest { node: Some(node), type_url: ebb::control::CLUSTER_TYPE.into(), ..Default::default() };
    let mut res = c.stream_resources(tokio_stream::iter([first])).await.unwrap().into_inner();
    let refused = tokio::time::timeout(WAIT, res.message()).await.expect("an answer in time").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");

    let list = support::plane::sidecars(&plane.url()).await;
    assert_eq!(support::plane::node_ids(&list), ["web-0"]);
    assert!(!list[0].marked_draining && list[0].connected_since.is_some(), "{list:?}");
}

/// Certificates that live 12 s: both sidecars renew under load (fresh connections, so every request
/// is a new pair of handshakes) and not one request fails; the plane restarts, the sidecars come back
/// on their certificates (no token needed) and the next renewal works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_under_load_loses_nothing_and_a_restarted_plane_keeps_the_identities() {
    let mut mesh = Mesh::start("12s");
    let (app, server, client) = two_sidecars(&mesh).await;
    let (s0, c0) = (serial(&server).await, serial(&client).await);
    let out = client.addr("out").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..20_000 {
                if stop.load(SeqCst) {
                    break;
                }
                match get(out).await {
                    (StatusCode::OK, _) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        }));
    }
    let renewed =
        eventually(Duration::from_secs(25), async || serial(&server).await != s0 && serial(&client).await != c0).await;
    let at = app.hits.load(SeqCst);
    assert!(eventually(WAIT, async || app.hits.load(SeqCst) >= at + 20).await);
    stop.store(true, SeqCst);
    let mut total = 0;
    for (ok, failed) in support::joined(workers).await {
        assert!(failed.is_empty(), "requests failed across the renewal: {failed:?}");
        total += ok;
    }
    assert!(renewed, "both sidecars renewed within 25 s");
    assert!(total >= 40, "{total} requests");
    // Counted at the identity watch's next look (once a second).
    let metrics = async || client::fetch(server.telemetry.unwrap(), "GET", "/metrics").await.1;
    let counted = eventually(WAIT, async || support::sample(&metrics().await, "ebb_identity_reloads_total") >= 1).await;
    assert!(counted, "renewals are counted");

    // The plane restarts on the same CA: the sidecars reconnect proving their nodes by certificate.
    mesh.plane.kill();
    mesh.plane.restart();
    let mut operator = mesh.operator().await;
    let connected = eventually(WAIT, async || {
        let list = operator.list_sidecars(pb::ListSidecarsRequest {}).await.unwrap().into_inner().sidecars;
        let ids: Vec<_> = list.iter().map(|s| (s.node.as_ref().unwrap().id.clone(), s.identity.clone())).collect();
        ids == [("client-0".to_string(), CLIENT.to_string()), ("web-0".to_string(), WEB.to_string())]
    })
    .await;
    assert!(connected, "both sidecars are back on the restarted plane with their identities");
    let s1 = serial(&server).await;
    assert!(
        eventually(Duration::from_secs(15), async || serial(&server).await != s1).await,
        "renewal after the restart"
    );
    assert_eq!(get(out).await.0, StatusCode::OK);
}
