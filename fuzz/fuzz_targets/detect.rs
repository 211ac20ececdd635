//! Protocol detection on arbitrary first bytes: it must never panic, and its verdict must not depend on
//! how the bytes arrived (a decided prefix is never overruled by more bytes).
#![no_main]

use ebb::transport::detect::classify_prefix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = classify_prefix(data);
    for n in 0..data.len() {
        if let Some(p) = classify_prefix(&data[..n]) {
            assert_eq!(Some(p), whole, "prefix of {n} bytes decided differently");
        }
    }
});
