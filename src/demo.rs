//! `ebb demo`: a whole mesh on one machine, without root, Kubernetes or iptables. Real `ebb`
//! processes (the control plane, an inbound Ebb per server pod, the client's outbound Ebb) and a
//! built-in app and load generator; the server pods are drained and restarted one after another
//! under steady load, and the demo counts every request (docs/architecture.md §14).

pub mod app;
pub mod load;
pub mod pods;
pub mod view;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;

use crate::control::pb::{self, mesh_admin_client::MeshAdminClient};
use load::Kind;
use pods::{base_yaml, Proc, Workdir};
use view::{Board, PodView};

/// How a pod's drain is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoTrigger {
    /// `ebb ctl drain`: a drain directive from the control plane
    ControlPlane,
    /// SIGTERM, as Kubernetes sends a container
    Sigterm,
    /// The admin API (`POST /drain?exit=1`, what `ebb drain --exit` calls)
    Admin,
}

impl DemoTrigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::ControlPlane => "control-plane",
            Self::Sigterm => "sigterm",
            Self::Admin => "admin",
        }
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(3600) {
        return Err("at most 1h".into());
    }
    Ok(d)
}

/// `ebb demo`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// How long the load runs; the restarts are spread over it
    #[arg(long, value_parser = duration, default_value = "20s")]
    pub duration: Duration,
    /// Requests a second, all protocols together (each worker waits for its answer, so it is a ceiling)
    #[arg(long, default_value_t = 400)]
    pub rate: u32,
    /// The app's time to answer each request (a gRPC stream spreads its messages over it)
    #[arg(long, value_parser = duration, default_value = "20ms")]
    pub latency: Duration,
    /// Response size in bytes
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// What the client sends: any of http1, http2, grpc (unary and server-streaming)
    #[arg(long, default_value = "http1,http2,grpc")]
    pub protocols: String,
    /// Server pods, each an app behind its own inbound Ebb (1-8)
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Rolling restarts: one pod after another is drained, exits, and is started again (default: one
    /// per pod)
    #[arg(long)]
    pub restarts: Option<usize>,
    /// How each drain is started; several (comma-separated) take turns
    #[arg(long, value_enum, value_delimiter = ',', default_value = "control-plane")]
    pub trigger: Vec<DemoTrigger>,
    /// The pods' drain announce phase (listeners still accept; everyone is told to go)
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub announce: Duration,
    /// The pods' drain deadline
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Print the whole result as JSON (for scripts) instead of the view and summary
    #[arg(long)]
    pub json: bool,
    /// Kill pods with SIGKILL instead of draining them: what a drain saves you from (the demo fails)
    #[arg(long)]
    pub kill: bool,
    /// Keep the processes' configs and logs (their directory is printed)
    #[arg(long)]
    pub keep_logs: bool,
    /// Mesh traffic over mTLS, every pod's identity issued by the plane's CA (`--mtls false`: plaintext)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub mtls: bool,
    /// Life of the certificates the plane issues: short, so that renewals happen under the load
    #[arg(long, value_parser = cert_life, default_value = "15s")]
    pub cert_life: Duration,
}

fn cert_life(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < crate::control::ca::MIN_CERT_LIFE {
        return Err(format!("at least {}", humantime::format_duration(crate::control::ca::MIN_CERT_LIFE)));
    }
    Ok(d)
}

/// The demo's identities: every server pod shares one (a Deployment's service account), the client
/// has its own.
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// What mTLS did in the demo.
#[derive(Debug, Default, Serialize)]
pub struct MtlsOutcome {
    /// Mesh TLS handshakes the client's Ebb completed (each a verified server identity).
    pub handshakes: u64,
    /// Certificates the plane's CA issued on a bootstrap token (a pod's start).
    pub certificates_issued: u64,
    /// Certificates renewed by a sidecar proving the one it held.
    pub certificates_renewed: u64,
}

/// How the demo's sidecars reach the plane and prove who they are.
struct PlaneLink {
    /// `http://` or `https://` and the plane's address.
    url: String,
    tls: Option<LinkTls>,
}

/// The plane's CA directory and the demo's two bootstrap tokens (made up for this run).
struct LinkTls {
    ca_dir: PathBuf,
    pods_token: (PathBuf, String),
    client_token: (PathBuf, String),
}

impl PlaneLink {
    /// The `control_plane` keys for a sidecar; `client` picks the client's token.
    fn yaml(&self, client: bool) -> String {
        match &self.tls {
            None => format!("address: \"{}\"", self.url),
            Some(t) => format!(
                "address: \"{}\", trust_bundle: \"{}\", token: \"{}\"",
                self.url,
                t.ca_dir.join("ca.crt").display(),
                if client { &t.client_token.0 } else { &t.pods_token.0 }.display()
            ),
        }
    }

    fn tokens(&self) -> Option<(&str, &str)> {
        self.tls.as_ref().map(|t| (t.pods_token.1.as_str(), t.client_token.1.as_str()))
    }

    /// The operator's client: with mTLS, the operator certificate the plane wrote beside its CA.
    async fn admin(&self) -> Result<MeshAdminClient<tonic::transport::Channel>, String> {
        use crate::control::tls::{certified, ClientCert, Dial, DialTls};
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                let read = |f: &str| std::fs::read_to_string(t.ca_dir.join(f)).map_err(|e| format!("{f}: {e}"));
                let key = Arc::new(certified(&read("operator.crt")?, &read("operator.key")?)?);
                let client: ClientCert = Arc::new(move || Some(key.clone()));
                let bundle = read("ca.crt")?;
                let plane_id = crate::control::ca::plane_id("cluster.local");
                Some(DialTls::new(bundle.as_bytes(), &plane_id, Some(client)).map_err(|e| e.to_string())?)
            }
        };
        let dial = Dial::new(&self.url, Duration::from_secs(3), tls).map_err(|e| e.to_string())?;
        Ok(MeshAdminClient::new(dial.channel().await?))
    }
}

/// A token nobody could guess, for this run only.
fn new_token() -> String {
    (0..32).map(|_| format!("{:02x}", fastrand::u8(..))).collect()
}

/// One protocol's outcome.
#[derive(Debug, Serialize)]
pub struct KindResult {
    pub protocol: &'static str,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
}

/// One restart.
#[derive(Debug, Serialize)]
pub struct Restart {
    pub pod: String,
    pub trigger: &'static str,
    /// From the trigger to the old process's exit.
    pub drain_ms: u64,
    /// The drain report (none when killed).
    pub report: Option<serde_json::Value>,
}

/// The demo's result, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub requests: u64,
    pub failed: u64,
    pub retries: u64,
    pub protocols: Vec<KindResult>,
    pub restarts: Vec<Restart>,
    pub logs: Option<String>,
    /// With `--mtls`: what the mesh's TLS did.
    pub mtls: Option<MtlsOutcome>,
}

/// VIPs the client dials; never dialled themselves (the clusters stand for them).
const VIP_H1: &str = "127.0.0.10:80";
const VIP_H2: &str = "127.0.0.11:80";

/// One server pod: its app and its inbound Ebb.
struct Pod {
    name: String,
    app: app::App,
    ebb: Option<Proc>,
}

fn pod_yaml(p: &Pod, plane: &PlaneLink, o: &DemoOptions) -> String {
    format!(
        "{}listeners:\n  - {{ name: h1, bind: 127.0.0.1:0, target: {}, direction: inbound }}\n  - {{ name: h2, bind: 127.0.0.1:0, target: {}, direction: inbound }}\n\
         drain: {{ announce: {}, timeout: {} }}\n\
         control_plane: {{ {}, node_id: {}, initial_fetch_timeout: 5s, backoff_base: 50ms, backoff_max: 1s }}\n",
        base_yaml(),
        p.app.h1,
        p.app.h2,
        humantime::format_duration(o.announce),
        humantime::format_duration(o.drain_timeout),
        plane.yaml(false),
        p.name
    )
}

/// The mesh the plane serves: one cluster per protocol family, every pod an endpoint of each; with
/// mTLS, each endpoint's identity and which identity each node gets for which token.
fn mesh_yaml(pods: &[Pod], tokens: Option<(&str, &str)>) -> Result<String, String> {
    let mut h1 = String::new();
    let mut h2 = String::new();
    let identity = if tokens.is_some() { format!(", identity: \"{SERVER_ID}\"") } else { String::new() };
    for p in pods {
        let Some(ebb) = &p.ebb else { continue };
        h1.push_str(&format!("      - {{ addr: \"{}\", node: {}{identity} }}\n", ebb.addr("h1")?, p.name));
        h2.push_str(&format!("      - {{ addr: \"{}\", node: {}{identity} }}\n", ebb.addr("h2")?, p.name));
    }
    let identities = match tokens {
        Some((pods, client)) => format!(
            "identities:\n  - {{ node: \"pod-*\", identity: \"{SERVER_ID}\", token_sha256: \"{}\" }}\n  \
             - {{ node: client, identity: \"{CLIENT_ID}\", token_sha256: \"{}\" }}\n",
            crate::control::plane::token_sha256(pods),
            crate::control::plane::token_sha256(client)
        ),
        None => String::new(),
    };
    if h1.is_empty() {
        return Ok(format!("{identities}clusters: []\n"));
    }
    Ok(format!(
        "{identities}clusters:\n  - name: demo-http1\n    addresses: [\"{VIP_H1}\"]\n    protocol: http1\n    endpoints:\n{h1}\
         \x20 - name: demo-http2\n    addresses: [\"{VIP_H2}\"]\n    protocol: http2\n    endpoints:\n{h2}"
    ))
}

fn start_pod(p: &Pod, plane: &PlaneLink, o: &DemoOptions, dir: &Workdir, n: usize) -> Result<Proc, String> {
    let cfg = dir.write(&format!("{}-{n}.yaml", p.name), &pod_yaml(p, plane, o))?;
    let cfg = cfg.to_string_lossy().into_owned();
    Proc::start(&["run", "--config", &cfg], &dir.file(&format!("{}-{n}.log", p.name)))
}

/// Polls `f` every 50 ms until it holds, at most `timeout`.
async fn until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn status(admin: SocketAddr) -> Option<serde_json::Value> {
    let b = crate::cli::call(admin, http::Method::GET, "/status").await.ok()?;
    serde_json::from_slice(&b).ok()
}

/// Whether the client's Ebb sends to `addr` in every cluster: it has it, and healthy.
async fn client_sees(client: SocketAddr, addrs: &[SocketAddr]) -> bool {
    let Some(s) = status(client).await else { return false };
    let eps: Vec<(String, String)> = s["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| (e["addr"].as_str().unwrap_or("").to_string(), e["state"].as_str().unwrap_or("").to_string()))
        .collect();
    addrs.iter().all(|a| eps.iter().any(|(x, st)| *x == a.to_string() && st == "healthy"))
}

fn set_doing(board: &Mutex<Board>, i: usize, doing: String, admin: Option<Option<SocketAddr>>) {
    if let Ok(mut b) = board.lock() {
        if let Some(p) = b.pods.get_mut(i) {
            p.doing = doing;
            if let Some(a) = admin {
                p.admin = a;
                if a.is_none() {
                    p.connections = 0;
                    p.in_flight = 0;
                    p.phase = "-".into();
                    p.deadline_in_ms = None;
                }
            }
        }
    }
}

/// Drains (or kills) pod `i`, waits for its Ebb to exit, starts it again, and waits until the client
/// sends to it again.
#[allow(clippy::too_many_arguments)]
async fn restart(
    i: usize,
    trigger: DemoTrigger,
    pods: &mut [Pod],
    plane: &PlaneLink,
    client_admin: SocketAddr,
    o: &DemoOptions,
    dir: &Workdir,
    board: &Mutex<Board>,
    generation: usize,
) -> Result<Restart, String> {
    let name = pods[i].name.clone();
    let mut ebb = pods[i].ebb.take().ok_or("pod not running")?;
    let t0 = Instant::now();
    let mut report = None;
    let what = if o.kill { "killed (SIGKILL)".to_string() } else { format!("draining ({})", trigger.as_str()) };
    set_doing(board, i, what, None);
    let limit = o.drain_timeout + Duration::from_secs(10);
    if o.kill {
        ebb.signal("KILL");
        ebb.wait_exit(Duration::from_secs(5)).await;
    } else {
        match trigger {
            DemoTrigger::ControlPlane => {
                let mut admin = plane.admin().await?;
                let req = pb::DrainSidecarRequest {
                    node_id: name.clone(),
                    deadline: Some(crate::control::convert::pb_duration(o.drain_timeout)),
                    reason: "ebb demo: rolling restart".into(),
                    scope: pb::DrainScope::All as i32,
                };
                let id = admin.drain_sidecar(req).await.map_err(|e| e.to_string())?.into_inner().drain_id;
                let mut watch = admin
                    .watch_drain(pb::WatchDrainRequest { node_id: name.clone(), drain_id: id })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let last = tokio::time::timeout(limit, async {
                    let mut last = None;
                    while let Ok(Some(p)) = watch.message().await {
                        last = Some(p);
                    }
                    last
                })
                .await
                .ok()
                .flatten();
                report = last.and_then(|p| serde_json::from_str(&p.final_report_json).ok());
                // Drained: the process has nothing left; SIGTERM ends it at once.
                ebb.signal("TERM");
            }
            DemoTrigger::Sigterm => ebb.signal("TERM"),
            DemoTrigger::Admin => {
                let admin = ebb.addr("admin")?;
                crate::cli::call(admin, http::Method::POST, "/drain?exit=1").await.map_err(|e| e.to_string())?;
            }
        }
        if ebb.wait_exit(limit).await.is_none() {
            return Err(format!("{name}'s Ebb did not exit within {limit:?}"));
        }
        if report.is_none() {
            report = ebb.report.lock().ok().and_then(|r| r.clone());
        }
    }
    let drain_ms = t0.elapsed().as_millis() as u64;
    drop(ebb);
    set_doing(board, i, "restarting".into(), Some(None));
    let next = start_pod(&pods[i], plane, o, dir, generation)?;
    let addrs = [next.addr("h1")?, next.addr("h2")?];
    let admin = next.addr("admin").ok();
    pods[i].ebb = Some(next);
    // The restarted pod has new ports: the mesh file changes, the plane pushes it.
    dir.write("mesh.yaml", &mesh_yaml(pods, plane.tokens())?)?;
    if !until(Duration::from_secs(15), async || client_sees(client_admin, &addrs).await).await {
        return Err(format!("the client's Ebb never got {name}'s new endpoints"));
    }
    set_doing(board, i, "serving".into(), Some(admin));
    Ok(Restart { pod: name, trigger: if o.kill { "sigkill" } else { trigger.as_str() }, drain_ms, report })
}

/// Runs the demo; the outcome says how many requests failed.
pub async fn run(o: DemoOptions) -> Result<Outcome, String> {
    let kinds = Kind::parse_list(&o.protocols).map_err(|e| format!("--protocols: {e}"))?;
    if !(1..=8).contains(&o.servers) {
        return Err("--servers: 1 to 8".into());
    }
    if o.trigger.is_empty() {
        return Err("--trigger: at least one".into());
    }
    let restarts = o.restarts.unwrap_or(o.servers);
    let dir = Workdir::new(o.keep_logs)?;
    let tty = std::io::stdout().is_terminal() && !o.json;
    let say = |s: &str| {
        if !o.json {
            println!("{s}");
        }
    };

    // The control plane, with no endpoints until the pods have their ports; with mTLS, the mesh file
    // names the tokens' hashes from the start, before any pod asks for its identity.
    let tls = match o.mtls {
        false => None,
        true => {
            let (pods_token, client_token) = (new_token(), new_token());
            Some(LinkTls {
                pods_token: (dir.write("pods.token", &pods_token)?, pods_token),
                client_token: (dir.write("client.token", &client_token)?, client_token),
                ca_dir: dir.file("ca"),
            })
        }
    };
    let tokens = tls.as_ref().map(|t| (t.pods_token.1.as_str(), t.client_token.1.as_str()));
    let mesh = dir.write("mesh.yaml", &mesh_yaml(&[], tokens)?)?;
    let mesh = mesh.to_string_lossy().into_owned();
    let life = humantime::format_duration(o.cert_life).to_string();
    let ca = dir.file("ca").to_string_lossy().into_owned();
    let mut args = vec!["control-plane", "--config", &mesh, "--listen", "127.0.0.1:0", "--log-format", "json"];
    if o.mtls {
        args.extend(["--ca-dir", &ca, "--cert-life", &life]);
    }
    let plane_proc = Proc::start(&args, &dir.file("control-plane.log"))?;
    let plane_addr = plane_proc.addr("control-plane")?;
    let scheme = if o.mtls { "https" } else { "http" };
    let plane = PlaneLink { url: format!("{scheme}://{plane_addr}"), tls };
    say(&format!(
        "control plane on {plane_addr}{}",
        if o.mtls {
            format!(", its CA issuing every pod's identity ({} certificates, renewed at ~70 %)", life)
        } else {
            String::new()
        }
    ));

    let app_opts = app::AppOptions { latency: o.latency, size: o.size };
    let mut pods = Vec::new();
    for i in 0..o.servers {
        let app = app::start(app_opts).await.map_err(|e| format!("app: {e}"))?;
        let mut pod = Pod { name: format!("pod-{i}"), app, ebb: None };
        pod.ebb = Some(start_pod(&pod, &plane, &o, &dir, 0)?);
        say(&format!(
            "{}: app on {} (HTTP/1.1) and {} (HTTP/2, gRPC), behind its inbound Ebb",
            pod.name, app.h1, app.h2
        ));
        pods.push(pod);
    }
    dir.write("mesh.yaml", &mesh_yaml(&pods, plane.tokens())?)?;

    // The client: its outbound Ebb gets the clusters from the plane.
    let client_yaml = format!(
        "{}listeners:\n  - {{ name: h1, bind: 127.0.0.1:0, target: \"{VIP_H1}\", direction: outbound }}\n  - {{ name: h2, bind: 127.0.0.1:0, target: \"{VIP_H2}\", direction: outbound }}\n\
         control_plane: {{ {}, node_id: client, backoff_base: 50ms, backoff_max: 1s }}\n",
        base_yaml(),
        plane.yaml(true)
    );
    let client_cfg = dir.write("client.yaml", &client_yaml)?.to_string_lossy().into_owned();
    let client = Proc::start(&["run", "--config", &client_cfg], &dir.file("client.log"))?;
    let client_admin = client.addr("admin")?;
    let all: Vec<SocketAddr> = pods
        .iter()
        .filter_map(|p| p.ebb.as_ref())
        .flat_map(|e| [e.addr("h1"), e.addr("h2")])
        .collect::<Result<_, _>>()?;
    if !until(Duration::from_secs(15), async || client_sees(client_admin, &all).await).await {
        return Err("the client's Ebb did not get its clusters from the control plane".into());
    }
    say(&format!(
        "client: load through its outbound Ebb ({} and {}) to {} pods; {} req/s of {}",
        client.addr("h1")?,
        client.addr("h2")?,
        o.servers,
        o.rate,
        kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    ));

    let board = Arc::new(Mutex::new(Board {
        pods: pods
            .iter()
            .map(|p| PodView {
                name: p.name.clone(),
                admin: p.ebb.as_ref().and_then(|e| e.addr("admin").ok()),
                doing: "serving".into(),
                ..Default::default()
            })
            .collect(),
        client_telemetry: client.addr("telemetry").ok(),
        ..Default::default()
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let targets = load::Targets { h1: client.addr("h1")?, h2: client.addr("h2")? };
    let (load, workers) = load::start(targets, &kinds, o.rate, stop_rx.clone());
    let load = Arc::new(load);
    let viewer =
        (!o.json).then(|| tokio::spawn(view::run(board.clone(), load.clone(), o.duration, tty, stop_rx.clone())));

    // Rolling restarts, spread over the run.
    let started = Instant::now();
    let slot = o.duration / (restarts as u32 + 1);
    let mut done = Vec::new();
    let mut error = None;
    for r in 0..restarts {
        let at = slot * (r as u32 + 1);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let i = r % o.servers;
        let trigger = o.trigger[r % o.trigger.len()];
        match restart(i, trigger, &mut pods, &plane, client_admin, &o, &dir, &board, r + 1).await {
            Ok(x) => done.push(x),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    tokio::time::sleep(o.duration.saturating_sub(started.elapsed())).await;
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(35), w).await;
    }
    if let Some(v) = viewer {
        let _ = v.await;
    }
    view::refresh(&board).await;
    let retries = board.lock().map(|b| b.retries).unwrap_or(0);

    // What mTLS did: the client's handshakes (each verified a pod's identity), and the plane's CA's
    // certificates from its log.
    let handshakes = match client.addr("telemetry") {
        Ok(t) => crate::cli::call(t, http::Method::GET, "/metrics").await.ok().map_or(0, |b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| l.starts_with("ebb_mtls_handshakes_total{"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        }),
        Err(_) => 0,
    };

    // Everything down: each Ebb drains what is left (nothing) and exits.
    drop(client);
    for p in &mut pods {
        if let Some(mut e) = p.ebb.take() {
            e.signal("TERM");
            e.wait_exit(Duration::from_secs(5)).await;
        }
    }
    drop(plane_proc);
    let mtls = o.mtls.then(|| {
        let log = std::fs::read_to_string(dir.file("control-plane.log")).unwrap_or_default();
        let mut m = MtlsOutcome { handshakes, ..Default::default() };
        for v in log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            if v["message"] == "Certificate issued" {
                if v["renewal"] == true {
                    m.certificates_renewed += 1;
                } else {
                    m.certificates_issued += 1;
                }
            }
        }
        m
    });
    if let Some(e) = error {
        return Err(e);
    }

    let protocols: Vec<KindResult> = load
        .kinds
        .iter()
        .map(|(k, c)| KindResult {
            protocol: k.as_str(),
            sent: c.sent.load(Relaxed),
            ok: c.ok.load(Relaxed),
            failed: c.failed.load(Relaxed),
            failures: c.samples.lock().map(|s| s.clone()).unwrap_or_default(),
        })
        .collect();
    Ok(Outcome {
        requests: protocols.iter().map(|p| p.sent).sum(),
        failed: protocols.iter().map(|p| p.failed).sum(),
        retries,
        protocols,
        restarts: done,
        logs: o.keep_logs.then(|| dir.path.display().to_string()),
        mtls,
    })
}

/// Groups digits: 123456 → "123,456".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints the outcome for people: each drain's report, the per-protocol table, the verdict.
pub fn print(o: &Outcome) {
    println!();
    for r in &o.restarts {
        match &r.report {
            Some(rep) => println!(
                "{} drained ({}) in {} ms: {} connections closed gracefully, {} forced, {} requests completed, {} GOAWAY, {} Connection: close",
                r.pod,
                r.trigger,
                r.drain_ms,
                rep["closed_gracefully"],
                rep["forced_closes"],
                rep["requests_completed"],
                rep["goaway_sent"],
                rep["connection_close_sent"]
            ),
            None => println!("{} {} after {} ms (no drain)", r.pod, r.trigger, r.drain_ms),
        }
    }
    println!("  {:<12} {:>9} {:>9} {:>7}", "protocol", "sent", "ok", "failed");
    for p in &o.protocols {
        println!("  {:<12} {:>9} {:>9} {:>7}", p.protocol, thousands(p.sent), thousands(p.ok), p.failed);
        for f in &p.failures {
            println!("      e.g. {f}");
        }
    }
    if let Some(l) = &o.logs {
        println!("logs: {l}");
    }
    let drains = o.restarts.len();
    println!(
        "{} failed of {} requests across {} {} ({} retried by the client's Ebb)",
        thousands(o.failed),
        thousands(o.requests),
        drains,
        if o.restarts.iter().any(|r| r.report.is_none()) {
            "kills"
        } else if drains == 1 {
            "drain"
        } else {
            "drains"
        },
        thousands(o.retries)
    );
    if let Some(m) = &o.mtls {
        println!(
            "all of it over mTLS: {} handshakes by the client's Ebb, each proving a pod's identity; {} certificates issued by the plane's CA, {} renewed under load",
            thousands(m.handshakes),
            m.certificates_issued,
            m.certificates_renewed
        );
    }
}
