//! Test harness: real origins (hyper HTTP/1.1 and HTTP/2, tonic gRPC), Ebb in-process or as a process,
//! and small clients. Every socket binds port 0.
#![allow(dead_code)]

pub mod attacker;
pub mod client;
pub mod grpc;
pub mod h2churn;
pub mod h2frame;
pub mod h2raw;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod origin;
pub mod peers;
pub mod pki;
pub mod plane;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use ebb::config::{Config, Direction, ListenerConfig};

/// A config with no capture listeners and every endpoint on an ephemeral loopback port.
pub fn base_config() -> Config {
    let mut c = Config::default();
    c.inbound.enabled = false;
    c.outbound.enabled = false;
    for ep in [&mut c.admin, &mut c.telemetry, &mut c.health] {
        ep.bind = "127.0.0.1:0".parse().unwrap();
    }
    c.log.level = "warn".into();
    c
}

/// A fixed-target listener on an ephemeral port.
pub fn listener(name: &str, target: SocketAddr, direction: Direction) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        target,
        direction,
        detect_timeout: Duration::from_secs(10),
        opaque: false,
        max_connections: ebb::config::DEFAULT_MAX_CONNECTIONS,
        max_requests: ebb::config::DEFAULT_MAX_REQUESTS,
        mtls: Default::default(),
    }
}

/// Cluster `name` on `vip` with one endpoint at `addr` (healthy, weight 1), which must prove
/// `identity` when it has one.
pub fn one_endpoint_cluster(
    name: &str,
    vip: SocketAddr,
    addr: SocketAddr,
    identity: Option<&str>,
) -> ebb::config::ClusterConfig {
    ebb::config::ClusterConfig {
        name: name.into(),
        addresses: vec![vip],
        endpoints: vec![ebb::config::EndpointConfig {
            addr,
            weight: 1,
            state: Default::default(),
            node: None,
            identity: identity.map(str::to_string),
        }],
        ..Default::default()
    }
}

/// Starts Ebb in this process with one inbound listener `web` in front of `target`.
pub async fn proxy_to(target: SocketAddr, tweak: impl FnOnce(&mut Config)) -> ebb::app::Running {
    let mut c = base_config();
    c.listeners.push(listener("web", target, Direction::Inbound));
    tweak(&mut c);
    ebb::telemetry::init_logging(&c.log);
    ebb::app::start(c).await.expect("ebb starts")
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The outputs of `tasks`, in order; a task that panicked fails the test.
pub async fn joined<T>(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}

/// Polls `f` every 10 ms until it returns true; panics, saying `what` was awaited, after `timeout`.
/// For tests that run on a thread of their own (a process under test, a runtime they block on).
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !f() {
        assert!(std::time::Instant::now() < until, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of `series` (a metric name with its labels, as Ebb renders them) in a Prometheus text
/// exposition. Panics, naming the series and showing the text, when it is not there: a renamed or
/// relabelled series must fail a test, not read as 0.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no series `{series}` in the metrics:\n{text}"))
}
