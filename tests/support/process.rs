//! Ebb as a real process: started from a YAML config, its bound addresses read from its JSON logs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `ebb` process; killed on drop if still running.
pub struct EbbProcess {
    pub child: Child,
    pub addrs: HashMap<String, SocketAddr>,
    pub lines: mpsc::Receiver<String>,
    /// JSON log lines taken from `lines` by `wait_log`, kept for `log_lines`.
    seen: Vec<serde_json::Value>,
    _dir: tempdir::Dir,
}

pub mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "ebb-test-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl EbbProcess {
    /// Starts `ebb run` with `yaml` (JSON logs are forced) and waits for it to be ready.
    pub fn start(yaml: &str) -> Self {
        Self::start_with(yaml, |_| {})
    }

    pub fn start_with(yaml: &str, tweak: impl FnOnce(&mut Command)) -> Self {
        Self::start_wrapped(&[], env!("CARGO_BIN_EXE_ebb"), yaml, tweak)
    }

    /// Starts Ebb under a wrapper command (`ip netns exec NS setpriv ...`), from `bin`.
    pub fn start_wrapped(wrapper: &[&str], bin: &str, yaml: &str, tweak: impl FnOnce(&mut Command)) -> Self {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("ebb.yaml");
        std::fs::write(&path, yaml).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755));
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        }
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["run", "--config"]).arg(&path).args(["--log-format", "json"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        tweak(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ebb");
        let rx = stdout_lines(&mut child);
        let mut addrs = HashMap::new();
        loop {
            let line = rx.recv_timeout(Duration::from_secs(20)).expect("ebb did not become ready");
            let v: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            match v["message"].as_str() {
                Some("Listening") => {
                    let name = v["listener"].as_str().unwrap().to_string();
                    addrs.insert(name, v["addr"].as_str().unwrap().parse().unwrap());
                }
                Some("Ready") => break,
                _ => {}
            }
        }
        Self { child, addrs, lines: rx, seen: Vec::new(), _dir: dir }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[name]
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for exit; `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Log lines not returned before: those `wait_log` went through, then whatever arrived since.
    pub fn log_lines(&mut self) -> Vec<serde_json::Value> {
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.lines.try_iter().filter_map(|l| serde_json::from_str(&l).ok()));
        lines
    }

    /// Waits for the next log line whose `message` is `message` (lines before it are kept for
    /// `log_lines`); panics after `timeout`. Lets a test order what it does after what Ebb did.
    pub fn wait_log(&mut self, message: &str, timeout: Duration) -> serde_json::Value {
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!("no `{message}` log line within {timeout:?}; seen: {:?}", self.seen),
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            self.seen.push(v.clone());
            if v["message"] == message {
                return v;
            }
        }
    }

    /// Reads log lines until `done` holds for those not yet returned by `log_lines` (which still
    /// returns them); panics after `timeout`, saying `what` was awaited. Lets a test wait for what Ebb
    /// logs later, such as a rate-limited site's summary, instead of sleeping.
    pub fn wait_lines(&mut self, what: &str, timeout: Duration, done: impl Fn(&[serde_json::Value]) -> bool) {
        let until = std::time::Instant::now() + timeout;
        while !done(&self.seen) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.extend(serde_json::from_str::<serde_json::Value>(&line).ok()),
                Err(_) => panic!("{what}: not within {timeout:?}; seen: {:?}", self.seen),
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// The lines `child` writes on its piped stdout, as they come (read on a thread of their own).
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs `cmd` to completion with its output captured; kills it and panics if it runs past `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for the command"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{cmd:?} still running after {timeout:?}");
        }
    }
}

impl Drop for EbbProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
