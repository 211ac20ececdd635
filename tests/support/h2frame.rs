//! HTTP/2 frames as bytes (RFC 9113 §4, §6) and the little HPACK a GET needs (RFC 7541), for the test
//! clients that speak HTTP/2 frame by frame to see what a client library hides: GOAWAY last-stream-ids,
//! frames after a GOAWAY, a peer that never grants window.
//!
//! Self-contained (bytes and tokio only): `examples/h2churn.rs` and the server's unit tests include it
//! with `#[path]`.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The client connection preface (RFC 9113 §3.4); a SETTINGS frame must follow it.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// Frame flags, each meaningful on some types only.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// Every window's size until SETTINGS or WINDOW_UPDATE change it (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;

/// SETTINGS parameters (RFC 9113 §6.5.2).
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// The error code that says a stream was never processed (RFC 9113 §8.7).
pub const REFUSED_STREAM: u32 = 0x7;

/// Appends one frame to `out`.
pub fn put_frame(out: &mut impl BufMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
}

/// One frame, to write on its own.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    put_frame(&mut f, kind, flags, stream, payload);
    f
}

/// A frame as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    /// The stream id, reserved bit cleared.
    pub stream: u32,
    pub payload: Bytes,
}

impl Frame {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The 31-bit id a GOAWAY (its last stream id) starts with.
    pub fn last_stream_id(&self) -> u32 {
        self.u32_at(0) & MAX_STREAM_ID
    }

    /// The error code of a RST_STREAM (offset 0) or GOAWAY (offset 4).
    pub fn u32_at(&self, offset: usize) -> u32 {
        let b = &self.payload[offset..offset + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Splits the first whole frame off `buf`, if it holds one (reserving room for the rest otherwise).
pub fn parse(buf: &mut BytesMut) -> Option<Frame> {
    if buf.len() < 9 {
        return None;
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    if buf.len() < 9 + len {
        buf.reserve(9 + len - buf.len());
        return None;
    }
    let head = buf.split_to(9);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & MAX_STREAM_ID;
    Some(Frame { kind: head[3], flags: head[4], stream, payload: buf.split_to(len).freeze() })
}

/// Reads one whole frame.
pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & MAX_STREAM_ID;
    Ok(Frame { kind: head[3], flags: head[4], stream, payload: payload.into() })
}

/// The header block of a GET: `:method GET` and `:scheme http` from the static table, `:path` and
/// `:authority` as literals without indexing and without Huffman, so nothing is kept in sync.
pub fn get_block(path: &str, authority: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    literal(&mut block, 4, path);
    literal(&mut block, 1, authority);
    block
}

/// A GET on `stream` in one HEADERS frame that ends the stream.
pub fn get(stream: u32, path: &str, authority: &str) -> Vec<u8> {
    frame(HEADERS, END_STREAM | END_HEADERS, stream, &get_block(path, authority))
}

/// HPACK literal header field without indexing, name from static table entry `index` (RFC 7541 §6.2.2),
/// value as a plain string.
pub fn literal(block: &mut Vec<u8>, index: u8, value: &str) {
    integer(block, 4, 0x00, u64::from(index));
    integer(block, 7, 0x00, value.len() as u64);
    block.extend_from_slice(value.as_bytes());
}

/// HPACK integer with an N-bit prefix (RFC 7541 §5.1); `high` holds the bits above the prefix.
fn integer(block: &mut Vec<u8>, prefix: u32, high: u8, mut value: u64) {
    let max = (1u64 << prefix) - 1;
    if value < max {
        block.push(high | value as u8);
        return;
    }
    block.push(high | max as u8);
    value -= max;
    while value >= 128 {
        block.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.push(value as u8);
}
