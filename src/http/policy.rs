//! What one Ebb instance adds to and checks on every request it proxies: the hop header that stops
//! request loops between Ebbs, how long the upstream may take, and how much its own error responses
//! may say.
//!
//! Two Ebbs whose targets point at each other (or a chain that comes back) would pass one request
//! around, a new connection per hop, until file descriptors run out. Every proxied request carries
//! `x-ebb-hops`, the list of the Ebbs (instance and direction) it went through; an Ebb that finds
//! itself in the list answers 508 instead of forwarding, and so does one that finds the list too long.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::UpstreamConfig;
use crate::domain::Direction;
use crate::http::error::ProxyError;

/// The hop header: comma-separated `<instance>-<in|out>` tokens, oldest first.
pub static X_EBB_HOPS: HeaderName = HeaderName::from_static("x-ebb-hops");

/// Most Ebb hops a request may already have made. Every service call in a mesh takes two (the
/// caller's outbound, the callee's inbound), and an app that passes incoming headers on to its own
/// calls adds two per service, so this leaves room for a call chain eight services deep.
pub const MAX_HOPS: usize = 16;

/// The token for an instance and direction. The direction is part of it because one Ebb serves both
/// sides of its pod: a request in through inbound and out again through outbound (an app that passes
/// headers on) is two hops, not a loop.
fn token(instance: &str, direction: Direction) -> String {
    let dir = match direction {
        Direction::Inbound => "in",
        Direction::Outbound => "out",
    };
    format!("{instance}-{dir}")
}

/// One instance's request policy; shared by every connection of the instance.
#[derive(Clone, Debug)]
pub struct RequestPolicy {
    /// Random per process start: two Ebbs (or two instances in one test process) never share it.
    instance: String,
    /// This instance's hop token per direction, ready to insert: most requests carry no hop list yet,
    /// and for them adding this hop costs no allocation.
    tokens: [HeaderValue; 2],
    /// Error responses name the upstream's address and OS error (`upstream.expose_errors`).
    pub expose_errors: bool,
    /// Time allowed for response headers (`upstream.response_timeout`).
    pub response_timeout: Option<Duration>,
}

impl RequestPolicy {
    /// The policy `upstream` asks for, with a fresh random instance id.
    pub fn new(upstream: &UpstreamConfig) -> Self {
        let instance = format!("{:016x}", fastrand::u64(..));
        let tokens = [Direction::Inbound, Direction::Outbound]
            .map(|d| HeaderValue::from_str(&token(&instance, d)).unwrap_or_else(|_| HeaderValue::from_static("ebb")));
        Self { instance, tokens, expose_errors: upstream.expose_errors, response_timeout: upstream.response_timeout }
    }

    /// This instance's id, as it appears in `x-ebb-hops`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Refuses a request that has been here before or has made too many hops; otherwise adds this
    /// hop to its `x-ebb-hops`.
    pub fn check_hops(&self, headers: &mut HeaderMap, direction: Direction) -> Result<(), ProxyError> {
        let own = &self.tokens[direction as usize];
        // Most requests carry no hop list yet: one hashed lookup finds that out and adds this hop.
        if let http::header::Entry::Vacant(e) = headers.entry(&X_EBB_HOPS) {
            e.insert(own.clone());
            return Ok(());
        }
        let own_text = own.to_str().unwrap_or_default();
        let mut list = String::new();
        let mut hops = 0;
        let mut looped = false;
        for value in headers.get_all(&X_EBB_HOPS) {
            // A value that is not text was not written by an Ebb; it counts as nothing.
            let Ok(text) = value.to_str() else { continue };
            for t in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                looped |= t == own_text;
                hops += 1;
                list.push_str(t);
                list.push_str(", ");
            }
        }
        if looped {
            return Err(ProxyError::LoopDetected { hops });
        }
        if hops >= MAX_HOPS {
            return Err(ProxyError::TooManyHops { hops });
        }
        list.push_str(own_text);
        match HeaderValue::from_str(&list) {
            Ok(v) => {
                headers.insert(X_EBB_HOPS.clone(), v);
            }
            // Every token came from a valid value or is hex, so this does not happen; if it did,
            // forwarding without the header would hide a loop, so refusing is the safe answer.
            Err(_) => return Err(ProxyError::TooManyHops { hops }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_its_hop_and_refuses_its_own() {
        let (a, b) = (RequestPolicy::new(&UpstreamConfig::default()), RequestPolicy::new(&UpstreamConfig::default()));
        assert_ne!(a.instance(), b.instance());
        let mut h = HeaderMap::new();
        a.check_hops(&mut h, Direction::Outbound).unwrap();
        b.check_hops(&mut h, Direction::Inbound).unwrap();
        // The same instance in the other direction is a hop, not a loop.
        b.check_hops(&mut h, Direction::Outbound).unwrap();
        assert_eq!(h.get_all(&X_EBB_HOPS).iter().count(), 1);
        let err = a.check_hops(&mut h, Direction::Outbound).unwrap_err();
        assert!(matches!(err, ProxyError::LoopDetected { hops: 3 }), "{err:?}");
    }

    #[test]
    fn refuses_past_the_hop_limit_counting_every_value() {
        let p = RequestPolicy::new(&UpstreamConfig::default());
        let mut h = HeaderMap::new();
        for i in 0..MAX_HOPS {
            h.append(X_EBB_HOPS.clone(), HeaderValue::from_str(&format!("other{i}-in")).unwrap());
        }
        let err = p.check_hops(&mut h, Direction::Inbound).unwrap_err();
        assert!(matches!(err, ProxyError::TooManyHops { hops: MAX_HOPS }), "{err:?}");
        h.remove(&X_EBB_HOPS);
        h.insert(X_EBB_HOPS.clone(), HeaderValue::from_static("x-in, ,y-out"));
        p.check_hops(&mut h, Direction::Inbound).unwrap();
        let v = h.get(&X_EBB_HOPS).unwrap().to_str().unwrap();
        assert_eq!(v, format!("x-in, y-out, {}-in", p.instance()));
    }
}
