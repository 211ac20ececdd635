//! Ebb's images in real containers (podman with runc), in a pod network namespace the test makes:
//! the init image writes the rules and leaves the static `ebb` in the shared volume, the proxy image
//! serves as UID 1337, and from an app container whose root filesystem has no libc at all, the copied
//! `ebb drain --wait` drains the sidecar while a request is in flight, which completes; then the app
//! and the sidecar stop in Kubernetes' order and the sidecar exits 0. Under HTTP/1.1, HTTP/2 and gRPC
//! load, a pod terminated as the kubelet terminates it (native sidecar: the app's preStop, the app's
//! SIGTERM, then the sidecar's; classic: the app's preStop and the sidecar's SIGTERM together) fails
//! no request.
//!
//! Needs podman, runc and the images `scripts/images.sh` builds (`scripts/test.sh` does both); without
//! them the test says why and does nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::load::{self, Backends, H2Kind, H2Pool, Stop, Tally};
use support::netns::Netns;
use support::process::{output_within, tempdir};
use support::{client, netns, origin, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const PROXY_CONFIG: &str = "inbound: { bind: 0.0.0.0:15006, detect_timeout: 2s }\n\
    outbound: { bind: 0.0.0.0:15001, detect_timeout: 2s }\n\
    admin: { bind: 127.0.0.1:15000 }\ntelemetry: { bind: 0.0.0.0:15020 }\nhealth: { bind: 0.0.0.0:15021 }\n\
    drain: { announce: 500ms, timeout: 15s, idle_close_window: 200ms }\nlog: { format: json }\n";

/// `podman` with the settings this machine needs (runc, cgroupfs, vfs storage: what the images were
/// built into).
fn podman(args: &[&str]) -> Output {
    let mut cmd = Command::new("podman");
    cmd.args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--runtime", "runc"]).args(args);
    output_within(&mut cmd, WAIT)
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if Command::new("podman").arg("--version").output().is_err() {
        return Some("podman is not installed (scripts/test.sh installs it)".into());
    }
    for image in ["ebb:proxy", "ebb:init", "ebb:app"] {
        if !podman(&["image", "exists", image]).status.success() {
            return Some(format!("image {image} is missing: run scripts/images.sh (scripts/test.sh does)"));
        }
    }
    None
}

/// Whether the container tests can run here; says why not when they cannot.
fn can_run() -> bool {
    if let Some(why) = missing() {
        println!("SKIPPED: {why}");
        return false;
    }
    netns::require_root_and_tools();
    true
}

/// Containers removed when the test ends, whatever happened.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
    }
}

/// The common flags of a container in the pod: its network namespace, explicit limits.
fn pod_flags(ns: &Netns) -> Vec<String> {
    vec![
        format!("--network=ns:/run/netns/{}", ns.name),
        "--ulimit=nofile=4096:4096".into(),
        "--ulimit=nproc=4096:4096".into(),
    ]
}

fn run(ns: &Netns, name: &str, extra: &[&str], image_and_args: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["run".into(), format!("--name={name}")];
    args.extend(pod_flags(ns));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(image_and_args.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&args)
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

/// A pod of real containers in its own network namespace: rules by the init container, the proxy,
/// the app; removed (containers, then namespace) when dropped.
struct Pod {
    ns: Netns,
    tag: String,
    _bin: tempdir::Dir,
    _cfg: tempdir::Dir,
    _cleanup: Containers,
}

impl Pod {
    /// Starts the pod: the init container (which must leave ebb in the volume), the proxy (UID 1337,
    /// read-only root, `proxy_env` added), the app with `app_args`.
    fn start(ns: Netns, app_args: &[&str], proxy_env: &[&str]) -> Self {
        let tag = format!("ebb-test-{}-{}", std::process::id(), ns.name);
        let cleanup = Containers(["init", "proxy", "app"].iter().map(|r| format!("{tag}-{r}")).collect());
        let bin = tempdir::Dir::new();
        let cfg = tempdir::Dir::new();
        std::fs::write(cfg.0.join("ebb.yaml"), PROXY_CONFIG).unwrap();
        for d in [&bin.0, &cfg.0] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let vol = format!("{}:/ebb-bin", bin.0.display());
        let init_flags =
            ["--rm", "--cap-add=NET_ADMIN", "--cap-add=NET_RAW", "-e", "EBB_INIT_INSTALL_EBB=/ebb-bin/ebb", "-v", &vol];
        ok(run(&ns, &format!("{tag}-init"), &init_flags, &["ebb:init"]), "the init container");
        let rules = String::from_utf8_lossy(&ns.exec(&["iptables-save", "-t", "nat"]).stdout).into_owned();
        assert!(rules.contains("EBB_INBOUND") && rules.contains("--uid-owner 1337"), "{rules}");
        assert!(bin.0.join("ebb").exists(), "the init container left ebb in the volume");

        let cfg_vol = format!("{}:/etc/ebb:ro", cfg.0.display());
        let mut flags = vec!["-d", "--user=1337:1337", "--read-only", "-v", &cfg_vol];
        for e in proxy_env {
            flags.extend(["-e", e]);
        }
        let proxy = run(&ns, &format!("{tag}-proxy"), &flags, &["ebb:proxy", "run", "--config", "/etc/ebb/ebb.yaml"]);
        ok(proxy, "the proxy container");
        let app_vol = format!("{}:/ebb-bin:ro", bin.0.display());
        let mut app = vec!["ebb:app"];
        app.extend(app_args);
        ok(run(&ns, &format!("{tag}-app"), &["-d", "-v", &app_vol], &app), "the app container");
        ns.wait_listening(15006);
        ns.wait_listening(8080);
        ns.wait_listening(8081);
        Pod { ns, tag, _bin: bin, _cfg: cfg, _cleanup: cleanup }
    }

    fn name(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    fn addr(&self, port: u16) -> std::net::SocketAddr {
        format!("{}:{port}", self.ns.pod_ip).parse().unwrap()
    }

    /// A JSON document from Ebb's admin API, read inside the pod.
    fn admin(&self, path: &'static str) -> serde_json::Value {
        self.ns.block_on(move || async move { client::json("127.0.0.1:15000".parse().unwrap(), path).await })
    }

    /// `podman exec` in the app container: the kubelet running its preStop.
    fn prestop(&self, timeout: &str) -> String {
        let out = podman(&["exec", &self.name("app"), "/ebb-bin/ebb", "drain", "--wait", "--timeout", timeout]);
        ok(out, "the app's preStop (ebb drain --wait)")
    }

    /// SIGTERM, then SIGKILL after `grace` seconds, as the kubelet stops a container; how long it took.
    fn stop(&self, role: &str, grace: u32) -> Duration {
        let t0 = Instant::now();
        ok(podman(&["stop", "-t", &grace.to_string(), &self.name(role)]), &format!("stopping {role}"));
        t0.elapsed()
    }

    fn exit_code(&self, role: &str) -> String {
        ok(podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.name(role)]), "inspect").trim().to_string()
    }

    fn logs(&self, role: &str) -> String {
        ok(podman(&["logs", &self.name(role)]), "logs")
    }
}

/// Load from outside the pod: HTTP/1.1 to the app's :8080, HTTP/2 GETs and gRPC unary calls to its
/// :8081, each counted on its own; a refused connect is the pod gone (nothing sent), any other
/// error a failure.
struct Load {
    rt: tokio::runtime::Runtime,
    /// The pod's two ports as the clients see them: gone once a GOAWAY or a refused connect said so.
    backends: [Arc<Backends>; 2],
    tallies: Vec<(&'static str, Arc<Tally>)>,
    stop: Stop,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(pod: &Pod) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stop = Stop::new();
        let (h1, h2) = (Backends::single(pod.addr(8080)), Backends::single(pod.addr(8081)));
        let mut tallies = Vec::new();
        let mut workers = Vec::new();
        let t = Arc::new(Tally::default());
        for _ in 0..3 {
            workers.push(rt.spawn(load::h1_worker(h1.clone(), t.clone(), "/work", stop.clone())));
        }
        tallies.push(("http1", t));
        for (name, kind) in [("http2", H2Kind::Get("/work")), ("grpc", H2Kind::GrpcAt("/demo.Echo/Unary"))] {
            let t = Arc::new(Tally::default());
            let pool = H2Pool::new(1);
            for _ in 0..2 {
                workers.push(rt.spawn(load::h2_worker(h2.clone(), pool.clone(), t.clone(), kind, stop.clone())));
            }
            tallies.push((name, t));
        }
        let load = Load { rt, backends: [h1, h2], tallies, stop, workers };
        wait_until("load through the pod on every protocol", WAIT, || load.least(|t| &t.ok) >= 20);
        load
    }

    fn least(&self, f: impl Fn(&Tally) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.tallies.iter().map(|(_, t)| f(t).load(SeqCst)).min().unwrap_or(0)
    }

    /// Waits until the clients saw the pod gone (HTTP/1.1: a refused connect; HTTP/2: a GOAWAY or a
    /// refused connect), stops, and asserts that nothing failed.
    fn finish(self, what: &str) -> String {
        let until = Instant::now() + WAIT;
        while !self.backends.iter().all(|b| b.is_draining(0)) {
            let all: Vec<String> = self.tallies.iter().map(|(n, t)| format!("{n}: {}", t.summary())).collect();
            assert!(Instant::now() < until, "{what}: not every protocol saw the pod gone: {all:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.stop();
        self.rt.block_on(async {
            for w in self.workers {
                tokio::time::timeout(WAIT, w).await.expect("a load worker ends").unwrap();
            }
        });
        let mut summary = Vec::new();
        for (name, t) in &self.tallies {
            t.assert_no_loss(&format!("{what}: {name}"));
            assert!(t.ok.load(SeqCst) >= 20, "{what}: {name}: {}", t.summary());
            summary.push(format!("{name} {} ok, {} failed", t.ok.load(SeqCst), t.failed.load(SeqCst)));
        }
        summary.join("; ")
    }
}

#[test]
fn a_libc_less_app_container_drains_the_sidecar_with_the_copied_ebb() {
    if !can_run() {
        return;
    }
    // The app image holds the static ebb and nothing else: no libc, no loader, no shell.
    let app_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/image/app");
    assert_eq!(files(&app_root), ["demo/ebb"], "the app image's root filesystem");
    let pod = Pod::start(Netns::new(), &["--latency", "1500ms"], &[]);

    // A request from outside the pod, in flight at the app through Ebb when the drain begins.
    let target = pod.addr(8080);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let in_flight = rt.spawn(async move { client::fetch(target, "GET", "/work").await });
    let until = Instant::now() + WAIT;
    loop {
        let conns = pod.admin("/connections");
        let held = conns
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["direction"] == "inbound" && c["orig_dst"] == target.to_string()));
        if held {
            break;
        }
        assert!(Instant::now() < until, "the request never reached Ebb: {conns}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The preStop, as the kubelet runs it: the copied ebb, inside the app container.
    let t0 = Instant::now();
    let report = pod.prestop("10s");
    assert!(report.contains("drained"), "{report}");
    let (status, _) = rt.block_on(in_flight).unwrap();
    assert_eq!(status, 200, "the request in flight when the drain began completed");
    assert!(t0.elapsed() < Duration::from_secs(10), "drained before the deadline: {:?}", t0.elapsed());

    // Then the app gets SIGTERM and exits; then the sidecar gets its SIGTERM and exits 0.
    pod.stop("app", 10);
    pod.stop("proxy", 20);
    assert_eq!(pod.exit_code("proxy"), "0", "the sidecar exits 0");
}

/// Kubernetes' order for a native sidecar, under load: the app's preStop drains inbound through the
/// copied ebb; the app's SIGTERM, whose late outbound call still has its proxy; the sidecar's SIGTERM
/// after the app exited, which ends it at once with exit 0.
#[test]
fn a_pod_terminated_in_native_sidecar_order_fails_no_request() {
    if !can_run() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A server outside the pod for the app's late call (through Ebb's outbound capture).
    let outside = rt.block_on(origin::serve_on("outside", false, "0.0.0.0:0".parse().unwrap()));
    let ns = Netns::new();
    let late = format!("http://{}:{}/late", ns.host_ip, outside.addr.port());
    let pod = Pod::start(ns, &["--latency", "5ms", "--on-term-get", &late], &[]);
    let load = Load::start(&pod);

    let report = pod.prestop("15s");
    assert!(report.contains("drained"), "{report}");
    let counts = load.finish("native order");
    let app_took = pod.stop("app", 10);
    assert_eq!(pod.exit_code("app"), "0");
    let logs = pod.logs("app");
    assert!(logs.contains(&format!("late call GET {late}: 200")), "the app's late outbound call: {logs}");
    assert_eq!(outside.hits.load(SeqCst), 1, "the late call reached its server through Ebb");
    let proxy_took = pod.stop("proxy", 30);
    assert_eq!(pod.exit_code("proxy"), "0", "the sidecar exits 0");
    assert!(proxy_took < Duration::from_secs(10), "the sidecar ended well within its grace: {proxy_took:?}");
    eprintln!("native order: {counts}; app stopped in {app_took:?}, sidecar in {proxy_took:?}");
}

/// A classic sidecar (a regular container) with the manifest's settings: the kubelet runs the app's
/// preStop and sends the sidecar SIGTERM at the same time; both drains run at once and no request
/// fails; the sidecar exits 0.
#[test]
fn a_pod_terminated_in_classic_sidecar_order_fails_no_request() {
    if !can_run() {
        return;
    }
    let pod = Pod::start(Netns::new(), &["--latency", "5ms"], &["EBB_DRAIN_TIMEOUT=25s", "EBB_DRAIN_ANNOUNCE=5s"]);
    let load = Load::start(&pod);
    std::thread::scope(|s| {
        let app = s.spawn(|| {
            pod.prestop("25s");
            pod.stop("app", 30)
        });
        let proxy = s.spawn(|| pod.stop("proxy", 30));
        let (app_took, proxy_took) = (app.join().unwrap(), proxy.join().unwrap());
        let counts = load.finish("classic order");
        assert_eq!(pod.exit_code("proxy"), "0", "the sidecar exits 0");
        assert!(proxy_took < Duration::from_secs(30), "within the grace: {proxy_took:?}");
        eprintln!("classic order: {counts}; app stopped in {app_took:?}, sidecar in {proxy_took:?}");
    });
}
