//! Ebb's images in real containers (podman with runc), in a pod network namespace the test makes:
//! the init image writes the rules and leaves the static `ebb` in the shared volume, the proxy image
//! serves as UID 1337, and from an app container whose root filesystem has no libc at all, the copied
//! `ebb drain --wait` drains the sidecar while a request is in flight, which completes; then the app
//! and the sidecar stop in Kubernetes' order and the sidecar exits 0.
//!
//! Needs podman, runc and the images `scripts/images.sh` builds (`scripts/test.sh` does both); without
//! them the test says why and does nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::netns::Netns;
use support::process::{output_within, tempdir};
use support::{client, netns};

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

#[test]
fn a_libc_less_app_container_drains_the_sidecar_with_the_copied_ebb() {
    if let Some(why) = missing() {
        println!("SKIPPED: {why}");
        return;
    }
    netns::require_root_and_tools();
    // The app image holds the static ebb and nothing else: no libc, no loader, no shell.
    let app_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/image/app");
    assert_eq!(files(&app_root), ["demo/ebb"], "the app image's root filesystem");

    let ns = Netns::new();
    let tag = format!("ebb-test-{}", std::process::id());
    let names = |role: &str| format!("{tag}-{role}");
    let _cleanup = Containers(vec![names("init"), names("proxy"), names("app")]);
    let bin = tempdir::Dir::new();
    let cfg = tempdir::Dir::new();
    std::fs::write(cfg.0.join("ebb.yaml"), PROXY_CONFIG).unwrap();
    for d in [&bin.0, &cfg.0] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // The init container: the rules, and the static ebb left in the volume.
    let vol = format!("{}:/ebb-bin", bin.0.display());
    let init = run(
        &ns,
        &names("init"),
        &["--rm", "--cap-add=NET_ADMIN", "--cap-add=NET_RAW", "-e", "EBB_INIT_INSTALL_EBB=/ebb-bin/ebb", "-v", &vol],
        &["ebb:init"],
    );
    ok(init, "the init container");
    let rules = String::from_utf8_lossy(&ns.exec(&["iptables-save", "-t", "nat"]).stdout).into_owned();
    assert!(rules.contains("EBB_INBOUND") && rules.contains("--uid-owner 1337"), "{rules}");
    assert!(bin.0.join("ebb").exists(), "the init container left ebb in the volume");

    // The proxy, as UID 1337 with a read-only root, and the app (no libc; the volume read-only).
    let cfg_vol = format!("{}:/etc/ebb:ro", cfg.0.display());
    let proxy = run(
        &ns,
        &names("proxy"),
        &["-d", "--user=1337:1337", "--read-only", "-v", &cfg_vol],
        &["ebb:proxy", "run", "--config", "/etc/ebb/ebb.yaml"],
    );
    ok(proxy, "the proxy container");
    let app_vol = format!("{}:/ebb-bin:ro", bin.0.display());
    let app = run(&ns, &names("app"), &["-d", "-v", &app_vol], &["ebb:app", "--latency", "1500ms"]);
    ok(app, "the app container");
    ns.wait_listening(15006);
    ns.wait_listening(8080);

    // A request from outside the pod, in flight at the app through Ebb when the drain begins.
    let target: std::net::SocketAddr = format!("{}:8080", ns.pod_ip).parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let in_flight = rt.spawn(async move { client::fetch(target, "GET", "/work").await });
    let until = Instant::now() + WAIT;
    loop {
        let conns = ns.block_on(|| async { client::json("127.0.0.1:15000".parse().unwrap(), "/connections").await });
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
    let drained = podman(&["exec", &names("app"), "/ebb-bin/ebb", "drain", "--wait", "--timeout", "10s"]);
    let report = ok(drained, "ebb drain --wait from the app container");
    assert!(report.contains("drained"), "{report}");
    let (status, _) = rt.block_on(in_flight).unwrap();
    assert_eq!(status, 200, "the request in flight when the drain began completed");
    assert!(t0.elapsed() < Duration::from_secs(10), "drained before the deadline: {:?}", t0.elapsed());

    // Then the app gets SIGTERM and exits; then the sidecar gets its SIGTERM and exits 0.
    ok(podman(&["stop", "-t", "10", &names("app")]), "stopping the app");
    ok(podman(&["stop", "-t", "20", &names("proxy")]), "stopping the proxy");
    let code = ok(podman(&["inspect", "--format", "{{.State.ExitCode}}", &names("proxy")]), "inspect");
    assert_eq!(code.trim(), "0", "the sidecar exits 0");
}
