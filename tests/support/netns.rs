//! Network namespaces the tests make themselves: a pod namespace joined to the host by a veth pair,
//! removed on drop even when a test fails.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Output {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (iproute2 and iptables must be installed)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Fails loudly when the test cannot do what it must (CI runs as root with iptables installed).
pub fn require_root_and_tools() {
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "namespace tests must run as root");
    for tool in ["ip", "iptables-restore", "iptables-save"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is not installed (apt-get install iptables iproute2)"
        );
    }
}

/// A namespace with `lo` up and a veth link to the host: host side `10.<a>.<b>.1`, pod side `.2`.
pub struct Netns {
    pub name: String,
    pub host_veth: String,
    pub host_ip: String,
    pub pod_ip: String,
}

impl Netns {
    pub fn new() -> Self {
        require_root_and_tools();
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("ebbt-{pid}-{n}");
        // Unique /30-ish subnet per namespace so parallel tests never collide.
        let a = 100 + (pid % 100) as u8;
        let b = (n % 250) as u8 + 1;
        let host_veth = format!("veb{}h{n}", pid % 100000);
        let pod_veth = format!("veb{}p{n}", pid % 100000);
        let ns = Self {
            name,
            host_veth: host_veth.clone(),
            host_ip: format!("10.{a}.{b}.1"),
            pod_ip: format!("10.{a}.{b}.2"),
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        run(Command::new("ip").args(["link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth]));
        run(Command::new("ip").args(["link", "set", &pod_veth, "netns", &ns.name]));
        run(Command::new("ip").args(["addr", "add", &format!("{}/24", ns.host_ip), "dev", &host_veth]));
        run(Command::new("ip").args(["link", "set", &host_veth, "up"]));
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{}/24", ns.pod_ip), "dev", &pod_veth]);
        ns.exec(&["ip", "link", "set", &pod_veth, "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &ns.host_ip]);
        ns
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// Runs a command inside the namespace, success or not.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Waits (at most 30 s: a container starting on a busy machine is slow) until something listens
    /// on TCP `port` inside the namespace.
    pub fn wait_listening(&self, port: u16) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < until {
            let out = self.try_exec(&["ss", "-Htln", &format!("sport = :{port}")]);
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("nothing listens on port {port} in {}", self.name);
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Applies an `iptables-restore` input inside the namespace.
    pub fn iptables_restore(&self, rules: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables-restore", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside, then remove the namespace and the host end of the veth.
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Copies a binary where any UID can run it (the build may live under /root, which UID 1337 cannot read).
pub fn world_runnable(bin: &str, dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let name = std::path::Path::new(bin).file_name().unwrap();
    let dst = dir.join(name);
    std::fs::copy(bin, &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dst
}

impl Netns {
    /// Runs `f` on a new thread that lives inside the namespace: every socket it opens is the pod's.
    pub fn run_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> std::thread::JoinHandle<R> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// Starts a tokio runtime on a thread inside the namespace and runs `fut` there to completion.
    pub fn block_on<F, R>(&self, fut: impl FnOnce() -> F + Send + 'static) -> R
    where
        F: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        self.run_in(move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(fut()))
            .join()
            .unwrap()
    }

    /// Starts a tokio runtime inside the namespace that runs `fut` (servers) until the process ends.
    pub fn background<F>(&self, fut: impl FnOnce() -> F + Send + 'static) -> tokio::runtime::Handle
    where
        F: std::future::Future<Output = ()> + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async move {
                fut().await;
                std::future::pending::<()>().await
            })
        });
        rx.recv().unwrap()
    }
}
