//! Lingering close: when Ebb ends a client connection first, the client's last bytes (a WINDOW_UPDATE,
//! a PING ACK, a pipelined request) may still sit unread in the socket, and closing a socket with
//! unread data makes the kernel answer with RST and throw away response bytes not yet transmitted.
//! So Ebb half-closes (FIN after everything written), reads and discards until the client closes or
//! a bounded time passes, and only then closes (docs/architecture.md §6).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::conntrack::{ConnHandle, ConnState};
use crate::drain::{Phase, Watch, FORCE_GRACE};

/// How one connection lingers when Ebb closes it first.
#[derive(Debug)]
pub struct Linger {
    /// Longest wait for the client to close; zero closes at once (no lingering).
    pub timeout: Duration,
    /// The drain, so that lingering never outlives the deadline.
    pub watch: Watch,
    /// Keeps the connection listed (and the process up) while it lingers.
    pub conn: Arc<ConnHandle>,
}

/// How a lingering close ended (a domain word: metrics count it without depending on this module).
pub use crate::domain::LingerOutcome as Outcome;

impl Linger {
    /// Half-closes `stream`, then discards what the client still sends until it closes, the linger
    /// time passes or the drain deadline is reached. Dropping the stream afterwards is a clean close.
    pub async fn run(self, mut stream: TcpStream) -> Outcome {
        self.conn.set_state(ConnState::Lingering);
        let mut until = crate::clock::after(self.timeout);
        if stream.shutdown().await.is_err() {
            return self.done(Outcome::Error);
        }
        let mut buf = [0u8; 4096];
        let mut cut_by_deadline = false;
        // Past the deadline (already, or once it comes) only the grace everything else gets is left.
        let mut deadline_seen = false;
        let mut watch = self.watch.clone();
        let outcome = loop {
            tokio::select! {
                r = stream.read(&mut buf) => match r {
                    Ok(0) => break Outcome::PeerClosed,
                    Ok(_) => continue,
                    Err(_) => break Outcome::Error,
                },
                _ = tokio::time::sleep_until(until) => {
                    break if cut_by_deadline { Outcome::Deadline } else { Outcome::TimedOut };
                }
                _ = watch.reached(Phase::Deadline), if !deadline_seen => {
                    deadline_seen = true;
                    let grace = Instant::now() + FORCE_GRACE;
                    if grace < until {
                        until = grace;
                        cut_by_deadline = true;
                    }
                }
            }
        };
        self.done(outcome)
    }

    fn done(&self, outcome: Outcome) -> Outcome {
        self.conn.metrics().linger_close(outcome);
        tracing::debug!(outcome = outcome.as_str(), "Lingering close ended");
        outcome
    }
}
