//! The path of every proxied connection: original destination → tracking → detection → HTTP or TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::DownstreamConfig;
use crate::config::RetryOn;
use crate::conntrack::{ConnState, ConnTrack, HoldKind};
use crate::domain::Direction;
use crate::domain::Protocol;
use crate::drain::Phase;
use crate::http::client::Session;
use crate::http::server::Upstream;
use crate::telemetry::ratelimit::{LogLimit, INTERVAL};
use crate::transport::connect::{connect, ConnectError};
use crate::transport::detect::detect;
use crate::transport::io::ClientIo;
use crate::transport::linger::Linger;
use crate::transport::listen::{Listener, Slot, Target};
use crate::transport::orig_dst::original_dst;
use crate::upstream::admission::Admission;
use crate::upstream::cluster::Cluster;
use crate::upstream::retry::full_jitter;
use crate::upstream::stack::Route;

/// What serving a connection needs from the app.
#[derive(Debug)]
pub struct Proxy {
    pub track: Arc<ConnTrack>,
    /// Drain, metrics, client-side timeouts and request policy, shared with every HTTP connection.
    pub env: crate::http::server::Env,
    /// Where connections go: clusters by original destination, passthrough otherwise.
    pub clusters: Arc<crate::upstream::cluster::Clusters>,
    /// Every address Ebb listens on, as bound, named by listener or endpoint: a fixed target among
    /// them would send each connection back into Ebb.
    pub own_addrs: Arc<[(String, SocketAddr)]>,
}

/// Refusals are caused by whoever connects, so a client in a reconnect loop must not be able to turn
/// each attempt into a log line.
static REFUSED_LOG: LogLimit = LogLimit::new("connection refused", INTERVAL);
static FD_LOG: LogLimit = LogLimit::new("upstream connect: no file descriptor", INTERVAL);

impl Proxy {
    /// Serves one accepted connection on its own task.
    /// `slot` is the connection's place under its listener's limit, given back when it ends.
    pub fn spawn(self: &Arc<Self>, listener: &Arc<Listener>, stream: TcpStream, client: SocketAddr, slot: Slot) {
        let this = self.clone();
        let listener = listener.clone();
        // Counted from the accept on: a drain must not end between the accept and the listing.
        let accepted = self.track.hold(listener.direction, HoldKind::Accepted);
        tokio::spawn(async move {
            this.serve(listener, stream, client).await;
            drop(slot);
            drop(accepted);
        });
    }

    async fn serve(self: Arc<Self>, listener: Arc<Listener>, stream: TcpStream, client: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let (orig_dst, target) = match self.resolve(&listener, &stream, client) {
            Ok(pair) => pair,
            Err(reason) => {
                self.env.metrics.rejected(&listener.name, "loop").inc();
                if let Some(suppressed) = REFUSED_LOG.check() {
                    tracing::warn!(listener = %listener.name, client.addr = %client, reason, suppressed, "Connection refused");
                }
                return;
            }
        };
        let conn = Arc::new(self.track.open(listener.direction, listener.name.clone(), client, orig_dst));
        // Span names follow the direction so logs and traces read `inbound` / `outbound`.
        macro_rules! conn_span {
            ($name:literal) => {
                tracing::info_span!(
                    $name,
                    conn.id = conn.id.0,
                    client.addr = %client,
                    orig_dst = %orig_dst,
                    protocol = tracing::field::Empty,
                )
            };
        }
        let span = match listener.direction {
            Direction::Inbound => conn_span!("inbound"),
            Direction::Outbound => conn_span!("outbound"),
        };
        async move {
            let mut watch = self.env.drain.watch(listener.direction);
            let mut stream = stream;
            let (protocol, prefix) = if listener.all_opaque || listener.opaque_ports.contains(&orig_dst.port()) {
                (Protocol::Opaque, bytes::Bytes::new())
            } else {
                tokio::select! {
                    r = detect(&mut stream, listener.detect_timeout) => match r {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::debug!(error = %e, "Client went away during detection");
                            return;
                        }
                    },
                    _ = watch.reached(Phase::Deadline) => {
                        self.env.drain.record_forced(&conn);
                        return;
                    }
                }
            };
            conn.set_protocol(protocol);
            tracing::Span::current().record("protocol", protocol.as_str());
            let linger = Linger {
                timeout: self.env.drain.config().linger,
                watch: self.env.drain.watch(conn.direction),
                conn: conn.clone(),
            };
            let io = ClientIo::new(stream, prefix, conn.conn().clone()).with_linger(linger);
            let slot = self.clusters.route(listener.direction, target);
            match protocol {
                Protocol::Opaque => self.forward(io, conn, &slot.load()).await,
                Protocol::Http1 | Protocol::Http2 => {
                    let admission =
                        Admission { limit: listener.requests.clone(), overflows: listener.request_overflows.clone() };
                    let session = Arc::new(Session::new());
                    let route = Route::new(slot, Some(admission), session.clone(), conn.orig_dst);
                    let upstream = Upstream { service: route, session: Some(session) };
                    crate::http::server::serve(io, protocol, conn, upstream, &self.env).await
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Where the client meant to go, and where Ebb sends it.
    fn resolve(
        &self,
        listener: &Listener,
        stream: &TcpStream,
        client: SocketAddr,
    ) -> Result<(SocketAddr, SocketAddr), &'static str> {
        let local = stream.local_addr().map_err(|_| "no local address")?;
        match listener.target {
            Target::Fixed(t) => {
                // Validation refuses such a target; an address added to an interface later can still
                // make one, and the loop would take every file descriptor within a second.
                if loops_back(t, local, &self.own_addrs) {
                    return Err("target is Ebb itself");
                }
                Ok((local, t))
            }
            Target::OriginalDst => {
                let orig = original_dst(stream, client).unwrap_or(local);
                // Not redirected (or aimed at Ebb itself): forwarding it would loop back here.
                let own = listener.own_ports.contains(&orig.port())
                    && (orig.ip() == local.ip() || orig.ip().is_loopback() || orig.ip().is_unspecified());
                if orig == local || own {
                    return Err("original destination is Ebb itself");
                }
                let target = match listener.direction {
                    // Inbound goes where the client dialled (the pod IP) unless loopback was asked
                    // for: forwarding to 127.0.0.1 would expose app ports bound only to loopback.
                    Direction::Outbound => orig,
                    Direction::Inbound if !listener.inbound_to_loopback => orig,
                    Direction::Inbound => {
                        let ip = match orig.ip() {
                            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                        };
                        SocketAddr::new(ip, orig.port())
                    }
                };
                Ok((orig, target))
            }
        }
    }

    /// Opens the upstream connection of an opaque TCP connection: an endpoint chosen once for the
    /// whole connection, and on a failed connect another (backing off as requests do), up to the
    /// cluster's retries. What goes through a byte stream cannot be retried once sent.
    ///
    /// With the connection come the places it holds until it closes: its count on the endpoint's
    /// outstanding requests and its place under the cluster's `max_connections`.
    async fn connect_opaque(&self, cluster: &Cluster) -> Option<(TcpStream, [crate::limits::Slot; 2])> {
        let mut tried = Vec::new();
        for n in 0..=cluster.cfg.retry.num_retries {
            let Ok(i) = cluster.pick(tokio::time::Instant::now(), &tried) else {
                tracing::debug!(cluster = %cluster.name, "No healthy endpoint");
                return None;
            };
            let ep = cluster.endpoints[i].clone();
            let slots = match cluster.connect.begin() {
                Ok(s) => s,
                Err(cause) => {
                    cluster.metrics.overflow(cause);
                    return None;
                }
            };
            match connect(ep.addr, cluster.connect_timeout).await {
                Ok(s) => {
                    cluster.record(i, false);
                    drop(slots.pending);
                    return Some((s, [ep.begin(), slots.connection]));
                }
                Err(e @ ConnectError::LocalFdExhausted(..)) => {
                    // Ebb's own shortage, not the upstream's: said once a second, whatever the load.
                    if let Some(suppressed) = FD_LOG.check() {
                        tracing::warn!(error = %e, reason = "local-fd-exhausted", suppressed, "Upstream connect failed");
                    }
                    return None;
                }
                Err(e) => {
                    // Counted; per connection, and a client can make as many as it likes: debug.
                    self.env.metrics.upstream_connect_errors.inc();
                    cluster.record(i, true);
                    tracing::debug!(error = %e, endpoint = %ep.addr, "Upstream connect failed");
                    tried.push(i);
                }
            }
            if n < cluster.cfg.retry.num_retries && cluster.cfg.retry.retry_on.contains(&RetryOn::ConnectFailure) {
                let r = &cluster.cfg.retry;
                tokio::time::sleep(full_jitter(r.backoff_base, r.backoff_max, n, fastrand::f64())).await;
            } else {
                return None;
            }
        }
        None
    }

    async fn forward(&self, io: ClientIo, conn: Arc<crate::conntrack::ConnHandle>, cluster: &Cluster) {
        let Some((upstream, _outstanding)) = self.connect_opaque(cluster).await else { return };
        conn.set_state(ConnState::Forwarding);
        let mut watch = self.env.drain.watch(conn.direction);
        // Named forced as the deadline is reached, not when the goodbye that follows has ended.
        let deadline = async {
            watch.reached(Phase::Deadline).await;
            self.env.drain.record_forced(&conn);
        };
        let idle = DownstreamConfig::enabled(self.env.downstream.tcp_idle_timeout);
        match crate::transport::tcp::forward(io, upstream, deadline, idle).await {
            Ok(r) => {
                if r.idle {
                    self.env.metrics.idle_timeout(crate::domain::Protocol::Opaque);
                }
                tracing::debug!(
                    bytes.up = r.up,
                    bytes.down = r.down,
                    at_deadline = r.at_deadline,
                    idle = r.idle,
                    "Forwarded"
                )
            }
            Err(e) => tracing::debug!(error = %e, "Forwarding ended"),
        }
    }
}

/// Whether a fixed target is Ebb itself: the socket that accepted the connection, or any other of its
/// own (`own`: as bound).
fn loops_back(target: SocketAddr, local: SocketAddr, own: &[(String, SocketAddr)]) -> bool {
    target == local || crate::config::own_address(target, own).is_some()
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    #[test]
    fn a_fixed_target_at_any_own_socket_loops_back() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [("inbound".to_string(), a("0.0.0.0:15006")), ("admin".to_string(), a("127.0.0.1:15000"))];
        assert!(loops_back(a("127.0.0.1:7000"), a("127.0.0.1:7000"), &own));
        assert!(loops_back(a("127.0.0.1:15006"), a("127.0.0.1:7000"), &own));
        assert!(loops_back(a("127.0.0.1:15000"), a("127.0.0.1:7000"), &own));
        assert!(!loops_back(a("127.0.0.2:15000"), a("127.0.0.1:7000"), &own));
        assert!(!loops_back(a("192.0.2.1:15006"), a("127.0.0.1:7000"), &own));
    }
}
