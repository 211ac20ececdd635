//! Bytes relayed both ways (opaque TCP, upgrades), half-close passed through, a clean end at the deadline.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::drain::FORCE_GRACE;
use crate::transport::idle::Idleness;
use crate::transport::stream::{Downstream, UpstreamIo};

/// Per direction. Larger than tokio's 8 KiB copy buffer, since bulk transfers pay a pair of syscalls
/// per buffer; not larger still, since every long-lived connection holds two.
const BUF_SIZE: usize = 32 * 1024;

/// What a relay knows of the messages in one direction, so that at the drain deadline it stops
/// between two of them and says goodbye in the protocol's own words.
pub trait Framing {
    /// Notes bytes read from the source, in order, whether they were relayed or dropped.
    fn pass(&mut self, bytes: &[u8]);
    /// How many of the `next` bytes to relay before the next safe place to stop; `None` when it lies
    /// beyond them.
    fn stop_after(&self, next: &[u8]) -> Option<usize>;
    /// What to write to the destination once stopped, before closing it.
    fn farewell(&self) -> Option<Bytes>;
    /// The source has finished in its own protocol: its end can be shut without waiting for its EOF.
    fn finished(&self) -> bool;
}

/// Bytes without messages: at the deadline what has been read is delivered, and nothing is awaited.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unframed;

impl Framing for Unframed {
    fn pass(&mut self, _: &[u8]) {}

    fn stop_after(&self, next: &[u8]) -> Option<usize> {
        Some(next.len())
    }

    fn farewell(&self) -> Option<Bytes> {
        None
    }

    fn finished(&self) -> bool {
        true
    }
}

/// One end of a relay, as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client's side: the connection Ebb accepted.
    Downstream,
    /// The side Ebb connected to.
    Upstream,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
        })
    }
}

/// Why a relay ended before both sides had closed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from one end failed (typically a reset).
    #[error("reading from the {0} failed: {1}")]
    Read(End, #[source] io::Error),
    /// Writing to one end failed (typically a reset or a broken pipe).
    #[error("writing to the {0} failed: {1}")]
    Write(End, #[source] io::Error),
}

/// What a relay moved, and whether the drain deadline ended it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes relayed downstream → upstream.
    pub up: u64,
    /// Bytes relayed upstream → downstream.
    pub down: u64,
    /// The drain deadline came before both sides had closed.
    pub at_deadline: bool,
    /// Nothing moved either way for the idle timeout, so Ebb ended it.
    pub idle: bool,
}

/// Forwards opaque TCP until both sides have closed; when one side finishes sending, the other sees a
/// FIN (`shutdown(SHUT_WR)`), not a close, so request/response protocols that half-close still work.
/// Once `deadline` resolves, or nothing has moved either way for `idle`, both sides get a FIN after
/// the bytes already read, then a short grace.
pub async fn forward(
    mut client: Downstream,
    mut upstream: UpstreamIo,
    deadline: impl Future<Output = ()>,
    idle: Option<Duration>,
) -> Result<Relayed, RelayError> {
    relay(&mut client, &mut upstream, Unframed, Unframed, deadline, idle).await
}

/// Notices a relay that has moved nothing for its idle timeout (`transport::idle`), against the
/// relay's byte counts.
struct IdleTimer {
    idleness: Idleness,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(idle: Duration) -> Self {
        let idleness = Idleness::new(idle);
        let sleep = Box::pin(tokio::time::sleep_until(crate::clock::after(idleness.tick())));
        Self { idleness, sleep }
    }

    /// Ready once `progress` has not changed for the idle timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>, progress: u64) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if self.idleness.expired(progress, false) {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(crate::clock::after(self.idleness.tick()));
        }
    }
}

/// How the open phase of a relay ended.
enum Ended {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The drain deadline.
    Deadline,
}

/// Relays between `down` and `up` until both directions have ended (a FIN passed through each).
///
/// Once `deadline` resolves, each direction relays up to its next safe stop (per its [`Framing`]) and
/// writes its farewell, within [`FORCE_GRACE`]; then, within another [`FORCE_GRACE`], each side gets
/// a FIN once it has finished (its own farewell, or EOF), and what the sides still send is read and
/// dropped, so that closing does not turn into a reset. Errors after the deadline only end the
/// direction they hit. With `idle`, a relay that has moved nothing either way for that long ends the
/// same way, without counting as forced (`deadline` is not polled again).
pub async fn relay<D, U, FD, FU>(
    down: &mut D,
    up: &mut U,
    to_up: FD,
    to_down: FU,
    deadline: impl Future<Output = ()>,
    idle: Option<Duration>,
) -> Result<Relayed, RelayError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    FD: Framing,
    FU: Framing,
{
    let mut du = Pipe::new(to_up, End::Downstream, End::Upstream);
    let mut ud = Pipe::new(to_down, End::Upstream, End::Downstream);
    let mut idle_timer = idle.map(IdleTimer::new);
    let mut deadline = std::pin::pin!(deadline);
    let open = poll_fn(|cx| {
        let a = du.poll(cx, down, up)?;
        let b = ud.poll(cx, up, down)?;
        if a.is_ready() && b.is_ready() {
            return Poll::Ready(Ok::<_, RelayError>(Ended::Closed));
        }
        // Bytes that arrived with the deadline are relayed first (above).
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(Ended::Deadline));
        }
        if let Some(t) = idle_timer.as_mut() {
            if t.poll_expired(cx, du.progress() + ud.progress()).is_ready() {
                return Poll::Ready(Ok(Ended::Idle));
            }
        }
        Poll::Pending
    });
    let idled = match open.await? {
        Ended::Closed => return Ok(du.totals(&ud, false, false)),
        Ended::Idle => {
            tracing::debug!(idle = ?idle, "Nothing moved for the idle timeout; closing");
            true
        }
        Ended::Deadline => false,
    };

    du.stop();
    ud.stop();
    let stopped = poll_fn(|cx| {
        du.poll_lenient(cx, down, up);
        ud.poll_lenient(cx, up, down);
        if du.stopped() && ud.stopped() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    if tokio::time::timeout(FORCE_GRACE, stopped).await.is_err() {
        tracing::debug!("No safe place to stop within the grace; closing without a farewell");
        du.give_up();
        ud.give_up();
    }

    let until = Instant::now() + FORCE_GRACE;
    let closed = poll_fn(|cx| {
        du.poll_lenient(cx, down, up);
        ud.poll_lenient(cx, up, down);
        // A side gets its FIN once it has answered our farewell (or there was none to answer); the pipe
        // writing to a side is the one that shuts it.
        ud.poll_shut_if(cx, du.source_done() || !ud.said_farewell, down);
        du.poll_shut_if(cx, ud.source_done() || !du.said_farewell, up);
        if du.eof && ud.eof {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    if tokio::time::timeout_at(until, closed).await.is_err() {
        tracing::debug!(down.eof = du.eof, up.eof = ud.eof, "Peers still open after the grace; closing");
    }
    Ok(du.totals(&ud, !idled, idled))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Everything read is relayed.
    Relay,
    /// Past the deadline: relaying up to the next safe stop only.
    Stopping,
    /// Stopped at a safe place; writing the farewell.
    Farewell,
    /// Nothing more is relayed; the source is read to its EOF and what it sends dropped.
    Discard,
}

/// Why one direction failed: reading its source or writing its destination.
enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of a relay.
struct Pipe<F> {
    framing: F,
    src_end: End,
    dst_end: End,
    mode: Mode,
    buf: Box<[u8]>,
    /// Bytes `buf[start..end]` are read and not yet written.
    start: usize,
    end: usize,
    /// Where relaying stops in `buf`, once the safe stop lies within it.
    stop_at: Option<usize>,
    farewell: Bytes,
    /// The farewell went out whole: the destination is expected to answer it.
    said_farewell: bool,
    /// The source has sent EOF (or failed): nothing more will be read from it.
    eof: bool,
    /// The destination's write half is shut down (or failed): nothing more will be written to it.
    shut: bool,
    need_flush: bool,
    relayed: u64,
}

impl<F: Framing> Pipe<F> {
    fn new(framing: F, src_end: End, dst_end: End) -> Self {
        Self {
            framing,
            src_end,
            dst_end,
            mode: Mode::Relay,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            stop_at: None,
            farewell: Bytes::new(),
            said_farewell: false,
            eof: false,
            shut: false,
            need_flush: false,
            relayed: 0,
        }
    }

    fn totals<G>(&self, other: &Pipe<G>, at_deadline: bool, idle: bool) -> Relayed {
        Relayed { up: self.relayed, down: other.relayed, at_deadline, idle }
    }

    /// Grows whenever this direction moves: bytes relayed, or its source's EOF.
    fn progress(&self) -> u64 {
        self.relayed + u64::from(self.eof)
    }

    fn stop(&mut self) {
        if self.mode == Mode::Relay {
            self.mode = Mode::Stopping;
        }
    }

    /// Stopped, with the farewell written (or there was none to write).
    fn stopped(&self) -> bool {
        self.mode == Mode::Discard
    }

    /// Stops where it stands: the bytes buffered are dropped, and no farewell is said (it would land
    /// inside a message).
    fn give_up(&mut self) {
        if self.mode == Mode::Farewell {
            // Half a farewell: the destination can only be closed now.
            self.shut = true;
        }
        self.discard();
    }

    /// The source will send nothing more that matters.
    fn source_done(&self) -> bool {
        self.eof || self.framing.finished()
    }

    fn discard(&mut self) {
        self.framing.pass(&self.buf[self.start..self.end]);
        self.start = 0;
        self.end = 0;
        self.stop_at = None;
        self.mode = Mode::Discard;
    }

    /// Shuts the destination's write half down once `when` holds.
    fn poll_shut_if<W: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, when: bool, dst: &mut W) {
        if !when || self.shut {
            return;
        }
        if let Poll::Ready(r) = Pin::new(dst).poll_shutdown(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, end = %self.dst_end, "Shutdown after the deadline failed");
            }
            self.shut = true;
        }
    }

    /// Like `poll`, past the deadline: an error ends this direction only.
    fn poll_lenient<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match self.poll_inner(cx, src, dst) {
                Poll::Ready(Err(PipeError::Read(e))) => {
                    tracing::debug!(error = %e, end = %self.src_end, "Read after the deadline failed");
                    self.eof = true;
                    self.discard();
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    tracing::debug!(error = %e, end = %self.dst_end, "Write after the deadline failed");
                    self.shut = true;
                    self.discard();
                }
                Poll::Ready(Ok(())) | Poll::Pending => return,
            }
        }
    }

    /// Drives this direction as far as it goes without waiting. Ready when its work is over: in
    /// `Relay`, the source's EOF has been passed on as a FIN; in `Discard`, the source has ended.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.poll_inner(cx, src, dst).map_err(|e| match e {
            PipeError::Read(e) => RelayError::Read(self.src_end, e),
            PipeError::Write(e) => RelayError::Write(self.dst_end, e),
        })
    }

    fn poll_inner<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<Result<(), PipeError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match self.mode {
                Mode::Relay | Mode::Stopping => {
                    if self.mode == Mode::Stopping {
                        if self.stop_at.is_none() {
                            self.stop_at =
                                self.framing.stop_after(&self.buf[self.start..self.end]).map(|n| self.start + n);
                        }
                        if self.stop_at == Some(self.start) {
                            ready!(self.poll_flush(cx, dst))?;
                            match self.framing.farewell().filter(|_| !self.shut) {
                                Some(f) => {
                                    self.farewell = f;
                                    self.mode = Mode::Farewell;
                                }
                                None => self.discard(),
                            }
                            continue;
                        }
                    }
                    let limit = self.stop_at.unwrap_or(self.end);
                    if self.start < limit {
                        let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.start..limit]))
                            .map_err(PipeError::Write)?;
                        if n == 0 {
                            return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
                        }
                        self.framing.pass(&self.buf[self.start..self.start + n]);
                        self.start += n;
                        self.relayed += n as u64;
                        self.need_flush = true;
                        continue;
                    }
                    if self.eof {
                        if self.mode == Mode::Stopping {
                            // The source ended inside a message: there is no safe place left to stop.
                            self.discard();
                            continue;
                        }
                        if !self.shut {
                            ready!(self.poll_flush(cx, dst))?;
                            ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(PipeError::Write)?;
                            self.shut = true;
                        }
                        return Poll::Ready(Ok(()));
                    }
                    ready!(self.poll_fill(cx, src, dst))?;
                    self.stop_at = None;
                }
                Mode::Farewell => {
                    while !self.farewell.is_empty() {
                        let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.farewell)).map_err(PipeError::Write)?;
                        if n == 0 {
                            return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
                        }
                        self.farewell.advance(n);
                        self.need_flush = true;
                    }
                    ready!(self.poll_flush(cx, dst))?;
                    self.said_farewell = true;
                    self.discard();
                }
                Mode::Discard => {
                    if self.eof {
                        return Poll::Ready(Ok(()));
                    }
                    ready!(self.poll_fill(cx, src, dst))?;
                    self.discard();
                }
            }
        }
    }

    /// Reads into the (empty) buffer; flushes the destination before waiting on the source.
    fn poll_fill<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<Result<(), PipeError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.start = 0;
        self.end = 0;
        let mut rb = ReadBuf::new(&mut self.buf);
        match Pin::new(&mut *src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                self.end = rb.filled().len();
                if self.end == 0 {
                    self.eof = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(PipeError::Read(e))),
            Poll::Pending => {
                if self.mode != Mode::Discard {
                    ready!(self.poll_flush(cx, dst))?;
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush<W: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, dst: &mut W) -> Poll<Result<(), PipeError>> {
        if self.need_flush && !self.shut {
            ready!(Pin::new(dst).poll_flush(cx)).map_err(PipeError::Write)?;
        }
        self.need_flush = false;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Lines as messages; the farewell is `bye\n`.
    #[derive(Default)]
    struct Lines {
        mid_line: bool,
    }

    impl Framing for Lines {
        fn pass(&mut self, bytes: &[u8]) {
            if let Some(last) = bytes.last() {
                self.mid_line = *last != b'\n';
            }
        }

        fn stop_after(&self, next: &[u8]) -> Option<usize> {
            if !self.mid_line {
                return Some(0);
            }
            next.iter().position(|b| *b == b'\n').map(|i| i + 1)
        }

        fn farewell(&self) -> Option<Bytes> {
            Some(Bytes::from_static(b"bye\n"))
        }

        fn finished(&self) -> bool {
            false
        }
    }

    /// A relay between two in-memory pipes, and its deadline: resolved by the caller, and acknowledged
    /// once the relay has taken it (so that what the caller writes next meets a stopping relay).
    struct Harness {
        client: tokio::io::DuplexStream,
        server: tokio::io::DuplexStream,
        deadline: Option<tokio::sync::oneshot::Sender<()>>,
        taken: Option<tokio::sync::oneshot::Receiver<()>>,
        relay: tokio::task::JoinHandle<Result<Relayed, RelayError>>,
    }

    impl Harness {
        fn start() -> Self {
            let (client, mut down) = tokio::io::duplex(1024);
            let (mut up, server) = tokio::io::duplex(1024);
            let (deadline, reached) = tokio::sync::oneshot::channel::<()>();
            let (took, taken) = tokio::sync::oneshot::channel::<()>();
            let relay = tokio::spawn(async move {
                let deadline = async {
                    let _ = reached.await;
                    let _ = took.send(());
                };
                relay(&mut down, &mut up, Lines::default(), Lines::default(), deadline, None).await
            });
            Self { client, server, deadline: Some(deadline), taken: Some(taken), relay }
        }

        async fn deadline(&mut self) {
            if let (Some(d), Some(t)) = (self.deadline.take(), self.taken.take()) {
                d.send(()).unwrap();
                t.await.unwrap();
            }
        }
    }

    /// A peer's side of the goodbye: reads `n` bytes, closes its end, then reads what follows up to
    /// the relay's FIN.
    async fn answer(peer: &mut tokio::io::DuplexStream, n: usize) -> (Vec<u8>, Vec<u8>) {
        let mut got = vec![0u8; n];
        peer.read_exact(&mut got).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        (got, rest)
    }

    #[tokio::test(start_paused = true)]
    async fn message_under_way_is_finished_then_farewell_then_fin_once_answered() {
        let mut h = Harness::start();
        h.client.write_all(b"one\ntw").await.unwrap();
        let mut buf = [0u8; 6];
        h.server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one\ntw");
        h.deadline().await;
        let Harness { mut client, mut server, relay, .. } = h;
        client.write_all(b"o\nthree\n").await.unwrap();
        // Each side answers the farewell by closing its end, and then sees Ebb's FIN.
        let (to_server, to_client) = tokio::join!(answer(&mut server, 6), answer(&mut client, 4));
        assert_eq!(
            (to_server.0.as_slice(), to_server.1.as_slice()),
            (&b"o\nbye\n"[..], &b""[..]),
            "`three` is not relayed"
        );
        assert_eq!((to_client.0.as_slice(), to_client.1.as_slice()), (&b"bye\n"[..], &b""[..]));
        let relayed = relay.await.unwrap().unwrap();
        assert_eq!(relayed, Relayed { up: 8, down: 0, at_deadline: true, idle: false });
    }

    #[tokio::test(start_paused = true)]
    async fn idle_relay_ends_with_a_fin_both_ways_and_traffic_keeps_it_open() {
        let (mut client, mut down) = tokio::io::duplex(1024);
        let (mut up, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(60);
        let relay = tokio::spawn(async move {
            relay(&mut down, &mut up, Unframed, Unframed, std::future::pending(), Some(idle)).await
        });
        // A byte every half timeout, for three timeouts: never idle.
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(idle / 2).await;
        }
        assert!(!relay.is_finished(), "closed while bytes kept moving");
        // Silence: both peers get a FIN between idle and idle * 1.25 after the last byte (the last
        // sleep above already counts), and the relay ends after its grace (the peers stay silent).
        let t0 = Instant::now() - idle / 2;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        let took = t0.elapsed();
        assert!(took >= idle && took <= idle + idle / 4, "{took:?}");
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        let r = relay.await.unwrap().unwrap();
        assert_eq!(r, Relayed { up: 6, down: 0, at_deadline: false, idle: true });
    }

    #[tokio::test(start_paused = true)]
    async fn message_never_finished_is_cut_without_farewell_within_two_graces() {
        let mut h = Harness::start();
        h.client.write_all(b"endless").await.unwrap();
        let mut buf = [0u8; 7];
        h.server.read_exact(&mut buf).await.unwrap();
        let t0 = Instant::now();
        h.deadline().await;
        let Harness { mut client, mut server, relay, .. } = h;
        // No farewell to the server (it would land inside the message): once the grace to finish the
        // message is over, it gets its FIN without waiting for an answer.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        // The client's farewell is unanswered: the relay ends when the grace does.
        relay.await.unwrap().unwrap();
        assert_eq!(t0.elapsed(), FORCE_GRACE * 2);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye\n");
    }
}
