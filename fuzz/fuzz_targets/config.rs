//! Configuration parsing on arbitrary text: any document is either a config or an error naming the
//! field, never a panic.
#![no_main]

use ebb::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = Config::from_yaml(text);
});
