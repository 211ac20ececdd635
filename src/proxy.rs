//! The path of every proxied connection: original destination → tracking → detection → HTTP or TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::config::Direction;
use crate::conntrack::{ConnState, ConnTrack};
use crate::drain::{Drain, Phase};
use crate::http::client::{Session, Upstreams};
use crate::transport::connect::connect;
use crate::transport::detect::{detect, Protocol};
use crate::transport::io::ClientIo;
use crate::transport::linger::Linger;
use crate::transport::listen::{Listener, Target};
use crate::transport::orig_dst::original_dst;

/// What serving a connection needs from the app.
#[derive(Debug)]
pub struct Proxy {
    pub track: Arc<ConnTrack>,
    pub drain: Arc<Drain>,
    pub upstreams: Arc<Upstreams>,
    pub connect_timeout: Duration,
    pub response_timeout: Option<Duration>,
}

impl Proxy {
    /// Serves one accepted connection on its own task.
    pub fn spawn(self: &Arc<Self>, listener: &Arc<Listener>, stream: TcpStream, client: SocketAddr) {
        let this = self.clone();
        let listener = listener.clone();
        tokio::spawn(async move { this.serve(listener, stream, client).await });
    }

    async fn serve(self: Arc<Self>, listener: Arc<Listener>, stream: TcpStream, client: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let (orig_dst, target) = match self.resolve(&listener, &stream, client) {
            Ok(pair) => pair,
            Err(reason) => {
                tracing::warn!(listener = %listener.name, client.addr = %client, reason, "Connection refused");
                return;
            }
        };
        let conn = Arc::new(self.track.open(listener.direction, listener.name.clone(), client, orig_dst));
        // Span names follow the direction so logs and traces read `inbound` / `outbound`.
        let span = match listener.direction {
            Direction::Inbound => tracing::info_span!(
                "inbound",
                conn.id = conn.id.0,
                client.addr = %client,
                orig_dst = %orig_dst,
                protocol = tracing::field::Empty,
            ),
            Direction::Outbound => tracing::info_span!(
                "outbound",
                conn.id = conn.id.0,
                client.addr = %client,
                orig_dst = %orig_dst,
                protocol = tracing::field::Empty,
            ),
        };
        async move {
            let mut watch = self.drain.watch(listener.direction);
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
                        self.drain.record_forced(&conn);
                        return;
                    }
                }
            };
            conn.set_protocol(protocol);
            tracing::Span::current().record("protocol", protocol.as_str());
            let linger = Linger {
                timeout: self.drain.config().linger,
                watch: self.drain.watch(conn.direction),
                conn: conn.clone(),
            };
            let io = ClientIo::new(stream, prefix, conn.conn().clone()).with_linger(linger);
            match protocol {
                Protocol::Opaque => self.forward(io, conn, target).await,
                Protocol::Http1 | Protocol::Http2 => {
                    let session = Session::new(self.upstreams.endpoint(target));
                    crate::http::server::serve(io, protocol, conn, session, self.drain.clone(), self.response_timeout)
                        .await
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
            Target::Fixed(t) => Ok((local, t)),
            Target::OriginalDst => {
                let orig = original_dst(stream, client).unwrap_or(local);
                // Not redirected (or aimed at Ebb itself): forwarding it would loop back here.
                let own = listener.own_ports.contains(&orig.port())
                    && (orig.ip() == local.ip() || orig.ip().is_loopback() || orig.ip().is_unspecified());
                if orig == local || own {
                    return Err("original destination is Ebb itself");
                }
                let target = match listener.direction {
                    Direction::Outbound => orig,
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

    async fn forward(&self, io: ClientIo, conn: Arc<crate::conntrack::ConnHandle>, target: SocketAddr) {
        let upstream = match connect(target, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                self.track.metrics().upstream_connect_errors.inc();
                tracing::info!(error = %e, "Upstream connect failed");
                return;
            }
        };
        conn.set_state(ConnState::Forwarding);
        let mut watch = self.drain.watch(conn.direction);
        // Named forced as the deadline is reached, not when the goodbye that follows has ended.
        let deadline = async {
            watch.reached(Phase::Deadline).await;
            self.drain.record_forced(&conn);
        };
        match crate::transport::tcp::forward(io, upstream, deadline).await {
            Ok(r) => tracing::debug!(bytes.up = r.up, bytes.down = r.down, at_deadline = r.at_deadline, "Forwarded"),
            Err(e) => tracing::debug!(error = %e, "Forwarding ended"),
        }
    }
}
