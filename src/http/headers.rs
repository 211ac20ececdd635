//! Hop-by-hop header handling (RFC 9110 §7.6.1) and the few headers Ebb itself adds.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Names the cause of a response Ebb made itself.
pub static X_EBB_ERROR: HeaderName = HeaderName::from_static("x-ebb-error");

/// gRPC's status, in trailers or a trailers-only response. Looked up by a ready-made name: a `&str`
/// key is parsed and lowercased on every lookup.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// An HTTP/1.1 server's keep-alive hint (`timeout=N`).
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one hop and must not be forwarded.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is one of [`HOP_BY_HOP`]: a match on the length and at most two string compares,
/// where comparing against the six names one by one cost several hundred instructions per request.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    let s = name.as_str();
    match s.len() {
        2 => s == "te",
        7 => s == "upgrade",
        10 => s == "connection" || s == "keep-alive",
        16 => s == "proxy-connection",
        17 => s == "transfer-encoding",
        _ => false,
    }
}

/// Whether `headers` has `name`, by a scan of the names present: a request or response head has a
/// handful, and comparing them costs less than hashing the name for one lookup.
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|n| n == name)
}

/// What the proxy needs to know of a request head, found in one pass over it instead of a hashed
/// lookup per question (BENCHMARKS.md, issue 19).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadScan {
    /// How many Host values (fields) arrived.
    pub hosts: usize,
    /// Whether the first Host value is a valid `host[:port]` (or empty), with no userinfo.
    pub host_valid: bool,
    /// Whether the content type is gRPC's.
    pub grpc: bool,
    /// Whether any hop-by-hop header is present (most requests carry none).
    pub hop_by_hop: bool,
    /// Whether an `Upgrade` header is present (with `Connection: upgrade`, a protocol switch).
    pub upgrade: bool,
    /// Whether a field value starts or ends with a space or tab: malformed on HTTP/2 (RFC 9113
    /// §8.2.1; HTTP/1.1's parser trims them).
    pub edge_whitespace: bool,
    /// Whether a field name contains `_` (see [`drop_underscore_aliases`]).
    pub underscore: bool,
    /// Whether a content type was seen: the first one decides, as a lookup's would.
    content_type: bool,
}

impl HeadScan {
    /// Scans a request head once.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut scan = Self::default();
        for (name, value) in headers {
            let v = value.as_bytes();
            scan.edge_whitespace |= matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'));
            scan.underscore |= name.as_str().as_bytes().contains(&b'_');
            match name.as_str().len() {
                4 if name == header::HOST => {
                    if scan.hosts == 0 {
                        scan.host_valid = valid_host(value.as_bytes());
                    }
                    scan.hosts += 1;
                }
                12 if name == header::CONTENT_TYPE => {
                    if !scan.content_type {
                        scan.grpc = value.as_bytes().starts_with(b"application/grpc");
                    }
                    scan.content_type = true;
                }
                _ if is_hop_by_hop(name) => {
                    scan.hop_by_hop = true;
                    scan.upgrade |= name == header::UPGRADE;
                }
                _ => {}
            }
        }
        scan
    }

    /// Whether the request asks to switch protocols: an `Upgrade` header named by `Connection`.
    pub fn is_upgrade(&self, headers: &HeaderMap) -> bool {
        self.upgrade && connection_has(headers, "upgrade") && !only_h2c(headers)
    }
}

/// `host[:port]`, or empty (allowed when the target URI has no authority, RFC 9112 §3.2); never userinfo.
fn valid_host(v: &[u8]) -> bool {
    // A name or IPv4 address and an optional numeric port, which is what nearly every request has, is
    // an authority as `http` parses one (unreserved characters, one colon, no brackets, `%` or `@`):
    // answered in one pass, where `Authority::try_from` copies the value into a new allocation for
    // every request (BENCHMARKS.md, "Streams inside their connection's task").
    let name = v.iter().position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~')));
    let plain = match name {
        None => true,
        Some(i) if v[i] == b':' => {
            let port = &v[i + 1..];
            port.len() <= 5
                && port.iter().all(u8::is_ascii_digit)
                && port.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX)
        }
        Some(_) => false,
    };
    plain || (!v.contains(&b'@') && http::uri::Authority::try_from(v).is_ok_and(|a| port_ok(&a)))
}

/// Whether an authority's port, if it has one, is a port: `http` parses `host:99999` and then reports
/// no port at all, so the upstream would have guessed one.
pub fn port_ok(a: &http::uri::Authority) -> bool {
    // One scan back from the end (this runs for every request): what follows the last `:` is the
    // port, unless a `]` (a colon inside an IPv6 literal) or an `@` (userinfo's colon,
    // `user:pw@host`) comes first; then there is no port.
    let b = a.as_str().as_bytes();
    match b.iter().rposition(|c| matches!(c, b':' | b']' | b'@')) {
        // As `http` reads a port: the text after the last colon, as a `u16`.
        Some(i) if b[i] == b':' => a.as_str()[i + 1..].is_empty() || a.as_str()[i + 1..].parse::<u16>().is_ok(),
        _ => true,
    }
}

/// Framing, routing and hop-by-hop field names, as `_` spellings fold onto them.
static UNDERSCORE_ALIASES: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "trailer",
];

/// Removes fields whose name, `_` read as `-`, is a framing, routing or hop-by-hop field
/// (`Content_Length`, `Transfer_Encoding`, `Host_`...). CGI-style servers fold the two into one
/// variable, so forwarding them lets a client smuggle a second length or host past Ebb, which reads
/// the real one. Other names with `_` pass (NGINX drops them all; apps use them).
pub fn drop_underscore_aliases(headers: &mut HeaderMap) {
    let aliases: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let s = n.as_str();
            s.contains('_') && UNDERSCORE_ALIASES.iter().any(|a| s.len() == a.len() && s.replace('_', "-") == *a)
        })
        .cloned()
        .collect();
    for name in aliases {
        headers.remove(&name);
    }
}

/// Whether a request asks to switch protocols (WebSocket); hyper splices those as bytes.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    has(headers, &header::UPGRADE) && connection_has(headers, "upgrade") && !only_h2c(headers)
}

/// Whether every protocol `Upgrade` offers is `h2c`. Ebb does not switch a hop to HTTP/2 that way
/// (RFC 9113 §3.1 deprecates it), so such a request is served as the plain HTTP/1.1 request it also
/// is (RFC 9110 §7.8: a server may ignore Upgrade), and its Upgrade and HTTP2-Settings, both
/// hop-by-hop, go with the rest of them. Passing the Upgrade on without its HTTP2-Settings would
/// break a real h2c server.
fn only_h2c(headers: &HeaderMap) -> bool {
    upgrade_protocols(headers)
        .is_some_and(|mut offered| offered.peek().is_some() && offered.all(|p| p.eq_ignore_ascii_case("h2c")))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers in place. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay
/// (the handshake must reach the other side); `TE: trailers` always stays, as gRPC requires it end to end.
/// `Host` always stays, whatever `Connection` names: it says which site the request is for, and a
/// client listing it (by mistake or to confuse routing) must not leave the upstream guessing.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Fast path: most requests and responses carry none of these. One pass over the few names
    // present instead of hashing each of the six.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE) && n != header::TE && n != header::HOST)
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    for h in &HOP_BY_HOP {
        if keep_upgrade && (h == header::UPGRADE || h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Fields a trailer section must not carry (RFC 9110 §6.5.1): framing, routing, authentication,
/// request modifiers and content format are read before the content, so a trailer naming them would
/// be read differently by each hop; the hop-by-hop fields belong to one connection. By length first:
/// a gRPC response's two or three trailers then cost a compare or two each.
fn banned_in_trailers(name: &HeaderName) -> bool {
    let s = name.as_str();
    match s.len() {
        2 => s == "te",
        4 => s == "host",
        5 => s == "range",
        6 => s == "expect",
        7 => s == "trailer" || s == "upgrade",
        10 => s == "connection" || s == "keep-alive" || s == "set-cookie",
        12 => s == "content-type" || s == "max-forwards",
        13 => s == "authorization" || s == "cache-control" || s == "content-range",
        14 => s == "content-length",
        16 => s == "content-encoding" || s == "proxy-connection" || s == "www-authenticate",
        17 => s == "transfer-encoding",
        19 => s == "proxy-authorization",
        _ => false,
    }
}

/// Drops what a trailer section must not carry (see [`banned_in_trailers`]), in place; a section with
/// none of them is left as it is, without allocating.
pub fn clean_trailers(trailers: &mut HeaderMap) {
    if !trailers.keys().any(banned_in_trailers) {
        return;
    }
    let banned: Vec<HeaderName> = trailers.keys().filter(|n| banned_in_trailers(n)).cloned().collect();
    for name in banned {
        trailers.remove(name);
    }
}

/// The protocol tokens of `headers`' `Upgrade` values, trimmed, empty ones skipped; `None` when a
/// value is not text (it names no protocol anyone offered).
fn upgrade_protocols(headers: &HeaderMap) -> Option<std::iter::Peekable<impl Iterator<Item = &str>>> {
    let values = headers.get_all(header::UPGRADE);
    if values.iter().any(|v| v.to_str().is_err()) {
        return None;
    }
    let tokens = values.into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    Some(tokens.map(str::trim).filter(|p| !p.is_empty()).peekable())
}

/// Whether a `101 Switching Protocols` (its headers `chosen`) switched only to protocols the request
/// (its headers `offered`) named. RFC 9110 §7.8: a server must not switch to a protocol the client
/// did not offer; splicing such a connection would hand the client bytes of a protocol it never asked
/// to speak. Names compare case-insensitively.
pub fn upgrade_was_offered(offered: &HeaderMap, chosen: &HeaderMap) -> bool {
    let Some(mut switched) = upgrade_protocols(chosen) else { return false };
    switched.peek().is_some()
        && switched.all(|p| upgrade_protocols(offered).is_some_and(|mut o| o.any(|o| o.eq_ignore_ascii_case(p))))
}

/// Whether a request or response is gRPC (so errors and drains end it with grpc-status, not a reset).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_101_may_switch_only_to_what_was_offered() {
        let offered = map(&[("upgrade", "websocket, SPDY/3")]);
        assert!(upgrade_was_offered(&offered, &map(&[("upgrade", "WebSocket")])));
        assert!(upgrade_was_offered(&offered, &map(&[("upgrade", "spdy/3")])));
        assert!(!upgrade_was_offered(&offered, &map(&[("upgrade", "h2c")])));
        assert!(!upgrade_was_offered(&offered, &map(&[("upgrade", "websocket, h2c")])));
        assert!(!upgrade_was_offered(&offered, &map(&[])), "a 101 must name the protocol");
        assert!(!upgrade_was_offered(&map(&[]), &map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn trailers_lose_framing_routing_and_hop_fields_only() {
        let mut t = map(&[
            ("grpc-status", "0"),
            ("content-length", "5"),
            ("host", "evil.example"),
            ("transfer-encoding", "chunked"),
            ("x-sum", "7"),
        ]);
        clean_trailers(&mut t);
        let mut names: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["grpc-status", "x-sum"]);
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strips_listed_and_standard_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-end", "2"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("x-end").unwrap(), "2");
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn keeps_upgrade_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn an_h2c_upgrade_is_a_plain_request_without_its_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert!(!is_upgrade(&h));
        assert!(!HeadScan::of(&h).is_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        // h2c offered with another protocol: that one may still be switched to.
        let h = map(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert!(is_upgrade(&h));
    }

    #[test]
    fn underscore_spellings_of_framing_fields_are_dropped_and_others_kept() {
        let mut h =
            map(&[("content_length", "5"), ("transfer_encoding", "chunked"), ("x_request_id", "7"), ("host", "a")]);
        assert!(HeadScan::of(&h).underscore);
        drop_underscore_aliases(&mut h);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x_request_id"]);
    }

    #[test]
    fn a_port_out_of_range_is_not_a_host() {
        assert!(valid_host(b"a.example:8080") && valid_host(b"[::1]:80") && valid_host(b"[::1]") && valid_host(b"a:"));
        assert!(!valid_host(b"a.example:99999"));
        assert!(!valid_host(b"[::1]:70000"));
        let with_userinfo = |a: &'static str| port_ok(&http::uri::Authority::from_static(a));
        assert!(with_userinfo("user:pw@right.example") && with_userinfo("user:pw@right.example:8080"));
        assert!(!with_userinfo("user:pw@right.example:99999"));
        // The one-pass scan answers as the split-and-search it replaced, on every shape of authority.
        let oracle = |a: &http::uri::Authority| {
            let s = a.as_str().rsplit('@').next().unwrap_or_default();
            match s.rfind(':') {
                Some(i) if !s[i..].contains(']') => i + 1 == s.len() || a.port().is_some(),
                _ => true,
            }
        };
        let hosts = ["h", "h:", "h:0", "h:65535", "h:65536", "h:+80", "h:8a", "[::1]", "[::1]:", "[::1]:8", "[::1]:x"];
        for host in hosts {
            for user in ["", "u@", "u:p@", "u:p:q@", "u@v@"] {
                let text = format!("{user}{host}");
                if let Ok(a) = http::uri::Authority::try_from(text.as_str()) {
                    assert_eq!(port_ok(&a), oracle(&a), "{text}");
                }
            }
        }
    }

    proptest::proptest! {
        /// The one-pass answer for plain hosts is the parser's: any value, from the characters that
        /// matter to an authority, is judged as `http` and `port_ok` judge it.
        #[test]
        fn a_host_is_valid_exactly_when_it_parses_as_an_authority_with_a_port(
            v in proptest::collection::vec(proptest::sample::select(b"aZ09.-_~:[]@%/?#+ \x7f\x80!".to_vec()), 0..12)
        ) {
            let parsed = v.is_empty()
                || (!v.contains(&b'@') && http::uri::Authority::try_from(v.as_slice()).is_ok_and(|a| port_ok(&a)));
            proptest::prop_assert_eq!(valid_host(&v), parsed, "{:?}", String::from_utf8_lossy(&v));
        }
    }

    #[test]
    fn a_plain_host_with_a_port_past_u16_or_a_sign_is_judged_by_the_parser() {
        assert!(valid_host(b"app.example:0080") && valid_host(b"10.0.0.1:65535") && valid_host(b":80"));
        assert!(!valid_host(b"app.example:65536") && !valid_host(b"app.example:8:8"));
        // `+80` parses as a u16, so the parser's path accepts it as before.
        assert!(valid_host(b"app.example:+80"));
    }

    #[test]
    fn an_empty_upgrade_value_beside_h2c_still_offers_only_h2c() {
        // Found by the property below on a fresh machine: its model counted the empty value.
        let h = map(&[("upgrade", ""), ("upgrade", "h2c"), ("connection", "upgrade")]);
        assert!(!is_upgrade(&h) && !HeadScan::of(&h).is_upgrade(&h));
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[("host", "app.example"), ("connection", "Host, x-hop"), ("x-hop", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("host").unwrap(), "app.example");
        assert!(h.get("x-hop").is_none());
        assert!(h.get("connection").is_none());
    }

    /// Header names requests are built from: Host, every hop-by-hop header, end-to-end ones.
    const NAMES: [&str; 10] = [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "x-a",
        "x-b",
        "content-type",
    ];
    /// Tokens a `Connection` header may list, in any case.
    const TOKENS: [&str; 9] = ["host", "HOST", "x-a", "close", "keep-alive", "upgrade", "te", "x-b", "not a name"];

    fn headers() -> impl Strategy<Value = HeaderMap> {
        let value = prop_oneof![
            Just("1".to_string()),
            Just("trailers".to_string()),
            Just("websocket".to_string()),
            Just("h2c".to_string()),
            Just("application/grpc+proto".to_string()),
            Just("a.example:8080".to_string()),
            Just("user@a.example".to_string()),
            Just(String::new()),
            prop::collection::vec(prop::sample::select(TOKENS.to_vec()), 1..4).prop_map(|t| t.join(", ")),
        ];
        prop::collection::vec((prop::sample::select(NAMES.to_vec()), value), 0..12).prop_map(|pairs| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.append(HeaderName::from_static(k), v);
                }
            }
            h
        })
    }

    fn listed_in_connection(h: &HeaderMap) -> Vec<String> {
        h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect()
    }

    proptest! {
        /// The one-pass scan answers every question exactly as the hashed lookups it replaces.
        #[test]
        fn one_pass_scan_answers_as_the_lookups_do(h in headers()) {
            let scan = HeadScan::of(&h);
            let hosts: Vec<_> = h.get_all(header::HOST).iter().collect();
            prop_assert_eq!(scan.hosts, hosts.len());
            if let Some(first) = hosts.first() {
                prop_assert_eq!(scan.host_valid, valid_host(first.as_bytes()));
            }
            prop_assert_eq!(scan.grpc, is_grpc(&h));
            prop_assert_eq!(scan.hop_by_hop, HOP_BY_HOP.iter().any(|n| h.contains_key(n)));
            prop_assert_eq!(scan.is_upgrade(&h), is_upgrade(&h));
            // Empty list elements do not count (RFC 9110 §5.6.1): `Upgrade: ` beside `Upgrade: h2c` offers h2c alone.
            let offered: Vec<String> = h
                .get_all(header::UPGRADE)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("?").split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
                .filter(|t| !t.is_empty())
                .collect();
            let only_h2c = !offered.is_empty() && offered.iter().all(|t| t == "h2c");
            prop_assert_eq!(
                is_upgrade(&h),
                h.contains_key(header::UPGRADE) && connection_has(&h, "upgrade") && !only_h2c
            );
            for n in NAMES {
                prop_assert_eq!(has(&h, &HeaderName::from_static(n)), h.contains_key(n));
            }
        }

        /// Stripping keeps every Host value and removes every hop-by-hop header: the standard ones
        /// (but `TE: trailers`, and the upgrade pair when kept) and whatever `Connection` names.
        #[test]
        fn strip_keeps_host_and_removes_hop_by_hop(before in headers(), keep_upgrade in any::<bool>()) {
            let mut after = before.clone();
            strip_hop_by_hop(&mut after, keep_upgrade);
            let hosts = |h: &HeaderMap| h.get_all(header::HOST).iter().cloned().collect::<Vec<_>>();
            prop_assert_eq!(hosts(&after), hosts(&before));
            for name in listed_in_connection(&before) {
                let kept = name == "host" || name == "te" || (keep_upgrade && name == "upgrade");
                if !kept {
                    prop_assert!(!after.contains_key(name.as_str()), "{} listed in Connection survived", name);
                }
            }
            for h in ["keep-alive", "proxy-connection", "transfer-encoding"] {
                prop_assert!(!after.contains_key(h), "{} survived", h);
            }
            if keep_upgrade {
                prop_assert!(after.get_all(header::CONNECTION).iter().all(|v| v == "upgrade"));
            } else {
                prop_assert!(!after.contains_key(header::CONNECTION));
                prop_assert!(!after.contains_key(header::UPGRADE));
            }
            prop_assert!(after.get_all(header::TE).iter().all(|v| v == "trailers"));
            // End-to-end headers nobody listed are untouched.
            for h in ["x-a", "x-b", "content-type"] {
                if !listed_in_connection(&before).iter().any(|t| t == h) {
                    prop_assert_eq!(after.get_all(h).iter().count(), before.get_all(h).iter().count());
                }
            }
        }
    }

    #[test]
    fn grpc_detected_by_content_type() {
        assert!(is_grpc(&map(&[("content-type", "application/grpc+proto")])));
        assert!(!is_grpc(&map(&[("content-type", "text/plain")])));
    }
}
