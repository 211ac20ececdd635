//! Where the reference control plane's mesh comes from. Behind [`ConfigSource`], so that a
//! Kubernetes EndpointSlice source (serving/terminating conditions as healthy/draining) can replace the
//! file without touching the stream code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{validate_cluster_list, ClusterConfig, ConfigError};

/// The mesh as the plane serves it: every cluster (with the node in front of each endpoint), and the
/// inbound policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Sent to every sidecar; an endpoint's `node` names the sidecar in front of it.
    pub clusters: Vec<ClusterConfig>,
    /// Sent to every sidecar; none: each keeps its own `max_requests`.
    pub inbound: Option<InboundPolicyConfig>,
    /// Which identity each node gets from the plane's CA, and the bootstrap token that proves a node
    /// before it has a certificate (docs/architecture.md §15). The first entry matching a node wins.
    pub identities: Vec<NodeIdentity>,
}

/// One node (or a family of them) and the identity the plane's CA gives it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
    /// A node id, or a prefix ending in `*` (`web-*`: every pod of a StatefulSet or Deployment).
    pub node: String,
    /// The SPIFFE ID its certificate carries; a caller proving it may also speak for these nodes.
    pub identity: String,
    /// SHA-256 of the bootstrap token, hex (`sha256sum` of the token file): the plane keeps no
    /// token itself. None: these nodes must already hold a certificate to get a new one.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

impl NodeIdentity {
    /// Whether this entry is for `node`.
    pub fn matches(&self, node: &str) -> bool {
        match self.node.strip_suffix('*') {
            Some(prefix) => node.starts_with(prefix),
            None => self.node == node,
        }
    }
}

/// What protects each sidecar's local app.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundPolicyConfig {
    pub max_requests: u32,
}

impl MeshConfig {
    /// Parses and checks a mesh file; errors name the field (`clusters[0].retry.num_retries`).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: MeshConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = crate::config::field_path(e.path());
            ConfigError::Field { field, message: e.into_inner().to_string() }
        })?;
        validate_cluster_list(&cfg.clusters, &|i| format!("clusters[{i}]"))?;
        for (i, n) in cfg.identities.iter().enumerate() {
            let field = |k: &str| format!("identities[{i}].{k}");
            let star = n.node.find('*');
            if n.node.is_empty() || n.node == "*" || star.is_some_and(|p| p + 1 != n.node.len()) {
                return Err(ConfigError::field(field("node"), "a node id, or a non-empty prefix ending in `*`"));
            }
            if !crate::domain::is_spiffe_id(&n.identity) {
                return Err(ConfigError::field(
                    field("identity"),
                    "must be a SPIFFE ID (spiffe://<trust-domain>/<path>)",
                ));
            }
            if let Some(h) = &n.token_sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ConfigError::field(
                        field("token_sha256"),
                        "64 hex digits (sha256sum of the token file)",
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// A source of the mesh config: the current one, and every later one.
pub trait ConfigSource: Send + Sync + 'static {
    fn watch(&self) -> watch::Receiver<Arc<MeshConfig>>;
}

/// A fixed config that code can replace (tests, embedding).
#[derive(Debug)]
pub struct StaticSource(watch::Sender<Arc<MeshConfig>>);

impl StaticSource {
    pub fn new(cfg: MeshConfig) -> Self {
        Self(watch::Sender::new(Arc::new(cfg)))
    }

    pub fn set(&self, cfg: MeshConfig) {
        self.0.send_replace(Arc::new(cfg));
    }
}

impl ConfigSource for StaticSource {
    fn watch(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.0.subscribe()
    }
}

/// A YAML file, read again whenever its contents change (polled: no inotify dependency, and it works
/// on a ConfigMap volume, whose updates are symlink swaps). A file that fails to parse or validate
/// keeps the config in force and says why, naming the field.
#[derive(Debug)]
pub struct FileSource {
    rx: watch::Receiver<Arc<MeshConfig>>,
}

/// How often the file's metadata is looked at (a `stat`: cheap); its contents are read when the
/// metadata changed, and at least every `REREAD` in case a change kept both size and time.
const POLL: Duration = Duration::from_millis(100);
const REREAD: Duration = Duration::from_secs(5);

impl FileSource {
    /// Loads the file (an error here is fatal: there is nothing to serve) and starts watching it.
    pub fn start(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        let cfg = MeshConfig::from_yaml(&text)?;
        let (tx, rx) = watch::channel(Arc::new(cfg));
        let path = path.to_path_buf();
        tokio::spawn(poll(path, text, tx));
        Ok(Self { rx })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })
}

/// What a `stat` tells of the file (following symlinks, as a ConfigMap volume swaps them).
fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

async fn poll(path: PathBuf, mut last: String, tx: watch::Sender<Arc<MeshConfig>>) {
    let mut tick = tokio::time::interval(POLL);
    let mut seen = stamp(&path);
    let mut read_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        let now = stamp(&path);
        if now == seen && now.is_some() && read_at.elapsed() < REREAD {
            continue;
        }
        seen = now;
        read_at = tokio::time::Instant::now();
        let text = match read(&path) {
            Ok(t) => t,
            Err(e) => {
                if !last.is_empty() {
                    tracing::warn!(error = %e, "Mesh file unreadable; keeping the config in force");
                    last.clear();
                }
                continue;
            }
        };
        if text == last {
            continue;
        }
        // An empty file is one caught mid-write by a tool that truncates before it writes (`>`,
        // `fs::write`): taken as a mesh, it would push "no clusters" to every sidecar until the next
        // poll. A mesh with none says so (`clusters: []`).
        if text.trim().is_empty() {
            tracing::warn!(path = %path.display(), "Mesh file empty; keeping the config in force");
            continue;
        }
        last = text;
        match MeshConfig::from_yaml(&last) {
            Ok(cfg) => {
                tracing::info!(path = %path.display(), clusters = cfg.clusters.len(), "Mesh file reloaded");
                tx.send_replace(Arc::new(cfg));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Mesh file refused; keeping the config in force")
            }
        }
    }
}

impl ConfigSource for FileSource {
    fn watch(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_mesh_file_names_the_field() {
        let err = MeshConfig::from_yaml(
            "clusters:\n  - name: web\n    addresses: [10.96.0.10:80]\n    endpoints: [{ addr: 10.0.0.5:80, node: web-0 }]\n    retry: { num_retries: 99 }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("clusters[0].retry.num_retries"), "{err}");
        let err = MeshConfig::from_yaml("clusterz: []\n").unwrap_err().to_string();
        assert!(err.contains("clusterz"), "{err}");
    }

    /// A mesh file caught empty mid-write must not reach the sidecars as "no clusters"; the next
    /// whole file must. Paused time: each poll is a timer tick, the reads are real.
    #[tokio::test(start_paused = true)]
    async fn an_empty_mesh_file_keeps_the_config_in_force() {
        let dir = std::env::temp_dir().join(format!("ebb-mesh-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        let mesh = |n: usize| {
            let mut y = String::from("clusters:\n");
            for i in 0..n {
                y += &format!(
                    "  - {{ name: c{i}, addresses: [10.96.0.{i}:80], endpoints: [{{ addr: 10.0.0.{i}:80 }}] }}\n"
                );
            }
            y
        };
        std::fs::write(&path, mesh(1)).unwrap();
        let source = FileSource::start(&path).unwrap();
        let mut rx = source.watch();
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert!(!rx.has_changed().unwrap(), "the empty file was pushed: {} clusters", rx.borrow().clusters.len());
        assert_eq!(rx.borrow().clusters.len(), 1);
        std::fs::write(&path, mesh(2)).unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert!(rx.has_changed().unwrap(), "the whole file after it is read");
        assert_eq!(rx.borrow_and_update().clusters.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
