//! The upstream hop's protocol, and fitting a request to it: a client's HTTP/1.1 request sent to an
//! HTTP/2 upstream needs `:scheme` and `:authority`, an HTTP/2 client's request sent as HTTP/1.1 needs
//! Host (RFC 9113 §8.3.1, RFC 9112 §3.2). The client side of the proxy decides this per request, from
//! the cluster's `protocol` and what the client spoke; the server knows nothing of it.

use std::net::SocketAddr;

use http::{header, HeaderValue, Request, Version};

use crate::config::UpstreamProtocol;
use crate::http::headers::{has, is_upgrade};

/// The protocol of the upstream hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Http1 { upgrade: bool },
    Http2,
}

impl Hop {
    /// The hop for `req` under a cluster's `protocol`: `auto` speaks what the client spoke (the
    /// request's version as it arrived); an upgrade needs HTTP/1.1 on both hops.
    pub fn choose<B>(protocol: UpstreamProtocol, req: &Request<B>) -> Self {
        let from_h2 = req.version() == Version::HTTP_2;
        let upgrade = !from_h2 && is_upgrade(req.headers());
        let h2 = match protocol {
            UpstreamProtocol::Auto => from_h2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        if h2 && !upgrade {
            Self::Http2
        } else {
            Self::Http1 { upgrade }
        }
    }
}

/// Fits a request for the upstream hop, whatever the client spoke. `orig_dst` names the server when
/// an HTTP/1.0 request came without Host. Hop-by-hop headers are already gone (the server strips
/// them before anything else sees the request).
pub fn fit<B>(req: &mut Request<B>, hop: Hop, orig_dst: SocketAddr) {
    if hop == Hop::Http2 {
        // An HTTP/2 request needs :scheme and :authority; take the authority from Host if it came that
        // way (an HTTP/1.1 client), and then Host goes: :authority replaces it (RFC 9113 §8.3.1).
        if req.uri().authority().is_none() {
            let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
            let host = host.unwrap_or_else(|| orig_dst.to_string());
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = host.parse().ok();
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
                req.headers_mut().remove(header::HOST);
            }
        }
        *req.version_mut() = Version::HTTP_2;
    } else {
        // A URI with an authority (absolute-form from a client that thinks it talks to a proxy, or an
        // HTTP/2 client's :authority): the authority becomes Host, replacing any Host sent (RFC 9112
        // §3.2.2; RFC 9113 §8.3.1), so Ebb and the upstream agree on the site.
        if let Some(authority) = req.uri().authority().cloned() {
            let host = authority.as_str().rsplit_once('@').map_or(authority.as_str(), |(_userinfo, host)| host);
            if let Ok(v) = HeaderValue::from_str(host) {
                req.headers_mut().insert(header::HOST, v);
            }
            let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(pq);
        }
        // It goes upstream as HTTP/1.1, which requires Host; HTTP/1.0 may lack one. The address the
        // client connected to is the server it meant.
        if !has(req.headers(), &header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&orig_dst.to_string()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const DST: &str = "10.0.0.1:8080";

    #[test]
    fn auto_speaks_the_clients_protocol_and_an_upgrade_stays_http1() {
        let h1 = req(Version::HTTP_11, "/", &[("host", "a")]);
        let h2 = req(Version::HTTP_2, "http://a/", &[]);
        let ws = req(Version::HTTP_11, "/", &[("host", "a"), ("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(Hop::choose(UpstreamProtocol::Auto, &h1), Hop::Http1 { upgrade: false });
        assert_eq!(Hop::choose(UpstreamProtocol::Auto, &h2), Hop::Http2);
        assert_eq!(Hop::choose(UpstreamProtocol::Http2, &h1), Hop::Http2);
        assert_eq!(Hop::choose(UpstreamProtocol::Http1, &h2), Hop::Http1 { upgrade: false });
        assert_eq!(Hop::choose(UpstreamProtocol::Http2, &ws), Hop::Http1 { upgrade: true });
    }

    #[test]
    fn http1_to_http2_moves_host_into_the_authority() {
        let mut r = req(Version::HTTP_11, "/x?q", &[("host", "app.example:81")]);
        fit(&mut r, Hop::Http2, DST.parse().unwrap());
        assert_eq!(r.uri().to_string(), "http://app.example:81/x?q");
        assert!(r.headers().get(header::HOST).is_none());
        assert_eq!(r.version(), Version::HTTP_2);
    }

    #[test]
    fn http2_to_http1_makes_the_authority_host_without_userinfo() {
        let mut r = req(Version::HTTP_2, "http://user@app.example/x", &[]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap());
        assert_eq!(r.uri().to_string(), "/x");
        assert_eq!(r.headers()[header::HOST], "app.example");
        assert_eq!(r.version(), Version::HTTP_11);
    }

    #[test]
    fn http10_without_host_gains_the_original_destination() {
        let mut r = req(Version::HTTP_10, "/", &[]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap());
        assert_eq!(r.headers()[header::HOST], DST);
    }

    #[test]
    fn fitting_twice_changes_nothing_more() {
        let dst = DST.parse().unwrap();
        for hop in [Hop::Http2, Hop::Http1 { upgrade: false }] {
            let mut once = req(Version::HTTP_11, "/x", &[("host", "a")]);
            fit(&mut once, hop, dst);
            let mut twice = req(Version::HTTP_11, "/x", &[("host", "a")]);
            fit(&mut twice, hop, dst);
            fit(&mut twice, hop, dst);
            assert_eq!((once.uri(), once.headers(), once.version()), (twice.uri(), twice.headers(), twice.version()));
        }
    }
}
