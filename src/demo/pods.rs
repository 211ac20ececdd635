//! The demo's processes: real `ebb` processes started from this same binary (the control plane, each
//! pod's inbound Ebb, the client's outbound Ebb), their bound addresses read from their JSON logs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `ebb` process; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub addrs: HashMap<String, SocketAddr>,
    /// The last `Drain report` line it logged, as JSON.
    pub report: std::sync::Arc<std::sync::Mutex<Option<serde_json::Value>>>,
}

impl Proc {
    /// Starts `ebb <args>`; its log goes to `log` (JSON lines) and is read for "Listening" lines until
    /// "Ready".
    pub fn start(args: &[&str], log: &Path) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find the ebb binary: {e}"))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start ebb {}: {e}", args.join(" ")))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut err_file = file.try_clone().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<serde_json::Value>();
        let report = std::sync::Arc::new(std::sync::Mutex::new(None));
        let r = report.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if v["message"] == "Drain report" {
                    if let Some(rep) = v["report"].as_str().and_then(|s| serde_json::from_str(s).ok()) {
                        if let Ok(mut slot) = r.lock() {
                            *slot = Some(rep);
                        }
                    }
                }
                let _ = tx.send(v);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(err_file, "{line}");
            }
        });
        let mut addrs = HashMap::new();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let v = match rx.recv_timeout(left) {
                Ok(v) => v,
                Err(_) => {
                    let _ = child.kill();
                    return Err(format!("ebb {} did not become ready; see {}", args.join(" "), log.display()));
                }
            };
            match v["message"].as_str() {
                Some("Listening") => {
                    if let (Some(name), Some(addr)) =
                        (v["listener"].as_str(), v["addr"].as_str().and_then(|a| a.parse().ok()))
                    {
                        addrs.insert(name.to_string(), addr);
                    }
                }
                Some("Ready") => break,
                _ => {}
            }
        }
        // Keep draining the channel so the reader thread never blocks on it.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Ok(Self { child, addrs, report })
    }

    pub fn addr(&self, name: &str) -> Result<SocketAddr, String> {
        self.addrs.get(name).copied().ok_or_else(|| format!("no listener `{name}`"))
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
    }

    /// Waits for the process to end, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Files the demo writes: configs and logs, in a directory removed at the end (kept with
/// `--keep-logs`).
#[derive(Debug)]
pub struct Workdir {
    pub path: PathBuf,
    keep: bool,
}

impl Workdir {
    pub fn new(keep: bool) -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("ebb-demo-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { path, keep })
    }

    /// Writes `name` whole in one step: beside it, then renamed over it, so a process watching the
    /// file (the plane re-reads the mesh file on change) never reads it half-written or empty.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf, String> {
        let p = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The common head of every Ebb config in the demo: no capture, everything on loopback port 0.
pub fn base_yaml() -> String {
    "inbound: { enabled: false }\noutbound: { enabled: false }\n\
     admin: { bind: 127.0.0.1:0 }\ntelemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n\
     log: { level: info, format: json }\n"
        .to_string()
}
