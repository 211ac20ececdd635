//! A frame-level HTTP/2 client that records what the server sends (GOAWAY last-stream-ids, response
//! frames), which a normal client library hides.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::h2frame::{
    self, frame, read_frame, Frame, ACK, DATA, END_STREAM, GOAWAY, HEADERS, PING, RST_STREAM, SETTINGS,
};

/// What the server sent, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    GoAway { last_stream_id: u32, error_code: u32 },
    Headers { stream: u32, end_stream: bool },
    Data { stream: u32, len: usize, end_stream: bool },
    Reset { stream: u32, error_code: u32 },
    Ping,
    Closed,
}

/// A connection: frames are written through a writer task, read on another and reported as events.
pub struct RawH2 {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl RawH2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if write.write_all(&f).await.is_err() {
                    return;
                }
            }
        });
        let _ = out.send(h2frame::PREFACE.to_vec());
        let _ = out.send(frame(SETTINGS, 0, 0, &[]));
        let (tx, events) = mpsc::unbounded_channel();
        let acks = out.clone();
        tokio::spawn(async move {
            loop {
                let Ok(f) = read_frame(&mut read).await else {
                    let _ = tx.send(Event::Closed);
                    return;
                };
                let Frame { kind, flags, stream, ref payload } = f;
                let ev = match kind {
                    SETTINGS if flags & ACK == 0 => {
                        let _ = acks.send(frame(SETTINGS, ACK, 0, &[]));
                        None
                    }
                    PING if flags & ACK == 0 => {
                        let _ = acks.send(frame(PING, ACK, 0, payload));
                        Some(Event::Ping)
                    }
                    GOAWAY => Some(Event::GoAway { last_stream_id: f.last_stream_id(), error_code: f.u32_at(4) }),
                    HEADERS => Some(Event::Headers { stream, end_stream: f.has(END_STREAM) }),
                    DATA => Some(Event::Data { stream, len: payload.len(), end_stream: f.has(END_STREAM) }),
                    RST_STREAM => Some(Event::Reset { stream, error_code: f.u32_at(0) }),
                    _ => None,
                };
                if let Some(ev) = ev {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        });
        Self { out, events }
    }

    /// Opens stream `id` with a GET of `path` (no body).
    pub fn get(&self, id: u32, authority: &str, path: &str) {
        let _ = self.out.send(h2frame::get(id, path, authority));
    }

    /// Sends raw bytes (frames made with `h2frame`).
    pub fn send(&self, bytes: Vec<u8>) {
        let _ = self.out.send(bytes);
    }

    /// The next event, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: std::time::Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.events.recv()).await.ok().flatten()
    }
}
