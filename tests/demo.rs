//! `ebb demo` as a user runs it: a short rolling restart with every trigger loses nothing (over mTLS,
//! identities issued and renewed by the plane's CA), and a demo whose pods are killed instead of
//! drained reports the failures and exits non-zero.

use std::process::Command;
use std::time::Duration;

fn demo(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .arg("demo")
        .args(args)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ebb demo");
    // Bounded: the demo's own duration plus its start and restarts.
    let until = std::time::Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < until, "ebb demo did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("demo JSON: {e}; stderr: {stderr}"));
    (out.status.code(), json, stderr)
}

#[test]
fn a_rolling_restart_with_every_trigger_loses_nothing() {
    let (code, out, stderr) = demo(&[
        "--duration",
        "9s",
        "--rate",
        "300",
        "--restarts",
        "3",
        "--trigger",
        "control-plane,sigterm,admin",
        "--cert-life",
        "10s",
    ]);
    assert_eq!(code, Some(0), "{out:#}\n{stderr}");
    // mTLS by default: the plane's CA issued an identity to each process (two pods, the client, three
    // restarted pods), some were renewed under the load, and the client's Ebb handshook with the pods.
    let mtls = &out["mtls"];
    assert_eq!(mtls["certificates_issued"], 6, "{out:#}");
    assert!(mtls["certificates_renewed"].as_u64().unwrap() >= 1, "{out:#}");
    assert!(mtls["handshakes"].as_u64().unwrap() >= 2, "{out:#}");
    assert_eq!(out["failed"], 0, "{out:#}");
    let restarts = out["restarts"].as_array().unwrap();
    let triggers: Vec<&str> = restarts.iter().map(|r| r["trigger"].as_str().unwrap()).collect();
    assert_eq!(triggers, ["control-plane", "sigterm", "admin"]);
    for r in restarts {
        assert_eq!(r["report"]["phase"], "drained", "{r:#}");
        assert_eq!(r["report"]["forced_closes"], 0, "{r:#}");
    }
    for p in out["protocols"].as_array().unwrap() {
        assert!(p["ok"].as_u64().unwrap() >= 100, "too few {} requests: {p:#}", p["protocol"]);
        assert_eq!(p["ok"], p["sent"], "{p:#}");
    }
}

#[test]
fn killing_a_pod_instead_of_draining_it_fails_the_demo() {
    // Slow answers keep requests in flight on the pod when it is killed.
    let (code, out, stderr) =
        demo(&["--duration", "5s", "--rate", "300", "--latency", "200ms", "--restarts", "1", "--kill"]);
    assert_eq!(code, Some(1), "{out:#}\n{stderr}");
    assert!(out["failed"].as_u64().unwrap() > 0, "{out:#}");
    assert_eq!(out["restarts"][0]["trigger"], "sigkill");
    assert!(out["restarts"][0]["report"].is_null());
}
