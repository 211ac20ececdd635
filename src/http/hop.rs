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
    /// request's version as it arrived); an upgrade needs HTTP/1.1 on both hops, so it cannot go to a
    /// cluster that speaks only HTTP/2 (`Err`: answered by Ebb, never the endpoint's failure).
    pub fn choose<B>(protocol: UpstreamProtocol, req: &Request<B>) -> Result<Self, Untranslatable> {
        let from_h2 = req.version() == Version::HTTP_2;
        let upgrade = !from_h2 && is_upgrade(req.headers());
        match protocol {
            UpstreamProtocol::Http2 if upgrade => Err(Untranslatable::UpgradeOverHttp2),
            UpstreamProtocol::Http2 => Ok(Self::Http2),
            UpstreamProtocol::Auto if from_h2 => Ok(Self::Http2),
            UpstreamProtocol::Auto | UpstreamProtocol::Http1 => Ok(Self::Http1 { upgrade }),
        }
    }
}

/// A request the upstream hop's protocol cannot carry: the client's to fix, so it is answered by Ebb
/// and never counts against an endpoint (a client must not be able to eject healthy endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Untranslatable {
    /// HTTP/1.1 with an empty Host, to an HTTP/2 upstream: an `http` request over HTTP/2 needs an
    /// authority (RFC 9113 §8.3.1), and there is none to give it.
    #[error("an HTTP/2 upstream needs an authority, and the request has an empty Host")]
    NoAuthority,
    /// An HTTP/1.1 upgrade to a cluster that speaks HTTP/2 only (RFC 9113 §8.6: no Upgrade in HTTP/2).
    #[error("the upstream speaks HTTP/2, which cannot carry an HTTP/1.1 upgrade")]
    UpgradeOverHttp2,
}

/// Fits a request for the upstream hop, whatever the client spoke. `orig_dst` names the server when
/// an HTTP/1.0 request came without Host. Hop-by-hop headers are already gone (the server strips
/// them before anything else sees the request).
pub fn fit<B: http_body::Body>(req: &mut Request<B>, hop: Hop, orig_dst: SocketAddr) -> Result<(), Untranslatable> {
    if hop == Hop::Http2 {
        // An HTTP/2 request needs :scheme and :authority, and exactly one authority (RFC 9113 §8.3.1):
        // the target's own if it has one (absolute-form, or an HTTP/2 client's :authority: it wins
        // over Host, RFC 9112 §3.2.2), else Host (an HTTP/1.1 client), else where the client
        // connected (HTTP/1.0). Host then goes, userinfo never travels in :authority, and the scheme
        // is the hop's, `http` (a client's `https://` said nothing of this cleartext hop).
        // An HTTP/2 client's request is nearly always that already: then only the version changes
        // (rebuilding the URI costs allocations on every request, BENCHMARKS.md issue 19).
        let uri = req.uri();
        if uri.authority().is_none() && req.extensions().get::<h2::ext::AuthorityList>().is_some() {
            // An HTTP/2 client's `:authority` listing several addresses (gRPC's multi-address
            // target): the URI cannot hold it, and h2 sends the list as it came (`patches/h2`).
            req.headers_mut().remove(header::HOST);
            *req.version_mut() = Version::HTTP_2;
            return Ok(());
        }
        let ready = uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
            && !has(req.headers(), &header::HOST);
        if ready {
            *req.version_mut() = Version::HTTP_2;
            return Ok(());
        }
        let authority = match req.uri().authority() {
            Some(a) => without_userinfo(a.as_str()).to_owned(),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map_or_else(|| orig_dst.to_string(), str::to_owned),
        };
        // An empty Host (RFC 9112 §3.2: the target has no authority) leaves nothing to send as
        // :authority, and an `http` request over HTTP/2 must have one.
        let authority = authority.parse::<http::uri::Authority>().map_err(|_| Untranslatable::NoAuthority)?;
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Untranslatable::NoAuthority)?;
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
    } else {
        // HTTP/2 may split Cookie into one field per crumb; HTTP/1.1 has one Cookie line, the crumbs
        // joined with "; " (RFC 9113 §8.2.3).
        if req.version() == Version::HTTP_2 {
            join_cookies(req.headers_mut());
        }
        // A URI with an authority (absolute-form from a client that thinks it talks to a proxy, or an
        // HTTP/2 client's :authority): the authority becomes Host, replacing any Host sent (RFC 9112
        // §3.2.2; RFC 9113 §8.3.1), so Ebb and the upstream agree on the site.
        if let Some(authority) = req.uri().authority().cloned() {
            if let Ok(v) = HeaderValue::from_str(without_userinfo(authority.as_str())) {
                req.headers_mut().insert(header::HOST, v);
            }
            let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = http::Uri::from(pq);
        }
        // An authority list (see above) becomes Host as it came: an HTTP/1.1 server reads Host as
        // leniently as a gRPC server reads `:authority`, or answers 400 itself.
        if let Some(list) = req.extensions().get::<h2::ext::AuthorityList>() {
            if let Ok(v) = HeaderValue::from_str(list.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        // It goes upstream as HTTP/1.1, which requires Host; HTTP/1.0 may lack one. The address the
        // client connected to is the server it meant.
        if !has(req.headers(), &header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&orig_dst.to_string()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        // A body of unknown length goes chunked. hyper frames such a body itself for most methods,
        // but sends a GET or HEAD without one: its body would be dropped, not forwarded (the client's
        // Transfer-Encoding was hop-by-hop and is gone by now).
        let body = req.body();
        if !body.is_end_stream()
            && body.size_hint().exact().is_none()
            && !has(req.headers(), &header::TRANSFER_ENCODING)
        {
            req.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(())
}

/// An authority's host and port, without the `userinfo@` (deprecated, RFC 9110 §4.2.4; never sent on).
fn without_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_userinfo, host)| host)
}

/// Joins several Cookie fields into one, crumbs in order, separated by "; ".
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else { return };
    let mut joined = first.as_bytes().to_vec();
    for c in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(c.as_bytes());
    }
    // Each crumb was a valid field value, and "; " is too: the join is one.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, headers: &[(&str, &str)]) -> Request<http_body_util::Empty<bytes::Bytes>> {
        let mut b = Request::builder().version(version).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(http_body_util::Empty::new()).unwrap()
    }

    const DST: &str = "10.0.0.1:8080";

    #[test]
    fn auto_speaks_the_clients_protocol_and_an_upgrade_stays_http1() {
        let h1 = req(Version::HTTP_11, "/", &[("host", "a")]);
        let h2 = req(Version::HTTP_2, "http://a/", &[]);
        let ws = req(Version::HTTP_11, "/", &[("host", "a"), ("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(Hop::choose(UpstreamProtocol::Auto, &h1), Ok(Hop::Http1 { upgrade: false }));
        assert_eq!(Hop::choose(UpstreamProtocol::Auto, &h2), Ok(Hop::Http2));
        assert_eq!(Hop::choose(UpstreamProtocol::Http2, &h1), Ok(Hop::Http2));
        assert_eq!(Hop::choose(UpstreamProtocol::Http1, &h2), Ok(Hop::Http1 { upgrade: false }));
        assert_eq!(Hop::choose(UpstreamProtocol::Auto, &ws), Ok(Hop::Http1 { upgrade: true }));
        assert_eq!(Hop::choose(UpstreamProtocol::Http2, &ws), Err(Untranslatable::UpgradeOverHttp2));
    }

    #[test]
    fn an_empty_host_cannot_become_an_http2_authority() {
        let mut r = req(Version::HTTP_11, "/x", &[("host", "")]);
        assert_eq!(fit(&mut r, Hop::Http2, DST.parse().unwrap()), Err(Untranslatable::NoAuthority));
        // To HTTP/1.1 it goes as it came.
        let mut r = req(Version::HTTP_11, "/x", &[("host", "")]);
        assert_eq!(fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()), Ok(()));
        assert_eq!(r.headers()[header::HOST], "");
    }

    #[test]
    fn http1_to_http2_moves_host_into_the_authority() {
        let mut r = req(Version::HTTP_11, "/x?q", &[("host", "app.example:81")]);
        fit(&mut r, Hop::Http2, DST.parse().unwrap()).unwrap();
        assert_eq!(r.uri().to_string(), "http://app.example:81/x?q");
        assert!(r.headers().get(header::HOST).is_none());
        assert_eq!(r.version(), Version::HTTP_2);
    }

    #[test]
    fn absolute_form_to_http2_has_one_authority_no_userinfo_and_the_hops_scheme() {
        let mut r = req(Version::HTTP_11, "https://user:pw@evil.example/x?q", &[("host", "a.example")]);
        fit(&mut r, Hop::Http2, DST.parse().unwrap()).unwrap();
        assert_eq!(r.uri().to_string(), "http://evil.example/x?q");
        assert!(r.headers().get(header::HOST).is_none(), "one authority only");
        // An HTTP/2 client's request with both :authority and host keeps the :authority alone.
        let mut r = req(Version::HTTP_2, "http://a.example/", &[("host", "b.example")]);
        fit(&mut r, Hop::Http2, DST.parse().unwrap()).unwrap();
        assert_eq!((r.uri().to_string().as_str(), r.headers().get(header::HOST)), ("http://a.example/", None));
    }

    #[test]
    fn http2_to_http1_makes_the_authority_host_without_userinfo() {
        let mut r = req(Version::HTTP_2, "http://user@app.example/x", &[]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        assert_eq!(r.uri().to_string(), "/x");
        assert_eq!(r.headers()[header::HOST], "app.example");
        assert_eq!(r.version(), Version::HTTP_11);
    }

    #[test]
    fn an_authority_list_travels_as_it_came() {
        let list = h2::ext::AuthorityList::parse("10.0.0.1:80,10.0.0.2:80").unwrap();
        let mut r = req(Version::HTTP_2, "/svc/M", &[]);
        r.extensions_mut().insert(list.clone());
        fit(&mut r, Hop::Http2, DST.parse().unwrap()).unwrap();
        assert_eq!(r.uri().to_string(), "/svc/M", "no authority of Ebb's choosing");
        assert_eq!(r.extensions().get::<h2::ext::AuthorityList>(), Some(&list), "h2 sends the list");
        let mut r = req(Version::HTTP_2, "/svc/M", &[]);
        r.extensions_mut().insert(list);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        assert_eq!(r.headers()[header::HOST], "10.0.0.1:80,10.0.0.2:80");
        // Not a list of authorities: not one at all.
        for bad in ["a.example", "a:1,", "u@a:1,b:2", "a:1,b:99999", "a b:1,c:2"] {
            assert!(h2::ext::AuthorityList::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn http2_cookie_crumbs_become_one_http1_cookie_line() {
        let mut r = req(Version::HTTP_2, "http://a/", &[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        let cookies: Vec<_> = r.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        // HTTP/2 to HTTP/2 keeps the crumbs (the peer may compress them one by one).
        let mut r = req(Version::HTTP_2, "http://a/", &[("cookie", "a=1"), ("cookie", "b=2")]);
        fit(&mut r, Hop::Http2, DST.parse().unwrap()).unwrap();
        assert_eq!(r.headers().get_all(header::COOKIE).iter().count(), 2);
    }

    #[test]
    fn a_body_of_unknown_length_goes_chunked_to_http1_whatever_the_method() {
        use futures_util::stream;
        let frames =
            stream::iter([Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from("hi")))]);
        let mut r =
            Request::get("http://a/").version(Version::HTTP_2).body(http_body_util::StreamBody::new(frames)).unwrap();
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        assert_eq!(r.headers()[header::TRANSFER_ENCODING], "chunked");
        // No body, or one of known length: nothing added.
        let mut r = req(Version::HTTP_2, "http://a/", &[]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        assert!(r.headers().get(header::TRANSFER_ENCODING).is_none());
    }

    #[test]
    fn http10_without_host_gains_the_original_destination() {
        let mut r = req(Version::HTTP_10, "/", &[]);
        fit(&mut r, Hop::Http1 { upgrade: false }, DST.parse().unwrap()).unwrap();
        assert_eq!(r.headers()[header::HOST], DST);
    }

    #[test]
    fn fitting_twice_changes_nothing_more() {
        let dst = DST.parse().unwrap();
        for hop in [Hop::Http2, Hop::Http1 { upgrade: false }] {
            let mut once = req(Version::HTTP_11, "/x", &[("host", "a")]);
            fit(&mut once, hop, dst).unwrap();
            let mut twice = req(Version::HTTP_11, "/x", &[("host", "a")]);
            fit(&mut twice, hop, dst).unwrap();
            fit(&mut twice, hop, dst).unwrap();
            assert_eq!((once.uri(), once.headers(), once.version()), (twice.uri(), twice.headers(), twice.version()));
        }
    }
}
