//! The drain of a real `ebb` process: signals, the CLI, exit codes and timing, and zero loss under load.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::load::{self, Backends, H2Kind, H2Pool, Tally};
use support::process::EbbProcess;
use support::{client, grpc, origin};

fn yaml(listeners: &[(&str, std::net::SocketAddr)], announce: &str, timeout: &str) -> String {
    let mut y = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         drain: {{ announce: {announce}, timeout: {timeout}, idle_close_window: 200ms }}\nlisteners:\n"
    );
    for (name, target) in listeners {
        y.push_str(&format!("  - {{ name: {name}, bind: 127.0.0.1:0, target: {target}, direction: inbound }}\n"));
    }
    y
}

#[test]
fn sigterm_when_idle_exits_zero_right_after_announce() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let mut ebb = EbbProcess::start(&yaml(&[("web", o.addr)], "300ms", "20s"));
    let (status, _) = rt.block_on(client::fetch(ebb.addr("web"), "GET", "/"));
    assert_eq!(status, 200);
    let t0 = Instant::now();
    ebb.signal("TERM");
    let exit = ebb.wait_exit(Duration::from_secs(5)).expect("exited well before the 20 s deadline");
    let took = t0.elapsed();
    assert_eq!(exit.code(), Some(0));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn exits_within_100ms_of_last_response() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let mut ebb = EbbProcess::start(&yaml(&[("web", o.addr)], "200ms", "20s"));
    let web = ebb.addr("web");
    let slow = rt.spawn(async move {
        let r = client::fetch(web, "GET", "/slow?ms=1500").await;
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(200));
    ebb.signal("TERM");
    let exit = ebb.wait_exit(Duration::from_secs(10)).expect("exits");
    let exited = Instant::now();
    let ((status, _), answered) = rt.block_on(slow).unwrap();
    assert_eq!(status, 200, "in-flight request completed");
    assert_eq!(exit.code(), Some(0));
    let gap = exited.saturating_duration_since(answered);
    assert!(gap < Duration::from_millis(100), "exit {gap:?} after the last response");
}

#[test]
fn drain_cli_waits_and_prints_the_report() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let mut ebb = EbbProcess::start(&yaml(&[("web", o.addr)], "300ms", "20s"));
    let web = ebb.addr("web");
    let slow = rt.spawn(async move { client::fetch(web, "GET", "/slow?ms=800").await });
    std::thread::sleep(Duration::from_millis(100));
    let admin = ebb.addr("admin").to_string();
    let ready = std::process::Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["wait-ready", "--admin", &admin, "--timeout", "2s"])
        .status()
        .unwrap();
    assert!(ready.success());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["drain", "--wait", "--admin", &admin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("drained in"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["phase"], "drained");
    assert_eq!(report["trigger"], "admin");
    assert_eq!(report["requests_completed"], 1);
    assert_eq!(report["forced_closes"], 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("in-flight"), "progress lines shown");
    assert_eq!(rt.block_on(slow).unwrap().0, 200);
    assert_eq!(ebb.wait_exit(Duration::from_secs(3)).unwrap().code(), Some(0));
    // Once exited, wait-ready fails rather than hanging.
    let ready = std::process::Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["wait-ready", "--admin", &admin, "--timeout", "300ms"])
        .status()
        .unwrap();
    assert!(!ready.success());
}

#[test]
fn third_signal_closes_everything_now() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let mut ebb = EbbProcess::start(&yaml(&[("web", o.addr)], "5s", "60s"));
    let web = ebb.addr("web");
    let _slow = rt.spawn(async move { client::fetch(web, "GET", "/slow?ms=30000").await });
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    for _ in 0..3 {
        ebb.signal("TERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exit = ebb.wait_exit(Duration::from_secs(5)).expect("third signal ends it");
    assert_eq!(exit.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(3));
    let lines = ebb.log_lines();
    let report = lines.iter().find(|l| l["message"] == "Drain report").expect("report logged");
    let report: serde_json::Value = serde_json::from_str(report["report"].as_str().unwrap()).unwrap();
    assert_eq!(report["forced_closes"], 1, "{report}");
}

/// Two Ebb instances in front of origins; continuous HTTP/1.1, HTTP/2 and gRPC load from well-behaved
/// clients; one instance gets SIGTERM mid-run. Every request sent gets its response.
#[test]
fn zero_loss_under_load_while_one_instance_drains() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (h1o, h2o, g) =
        rt.block_on(async { (origin::http1("a").await, origin::http2("b").await, grpc::server().await) });
    let spec = [("h1", h1o.addr), ("h2", h2o.addr), ("grpc", g)];
    let mut a = EbbProcess::start(&yaml(&spec, "1s", "15s"));
    let b = EbbProcess::start(&yaml(&spec, "1s", "15s"));
    let backends = |name: &str| Backends::new(vec![a.addr(name), b.addr(name)]);
    let (bh1, bh2, bg) = (backends("h1"), backends("h2"), backends("grpc"));
    let (th1, th2, tg) = (Arc::new(Tally::default()), Arc::new(Tally::default()), Arc::new(Tally::default()));
    let stop = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    let (p2, pg) = (H2Pool::new(2), H2Pool::new(2));
    rt.block_on(async {
        for _ in 0..6 {
            tasks.push(tokio::spawn(load::h1_worker(bh1.clone(), th1.clone(), "/slow?ms=3", stop)));
        }
        for _ in 0..8 {
            tasks.push(tokio::spawn(load::h2_worker(
                bh2.clone(),
                p2.clone(),
                th2.clone(),
                H2Kind::Get("/slow?ms=3"),
                stop,
            )));
            tasks.push(tokio::spawn(load::h2_worker(bg.clone(), pg.clone(), tg.clone(), H2Kind::GrpcUnary, stop)));
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let before: Vec<u64> = [&th1, &th2, &tg].iter().map(|t| t.per_instance[0].load(SeqCst)).collect();
    let t0 = Instant::now();
    a.signal("TERM");
    let exit = a.wait_exit(Duration::from_secs(12)).expect("drained instance exits");
    let drain_took = t0.elapsed();
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(exit.code(), Some(0));
    assert!(drain_took < Duration::from_secs(3), "exited once idle, not at the deadline: {drain_took:?}");
    for (name, t, before) in [("http1", &th1, before[0]), ("http2", &th2, before[1]), ("grpc", &tg, before[2])] {
        let ok = t.ok.load(SeqCst);
        let failed = t.failed.load(SeqCst);
        eprintln!(
            "{name}: ok {ok} failed {failed} refused-connects {} unsent {} via draining instance {} (before drain {before})",
            t.refused.load(SeqCst),
            t.unsent.load(SeqCst),
            t.per_instance[0].load(SeqCst)
        );
        assert_eq!(failed, 0, "{name} failures: {:?}", t.failures.lock().unwrap());
        assert!(ok >= 1000, "{name}: only {ok} requests");
        assert!(before > 0, "{name}: the draining instance carried traffic");
    }
    drop(b);
}
