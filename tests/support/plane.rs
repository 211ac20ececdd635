//! The control plane in tests: the reference plane (`ebb control-plane`) as a real process, mesh files
//! and sidecar configs that point at it, `ebb ctl`, the operator API, and probes of what a sidecar
//! shows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ebb::control::pb::{self, mesh_admin_client::MeshAdminClient};
use tokio::time::Instant;

use super::client;
use super::process::{output_within, stdout_lines, tempdir};

/// How long the plane process may take to say it listens.
const START: Duration = Duration::from_secs(20);

/// `ebb control-plane` serving a mesh file; killed on drop.
pub struct PlaneProcess {
    child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    seen: Vec<serde_json::Value>,
    dir: tempdir::Dir,
    /// Arguments beyond the mesh file and the address (a CA directory, a certificate life).
    extra: Vec<String>,
}

/// Starts the plane on `listen` and waits for its "Listening" and "Ready" lines.
fn spawn(mesh: &std::path::Path, listen: SocketAddr, extra: &[String]) -> (Child, SocketAddr, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["control-plane", "--config"])
        .arg(mesh)
        .args(["--listen", &listen.to_string(), "--log-format", "json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ebb control-plane");
    let rx = stdout_lines(&mut child);
    let mut addr = None;
    loop {
        let line = match rx.recv_timeout(START) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("the control plane did not become ready on {listen} ({e}); exit status {status:?}");
            }
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        match v["message"].as_str() {
            Some("Listening") if v["listener"] == "control-plane" => {
                addr = Some(v["addr"].as_str().unwrap().parse().unwrap());
            }
            Some("Ready") => break,
            _ => {}
        }
    }
    (child, addr.expect("a Listening line before Ready"), rx)
}

impl PlaneProcess {
    /// Starts the plane on an ephemeral loopback port with `mesh` as its mesh file.
    pub fn start(mesh: &str) -> Self {
        Self::start_with(mesh, &[])
    }

    /// Starts the plane with `extra` arguments too (`--ca-dir`, `--cert-life`, ...).
    pub fn start_with(mesh: &str, extra: &[String]) -> Self {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("mesh.yaml");
        std::fs::write(&path, mesh).unwrap();
        let (child, addr, lines) = spawn(&path, "127.0.0.1:0".parse().unwrap(), extra);
        Self { child, addr, lines, seen: Vec::new(), dir, extra: extra.to_vec() }
    }

    /// The address over TLS (a plane started with `--ca-dir`).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The address sidecars and `ebb ctl` use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn mesh_path(&self) -> PathBuf {
        self.dir.0.join("mesh.yaml")
    }

    /// Replaces the mesh file whole (a rename, so the plane never reads half of it); the plane reloads
    /// it within its poll interval.
    pub fn write_mesh(&self, yaml: &str) {
        let tmp = self.dir.0.join("mesh.yaml.new");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.mesh_path()).unwrap();
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the control plane");
        self.child.wait().expect("the killed control plane is reaped");
    }

    /// Starts the plane again on the same address and mesh file (after `kill`).
    pub fn restart(&mut self) {
        assert!(self.child.try_wait().unwrap().is_some(), "restart: the plane is still running");
        let (child, addr, lines) = spawn(&self.mesh_path(), self.addr, &self.extra);
        assert_eq!(addr, self.addr, "the plane came back on the same address");
        self.child = child;
        self.lines = lines;
    }

    /// Waits for the next log line whose `message` is `message`; panics after `timeout`.
    pub fn wait_log(&mut self, message: &str, timeout: Duration) -> serde_json::Value {
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("no `{message}` plane log line within {timeout:?}; seen: {:?}", self.seen)
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            self.seen.push(v.clone());
            if v["message"] == message {
                return v;
            }
        }
    }
}

impl Drop for PlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One cluster of a mesh file: name, service address, endpoints with the node in front of each.
pub struct MeshCluster<'a> {
    pub name: &'a str,
    pub vip: SocketAddr,
    pub endpoints: Vec<(SocketAddr, Option<&'a str>)>,
    /// Extra YAML keys for the cluster, each line indented by four spaces.
    pub extra: &'a str,
}

/// A mesh file (`ebb control-plane --config`) with these clusters.
pub fn mesh_yaml(clusters: &[MeshCluster]) -> String {
    if clusters.is_empty() {
        return "clusters: []\n".into();
    }
    let mut y = String::from("clusters:\n");
    for c in clusters {
        y.push_str(&format!("  - name: {}\n    addresses: [{}]\n    endpoints:\n", c.name, c.vip));
        for (addr, node) in &c.endpoints {
            match node {
                Some(n) => y.push_str(&format!("      - {{ addr: {addr}, node: {n} }}\n")),
                None => y.push_str(&format!("      - {{ addr: {addr} }}\n")),
            }
        }
        y.push_str(c.extra);
    }
    y
}

/// A sidecar's config: loopback admin endpoints, JSON logs at `log`, the plane at `plane` as `node`
/// (quick reconnects), `drain` (a YAML map), and fixed listeners `(name, target, direction)`.
pub fn sidecar_yaml(node: &str, plane: &str, drain: &str, log: &str, listeners: &[(&str, SocketAddr, &str)]) -> String {
    let mut y = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\nlog: {{ level: \"{log}\" }}\n\
         drain: {drain}\ncontrol_plane: {{ address: \"{plane}\", node_id: {node}, backoff_base: 50ms, \
         backoff_max: 500ms, initial_fetch_timeout: 60s }}\nlisteners:\n"
    );
    for (name, target, direction) in listeners {
        y.push_str(&format!("  - {{ name: {name}, bind: 127.0.0.1:0, target: {target}, direction: {direction} }}\n"));
    }
    y
}

/// Runs `ebb ctl --plane <plane> <args>` to completion (at most `timeout`).
pub fn ctl(plane: &str, args: &[&str], timeout: Duration) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ebb"));
    cmd.args(["ctl", "--plane", plane]).args(args);
    output_within(&mut cmd, timeout)
}

/// The plane's operator API.
pub async fn admin(url: &str) -> MeshAdminClient<tonic::transport::Channel> {
    MeshAdminClient::connect(url.to_string()).await.expect("connect to MeshAdmin")
}

/// Every sidecar the plane has connected now.
pub async fn sidecars(url: &str) -> Vec<pb::SidecarInfo> {
    admin(url).await.list_sidecars(pb::ListSidecarsRequest {}).await.expect("ListSidecars").into_inner().sidecars
}

/// The node ids of `list`.
pub fn node_ids(list: &[pb::SidecarInfo]) -> Vec<String> {
    list.iter().map(|s| s.node.as_ref().map(|n| n.id.clone()).unwrap_or_default()).collect()
}

/// The status code of `GET /healthz/ready` on a health endpoint.
pub async fn ready(health: SocketAddr) -> u16 {
    client::fetch(health, "GET", "/healthz/ready").await.0.as_u16()
}

/// Probes `addr` with TCP connects until one is not accepted: refused, or no handshake within 250 ms.
/// Returns when that probe started (the listener had stopped accepting by then) and how it failed.
pub async fn watch_refused(addr: SocketAddr, until: Instant) -> Option<(Instant, String)> {
    while Instant::now() < until {
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_millis(250), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => drop(s),
            Ok(Err(e)) => return Some((started, e.to_string())),
            Err(_) => return Some((started, "no handshake within 250 ms".into())),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Milliseconds from `t0` to `t`, negative when before.
pub fn ms(t0: Instant, t: Instant) -> i128 {
    if t >= t0 {
        t.duration_since(t0).as_millis() as i128
    } else {
        -(t0.duration_since(t).as_millis() as i128)
    }
}
