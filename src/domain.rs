//! The vocabulary every layer shares: which side of the pod a connection is on, what it speaks, its
//! id, how a lingering close ended. Kept here, at the bottom of the import graph (docs/architecture.md
//! §2.1), rather than in the module that first needed each, so that a word several layers use does
//! not make a lower layer import a higher one (metrics count linger outcomes without `transport`).

use serde::{Deserialize, Serialize};

/// Which side of the pod a listener serves; drains treat the two differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "opaque",
        }
    }
}

/// A connection's id, unique for the process's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a lingering close ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LingerOutcome {
    /// The client closed its side: every byte Ebb wrote was delivered before the FIN.
    PeerClosed,
    /// The client kept the connection open past the linger time.
    TimedOut,
    /// The drain deadline cut it short.
    Deadline,
    /// The socket failed (the client reset it).
    Error,
}

impl LingerOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::TimedOut => "timeout",
            Self::Deadline => "deadline",
            Self::Error => "error",
        }
    }
}

/// Whether `id` has the shape of a SPIFFE ID: `spiffe://`, a trust domain, a path.
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else { return false };
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    !domain.is_empty()
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && !path.is_empty()
        && !path.split('/').any(str::is_empty)
        && path.bytes().all(|b| b == b'/' || b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@".contains(&b))
}

#[cfg(test)]
mod spiffe_tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_recognised_by_shape() {
        assert!(is_spiffe_id("spiffe://cluster.local/ns/default/sa/web"));
        assert!(!is_spiffe_id("spiffe://cluster.local"));
        assert!(!is_spiffe_id("spiffe:///ns/a"));
        assert!(!is_spiffe_id("spiffe://Cluster.local/ns/a"));
        assert!(!is_spiffe_id("spiffe://cluster.local/ns//a"));
        assert!(!is_spiffe_id("https://cluster.local/ns/a"));
        assert!(!is_spiffe_id("spiffe://cluster.local/ns/a b"));
    }
}
