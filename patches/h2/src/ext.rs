//! Extensions specific to the HTTP/2 protocol.

use crate::hpack::BytesStr;

use bytes::Bytes;
use std::fmt;

/// Represents the `:protocol` pseudo-header used by
/// the [Extended CONNECT Protocol].
///
/// [Extended CONNECT Protocol]: https://datatracker.ietf.org/doc/html/rfc8441#section-4
#[derive(Clone, Eq, PartialEq)]
pub struct Protocol {
    value: BytesStr,
}

impl Protocol {
    /// Converts a static string to a protocol name.
    pub const fn from_static(value: &'static str) -> Self {
        Self {
            value: BytesStr::from_static(value),
        }
    }

    /// Returns a str representation of the header.
    pub fn as_str(&self) -> &str {
        self.value.as_str()
    }

    pub(crate) fn try_from(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Ok(Self {
            value: BytesStr::try_from(bytes)?,
        })
    }
}

impl<'a> From<&'a str> for Protocol {
    fn from(value: &'a str) -> Self {
        Self {
            value: BytesStr::from(value),
        }
    }
}

impl AsRef<[u8]> for Protocol {
    fn as_ref(&self) -> &[u8] {
        self.value.as_ref()
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}

/// An `:authority` that is not one URI authority but a comma-separated list of them, as gRPC
/// clients with a multi-address target send (`ipv4:10.0.0.1:80,10.0.0.2:80` becomes
/// `:authority: 10.0.0.1:80,10.0.0.2:80`).
///
/// The `http` crate cannot hold it in a `Uri`, and refusing the request resets the stream. A server
/// hands such a request over with no authority in its URI and this extension holding the value as
/// received; a client sends a request with this extension (and no authority in its URI) with the
/// value as its `:authority`, so a proxy forwards it as it came.
#[derive(Clone, Eq, PartialEq)]
pub struct AuthorityList {
    value: BytesStr,
}

impl AuthorityList {
    /// The value, if it is a list of at least two valid authorities without userinfo.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split(',');
        // A port, if there is one, must be a port: `http` accepts `host:99999` as having none.
        let valid = |p: &str| {
            let has_port = p.rsplit(']').next().map_or(false, |tail| tail.contains(':'));
            !p.contains('@')
                && http::uri::Authority::try_from(p)
                    .map_or(false, |a| !has_port || a.port_u16().is_some())
        };
        let (Some(first), Some(second)) = (parts.next(), parts.next()) else {
            return None;
        };
        if valid(first) && valid(second) && parts.all(valid) {
            Some(Self {
                value: BytesStr::from(value),
            })
        } else {
            None
        }
    }

    /// The value as received.
    pub fn as_str(&self) -> &str {
        self.value.as_str()
    }

    pub(crate) fn as_bytes_str(&self) -> BytesStr {
        self.value.clone()
    }
}

impl fmt::Debug for AuthorityList {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}
