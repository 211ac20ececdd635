//! The one place where a proxying failure becomes a response: HTTP status or gRPC status, and an
//! `x-ebb-error` header naming the cause.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::http::body::ProxyBody;
use crate::http::headers::X_EBB_ERROR;
use crate::transport::connect::ConnectError;

/// The first error of type `T` in `e`'s chain of sources (`e` itself excluded).
pub fn source_of<'a, T: std::error::Error + 'static>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        src = s.source();
    }
    None
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream failed: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream sent no response within {0:?}")]
    ResponseTimeout(Duration),
    #[error("request aborted at the drain deadline")]
    DrainDeadline,
    /// The request has been through this Ebb before (its `x-ebb-hops` names it): targets form a loop.
    #[error("request loop: this Ebb already proxied this request ({hops} hops so far)")]
    LoopDetected { hops: usize },
    /// The request has made more Ebb hops than any mesh path needs (`http::policy::MAX_HOPS`).
    #[error("request made {hops} Ebb hops, the most allowed is {max}", max = crate::http::policy::MAX_HOPS)]
    TooManyHops { hops: usize },
    /// The client's request body failed: malformed chunked framing, or the client went away mid-body.
    /// The client's fault, not the upstream's.
    #[error("request body failed: {0}")]
    RequestBody(#[source] hyper::Error),
    /// An HTTP/1.1 request without Host (RFC 9112 §3.2).
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    /// More than one Host header: which site the request is for is ambiguous.
    #[error("request with more than one Host header")]
    DuplicateHost,
    /// A Host that is not `host[:port]`.
    #[error("Host header is not a valid host[:port]")]
    InvalidHost,
    /// A request target `*` on a method other than OPTIONS (RFC 9112 §3.2.4, RFC 9113 §8.3.1).
    #[error("request target `*` is for OPTIONS only")]
    AsteriskNotOptions,
    /// An HTTP/2 field value with leading or trailing whitespace (RFC 9113 §8.2.1: malformed).
    #[error("a header value starts or ends with whitespace")]
    MalformedHeader,
    /// The upstream provably did not process the request: a pooled connection handed it back unsent,
    /// or an HTTP/2 connection going away refused it. Resent by the retry layer whatever its method.
    #[error("upstream did not process the request: {0}")]
    Unprocessed(#[source] hyper::Error),
    /// A listener or cluster threshold was reached; the cause names which (`overflow-listener-max-requests`,
    /// `overflow-max-requests`, ...).
    #[error("limit reached ({0})")]
    Overflow(&'static str),
    /// Every endpoint of the cluster is ejected by its breaker.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    /// One attempt took longer than the per-try timeout.
    #[error("upstream attempt timed out after {0:?}")]
    PerTryTimeout(Duration),
    /// CONNECT would need a tunnel routed by its authority, which Ebb does not do.
    #[error("CONNECT is not supported")]
    ConnectNotSupported,
    /// The request cannot be carried by the upstream hop's protocol (the client's to fix).
    #[error("{0}")]
    Untranslatable(#[from] crate::http::hop::Untranslatable),
    /// The upstream answered 101 switching to a protocol the request did not offer, or to a request
    /// that asked for no switch (RFC 9110 §7.8 forbids both).
    #[error("upstream switched to a protocol the request did not offer")]
    UpgradeNotOffered,
    /// The stream moved no body byte either way for `downstream.stream_idle_timeout`: the client's
    /// doing when its request body was waiting on it (408), else the upstream's (504).
    #[error("stream idle for downstream.stream_idle_timeout")]
    StreamIdle { client: bool },
    /// `inbound.authorization` does not let this caller (its SPIFFE ID, or `plaintext`) call the port.
    #[error("{0} may not call this port")]
    Unauthorized(std::sync::Arc<str>),
}

/// The `x-ebb-error` of a failed upstream mesh handshake.
fn tls_cause(cause: crate::tls::verify::TlsCause) -> &'static str {
    use crate::tls::verify::TlsCause as C;
    match cause {
        C::WrongIdentity => "upstream-tls-wrong-identity",
        C::Expired => "upstream-tls-expired",
        C::Untrusted => "upstream-tls-untrusted",
        C::NoClientCertificate => "upstream-tls-no-client-certificate",
        C::Rejected => "upstream-tls-rejected-by-peer",
        C::Failed => "upstream-tls-handshake-failed",
    }
}

impl ProxyError {
    /// HTTP status, gRPC status and the stable cause name.
    fn classify(&self) -> (StatusCode, u32, &'static str) {
        match self {
            Self::Connect(ConnectError::Refused(_)) => (StatusCode::BAD_GATEWAY, 14, "upstream-connect-refused"),
            Self::Connect(ConnectError::TimedOut(..)) => (StatusCode::GATEWAY_TIMEOUT, 14, "upstream-connect-timeout"),
            Self::Connect(ConnectError::Other(..)) => (StatusCode::BAD_GATEWAY, 14, "upstream-connect-failed"),
            Self::Connect(ConnectError::LocalFdExhausted(..)) => {
                (StatusCode::SERVICE_UNAVAILABLE, 14, "local-fd-exhausted")
            }
            Self::Connect(ConnectError::Tls { cause, .. }) => (StatusCode::BAD_GATEWAY, 14, tls_cause(*cause)),
            Self::Unauthorized(_) => (StatusCode::FORBIDDEN, 7, "unauthorized"),
            Self::Untranslatable(crate::http::hop::Untranslatable::NoAuthority) => {
                (StatusCode::BAD_REQUEST, 13, "no-authority-for-http2")
            }
            // RFC 9110 §7.8: a server that will not switch ignores Upgrade; refusing is clearer here,
            // since the client asked for nothing else.
            Self::Untranslatable(crate::http::hop::Untranslatable::UpgradeOverHttp2) => {
                (StatusCode::NOT_IMPLEMENTED, 12, "upgrade-over-http2")
            }
            Self::Handshake(_) => (StatusCode::BAD_GATEWAY, 14, "upstream-handshake-failed"),
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, 14, "upstream-reset"),
            Self::UpgradeNotOffered => (StatusCode::BAD_GATEWAY, 13, "upstream-upgrade-not-offered"),
            Self::Unprocessed(_) => (StatusCode::SERVICE_UNAVAILABLE, 14, "upstream-refused-request"),
            Self::Overflow(cause) => (StatusCode::SERVICE_UNAVAILABLE, 14, cause),
            Self::NoHealthyEndpoint => (StatusCode::SERVICE_UNAVAILABLE, 14, "no-healthy-endpoint"),
            Self::PerTryTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, 4, "upstream-per-try-timeout"),
            Self::ResponseTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, 4, "upstream-response-timeout"),
            Self::DrainDeadline => (StatusCode::SERVICE_UNAVAILABLE, 14, "drain-deadline"),
            Self::StreamIdle { client: true } => (StatusCode::REQUEST_TIMEOUT, 4, "stream-idle-timeout"),
            Self::StreamIdle { client: false } => (StatusCode::GATEWAY_TIMEOUT, 4, "upstream-stream-idle-timeout"),
            // Not UNAVAILABLE: retrying a loop only loops again.
            Self::LoopDetected { .. } => (StatusCode::LOOP_DETECTED, 13, "loop-detected"),
            Self::TooManyHops { .. } => (StatusCode::LOOP_DETECTED, 13, "too-many-hops"),
            // gRPC maps HTTP 400 to INTERNAL (13); a method it cannot serve is UNIMPLEMENTED (12).
            Self::RequestBody(_) => (StatusCode::BAD_REQUEST, 13, "bad-request-body"),
            Self::MissingHost => (StatusCode::BAD_REQUEST, 13, "missing-host"),
            Self::DuplicateHost => (StatusCode::BAD_REQUEST, 13, "duplicate-host"),
            Self::InvalidHost => (StatusCode::BAD_REQUEST, 13, "invalid-host"),
            Self::AsteriskNotOptions => (StatusCode::BAD_REQUEST, 13, "asterisk-not-options"),
            Self::MalformedHeader => (StatusCode::BAD_REQUEST, 13, "malformed-header"),
            Self::ConnectNotSupported => (StatusCode::METHOD_NOT_ALLOWED, 12, "connect-not-supported"),
        }
    }

    /// The cause name when the client caused the failure (counted as a client error, not an upstream
    /// one); `None` for upstream and drain failures.
    pub fn client_error(&self) -> Option<&'static str> {
        match self {
            Self::RequestBody(_)
            | Self::MissingHost
            | Self::DuplicateHost
            | Self::InvalidHost
            | Self::AsteriskNotOptions
            | Self::MalformedHeader
            | Self::ConnectNotSupported
            | Self::StreamIdle { client: true }
            | Self::Untranslatable(_)
            | Self::Unauthorized(_) => Some(self.classify().2),
            _ => None,
        }
    }

    /// The response the client gets. gRPC clients get a trailers-only response with `grpc-status`, so
    /// their libraries see a status (UNAVAILABLE is retryable), not a protocol error.
    /// The message says what failed but not where: see [`ProxyError::to_response_with`].
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        self.to_response_with(grpc, false)
    }

    /// As [`ProxyError::to_response`]; with `expose` (`upstream.expose_errors`) the message also names
    /// the upstream's address and the OS error.
    pub fn to_response_with(&self, grpc: bool, expose: bool) -> Response<ProxyBody> {
        let (status, grpc_status, cause) = self.classify();
        let message = self.message(expose);
        let mut res = if grpc {
            let mut r = Response::new(ProxyBody::empty());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(grpc_status));
            if let Ok(v) = HeaderValue::from_str(&message) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(ProxyBody::full(Bytes::from(format!("{message}\n"))));
            *r.status_mut() = status;
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        };
        res.headers_mut().insert(X_EBB_ERROR.clone(), HeaderValue::from_static(cause));
        res
    }

    /// What the client is told. Upstream addresses and OS errors describe the pod's insides (an
    /// inbound error reaches whoever called the pod), so they stay in the logs unless exposed.
    fn message(&self, expose: bool) -> String {
        match self {
            _ if expose => self.to_string(),
            Self::Connect(ConnectError::Refused(_)) => "upstream refused the connection".into(),
            Self::Connect(ConnectError::TimedOut(_, t)) => format!("upstream connect timed out after {t:?}"),
            Self::Connect(_) => format!("upstream connect failed ({})", self.classify().2),
            Self::Handshake(_) => "upstream handshake failed".into(),
            Self::Upstream(_) => "upstream connection failed".into(),
            Self::Unprocessed(_) => "upstream refused the request (it is going away)".into(),
            other => other.to_string(),
        }
    }
}
