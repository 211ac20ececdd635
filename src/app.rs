//! Wires the proxy together: binds every listener, starts the endpoints, owns the drain, and reports
//! the addresses it actually bound (tests bind port 0).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::admin::{self, ListenerView, Role};
use crate::config::{Config, ConfigError};
use crate::conntrack::{ConnTrack, HoldKind};
use crate::domain::Direction;
use crate::drain::{Drain, Report, Trigger};
use crate::http::client::Upstreams;
use crate::limits::Limit;
use crate::proxy::Proxy;
use crate::telemetry::metrics::Metrics;
use crate::transport::listen::{self, Listener, Target};
use crate::upstream::admission::LISTENER_OVERFLOW;
use crate::upstream::cluster::Clusters;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket could not be bound (exit 69).
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: String, addr: SocketAddr, source: std::io::Error },
    /// The configuration is wrong in a way only binding could show (exit 64): a port-0 bind that
    /// turned out to be a fixed listener's target.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `identity` names files that do not load (exit 64).
    #[error(transparent)]
    Identity(#[from] crate::tls::identity::IdentityError),
    /// The control plane's TLS settings do not load, or its CA refused this node an identity (exit 64).
    #[error("{0}")]
    Plane(String),
}

/// How this sidecar dials its control plane: over TLS for an `https://` address, the plane's
/// certificate checked against `control_plane.trust_bundle` and `control_plane.identity`, and this
/// workload's certificate (read from `me` at each dial, so a renewal is used from the next) presented.
fn plane_dial(
    cp: &crate::config::ControlPlaneConfig,
    me: Arc<std::sync::OnceLock<Arc<crate::tls::identity::Identity>>>,
) -> Result<Option<crate::control::tls::Dial>, StartError> {
    use crate::control::tls::{Dial, DialTls};
    let Some(address) = &cp.address else { return Ok(None) };
    let tls = match &cp.trust_bundle {
        Some(path) if address.starts_with("https://") => {
            let bundle = std::fs::read(path).map_err(|e| {
                StartError::Plane(format!("control_plane.trust_bundle: cannot read {}: {e}", path.display()))
            })?;
            let client: crate::control::tls::ClientCert = Arc::new(move || me.get().map(|i| i.current().key.clone()));
            let tls = DialTls::new(&bundle, &cp.identity, Some(client))
                .map_err(|e| StartError::Plane(format!("control_plane.trust_bundle: {}: {e}", path.display())))?;
            Some(tls)
        }
        _ => None,
    };
    Dial::new(address, cp.connect_timeout, tls)
        .map(Some)
        .map_err(|e| StartError::Plane(format!("control_plane.address: {e}")))
}

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    /// Proxy listeners by name, with the addresses actually bound.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub telemetry: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    pub drain: Arc<Drain>,
    pub track: Arc<ConnTrack>,
    state: Arc<admin::State>,
    done: JoinHandle<Report>,
}

impl Running {
    /// The bound address of a listener by name.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// Waits until the drain under way has nothing left (whatever its scope; the process may go on
    /// serving outbound), lets open progress streams deliver the final report, and returns it.
    pub async fn wait(&self) -> Report {
        let report = self.drain.drained().await;
        let_watchers_finish(&self.state).await;
        report
    }

    /// Waits until a drain that ends the process is done (SIGTERM, `--exit`), and returns its report.
    pub async fn exited(self) -> Report {
        let report = match self.done.await {
            Ok(r) => r,
            Err(_) => self.drain.report(),
        };
        let_watchers_finish(&self.state).await;
        report
    }
}

/// Gives open `GET /drain?watch=1` streams a moment to send their last line, and the control plane's
/// progress stream the time to deliver the drain's end (bounded as that stream bounds it).
async fn let_watchers_finish(state: &admin::State) {
    if let Some(plane) = state.plane.get() {
        plane.delivered(Duration::from_secs(2)).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while state.watchers.load(Relaxed) > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn bind(what: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    listen::bind(addr).map_err(|source| StartError::Bind { what: what.to_string(), addr, source })
}

/// Binds a proxy listener and reads back the address it got (port 0 → the real port).
fn bind_listener(what: &str, addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let socket = bind(what, addr)?;
    let local = socket.local_addr().map_err(|source| StartError::Bind { what: what.to_string(), addr, source })?;
    Ok((socket, local))
}

/// Every address Ebb listens on as bound, named by its listener or endpoint.
fn bound_addresses(
    specs: &[(Listener, tokio::net::TcpListener)],
    endpoints: &[(Role, tokio::net::TcpListener)],
) -> Arc<[(String, SocketAddr)]> {
    let listeners = specs.iter().map(|(l, _)| (l.name.to_string(), l.local));
    let endpoints = endpoints.iter().filter_map(|(role, s)| Some((role.as_str().to_string(), s.local_addr().ok()?)));
    listeners.chain(endpoints).collect()
}

/// Binds and starts everything. Returns once every listener is bound and ready to accept.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let track = ConnTrack::new(metrics.clone());
    let drain = Drain::new(cfg.drain.clone(), track.clone());
    let me = Arc::new(std::sync::OnceLock::new());
    let dial = plane_dial(&cfg.control_plane, me.clone())?;
    let backoff = (cfg.control_plane.backoff_base, cfg.control_plane.backoff_max);
    let identity = match (&cfg.identity, &cfg.control_plane.token, &dial) {
        (Some(paths), _, _) => Some(crate::tls::identity::Identity::open(paths)?),
        // The identity comes from the plane's CA: nothing is served without it (docs/architecture.md §15).
        (None, Some(token), Some(dial)) => {
            let node = cfg.control_plane.node_id();
            let loaded = crate::control::enroll::first(dial, &node, token, backoff)
                .await
                .map_err(|e| StartError::Plane(e.to_string()))?;
            let identity = crate::tls::identity::Identity::issued(loaded);
            tokio::spawn(crate::control::enroll::renew(identity.clone(), dial.clone(), node, token.clone(), backoff));
            Some(identity)
        }
        _ => None,
    };
    if let Some(i) = &identity {
        let _ = me.set(i.clone());
    }
    let upstreams = Upstreams::new(cfg.upstream.clone(), metrics.clone(), identity.clone());
    let clusters =
        Clusters::new(&cfg.clusters, cfg.passthrough.clone(), cfg.upstream.clone(), upstreams.clone(), metrics.clone());

    // Bind everything first, so a bad address fails before anything is served.
    let mut specs = Vec::new();
    for (name, cap, direction) in
        [("inbound", &cfg.inbound, Direction::Inbound), ("outbound", &cfg.outbound, Direction::Outbound)]
    {
        if cap.enabled {
            let (socket, local) = bind_listener(name, cap.bind)?;
            let l = Listener {
                name: name.into(),
                direction,
                target: Target::OriginalDst,
                local,
                detect_timeout: cap.detect_timeout,
                opaque_ports: cap.opaque_ports.clone().into(),
                own_ports: Arc::from([]),
                all_opaque: false,
                inbound_to_loopback: cap.target == crate::config::InboundTarget::Loopback,
                mtls: mtls_of(direction, cap.mtls, identity.is_some()),
                max_connections: cap.max_connections,
                requests: Arc::new(Limit::new(cap.max_requests, LISTENER_OVERFLOW)),
                request_overflows: metrics.requests_rejected(name, "max_requests"),
                metrics: metrics.clone(),
            };
            specs.push((l, socket));
        }
    }
    for c in &cfg.listeners {
        let (socket, local) = bind_listener(&format!("listener {}", c.name), c.bind)?;
        let l = Listener {
            name: c.name.as_str().into(),
            direction: c.direction,
            target: Target::Fixed(c.target),
            local,
            detect_timeout: c.detect_timeout,
            opaque_ports: Arc::from([]),
            own_ports: Arc::from([]),
            all_opaque: c.opaque,
            inbound_to_loopback: false,
            mtls: mtls_of(c.direction, c.mtls, identity.is_some()),
            max_connections: c.max_connections,
            requests: Arc::new(Limit::new(c.max_requests, LISTENER_OVERFLOW)),
            request_overflows: metrics.requests_rejected(&c.name, "max_requests"),
            metrics: metrics.clone(),
        };
        specs.push((l, socket));
    }
    let mut endpoints = Vec::new();
    for (role, ep) in [(Role::Admin, &cfg.admin), (Role::Telemetry, &cfg.telemetry), (Role::Health, &cfg.health)] {
        if ep.enabled {
            endpoints.push((role, bind(role.as_str(), ep.bind)?));
        }
    }
    let mut own_ports: Vec<u16> = specs.iter().map(|(l, _)| l.local.port()).collect();
    own_ports.extend(endpoints.iter().filter_map(|(_, s)| s.local_addr().ok()).map(|a| a.port()));
    let own_ports: Arc<[u16]> = own_ports.into();
    let own_addrs = bound_addresses(&specs, &endpoints);
    // Validation checked the addresses it could; a port-0 bind has its port only now.
    for (i, c) in cfg.listeners.iter().enumerate() {
        if let Some(own) = crate::config::own_address(c.target, &own_addrs) {
            return Err(StartError::Config(ConfigError::Field {
                field: format!("listeners[{i}].target"),
                message: format!(
                    "{} is Ebb's own `{own}` as bound: every connection would loop back into Ebb",
                    c.target
                ),
            }));
        }
    }

    let state = Arc::new(admin::State {
        drain: drain.clone(),
        track: track.clone(),
        clusters: clusters.clone(),
        plane: std::sync::OnceLock::new(),
        config: cfg.clone(),
        ready: AtomicBool::new(false),
        listeners: std::sync::Mutex::new(Vec::new()),
        started: tokio::time::Instant::now(),
        watchers: AtomicUsize::new(0),
        identity: identity.clone(),
    });
    let mut addrs = Vec::new();
    let (mut admin_addr, mut telemetry_addr, mut health_addr) = (None, None, None);
    for (role, socket) in endpoints {
        let addr = socket.local_addr().ok();
        match role {
            Role::Admin => admin_addr = addr,
            Role::Telemetry => telemetry_addr = addr,
            Role::Health => health_addr = addr,
        }
        tokio::spawn(admin::run(role, socket, state.clone()));
    }

    let proxy = Arc::new(Proxy {
        track: track.clone(),
        env: crate::http::server::Env {
            drain: drain.clone(),
            metrics: metrics.clone(),
            downstream: cfg.downstream.clone(),
            policy: Arc::new(crate::http::policy::RequestPolicy::new(&cfg.upstream)),
        },
        clusters: clusters.clone(),
        own_addrs,
        identity: identity.clone(),
        authorization: cfg
            .inbound
            .authorization
            .iter()
            .map(|r| (r.port, r.allow.iter().map(|a| Arc::from(a.as_str())).collect()))
            .collect(),
    });
    if let Some(identity) = identity.clone() {
        let m = metrics.clone();
        tokio::spawn(identity.watch(move |loaded, reloaded| {
            m.mtls.expiry_seconds.set(loaded.seconds_to_expiry());
            if reloaded {
                m.mtls.reloads.inc();
            }
        }));
    }
    let mut views = Vec::new();
    let inbound_limits: Vec<_> =
        specs.iter().filter(|(l, _)| l.direction == Direction::Inbound).map(|(l, _)| l.requests.clone()).collect();
    for (mut l, socket) in specs {
        l.own_ports = own_ports.clone();
        let (name, direction, target) = (l.name.to_string(), l.direction, l.target);
        views.push(ListenerView {
            name: name.clone(),
            direction,
            addr: l.local,
            target: match target {
                Target::OriginalDst => "original destination".into(),
                Target::Fixed(a) => a.to_string(),
            },
        });
        addrs.push((name, l.local));
        let l = Arc::new(l);
        let p = proxy.clone();
        let m = metrics.clone();
        tokio::spawn(listen::run(
            l,
            socket,
            drain.watch(direction),
            move || {
                m.drain.accepted_during_announce.inc();
            },
            move |l, s, peer, slot| p.spawn(l, s, peer, slot),
            track.hold(direction, HoldKind::Listener),
        ));
    }
    if let Ok(mut l) = state.listeners.lock() {
        *l = views;
    }

    // Idle upstream connections are closed on time even when nothing else touches their pool.
    let reaper = upstreams.clone();
    let cluster_reaper = clusters.clone();
    // Clamped as validation bounds it (a config built in code skips that): the interval adds the period
    // to an `Instant`, which panics on overflow.
    let period = (cfg.upstream.idle_timeout / 2).clamp(Duration::from_millis(100), crate::config::MAX_TIMEOUT);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            reaper.reap_idle();
            cluster_reaper.reap();
        }
    });

    // The control plane, if one is configured: clusters, inbound policy and drain directives at run
    // time (docs/architecture.md §13).
    let inbound_limits = inbound_limits.into_iter().map(|l| {
        let configured = l.max();
        (l, configured)
    });
    let targets = crate::control::sidecar::Targets {
        clusters: clusters.clone(),
        inbound_limits: inbound_limits.collect(),
        drain: drain.clone(),
        metrics: metrics.clone(),
    };
    let done = tokio::spawn(drain.clone().run());
    if let Some(dial) = dial {
        let status = crate::control::sidecar::start(cfg.control_plane.clone(), dial, targets);
        let _ = state.plane.set(status);
    }
    state.ready.store(true, Relaxed);
    Ok(Running {
        listeners: addrs,
        admin: admin_addr,
        telemetry: telemetry_addr,
        health: health_addr,
        drain,
        track,
        state,
        done,
    })
}

/// The mTLS mode a listener runs with: only inbound listeners terminate mesh TLS, and only with an
/// identity to present.
fn mtls_of(direction: Direction, configured: crate::config::MtlsMode, has_identity: bool) -> crate::config::MtlsMode {
    if direction == Direction::Inbound && has_identity {
        configured
    } else {
        crate::config::MtlsMode::Off
    }
}

/// SIGTERM/SIGINT drain everything and end the process (after any inbound drain already under way);
/// the third signal closes everything at once. The handlers are installed before this returns, not
/// in the task: a SIGTERM that arrives as soon as Ebb says it is ready must drain, not kill.
pub fn watch_signals(drain: Arc<Drain>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("Cannot install signal handlers");
        return;
    };
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "sigterm",
                _ = int.recv() => "sigint",
            };
            count += 1;
            let now = count >= 3;
            if now {
                tracing::warn!("Third signal: closing everything now");
            }
            let _ = drain.trigger(Trigger { now, ..Trigger::exit(name) });
        }
    });
}
