//! An HTTP/1.1 request head as Ebb's server reads it (httparse, as hyper uses it), then Ebb's own
//! passes over it: the head scan, the hop-by-hop strip, the `_` aliases, the trailer clean and the
//! upgrade check. None panics, and the strip leaves no hop-by-hop field it must remove.
#![no_main]

use ebb::http::headers::{
    clean_trailers, drop_underscore_aliases, port_ok, strip_hop_by_hop, upgrade_was_offered, HeadScan,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            headers.append(n, v);
        }
    }
    if let Some(path) = req.path {
        if let Ok(uri) = path.parse::<http::Uri>() {
            if let Some(a) = uri.authority() {
                let _ = port_ok(a);
            }
        }
    }
    let scan = HeadScan::of(&headers);
    let upgrade = scan.is_upgrade(&headers);
    let _ = upgrade_was_offered(&headers, &headers);
    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped, upgrade);
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        assert!(!stripped.contains_key(name), "{name} survived the strip");
    }
    assert!(stripped.get_all(http::header::TE).iter().all(|v| v == "trailers"));
    drop_underscore_aliases(&mut headers);
    clean_trailers(&mut headers);
});
