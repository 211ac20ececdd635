//! The path of every proxied connection: original destination → tracking → detection → HTTP or TCP.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::DownstreamConfig;
use crate::config::MtlsMode;
use crate::config::RetryOn;
use crate::conntrack::{ConnState, ConnTrack, HoldKind};
use crate::domain::Direction;
use crate::domain::Protocol;
use crate::drain::Phase;
use crate::http::client::Session;
use crate::http::server::Upstream;
use crate::telemetry::ratelimit::{LogLimit, INTERVAL};
use crate::tls::identity::Identity;
use crate::tls::mesh::{accept, read_hello, Alpn, Hello};
use crate::transport::connect::{connect_io, ConnectError, MeshDial};
use crate::transport::detect::detect;
use crate::transport::io::ClientIo;
use crate::transport::linger::Linger;
use crate::transport::listen::{Listener, Slot, Target};
use crate::transport::orig_dst::original_dst;
use crate::transport::stream::{Downstream, UpstreamIo};
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
    /// This workload's mesh identity, if it has one (docs/architecture.md §15).
    pub identity: Option<Arc<Identity>>,
    /// `inbound.authorization`: per app port, the identities that may call it.
    pub authorization: HashMap<u16, Arc<[Arc<str>]>>,
}

/// What the first bytes and the listener's mTLS mode made of a connection.
enum Admitted {
    /// Served as it is: plaintext, or TLS passed through.
    Plain(ClientIo, Protocol),
    /// Mesh TLS, terminated; the peer is who it proved to be.
    Mesh(Box<tokio_rustls::server::TlsStream<ClientIo>>, Protocol, Arc<str>),
}

/// Refusals are caused by whoever connects, so a client in a reconnect loop must not be able to turn
/// each attempt into a log line.
static REFUSED_LOG: LogLimit = LogLimit::new("connection refused", INTERVAL);
static FD_LOG: LogLimit = LogLimit::new("upstream connect: no file descriptor", INTERVAL);
static STRICT_LOG: LogLimit = LogLimit::new("refused by mtls: strict", INTERVAL);
static HANDSHAKE_LOG: LogLimit = LogLimit::new("inbound mesh handshake failed", INTERVAL);

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
                    peer.identity = tracing::field::Empty,
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
            let linger = Linger {
                timeout: self.env.drain.config().linger,
                watch: self.env.drain.watch(conn.direction),
                conn: conn.clone(),
            };
            let admitted = tokio::select! {
                a = self.admit(&listener, stream, protocol, prefix, &conn, linger) => a,
                _ = watch.reached(Phase::Deadline) => {
                    self.env.drain.record_forced(&conn);
                    return;
                }
            };
            let Some(admitted) = admitted else { return };

            let (io, protocol, peer) = match admitted {
                Admitted::Plain(io, p) => (Downstream::Plain(io), p, None),
                Admitted::Mesh(tls, p, peer) => (Downstream::Tls(tls), p, Some(peer)),
            };
            conn.set_protocol(protocol);
            let span = tracing::Span::current();
            span.record("protocol", protocol.as_str());
            if let Some(peer) = &peer {
                span.record("peer.identity", &**peer);
                conn.set_peer_identity(peer.clone());
            }
            // The app's port: the original destination's under capture, the target's on a fixed listener.
            let denied = self.denied(&listener, target.port(), peer.as_ref());
            let slot = self.clusters.route(listener.direction, target);
            match protocol {
                Protocol::Opaque if denied.is_some() => tracing::debug!("Connection refused by inbound.authorization"),
                Protocol::Opaque => self.forward(io, conn, &slot.load()).await,
                Protocol::Http1 | Protocol::Http2 => {
                    let admission =
                        Admission { limit: listener.requests.clone(), overflows: listener.request_overflows.clone() };
                    let session = Arc::new(Session::new());
                    let route = Route::new(slot, Some(admission), session.clone(), conn.orig_dst);
                    let upstream = Upstream { service: route, session: Some(session), denied };
                    crate::http::server::serve(io, protocol, conn, upstream, &self.env).await
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Applies the listener's mTLS mode to a detected connection: mesh TLS is terminated (its ALPN
    /// says what runs inside), `strict` closes anything else, and the rest is served as detected.
    /// `None`: the connection is closed (refused, or its handshake failed).
    async fn admit(
        &self,
        listener: &Listener,
        mut stream: TcpStream,
        protocol: Protocol,
        prefix: bytes::Bytes,
        conn: &Arc<crate::conntrack::ConnHandle>,
        linger: Linger,
    ) -> Option<Admitted> {
        let (mode, identity) = match (&self.identity, listener.mtls) {
            (Some(identity), mode) if mode != MtlsMode::Off => (mode, identity),
            _ => return Some(Admitted::Plain(self.client_io(stream, prefix, conn, linger), protocol)),
        };
        // A port declared opaque is not sniffed (a server-first protocol would wait for the detection
        // timeout): in permissive mode its bytes pass as they come, so mesh TLS to it needs `strict`.
        if protocol == Protocol::Opaque && prefix.is_empty() && mode == MtlsMode::Permissive {
            return Some(Admitted::Plain(self.client_io(stream, prefix, conn, linger), protocol));
        }
        let (hello, prefix) = if protocol == Protocol::Opaque {
            match read_hello(&mut stream, prefix, listener.detect_timeout).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "Client went away during its TLS hello");
                    return None;
                }
            }
        } else {
            (Hello::NotTls, prefix)
        };
        if hello != Hello::Mesh {
            if mode == MtlsMode::Strict {
                let reason = if hello == Hello::NotTls { "plaintext" } else { "not-mesh-tls" };
                self.env.metrics.mtls_refused(&listener.name, reason);
                if let Some(suppressed) = STRICT_LOG.check() {
                    tracing::warn!(listener = %listener.name, client.addr = %conn.client, reason, suppressed, "Connection refused: mtls is strict");
                }
                return None;
            }
            return Some(Admitted::Plain(self.client_io(stream, prefix, conn, linger), protocol));
        }
        let io = self.client_io(stream, prefix, conn, linger);
        match accept(io, identity).await {
            Ok(a) => {
                self.env.metrics.mtls_handshake(Direction::Inbound);
                Some(Admitted::Mesh(Box::new(a.stream), a.alpn.protocol(), a.peer))
            }
            Err((cause, e)) => {
                self.env.metrics.mtls_handshake_error(Direction::Inbound, cause.as_str());
                if let Some(suppressed) = HANDSHAKE_LOG.check() {
                    tracing::warn!(client.addr = %conn.client, cause = cause.as_str(), error = %e, suppressed, "Mesh TLS handshake failed");
                }
                None
            }
        }
    }

    fn client_io(
        &self,
        stream: TcpStream,
        prefix: bytes::Bytes,
        conn: &Arc<crate::conntrack::ConnHandle>,
        linger: Linger,
    ) -> ClientIo {
        ClientIo::new(stream, prefix, conn.conn().clone()).with_linger(linger)
    }

    /// Whether `inbound.authorization` refuses this caller on `port`: the name it is refused under
    /// (its SPIFFE ID, or `plaintext`), counted; `None` when allowed.
    fn denied(&self, listener: &Listener, port: u16, peer: Option<&Arc<str>>) -> Option<Arc<str>> {
        if listener.direction != Direction::Inbound {
            return None;
        }
        let allow = self.authorization.get(&port)?;
        if peer.is_some_and(|p| allow.contains(p)) {
            return None;
        }
        let who: Arc<str> = peer.cloned().unwrap_or_else(|| Arc::from("plaintext"));
        self.env.metrics.authorization_denied(&who, port);
        Some(who)
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
    async fn connect_opaque(&self, cluster: &Cluster) -> Option<(UpstreamIo, [crate::limits::Slot; 2])> {
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
            let mesh = ep.pool.identity().map(|expected| MeshDial {
                expected,
                alpn: Alpn::Tcp,
                identity: self.identity.as_deref(),
            });
            match connect_io(ep.addr, cluster.connect_timeout, mesh).await {
                Ok(s) => {
                    if s.is_tls() {
                        self.env.metrics.mtls_handshake(Direction::Outbound);
                    }
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
                    if let ConnectError::Tls { cause, .. } = &e {
                        self.env.metrics.mtls_handshake_error(Direction::Outbound, cause.as_str());
                    }
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

    async fn forward(&self, io: Downstream, conn: Arc<crate::conntrack::ConnHandle>, cluster: &Cluster) {
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
