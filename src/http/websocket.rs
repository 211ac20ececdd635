//! WebSocket frame boundaries in a spliced byte stream, so a drain can close a WebSocket between frames.

use bytes::Bytes;
use http::{header, HeaderMap};

use crate::transport::tcp::Framing;

/// Close status 1001, "going away" (RFC 6455 §7.4.1): the server is going down.
const GOING_AWAY: [u8; 2] = 1001u16.to_be_bytes();
/// FIN set, opcode 0x8 (Close).
const CLOSE_FIN: u8 = 0x88;
const OPCODE_CLOSE: u8 = 0x8;
/// Close 1001 as a server sends it: unmasked.
const CLOSE_TO_CLIENT: [u8; 4] = [CLOSE_FIN, GOING_AWAY.len() as u8, GOING_AWAY[0], GOING_AWAY[1]];
/// The longest frame header: 2 bytes, a 64-bit length and a masking key.
const MAX_HEADER: usize = 14;

/// Whether a `101 Switching Protocols` switched to WebSocket (its `Upgrade` names the protocol chosen).
pub fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
}

/// Which way frames travel: it decides whether a frame Ebb writes there is masked (RFC 6455 §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// From the WebSocket client (Ebb's downstream) to the server (the upstream): frames are masked.
    ToServer,
    /// From the server to the client: frames are not masked.
    ToClient,
}

/// Follows frame headers in one direction as bytes pass, without buffering or unmasking payloads.
///
/// Any byte stream parses as frames, so a peer that does not speak WebSocket after all never stalls
/// the relay; the tracker is then merely wrong about where frames end, which only matters at the
/// drain deadline, where the cost is a Close frame the peer cannot read (or none, and a plain FIN).
#[derive(Clone, Copy, Debug)]
pub struct FrameTracker {
    flow: Flow,
    /// The header of the frame under way, while it is incomplete.
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// Payload bytes of the current frame not yet passed.
    payload_left: u64,
    /// Opcode of the frame whose payload is passing.
    opcode: u8,
    /// A whole Close frame has passed: the source has finished speaking WebSocket.
    closed: bool,
}

impl FrameTracker {
    /// A tracker for frames flowing `flow`, starting at a frame boundary (right after the 101).
    pub fn new(flow: Flow) -> Self {
        Self { flow, head: [0; MAX_HEADER], head_len: 0, payload_left: 0, opcode: 0, closed: false }
    }

    /// Between two frames: nothing of a frame has passed, or all of it has.
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.payload_left == 0
    }

    /// Whether a whole Close frame has passed.
    pub fn close_passed(&self) -> bool {
        self.closed
    }

    /// Notes `bytes` as passed (relayed or dropped); header bytes are looked at, payload is skipped.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.step(bytes);
            bytes = &bytes[n..];
        }
    }

    /// Consumes the start of `bytes` up to the end of the current header byte or payload run, and
    /// returns how many bytes it took (at least one; `bytes` is not empty).
    fn step(&mut self, bytes: &[u8]) -> usize {
        if self.payload_left > 0 {
            let n = self.payload_left.min(bytes.len() as u64);
            self.payload_left -= n;
            if self.payload_left == 0 {
                self.frame_done();
            }
            // n <= bytes.len(), so it fits a usize.
            return n as usize;
        }
        self.head[self.head_len] = bytes[0];
        self.head_len += 1;
        if self.head_len >= 2 && self.head_len == self.header_len() {
            self.payload_left = self.payload_len();
            self.opcode = self.head[0] & 0x0f;
            self.head_len = 0;
            if self.payload_left == 0 {
                self.frame_done();
            }
        }
        1
    }

    fn frame_done(&mut self) {
        if self.opcode == OPCODE_CLOSE {
            self.closed = true;
        }
    }

    /// The whole header's length, known once its first two bytes are in.
    fn header_len(&self) -> usize {
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        }
    }

    /// How many of the `next` bytes finish the frame under way: `Some(0)` at a boundary, `None` when
    /// the frame goes on past them.
    pub fn to_boundary(&self, next: &[u8]) -> Option<usize> {
        let mut t = *self;
        let mut taken = 0;
        while !t.at_boundary() {
            if taken == next.len() {
                return None;
            }
            taken += t.step(&next[taken..]);
        }
        Some(taken)
    }

    /// A Close frame with status 1001, as this direction's sender would write it.
    pub fn going_away(&self) -> Bytes {
        match self.flow {
            Flow::ToClient => Bytes::from_static(&CLOSE_TO_CLIENT),
            Flow::ToServer => {
                // The key is fastrand's, not a cryptographic one: masking exists so that a script's
                // chosen payload cannot be made to look like another protocol to a cache in between,
                // and this payload is Ebb's own fixed two bytes.
                let key = fastrand::u32(..).to_be_bytes();
                let mut f = vec![CLOSE_FIN, 0x80 | GOING_AWAY.len() as u8];
                f.extend_from_slice(&key);
                f.extend(GOING_AWAY.iter().zip(key).map(|(b, k)| b ^ k));
                Bytes::from(f)
            }
        }
    }
}

impl Framing for FrameTracker {
    fn pass(&mut self, bytes: &[u8]) {
        self.advance(bytes);
    }

    fn stop_after(&self, next: &[u8]) -> Option<usize> {
        self.to_boundary(next)
    }

    fn farewell(&self) -> Option<Bytes> {
        // A Close already sent this way ends the conversation; a second one would be a protocol error.
        (!self.closed).then(|| self.going_away())
    }

    fn finished(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a peer would send it: masked with a zero key when `mask` (content is not looked at).
    fn frame(opcode: u8, fin: bool, mask: bool, len: usize) -> Vec<u8> {
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        let m = if mask { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0x55, len));
        f
    }

    #[test]
    fn boundaries_for_each_length_form_in_any_split() {
        for (mask, flow) in [(true, Flow::ToServer), (false, Flow::ToClient)] {
            let frames = [frame(0x1, true, mask, 5), frame(0x2, true, mask, 300), frame(0x2, true, mask, 70_000)];
            let stream: Vec<u8> = frames.concat();
            let mut ends = Vec::new();
            for f in &frames {
                ends.push(ends.last().copied().unwrap_or(0) + f.len());
            }
            // Fed one byte at a time, the tracker is at a boundary exactly at each frame's end.
            let mut t = FrameTracker::new(flow);
            for (i, b) in stream.iter().enumerate() {
                t.advance(std::slice::from_ref(b));
                assert_eq!(t.at_boundary(), ends.contains(&(i + 1)), "after byte {i}");
            }
            // From any point, to_boundary finds the end of the frame under way.
            for start in [0, 1, 3, 6, 11, 12, 200, 320, 330, 50_000] {
                let mut t = FrameTracker::new(flow);
                t.advance(&stream[..start]);
                let end = if t.at_boundary() { start } else { *ends.iter().find(|&&e| e > start).unwrap() };
                assert_eq!(t.to_boundary(&stream[start..]), Some(end - start), "from {start}");
                if end > start {
                    assert_eq!(t.to_boundary(&stream[start..end - 1]), None, "one byte short, from {start}");
                }
            }
        }
    }

    #[test]
    fn close_frame_is_noticed_once_whole() {
        let mut t = FrameTracker::new(Flow::ToServer);
        let close = frame(OPCODE_CLOSE, true, true, 2);
        t.advance(&close[..close.len() - 1]);
        assert!(!t.close_passed());
        assert!(t.farewell().is_some());
        t.advance(&close[close.len() - 1..]);
        assert!(t.close_passed() && t.finished());
        assert!(t.farewell().is_none(), "no second Close after the source's own");
    }

    #[test]
    fn control_frame_between_fragments_is_a_boundary() {
        let mut t = FrameTracker::new(Flow::ToClient);
        t.advance(&frame(0x1, false, false, 10));
        assert!(t.at_boundary());
        t.advance(&frame(0x9, true, false, 0));
        assert!(t.at_boundary());
        t.advance(&frame(0x0, true, false, 3)[..2]);
        assert!(!t.at_boundary());
    }

    #[test]
    fn going_away_frames_parse_back_with_code_1001() {
        let to_client = FrameTracker::new(Flow::ToClient).going_away();
        assert_eq!(&to_client[..], &[0x88, 0x02, 0x03, 0xe9]);
        let to_server = FrameTracker::new(Flow::ToServer).going_away();
        assert_eq!(to_server.len(), 8);
        assert_eq!(&to_server[..2], &[0x88, 0x82]);
        let key = &to_server[2..6];
        assert_eq!([to_server[6] ^ key[0], to_server[7] ^ key[1]], [0x03, 0xe9]);
        let mut t = FrameTracker::new(Flow::ToServer);
        t.advance(&to_server);
        assert!(t.at_boundary() && t.close_passed());
    }

    #[test]
    fn websocket_upgrade_named_in_any_case_or_list() {
        let mut h = HeaderMap::new();
        assert!(!is_websocket(&h));
        h.insert(header::UPGRADE, "h2c, WebSocket".parse().unwrap());
        assert!(is_websocket(&h));
        h.insert(header::UPGRADE, "spdy/3".parse().unwrap());
        assert!(!is_websocket(&h));
    }
}
