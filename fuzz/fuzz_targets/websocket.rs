//! The WebSocket frame tracker on arbitrary bytes in arbitrary pieces: it never panics, where frames
//! end does not depend on how the bytes were split, and `to_boundary` says where the next boundary is.
#![no_main]

use ebb::http::websocket::{Flow, FrameTracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, &[u8])| {
    let (split, data) = input;
    let flow = if split & 1 == 0 { Flow::ToServer } else { Flow::ToClient };
    let mut whole = FrameTracker::new(flow);
    whole.advance(data);
    // The same bytes in pieces of `split` (at least 1) bytes.
    let mut pieces = FrameTracker::new(flow);
    for chunk in data.chunks(usize::from(split.max(1))) {
        pieces.advance(chunk);
    }
    assert_eq!(whole.at_boundary(), pieces.at_boundary());
    assert_eq!(whole.close_passed(), pieces.close_passed());
    // `to_boundary` from the start: advancing that many bytes lands on a boundary.
    let start = FrameTracker::new(flow);
    if let Some(n) = start.to_boundary(data) {
        let mut t = start;
        t.advance(&data[..n]);
        assert!(t.at_boundary(), "to_boundary said {n}");
    }
});
