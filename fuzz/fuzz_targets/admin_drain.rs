//! `POST /drain` parameters from arbitrary query strings and bodies: a drain or a 400's reason, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &[u8])| {
    let (query, body) = input;
    let _ = ebb::admin::drain_trigger(query, body);
});
