//! What Ebb shows: live connections with in-flight requests, metrics, health; and config errors.

mod support;

use std::time::Duration;

use support::{client, eventually, origin, process::EbbProcess, proxy_to};

#[tokio::test]
async fn connections_lists_in_flight_request_then_forgets_closed_connection() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let admin = ebb.admin.unwrap();
    let web = ebb.addr("web").unwrap();
    let slow = tokio::spawn(async move { client::fetch(web, "GET", "/slow?ms=800").await });
    let listed = eventually(Duration::from_secs(3), async || {
        let conns = client::json(admin, "/connections").await;
        conns.as_array().unwrap().iter().any(|c| c["in_flight"].as_array().unwrap().len() == 1)
    })
    .await;
    assert!(listed, "the slow request shows as in flight");
    let conns = client::json(admin, "/connections").await;
    let c = &conns[0];
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["protocol"], "http1");
    assert_eq!(c["orig_dst"], web.to_string());
    assert_eq!(c["in_flight"][0]["method"], "GET");
    assert_eq!(c["in_flight"][0]["uri"], "/slow?ms=800");
    let status = client::json(admin, "/status").await;
    assert_eq!(status["counts"]["in_flight_requests"], 1);

    assert_eq!(slow.await.unwrap().0, 200);
    // The client dropped its connection: the record goes away.
    let gone = eventually(Duration::from_secs(3), async || {
        client::json(admin, "/connections").await.as_array().unwrap().is_empty()
    })
    .await;
    assert!(gone, "closed connection no longer listed");

    let (_, metrics) = client::fetch(ebb.telemetry.unwrap(), "GET", "/metrics").await;
    assert!(metrics.contains(r#"ebb_connections_opened_total{direction="inbound",protocol="http1"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"ebb_connections_closed_total{direction="inbound",protocol="http1"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"ebb_requests_total{direction="inbound",protocol="http1",status_class="2xx"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ebb_request_duration_seconds_count{direction="inbound",protocol="http1"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_endpoints_and_admin_is_separate() {
    let o = origin::http1("a").await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let health = ebb.health.unwrap();
    assert_eq!(client::fetch(health, "GET", "/healthz/live").await.0, 200);
    assert_eq!(client::fetch(health, "GET", "/healthz/ready").await.0, 200);
    // Read-only endpoints expose no admin routes.
    assert_eq!(client::fetch(health, "POST", "/drain").await.0, 404);
    assert_eq!(client::fetch(ebb.telemetry.unwrap(), "GET", "/connections").await.0, 404);
}

#[test]
fn bad_config_exits_64_naming_the_field() {
    let dir = support::process::tempdir::Dir::new();
    for (yaml, field) in [
        ("drain:\n  timeout: 5 parsecs\n", "drain.timeout"),
        (
            "listeners:\n  - name: a\n    bind: 127.0.0.1:0\n    target: 127.0.0.1:1\n    direction: sideways\n",
            "listeners[0].direction",
        ),
        ("upstream:\n  conect_timeout: 1s\n", "conect_timeout"),
        ("admin:\n  bind: 0.0.0.0:15000\n", "admin.bind"),
    ] {
        let path = dir.0.join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ebb"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "stderr should name {field}: {err}");
    }
}

#[test]
fn large_body_does_not_grow_memory() {
    // A real process, so its peak RSS is its own: 256 MiB streamed through must not be held.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let o = rt.block_on(origin::http1("a"));
    let ebb = EbbProcess::start(&format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: web, bind: 127.0.0.1:0, target: {}, direction: inbound }}\n",
        o.addr
    ));
    let web = ebb.addr("web");
    let hwm = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = hwm(ebb.child.id());
    rt.block_on(async {
        use http_body_util::BodyExt;
        let (mut tx, _t) = client::h1(web).await;
        let res = tx.send_request(client::get(&format!("/big?bytes={}", 256u64 << 20))).await.unwrap();
        let mut body = res.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            n += f.unwrap().into_data().map(|d| d.len() as u64).unwrap_or(0);
        }
        assert_eq!(n, 256 << 20);
    });
    let after = hwm(ebb.child.id());
    assert!(after - before < 32 * 1024, "peak RSS grew by {} KiB while streaming 256 MiB", after - before);
}
