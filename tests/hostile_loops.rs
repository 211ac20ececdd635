//! Loops: a fixed listener aimed at one of Ebb's own sockets, and Ebbs aimed at each other. One
//! request used to make hundreds of nested hops within milliseconds and exhaust file descriptors;
//! now the config is refused naming the field, and a loop between instances gets a single 508.

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ebb::config::{Config, ConfigError, Direction};
use ebb::http::policy::{MAX_HOPS, X_EBB_HOPS};
use http::Request;
use http_body_util::Full;
use support::process::{output_within, tempdir::Dir};
use support::{base_config, client, listener, origin};

/// One HTTP/1.1 request on a fresh connection.
async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming> {
    let (mut tx, _conn) = client::h1(addr).await;
    tx.send_request(req).await.unwrap()
}

/// A loopback port nothing listens on (as far as anyone can tell right now).
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn refused_field(yaml: &str) -> String {
    match Config::from_yaml(yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(ConfigError::Field { field, .. }) => field,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn self_target_config_is_refused_naming_the_field() {
    let p = free_port();
    let dir = Dir::new();
    let path = dir.0.join("ebb.yaml");
    std::fs::write(
        &path,
        format!(
            "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
             telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
             listeners:\n  - {{ name: self, bind: 127.0.0.1:{p}, target: 127.0.0.1:{p}, direction: inbound }}\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ebb"));
    cmd.arg("run").arg("--config").arg(&path);
    let out = output_within(&mut cmd, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("listeners[0].target"), "{err}");
}

#[test]
fn targets_that_reach_any_own_socket_are_refused() {
    let l = |target: &str| {
        format!("listeners:\n  - {{ name: a, bind: 127.0.0.1:0, target: \"{target}\", direction: outbound }}\n")
    };
    // The capture listeners bind 0.0.0.0: reached through loopback, any loopback address, or 0.0.0.0.
    for target in ["127.0.0.1:15006", "127.0.0.2:15001", "0.0.0.0:15006", "[::ffff:127.0.0.1]:15006"] {
        assert_eq!(refused_field(&l(target)), "listeners[0].target", "{target}");
    }
    // Admin, telemetry and health: a fixed listener must not put the admin API on the network.
    for target in ["127.0.0.1:15000", "127.0.0.1:15020", "127.0.0.1:15021"] {
        assert_eq!(refused_field(&l(target)), "listeners[0].target", "{target}");
    }
    // A dual-stack `[::]` bind takes IPv4 too.
    let yaml = format!("inbound: {{ bind: \"[::]:15006\" }}\n{}", l("127.0.0.1:15006"));
    assert_eq!(refused_field(&yaml), "listeners[0].target");
    let yaml = format!("inbound: {{ bind: \"[::]:15006\" }}\n{}", l("[::1]:15006"));
    assert_eq!(refused_field(&yaml), "listeners[0].target");
    // A second listener aimed at the first one.
    let yaml = "inbound: { enabled: false }\nlisteners:\n\
        - { name: a, bind: 127.0.0.1:7100, target: 127.0.0.1:9, direction: inbound }\n\
        - { name: b, bind: 127.0.0.1:7101, target: 127.0.0.1:7100, direction: inbound }\n";
    assert_eq!(refused_field(yaml), "listeners[1].target");
    // This host's own (non-loopback) address, when it has one, on the port of an unspecified bind.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    if probe.connect("192.0.2.1:9").is_ok() {
        let ip = probe.local_addr().unwrap().ip();
        if !ip.is_loopback() && !ip.is_unspecified() {
            assert_eq!(refused_field(&l(&format!("{ip}:15006"))), "listeners[0].target", "{ip}");
        }
    }
    // Not loops: a disabled listener's port, another host, a specific bind on another address.
    Config::from_yaml(&format!("inbound: {{ enabled: false }}\n{}", l("127.0.0.1:15006"))).unwrap();
    Config::from_yaml(&l("192.0.2.1:15006")).unwrap();
    Config::from_yaml(&format!("inbound: {{ bind: 127.0.0.1:15006 }}\n{}", l("127.0.0.2:15006"))).unwrap();
}

#[tokio::test]
async fn a_self_target_found_only_when_binding_is_a_config_error() {
    // Built in code, as tests and embedders do, so validation never ran: start checks the addresses
    // it actually bound.
    let p = free_port();
    let mut c = base_config();
    c.admin.bind = SocketAddr::from(([127, 0, 0, 1], p));
    c.listeners.push(listener("web", SocketAddr::from(([127, 0, 0, 1], p)), Direction::Inbound));
    match ebb::app::start(c).await {
        Err(ebb::app::StartError::Config(ConfigError::Field { field, .. })) => assert_eq!(field, "listeners[0].target"),
        other => panic!("expected a config error, got {:?}", other.map(|r| r.listeners)),
    }
}

/// Two in-process Ebbs, A and B, each listener's target the other's listener.
async fn pointing_at_each_other(direction: Direction) -> (ebb::app::Running, ebb::app::Running) {
    let (pa, pb) = (free_port(), free_port());
    let (a, b) = (SocketAddr::from(([127, 0, 0, 1], pa)), SocketAddr::from(([127, 0, 0, 1], pb)));
    let start = |bind: SocketAddr, target: SocketAddr| {
        let mut c = base_config();
        let mut l = listener("web", target, direction);
        l.bind = bind;
        c.listeners.push(l);
        c.validate().expect("each config alone is fine");
        ebb::app::start(c)
    };
    let ebb_a = start(a, b).await.expect("A starts");
    let ebb_b = start(b, a).await.expect("B starts");
    (ebb_a, ebb_b)
}

/// Connections each instance has seen since it started.
fn opened(ebb: &ebb::app::Running) -> u64 {
    ebb.track.totals().closed + ebb.track.counts().connections as u64
}

#[tokio::test]
async fn two_ebbs_pointing_at_each_other_answer_one_508_quickly() {
    let (a, b) = pointing_at_each_other(Direction::Inbound).await;
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), send(a.addr("web").unwrap(), client::get("/")))
        .await
        .expect("an answer within 5 s, not a loop");
    let elapsed = started.elapsed();
    assert_eq!(res.status(), 508, "{:?}", res.headers());
    assert_eq!(res.headers()["x-ebb-error"], "loop-detected");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    // A: the client's connection and B's; B: A's. No storm.
    let (on_a, on_b) = (opened(&a), opened(&b));
    assert!(on_a <= 3 && on_b <= 2, "connections opened: A {on_a}, B {on_b}");
}

#[tokio::test]
async fn a_grpc_loop_gets_a_trailers_only_status() {
    let (a, _b) = pointing_at_each_other(Direction::Outbound).await;
    let web = a.addr("web").unwrap();
    let (mut tx, _conn) = client::h2(web).await;
    let req = Request::post(format!("http://{web}/pkg.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), tx.send_request(req)).await.expect("no loop").unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ebb-error"], "loop-detected");
    assert_eq!(res.headers()["grpc-status"], "13", "not UNAVAILABLE: a retried loop loops again");
    assert!(res.headers().contains_key("grpc-message"));
}

#[tokio::test]
async fn too_many_hops_get_508_and_fewer_pass_with_this_hop_added() {
    let o = origin::http1("app").await;
    let ebb = support::proxy_to(o.addr, |_| {}).await;
    let web = ebb.addr("web").unwrap();
    let with_hops = |n: usize| {
        let hops: Vec<String> = (0..n).map(|i| format!("{i:016x}-out")).collect();
        let mut req = client::get("/headers");
        req.headers_mut().insert(X_EBB_HOPS.clone(), hops.join(", ").parse().unwrap());
        req
    };
    let res = send(web, with_hops(MAX_HOPS)).await;
    assert_eq!(res.status(), 508);
    assert_eq!(res.headers()["x-ebb-error"], "too-many-hops");
    let res = send(web, with_hops(2)).await;
    assert_eq!(res.status(), 200);
    let body = client::text(res).await;
    let line = body.lines().find(|l| l.starts_with("x-ebb-hops:")).expect("the hop list reaches the upstream");
    let hops: Vec<&str> = line["x-ebb-hops:".len()..].split(',').map(str::trim).collect();
    assert_eq!(hops.len(), 3, "{line}");
    assert!(hops[2].ends_with("-in"), "{line}");
}

#[tokio::test]
async fn error_bodies_do_not_name_the_upstream_unless_exposed() {
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    for expose in [false, true] {
        let ebb = support::proxy_to(dead, |c| c.upstream.expose_errors = expose).await;
        let res = send(ebb.addr("web").unwrap(), client::get("/")).await;
        assert_eq!(res.status(), 502);
        let cause = res.headers()["x-ebb-error"].to_str().unwrap().to_string();
        assert_eq!(cause, "upstream-connect-refused");
        let body = client::text(res).await;
        let named = body.contains(&dead.to_string()) || body.contains(&dead.port().to_string());
        assert_eq!(named, expose, "expose_errors: {expose}: {body}");
    }
}
