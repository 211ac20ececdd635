//! Listeners: bind, accept until the drain's close phase, then take what the kernel already queued and
//! close — so a connection the kernel completed is served, never reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conntrack::Hold;
use crate::domain::Direction;
use crate::drain::{Phase, Watch};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::ratelimit::{LogLimit, INTERVAL};
use crate::transport::connect::fd_exhausted;

/// Where a listener's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The connection's original destination (iptables REDIRECT); inbound goes to the pod's own address
    /// (or loopback, with `inbound_to_loopback`) on the original port.
    OriginalDst,
    /// A fixed upstream.
    Fixed(SocketAddr),
}

/// A bound listener's identity and how its connections are served.
#[derive(Debug)]
pub struct Listener {
    pub name: Arc<str>,
    pub direction: Direction,
    pub target: Target,
    pub local: SocketAddr,
    pub detect_timeout: Duration,
    pub opaque_ports: Arc<[u16]>,
    /// Every port Ebb listens on, so a connection aimed at one of them is refused (no loops).
    pub own_ports: Arc<[u16]>,
    /// Every connection is opaque TCP (no detection).
    pub all_opaque: bool,
    /// Inbound capture sends connections to `127.0.0.1:<port>` instead of their original destination
    /// (`inbound.target: loopback`).
    pub inbound_to_loopback: bool,
    /// Mesh TLS handling; `Off` on outbound listeners and without an identity.
    pub mtls: crate::config::MtlsMode,
    /// Connections served at once; more are closed as soon as they are accepted. 0: no limit.
    pub max_connections: usize,
    /// Requests in flight through this listener (`max_requests`), shared by its connections.
    pub requests: Arc<crate::limits::Limit>,
    /// Requests refused at `max_requests`, counted for this listener.
    pub request_overflows: prometheus_client::metrics::counter::Counter,
    /// Where rejected connections and failed accepts are counted.
    pub metrics: Arc<Metrics>,
}

/// A connection's place under its listener's `max_connections`, held for as long as it is served.
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Admits connections up to the listener's limit and closes the rest at once.
///
/// A client that opens a connection and then sends nothing costs Ebb a task, a record and, once
/// detection gives up, an upstream connection; without a bound, enough of them exhaust the process's
/// file descriptors and every other connection fails with it. A closed connection costs nothing.
struct Gate {
    limit: Option<Arc<Semaphore>>,
    rejected: Counter,
    fd_exhausted: Counter,
    other_errors: Counter,
    /// The pause after a failed accept; doubles while accepts keep failing.
    backoff: Duration,
}

/// The first pause after a failed accept, and the longest: failures such as EMFILE repeat at once
/// (the connection stays queued), so the loop must not spin, but the listener must come back soon
/// after descriptors are freed, and see the drain's phases meanwhile.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(320);

static LIMIT_LOG: LogLimit = LogLimit::new("connection limit", INTERVAL);
static ACCEPT_LOG: LogLimit = LogLimit::new("accept failed", INTERVAL);

impl Gate {
    fn new(listener: &Listener) -> Self {
        let limit = (listener.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(listener.max_connections.min(Semaphore::MAX_PERMITS))));
        Self {
            limit,
            rejected: listener.metrics.rejected(&listener.name, "limit"),
            fd_exhausted: listener.metrics.accept_error(&listener.name, "fd_exhausted"),
            other_errors: listener.metrics.accept_error(&listener.name, "other"),
            backoff: BACKOFF_MIN,
        }
    }

    /// A slot for a newly accepted connection, or `None` when the listener is full (the caller drops
    /// the stream, which closes it).
    fn admit(&mut self, listener: &Listener) -> Option<Slot> {
        self.backoff = BACKOFF_MIN;
        let Some(limit) = &self.limit else { return Some(Slot { _permit: None }) };
        match limit.clone().try_acquire_owned() {
            Ok(permit) => Some(Slot { _permit: Some(permit) }),
            Err(_) => {
                self.rejected.inc();
                if let Some(suppressed) = LIMIT_LOG.check() {
                    tracing::warn!(
                        listener = %listener.name,
                        max_connections = listener.max_connections,
                        suppressed,
                        "Connection limit reached; closing new connections"
                    );
                }
                None
            }
        }
    }

    /// Counts and (rate-limited) logs a failed accept; returns how long to pause before the next.
    fn failed(&mut self, listener: &Listener, e: &std::io::Error) -> Duration {
        let exhausted = fd_exhausted(e);
        if exhausted {
            self.fd_exhausted.inc();
        } else {
            self.other_errors.inc();
        }
        if let Some(suppressed) = ACCEPT_LOG.check() {
            let reason = if exhausted { "local-fd-exhausted" } else { "other" };
            tracing::warn!(listener = %listener.name, error = %e, reason, suppressed, "Accept failed");
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        pause
    }
}

/// Binds with a deep backlog and SO_REUSEADDR; `[::]` also accepts IPv4.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// After new handshakes are refused, how long the listener keeps accepting those already answered
/// (SYN-ACK sent, the client's ACK on its way): a round trip inside a cluster, with room to spare.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(50);

/// Makes the kernel drop new SYNs to this listener while letting handshakes under way complete.
///
/// Closing a listening socket resets every connection the kernel completed but nobody accepted, and a
/// handshake can complete between the last `accept` and the close: the client believes it is
/// connected, may already have written its request, and gets a reset. With new SYNs dropped first,
/// such a client retransmits its SYN and then finds the port closed (a refused connect, which it
/// retries elsewhere); the handshakes already answered arrive within `HANDSHAKE_GRACE` and are served.
/// The filter sees the TCP header at offset 0: byte 13 holds the flags.
fn refuse_new_handshakes(socket: &TcpListener) -> std::io::Result<()> {
    use socket2::SockFilter;
    const LD_B_ABS: u16 = 0x30;
    const AND_K: u16 = 0x54;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let program = [
        SockFilter::new(LD_B_ABS, 0, 0, 13),
        SockFilter::new(AND_K, 0, 0, SYN | ACK),
        // A bare SYN (a new handshake): drop it. Anything else: keep all of it.
        SockFilter::new(JEQ_K, 0, 1, SYN),
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, u32::MAX),
    ];
    socket2::SockRef::from(socket).attach_filter(&program)
}

/// Accepts until the close phase, handing each connection to `serve` with its [`Slot`] (a connection
/// over the listener's limit is closed at once instead); then refuses new handshakes, serves those
/// under way and what the kernel had already accepted, and closes the socket.
pub async fn run<F>(
    listener: Arc<Listener>,
    socket: TcpListener,
    mut watch: Watch,
    on_announce_accept: impl Fn() + Send,
    serve: F,
    open: Hold,
) where
    F: Fn(&Arc<Listener>, TcpStream, SocketAddr, Slot) + Send,
{
    let mut gate = Gate::new(&listener);
    loop {
        tokio::select! {
            r = socket.accept() => match r {
                Ok((stream, peer)) => {
                    let Some(slot) = gate.admit(&listener) else { continue };
                    if watch.phase() == Phase::Announcing {
                        on_announce_accept();
                    }
                    serve(&listener, stream, peer, slot);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    let pause = gate.failed(&listener, &e);
                    tokio::time::sleep(pause).await;
                }
            },
            _ = watch.reached(Phase::Closing) => break,
        }
    }
    match refuse_new_handshakes(&socket) {
        Ok(()) => {
            let until = tokio::time::Instant::now() + HANDSHAKE_GRACE;
            loop {
                tokio::select! {
                    r = socket.accept() => match r {
                        Ok((stream, peer)) => {
                            if let Some(slot) = gate.admit(&listener) {
                                serve(&listener, stream, peer, slot);
                            }
                        }
                        Err(_) => break,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        Err(e) => tracing::warn!(listener = %listener.name, error = %e, "Cannot filter new handshakes; closing as is"),
    }
    let mut late = 0;
    match socket.into_std() {
        Ok(std) => loop {
            match std.accept() {
                Ok((s, peer)) => {
                    late += 1;
                    if s.set_nonblocking(true).is_ok() {
                        if let Ok(s) = TcpStream::from_std(s) {
                            if let Some(slot) = gate.admit(&listener) {
                                serve(&listener, s, peer, slot);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(listener = %listener.name, error = %e, "Accept failed while closing");
                    break;
                }
            }
        },
        Err(e) => tracing::warn!(listener = %listener.name, error = %e, "Cannot take the accept queue"),
    }
    tracing::info!(listener = %listener.name, queued = late, "Listener closed");
    // Only now may the direction's drain end: every connection the listener took is counted.
    drop(open);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn filtered_listener_ignores_new_handshakes_and_keeps_established_ones() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut before = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut accepted, _) = socket.accept().await.unwrap();
        refuse_new_handshakes(&socket).unwrap();
        // A new SYN goes unanswered: neither connected nor refused.
        let late = tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await;
        assert!(late.is_err(), "a new handshake completed: {late:?}");
        // The established connection is untouched.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        before.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Once closed, the port refuses.
        drop(socket);
        let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
