//! The drain of a real `ebb` process: signals, the CLI, exit codes and timing, and zero loss under load.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::load::{self, Backends, H2Kind, H2Pool, Stop, Tally};
use support::process::{output_within, EbbProcess};
use support::{client, eventually, origin, wait_until};

/// How long any single wait may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(5);
const EBB: &str = env!("CARGO_BIN_EXE_ebb");

/// A config with fixed-target listeners (name, target, direction).
fn yaml_with(listeners: &[(&str, SocketAddr, &str)], announce: &str, timeout: &str) -> String {
    let mut y = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         drain: {{ announce: {announce}, timeout: {timeout}, idle_close_window: 200ms }}\nlisteners:\n"
    );
    for (name, target, direction) in listeners {
        y.push_str(&format!("  - {{ name: {name}, bind: 127.0.0.1:0, target: {target}, direction: {direction} }}\n"));
    }
    y
}

/// A config with inbound listeners only.
fn yaml(listeners: &[(&str, SocketAddr)], announce: &str, timeout: &str) -> String {
    let with: Vec<_> = listeners.iter().map(|(n, t)| (*n, *t, "inbound")).collect();
    yaml_with(&with, announce, timeout)
}

/// The drain report from the admin API.
async fn report(admin: SocketAddr) -> serde_json::Value {
    client::json(admin, "/drain").await
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
    let exit = ebb.wait_exit(WAIT).expect("exited well before the 20 s deadline");
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
    // In flight (at the origin) when the signal comes.
    rt.block_on(o.arrivals(1, WAIT));
    ebb.signal("TERM");
    let exit = ebb.wait_exit(Duration::from_secs(10)).expect("exits");
    let exited = Instant::now();
    let ((status, _), answered) = rt.block_on(slow).unwrap();
    assert_eq!(status, 200, "in-flight request completed");
    assert_eq!(exit.code(), Some(0));
    let gap = exited.saturating_duration_since(answered);
    assert!(gap < Duration::from_millis(100), "exit {gap:?} after the last response");
}

/// The preStop hook: `ebb drain --wait` drains inbound and returns; the process stays up serving the
/// app's outbound calls until SIGTERM, which then ends it at once.
#[test]
fn drain_cli_waits_and_prints_the_report() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let up = rt.block_on(origin::http1("up"));
    let mut ebb =
        EbbProcess::start(&yaml_with(&[("web", o.addr, "inbound"), ("out", up.addr, "outbound")], "1s", "20s"));
    let (web, out, admin) = (ebb.addr("web"), ebb.addr("out"), ebb.addr("admin"));
    let admin_arg = admin.to_string();
    let ready = output_within(Command::new(EBB).args(["wait-ready", "--admin", &admin_arg, "--timeout", "2s"]), WAIT);
    assert!(ready.status.success());
    // A request in flight (held at the origin) when the hook runs.
    let held = rt.spawn(async move { client::fetch(web, "GET", "/hold").await });
    rt.block_on(o.arrivals(1, WAIT));
    let cli = {
        let admin_arg = admin_arg.clone();
        std::thread::spawn(move || {
            output_within(Command::new(EBB).args(["drain", "--wait", "--admin", &admin_arg]), Duration::from_secs(15))
        })
    };
    // Let the held request go only once the hook's drain has started.
    let started = rt.block_on(eventually(WAIT, async || report(admin).await["phase"] != "serving"));
    assert!(started, "the hook started a drain");
    o.release(1);
    let out_cli = cli.join().unwrap();
    let stderr = String::from_utf8_lossy(&out_cli.stderr);
    assert!(out_cli.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out_cli.stdout);
    assert!(stdout.contains("drained in"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (r["phase"].as_str(), r["inbound"].as_str(), r["outbound"].as_str()),
        (Some("drained"), Some("drained"), Some("serving")),
        "{r}"
    );
    assert_eq!(
        (r["trigger"].as_str(), r["scope"].as_str(), r["exit"].as_bool()),
        (Some("admin"), Some("inbound"), Some(false)),
        "{r}"
    );
    assert_eq!(r["at_start"]["in_flight_requests"], 1, "{r}");
    assert_eq!(r["requests_completed"], 1);
    assert_eq!(r["forced_closes"], 0);
    assert!(stderr.contains("in-flight"), "progress lines shown");
    assert_eq!(rt.block_on(held).unwrap(), (http::StatusCode::OK, "held".to_string()));

    // Still up, and saying so.
    assert!(ebb.is_running(), "the process outlives an inbound drain");
    let now = rt.block_on(report(admin));
    assert_eq!(
        (now["phase"].as_str(), now["inbound"].as_str(), now["outbound"].as_str()),
        (Some("drained"), Some("drained"), Some("serving")),
        "{now}"
    );
    let err = rt.block_on(tokio::net::TcpStream::connect(web)).expect_err("inbound stays closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The app's late outbound calls during its own shutdown, on new connections and on one kept, for
    // longer than the 500 ms a process that exits gives progress watchers: the sleeps make that span.
    let calls = rt.block_on(async {
        let (mut kept, kept_task) = client::h1(out).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(700);
        let mut calls = 0;
        while tokio::time::Instant::now() < until {
            let (status, body) = client::fetch(out, "GET", "/").await;
            assert_eq!((status.as_u16(), body.as_str()), (200, "ok"));
            kept.ready().await.unwrap();
            let res = kept.send_request(client::get("/")).await.unwrap();
            assert_eq!(res.status(), 200);
            assert!(res.headers().get("connection").is_none(), "outbound is not told to close");
            client::text(res).await;
            calls += 2;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(kept);
        assert!(tokio::time::timeout(WAIT, kept_task).await.unwrap().unwrap().is_ok());
        calls
    });
    assert_eq!(up.hits.load(SeqCst), calls, "every outbound call reached the app's destination");
    assert!(ebb.is_running(), "still serving outbound");

    // SIGTERM once the app's connections are gone: nothing is left, so the exit is immediate, not
    // after a second 1 s announce phase.
    assert!(rt.block_on(eventually(WAIT, async || report(admin).await["now"]["connections"] == 0)));
    let t0 = Instant::now();
    ebb.signal("TERM");
    let exit = ebb.wait_exit(WAIT).expect("exits on SIGTERM");
    let took = t0.elapsed();
    assert_eq!(exit.code(), Some(0));
    assert!(took < Duration::from_millis(900), "exited once outbound was empty, without announcing again: {took:?}");
    let last = ebb.log_lines().into_iter().find(|l| l["message"] == "Drain report").expect("report logged");
    let last: serde_json::Value = serde_json::from_str(last["report"].as_str().unwrap()).unwrap();
    assert_eq!((last["outbound"].as_str(), last["exit"].as_bool()), (Some("drained"), Some(true)), "{last}");
    // Once exited, wait-ready fails rather than hanging.
    let ready =
        output_within(Command::new(EBB).args(["wait-ready", "--admin", &admin_arg, "--timeout", "300ms"]), WAIT);
    assert!(!ready.status.success());
}

/// Signals are sent one at a time, each after Ebb has shown it handled the one before (tokio may merge
/// signals that arrive together).
#[test]
fn third_signal_closes_everything_now() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let mut ebb = EbbProcess::start(&yaml(&[("web", o.addr)], "5s", "60s"));
    let (web, admin) = (ebb.addr("web"), ebb.addr("admin"));
    // Held at the origin and never released.
    let held = rt.spawn(async move { client::fetch(web, "GET", "/hold").await });
    rt.block_on(o.arrivals(1, WAIT));
    ebb.signal("TERM");
    let first = ebb.wait_log("Drain started", WAIT);
    assert_eq!((first["trigger"].as_str(), first["exit"].as_bool()), (Some("sigterm"), Some(true)), "{first}");
    ebb.signal("TERM");
    ebb.wait_log("Drain triggered again", WAIT);
    let r = rt.block_on(report(admin));
    assert_eq!(
        (r["phase"].as_str(), r["forced_closes"].as_u64()),
        (Some("announcing"), Some(0)),
        "two signals only drain: {r}"
    );
    let t0 = Instant::now();
    ebb.signal("TERM");
    ebb.wait_log("Third signal: closing everything now", WAIT);
    let exit = ebb.wait_exit(WAIT).expect("third signal ends it");
    assert_eq!(exit.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let lines = ebb.log_lines();
    let report = lines.iter().find(|l| l["message"] == "Drain report").expect("report logged");
    let report: serde_json::Value = serde_json::from_str(report["report"].as_str().unwrap()).unwrap();
    assert_eq!(report["forced_closes"], 1, "{report}");
    assert_eq!(report["forced"][0]["doing"], "1 requests in flight", "{report}");
    assert_eq!(report["forced"][0]["in_flight"][0]["uri"], "/hold", "{report}");
    // The held request was answered, not dropped.
    let (status, body) = rt.block_on(held).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("drain deadline"), "{body}");
}

/// Two Ebb instances in front of origins; continuous HTTP/1.1, HTTP/2 and gRPC load from well-behaved
/// clients; one instance gets SIGTERM mid-run. Every request sent gets its response.
#[test]
fn zero_loss_under_load_while_one_instance_drains() {
    /// Successes of every kind of request awaited in each part of the run: through both instances
    /// before the drain, while one drains, and after it has exited.
    const EACH: u64 = 50;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The gRPC origin answers the echo service's unary method itself, so its requests are counted too.
    let (h1o, h2o, go) =
        rt.block_on(async { (origin::http1("a").await, origin::http2("b").await, origin::http2("grpc").await) });
    let spec = [("h1", h1o.addr), ("h2", h2o.addr), ("grpc", go.addr)];
    let mut a = EbbProcess::start(&yaml(&spec, "1s", "15s"));
    let b = EbbProcess::start(&yaml(&spec, "1s", "15s"));
    let backends = |name: &str| Backends::new(vec![a.addr(name), b.addr(name)]);
    let (bh1, bh2, bg) = (backends("h1"), backends("h2"), backends("grpc"));
    let (th1, th2, tg) = (Arc::new(Tally::default()), Arc::new(Tally::default()), Arc::new(Tally::default()));
    let stop = Stop::new();
    let mut tasks = Vec::new();
    let (p2, pg) = (H2Pool::new(2), H2Pool::new(2));
    rt.block_on(async {
        for _ in 0..6 {
            tasks.push(tokio::spawn(load::h1_worker(bh1.clone(), th1.clone(), "/slow?ms=3", stop.clone())));
        }
        for _ in 0..8 {
            tasks.push(tokio::spawn(load::h2_worker(
                bh2.clone(),
                p2.clone(),
                th2.clone(),
                H2Kind::Get("/slow?ms=3"),
                stop.clone(),
            )));
            tasks.push(tokio::spawn(load::h2_worker(
                bg.clone(),
                pg.clone(),
                tg.clone(),
                H2Kind::GrpcUnary,
                stop.clone(),
            )));
        }
    });
    let tallies = [("http1", &th1, &h1o), ("http2", &th2, &h2o), ("grpc", &tg, &go)];
    let ok = |t: &Tally| t.ok.load(SeqCst);
    let every_kind_gains = |what: &str, from: [u64; 3]| {
        wait_until(what, WAIT, || tallies.iter().zip(from).all(|((_, t, _), from)| ok(t) >= from + EACH))
    };
    // Both instances carry every kind of request before one drains.
    wait_until("load through both instances", WAIT, || {
        tallies.iter().all(|(_, t, _)| t.per_instance.iter().all(|n| n.load(SeqCst) >= EACH))
    });
    let before = tallies.map(|(_, t, _)| t.per_instance[0].load(SeqCst));
    let t0 = Instant::now();
    a.signal("TERM");
    a.wait_log("Drain started", WAIT);
    // The load goes on while the instance drains: its clients move to the other one.
    every_kind_gains("requests while one instance drains", tallies.map(|(_, t, _)| ok(t)));
    assert!(a.is_running(), "the requests above were served while the instance drained");
    let exit = a.wait_exit(Duration::from_secs(12)).expect("drained instance exits");
    let drain_took = t0.elapsed();
    // And after it has gone.
    every_kind_gains("requests after the drained instance exited", tallies.map(|(_, t, _)| ok(t)));
    stop.stop();
    rt.block_on(async {
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t).await.expect("load worker ends").unwrap();
        }
    });
    assert_eq!(exit.code(), Some(0));
    assert!(drain_took < Duration::from_secs(3), "exited once idle, not at the deadline: {drain_took:?}");
    for ((name, t, o), before) in tallies.into_iter().zip(before) {
        eprintln!("{name}: {} (via the draining instance before the drain: {before})", t.summary());
        t.assert_no_loss(name);
        assert!(before >= EACH, "{name}: the draining instance carried traffic");
        // Every request the origin processed was seen through to a success by the client: nothing was
        // answered into the void, and nothing re-sent had been processed before.
        assert_eq!(o.hits.load(SeqCst) as u64, ok(t), "{name}: origin requests vs successes");
    }
    drop(b);
}
