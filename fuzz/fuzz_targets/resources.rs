//! The control plane's resources as a sidecar decodes them, from arbitrary bytes: every cluster,
//! inbound policy and drain directive is either taken or refused with a reason, never a panic.
#![no_main]

use ebb::control::{convert, CLUSTER_TYPE, DRAIN_TYPE, INBOUND_TYPE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for type_url in [CLUSTER_TYPE, INBOUND_TYPE, DRAIN_TYPE] {
        let any = prost_types::Any { type_url: type_url.to_string(), value: data.to_vec() };
        let _ = convert::clusters(std::slice::from_ref(&any));
        let _ = convert::inbound(std::slice::from_ref(&any));
        let _ = convert::directives(std::slice::from_ref(&any));
    }
});
