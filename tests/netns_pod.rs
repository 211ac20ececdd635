//! A real pod in network namespaces: sidecar-init's iptables rules, Ebb as UID 1337 and the app inside
//! a pod namespace; clients and a second server on the other end of a veth. Interception both ways,
//! no loops, excluded ports, a drain by SIGTERM under load, and cleanup.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use support::load::{self, Backends, Tally};
use support::netns::{world_runnable, Netns};
use support::process::{tempdir, EbbProcess};
use support::{client, origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sidecar_init() -> PathBuf {
    let ebb = PathBuf::from(env!("CARGO_BIN_EXE_ebb"));
    let p = ebb.with_file_name("sidecar-init");
    assert!(p.exists(), "{} is missing: run the workspace's tests (cargo test --workspace)", p.display());
    p
}

const POD_CONFIG: &str = "inbound: { bind: 0.0.0.0:15006, detect_timeout: 2s }\n\
    outbound: { bind: 0.0.0.0:15001, detect_timeout: 2s }\n\
    admin: { bind: 127.0.0.1:15000 }\ntelemetry: { bind: 0.0.0.0:15020 }\nhealth: { bind: 0.0.0.0:15021 }\n\
    drain: { announce: 1s, timeout: 15s, idle_close_window: 200ms }\n";

/// The pod: namespace, app servers, iptables rules, Ebb as UID 1337.
struct Pod {
    ns: Netns,
    ebb: EbbProcess,
    app_h1: SocketAddr,
    app_h2: SocketAddr,
    app_tcp: SocketAddr,
    /// A port the app serves directly, excluded from capture.
    app_excluded: SocketAddr,
    _bin_dir: tempdir::Dir,
}

fn nat_rules(ns: &Netns) -> String {
    let out = ns.exec(&["iptables-save", "-t", "nat"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Pod {
    fn start() -> (Self, String) {
        let ns = Netns::new();
        let pristine = nat_rules(&ns);
        // The app: HTTP/1.1, HTTP/2 and TCP on loopback (reachable only through Ebb), and one port on
        // every address, excluded from capture.
        let (tx, rx) = std::sync::mpsc::channel();
        ns.background(move || async move {
            let lo = "127.0.0.1:0".parse().unwrap();
            let h1 = origin::serve_on("pod-h1", false, lo).await.addr;
            let h2 = origin::serve_on("pod-h2", true, lo).await.addr;
            let tcp = origin::tcp_echo_on(lo).await;
            let excluded = origin::serve_on("pod-direct", false, "0.0.0.0:0".parse().unwrap()).await.addr;
            tx.send((h1, h2, tcp, excluded)).unwrap();
        });
        let (app_h1, app_h2, app_tcp, app_excluded) = rx.recv().unwrap();
        let init =
            ns.exec(&[sidecar_init().to_str().unwrap(), "--exclude-inbound-ports", &app_excluded.port().to_string()]);
        let applied = nat_rules(&ns);
        assert!(applied.contains("EBB_INBOUND"), "rules applied: {applied}\n{}", String::from_utf8_lossy(&init.stderr));
        let bin_dir = tempdir::Dir::new();
        let ebb_bin = world_runnable(env!("CARGO_BIN_EXE_ebb"), &bin_dir.0);
        let ebb = EbbProcess::start_wrapped(
            &["ip", "netns", "exec", &ns.name, "setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"],
            ebb_bin.to_str().unwrap(),
            POD_CONFIG,
            |_| {},
        );
        (Pod { ns, ebb, app_h1, app_h2, app_tcp, app_excluded, _bin_dir: bin_dir }, pristine)
    }

    /// The pod's address with one of the app's ports: what a client outside dials.
    fn pod_addr(&self, app: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.ns.pod_ip.parse().unwrap(), app.port())
    }

    /// Ebb's connection list, read inside the pod.
    fn connections(&self) -> serde_json::Value {
        self.ns.block_on(|| async { client::json("127.0.0.1:15000".parse().unwrap(), "/connections").await })
    }
}

#[test]
fn pod_traffic_is_intercepted_both_ways_and_drains_without_loss() {
    let (mut pod, pristine) = Pod::start();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Inbound HTTP/1.1: the app listens on loopback only, so an answer proves interception.
    let target = pod.pod_addr(pod.app_h1);
    let slow = rt.spawn(async move { client::fetch(target, "GET", "/slow?ms=700").await });
    std::thread::sleep(Duration::from_millis(300));
    let conns = pod.connections();
    let c = conns.as_array().unwrap().iter().find(|c| c["orig_dst"] == target.to_string()).expect("listed");
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["protocol"], "http1");
    assert_eq!(c["client_addr"].as_str().unwrap().split(':').next().unwrap(), pod.ns.host_ip);
    assert_eq!(rt.block_on(slow).unwrap(), (http::StatusCode::OK, "slow".to_string()));

    // Inbound HTTP/2.
    let h2_target = pod.pod_addr(pod.app_h2);
    rt.block_on(async {
        let (mut tx, _t) = client::h2(h2_target).await;
        let res = tx.send_request(client::get_h2(h2_target, "/")).await.unwrap();
        assert_eq!(res.headers()["x-origin"], "pod-h2");
        assert_eq!(client::text(res).await, "ok");
    });

    // Inbound opaque TCP.
    let tcp_target = pod.pod_addr(pod.app_tcp);
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(tcp_target).await.unwrap();
        s.write_all(b"\x00raw").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
        assert_eq!(out, b"\x00rawbye");
    });

    // An excluded port reaches the app directly: Ebb never sees it.
    let direct = pod.pod_addr(pod.app_excluded);
    let held = rt.block_on(async {
        let (mut tx, task) = client::h1(direct).await;
        let res = tx.send_request(client::get("/")).await.unwrap();
        assert_eq!(res.headers()["x-origin"], "pod-direct");
        client::text(res).await;
        (tx, task)
    });
    let conns = pod.connections();
    assert!(
        !conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["orig_dst"].as_str().unwrap().ends_with(&format!(":{}", direct.port()))),
        "excluded port bypasses Ebb: {conns}"
    );
    drop(held);

    // Outbound: the app calls a server on the other side of the veth; Ebb's own upstream connection
    // (UID 1337) is not captured again, so exactly one connection reaches the server.
    let outside = rt.block_on(origin::serve_on("outside", false, format!("{}:0", pod.ns.host_ip).parse().unwrap()));
    let outside_addr = outside.addr;
    let (status, conns) = pod.ns.block_on(move || async move {
        let (mut tx, _t) = client::h1(outside_addr).await;
        let res = tx.send_request(client::get("/slow?ms=300")).await.unwrap();
        // While the connection is open, Ebb lists it as outbound.
        let conns = client::json("127.0.0.1:15000".parse().unwrap(), "/connections").await;
        let status = res.status();
        assert_eq!(res.headers()["x-origin"], "outside");
        client::text(res).await;
        (status, conns)
    });
    assert_eq!(status, 200);
    let out = conns.as_array().unwrap().iter().filter(|c| c["direction"] == "outbound").collect::<Vec<_>>();
    assert_eq!(out.len(), 1, "{conns}");
    assert_eq!(out[0]["orig_dst"], outside_addr.to_string());
    assert_eq!(outside.conns.load(SeqCst), 1, "no loop: one upstream connection");

    // SIGTERM under continuous load: every request sent gets its response; Ebb exits once idle.
    let backends = Backends::single(target);
    let tally = Arc::new(Tally::default());
    let stop = tokio::time::Instant::now() + Duration::from_secs(4);
    let workers: Vec<_> =
        (0..4).map(|_| rt.spawn(load::h1_worker(backends.clone(), tally.clone(), "/slow?ms=5", stop))).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let before = tally.ok.load(SeqCst);
    let t0 = std::time::Instant::now();
    pod.ebb.signal("TERM");
    let exit = pod.ebb.wait_exit(Duration::from_secs(12)).expect("Ebb exits");
    let took = t0.elapsed();
    rt.block_on(async {
        for w in workers {
            w.await.unwrap();
        }
    });
    eprintln!(
        "pod drain: ok {} (before SIGTERM {before}) failed {} refused {} in {took:?}",
        tally.ok.load(SeqCst),
        tally.failed.load(SeqCst),
        tally.refused.load(SeqCst)
    );
    assert_eq!(exit.code(), Some(0));
    assert_eq!(tally.failed.load(SeqCst), 0, "{:?}", tally.failures.lock().unwrap());
    assert!(tally.ok.load(SeqCst) > before, "requests were served during the announce phase");
    assert!(tally.refused.load(SeqCst) > 0, "after the announce phase new connections were refused");
    assert!(took < Duration::from_secs(5), "exited once idle: {took:?}");

    // Cleanup restores the nat table exactly.
    pod.ns.exec(&[sidecar_init().to_str().unwrap(), "--cleanup"]);
    assert_eq!(nat_rules(&pod.ns), pristine);
}
