//! A real pod in network namespaces: sidecar-init's iptables rules, Ebb as UID 1337 and the app inside
//! a pod namespace; clients and a second server on the other end of a veth. Interception both ways,
//! no loops, excluded ports, a drain by SIGTERM under load, cleanup, and the pod's shutdown order
//! (preStop drain, the app's late outbound call, then SIGTERM).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::load::{self, Backends, Stop, Tally};
use support::netns::{world_runnable, Netns};
use support::origin::Origin;
use support::process::{output_within, tempdir, EbbProcess};
use support::{client, origin, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any single wait may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);
/// Ebb's admin API, inside the pod.
const ADMIN: &str = "127.0.0.1:15000";

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
    app_h1: Origin,
    app_h2: SocketAddr,
    app_tcp: SocketAddr,
    /// A port the app serves on loopback only: private to the pod, so not reachable through Ebb.
    app_loopback: Origin,
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
        // The app: HTTP/1.1, HTTP/2 and TCP on every address (captured, so reached through Ebb, which
        // forwards to the pod IP), one HTTP/1.1 port on loopback only, and one port on every address,
        // excluded from capture.
        let (tx, rx) = std::sync::mpsc::channel();
        ns.background(move || async move {
            let any = "0.0.0.0:0".parse().unwrap();
            let h1 = origin::serve_on("pod-h1", false, any).await;
            let h2 = origin::serve_on("pod-h2", true, any).await.addr;
            let tcp = origin::tcp_echo_on(any).await;
            let lo = origin::serve_on("pod-loopback", false, "127.0.0.1:0".parse().unwrap()).await;
            let excluded = origin::serve_on("pod-direct", false, any).await.addr;
            tx.send((h1, h2, tcp, lo, excluded)).unwrap();
        });
        let (app_h1, app_h2, app_tcp, app_loopback, app_excluded) = rx.recv_timeout(WAIT).expect("the app started");
        let init =
            ns.exec(&[sidecar_init().to_str().unwrap(), "--exclude-inbound-ports", &app_excluded.port().to_string()]);
        let applied = nat_rules(&ns);
        assert!(applied.contains("EBB_INBOUND"), "rules applied: {applied}\n{}", String::from_utf8_lossy(&init.stderr));
        let bin_dir = tempdir::Dir::new();
        // `EBB_TEST_BIN` runs the pod on another build (an older one, to see a test fail without a fix).
        let bin = std::env::var("EBB_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ebb").to_string());
        let ebb_bin = world_runnable(&bin, &bin_dir.0);
        let ebb = EbbProcess::start_wrapped(
            &["ip", "netns", "exec", &ns.name, "setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"],
            ebb_bin.to_str().unwrap(),
            POD_CONFIG,
            |_| {},
        );
        (Pod { ns, ebb, app_h1, app_h2, app_tcp, app_loopback, app_excluded, _bin_dir: bin_dir }, pristine)
    }

    /// The pod's address with one of the app's ports: what a client outside dials.
    fn pod_addr(&self, app: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.ns.pod_ip.parse().unwrap(), app.port())
    }

    /// A JSON document from Ebb's admin API, read inside the pod.
    fn admin(&self, path: &'static str) -> serde_json::Value {
        self.ns.block_on(move || async move { client::json(ADMIN.parse().unwrap(), path).await })
    }

    /// Ebb's connection list, read inside the pod.
    fn connections(&self) -> serde_json::Value {
        self.admin("/connections")
    }

    /// Polls the admin API (every 20 ms) until `f` holds; panics after `WAIT`.
    fn admin_until(&self, path: &'static str, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let until = Instant::now() + WAIT;
        loop {
            let v = self.admin(path);
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < until, "{what}: not within {WAIT:?}: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn pod_traffic_is_intercepted_both_ways_and_drains_without_loss() {
    let (mut pod, pristine) = Pod::start();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Inbound HTTP/1.1, listed by Ebb while the app holds it: intercepted.
    let target = pod.pod_addr(pod.app_h1.addr);
    let held = rt.spawn(async move { client::fetch(target, "GET", "/hold").await });
    // Listed while the request is held at the app.
    rt.block_on(pod.app_h1.arrivals(1, WAIT));
    let conns = pod.connections();
    let c = conns.as_array().unwrap().iter().find(|c| c["orig_dst"] == target.to_string()).expect("listed");
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["protocol"], "http1");
    assert_eq!(c["client_addr"].as_str().unwrap().split(':').next().unwrap(), pod.ns.host_ip);
    pod.app_h1.release(1);
    assert_eq!(rt.block_on(held).unwrap(), (http::StatusCode::OK, "held".to_string()));

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
    let hits_before = pod.app_h1.hits.load(SeqCst);
    let backends = Backends::single(target);
    let tally = Arc::new(Tally::default());
    let stop = Stop::new();
    let workers: Vec<_> = (0..4)
        .map(|_| rt.spawn(load::h1_worker(backends.clone(), tally.clone(), "/slow?ms=5", stop.clone())))
        .collect();
    let ok = || tally.ok.load(SeqCst);
    wait_until("load through the pod before the signal", WAIT, || ok() >= 20);
    let t0 = std::time::Instant::now();
    pod.ebb.signal("TERM");
    // Requests answered between two looks that both find Ebb announcing were served in that phase.
    pod.admin_until("/drain", "announcing after SIGTERM", |r| r["phase"] == "announcing");
    let at_announce = ok();
    wait_until("requests served while announcing", WAIT, || ok() > at_announce);
    let during = ok() - at_announce;
    let r = pod.admin("/drain");
    assert_eq!(r["phase"], "announcing", "{during} requests served, but not all while announcing: {r}");
    let exit = pod.ebb.wait_exit(Duration::from_secs(12)).expect("Ebb exits");
    let took = t0.elapsed();
    // The listener closed after the announce phase: the workers' next connect is refused.
    wait_until("a connect refused after the drain", WAIT, || tally.refused.load(SeqCst) > 0);
    stop.stop();
    rt.block_on(async {
        for w in workers {
            tokio::time::timeout(Duration::from_secs(10), w).await.expect("load worker ends").unwrap();
        }
    });
    eprintln!("pod drain: {} ({during} served while announcing) in {took:?}", tally.summary());
    assert_eq!(exit.code(), Some(0));
    tally.assert_no_loss("pod http1");
    assert_eq!(
        (pod.app_h1.hits.load(SeqCst) - hits_before) as u64,
        tally.ok.load(SeqCst),
        "every request the app processed was seen through to a success"
    );
    assert!(took < Duration::from_secs(5), "exited once idle: {took:?}");

    // Cleanup restores the nat table exactly.
    pod.ns.exec(&[sidecar_init().to_str().unwrap(), "--cleanup"]);
    assert_eq!(nat_rules(&pod.ns), pristine);
}

/// The pod's shutdown as Kubernetes runs it (docs/architecture.md §5): the app's preStop hook drains
/// inbound and returns; the app, shutting down, then makes a late outbound call, which Ebb still serves
/// on a new connection; Ebb's own SIGTERM then ends it at once.
#[test]
fn app_late_outbound_call_after_prestop_drain_succeeds() {
    let (mut pod, _) = Pod::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The app's outbound destination, outside the pod.
    let outside = rt.block_on(origin::serve_on("outside", false, format!("{}:0", pod.ns.host_ip).parse().unwrap()));

    // An inbound request in flight (held at the app) when the hook runs.
    let target = pod.pod_addr(pod.app_h1.addr);
    let held = rt.spawn(async move { client::fetch(target, "GET", "/hold").await });
    rt.block_on(pod.app_h1.arrivals(1, WAIT));
    let hook = {
        let mut cmd = pod.ns.command(env!("CARGO_BIN_EXE_ebb"));
        cmd.args(["drain", "--wait", "--admin", ADMIN]);
        std::thread::spawn(move || output_within(&mut cmd, Duration::from_secs(15)))
    };
    // Let the held request go once the hook's drain has started.
    pod.admin_until("/drain", "the hook started a drain", |r| r["phase"] != "serving");
    pod.app_h1.release(1);
    let out = hook.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "preStop hook failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let phases = |r: &serde_json::Value| {
        [&r["phase"], &r["inbound"], &r["outbound"]].map(|p| p.as_str().unwrap_or("-").to_string())
    };
    let drained_inbound = ["drained", "drained", "serving"];
    assert_eq!(phases(&r), drained_inbound, "{r}");
    assert_eq!((r["scope"].as_str(), r["exit"].as_bool()), (Some("inbound"), Some(false)), "{r}");
    assert_eq!(r["requests_completed"], 1, "{r}");
    assert_eq!(r["forced_closes"], 0, "{r}");
    assert_eq!(rt.block_on(held).unwrap(), (http::StatusCode::OK, "held".to_string()));

    // The hook has returned; Ebb is still up, inbound is closed, outbound is not.
    assert!(pod.ebb.is_running(), "Ebb outlives the preStop drain");
    let err = rt.block_on(tokio::net::TcpStream::connect(target)).expect_err("inbound is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    // The app's late call during its own shutdown: a new outbound connection, captured by iptables and
    // proxied by Ebb. Held at the outside server while Ebb's connection list is read.
    let outside_addr = outside.addr;
    let server = outside.clone();
    let ((status, from, body), conns) = pod.ns.block_on(move || async move {
        let (mut tx, _conn) = client::h1(outside_addr).await;
        let call = tokio::spawn(async move {
            let res = tx.send_request(client::get("/hold")).await.unwrap();
            let from = res.headers().get("x-origin").cloned();
            (res.status(), from, client::text(res).await)
        });
        server.arrivals(1, WAIT).await;
        let conns = client::json(ADMIN.parse().unwrap(), "/connections").await;
        server.release(1);
        (tokio::time::timeout(WAIT, call).await.expect("late call answered").unwrap(), conns)
    });
    assert_eq!((status.as_u16(), body.as_str()), (200, "held"));
    assert_eq!(from.unwrap(), "outside");
    let out: Vec<_> = conns.as_array().unwrap().iter().filter(|c| c["direction"] == "outbound").collect();
    assert_eq!(out.len(), 1, "the late call went through Ebb: {conns}");
    assert_eq!(out[0]["orig_dst"], outside_addr.to_string());
    assert_eq!(out[0]["client_addr"].as_str().unwrap().split(':').next().unwrap(), pod.ns.pod_ip, "from the app");
    assert_eq!(outside.conns.load(SeqCst), 1, "one upstream connection: no loop");
    assert_eq!(outside.hits.load(SeqCst), 1);
    let r = pod.admin("/drain");
    assert_eq!(phases(&r), drained_inbound, "the late call changed nothing: {r}");

    // The app has exited (its runtime, and with it its connection, is gone). The sidecar's SIGTERM:
    // nothing is left, so Ebb exits at once, not after a second 1 s announce phase.
    pod.admin_until("/drain", "the app's connection closed", |r| r["now"]["connections"] == 0);
    let t0 = Instant::now();
    pod.ebb.signal("TERM");
    let exit = pod.ebb.wait_exit(WAIT).expect("Ebb exits on SIGTERM");
    let took = t0.elapsed();
    assert_eq!(exit.code(), Some(0));
    assert!(took < Duration::from_millis(900), "exited once outbound was empty: {took:?}");
    let last = pod.ebb.log_lines().into_iter().find(|l| l["message"] == "Drain report").expect("report logged");
    let last: serde_json::Value = serde_json::from_str(last["report"].as_str().unwrap()).unwrap();
    assert_eq!((last["outbound"].as_str(), last["exit"].as_bool()), (Some("drained"), Some(true)), "{last}");
}

/// Inbound goes to the original destination, the pod IP (docs/architecture.md §2): a port the app
/// binds on loopback only stays private to the pod, as it is without a sidecar, while a port on the
/// pod IP is served. Ebb's own connection to the pod IP (UID 1337) leaves through OUTPUT, which
/// exempts it, so it reaches the app directly: one connection, never captured again.
#[test]
fn inbound_reaches_pod_ip_ports_but_not_loopback_only_ports() {
    let (pod, _) = Pod::start();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The loopback-only port: the client reaches Ebb (captured), Ebb cannot reach the app.
    let private = pod.pod_addr(pod.app_loopback.addr);
    let (status, error) = rt.block_on(async {
        let (mut tx, conn) = client::h1(private).await;
        let res = tx.send_request(client::get("/")).await.unwrap();
        let error = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string());
        // Close this connection before the next part counts connections.
        drop(tx);
        conn.await.unwrap().unwrap();
        (res.status(), error)
    });
    assert_eq!((status.as_u16(), error.as_deref()), (502, Some("upstream-connect-refused")));
    assert_eq!(pod.app_loopback.hits.load(SeqCst), 0, "the loopback-only port was not reached");
    pod.admin_until("/connections", "the first connection closed", |c| c.as_array().is_some_and(|a| a.is_empty()));

    // The pod-IP port: served, through exactly one connection (no loop through the outbound listener).
    let target = pod.pod_addr(pod.app_h1.addr);
    let held = rt.spawn(async move { client::fetch(target, "GET", "/hold").await });
    rt.block_on(pod.app_h1.arrivals(1, WAIT));
    let conns = pod.connections();
    let listed: Vec<_> = conns.as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "only the client's inbound connection: {conns}");
    assert_eq!(
        (listed[0]["direction"].as_str(), listed[0]["orig_dst"].as_str()),
        (Some("inbound"), Some(&*target.to_string()))
    );
    pod.app_h1.release(1);
    assert_eq!(rt.block_on(held).unwrap(), (http::StatusCode::OK, "held".to_string()));
    assert_eq!(pod.app_h1.conns.load(SeqCst), 1, "one connection reached the app");
}
