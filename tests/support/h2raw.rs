//! A frame-level HTTP/2 client that records what the server sends (GOAWAY last-stream-ids, response
//! frames), which a normal client library hides.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

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

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: literal header field without indexing, name from the static table (RFC 7541 §6.2.2).
fn literal(index: u8, value: &str) -> Vec<u8> {
    assert!(value.len() < 127);
    let mut v = vec![index, value.len() as u8];
    v.extend_from_slice(value.as_bytes());
    v
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
        let _ = out.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec());
        let _ = out.send(frame(SETTINGS, 0, 0, &[]));
        let (tx, events) = mpsc::unbounded_channel();
        let acks = out.clone();
        tokio::spawn(async move {
            loop {
                let mut head = [0u8; 9];
                if read.read_exact(&mut head).await.is_err() {
                    let _ = tx.send(Event::Closed);
                    return;
                }
                let len = ((head[0] as usize) << 16) | ((head[1] as usize) << 8) | head[2] as usize;
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    let _ = tx.send(Event::Closed);
                    return;
                }
                let ev = match kind {
                    SETTINGS if flags & ACK == 0 => {
                        let _ = acks.send(frame(SETTINGS, ACK, 0, &[]));
                        None
                    }
                    PING if flags & ACK == 0 => {
                        let _ = acks.send(frame(PING, ACK, 0, &payload));
                        Some(Event::Ping)
                    }
                    GOAWAY => Some(Event::GoAway {
                        last_stream_id: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                            & 0x7fff_ffff,
                        error_code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                    }),
                    HEADERS => Some(Event::Headers { stream, end_stream: flags & END_STREAM != 0 }),
                    DATA => Some(Event::Data { stream, len, end_stream: flags & END_STREAM != 0 }),
                    RST_STREAM => Some(Event::Reset {
                        stream,
                        error_code: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                    }),
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
        // :method GET (static 2), :scheme http (static 6), then :path and :authority as literals.
        let mut block = vec![0x82, 0x86];
        block.extend(literal(4, path));
        block.extend(literal(1, authority));
        let _ = self.out.send(frame(HEADERS, END_STREAM | 0x4, id, &block));
    }

    /// The next event, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: std::time::Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.events.recv()).await.ok().flatten()
    }
}
