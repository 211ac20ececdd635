//! The one place where a proxying failure becomes a response: HTTP status or gRPC status, and an
//! `x-ebb-error` header naming the cause.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::http::body::ProxyBody;
use crate::http::headers::X_EBB_ERROR;
use crate::transport::connect::ConnectError;

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
}

impl ProxyError {
    /// HTTP status, gRPC status and the stable cause name.
    fn classify(&self) -> (StatusCode, u32, &'static str) {
        match self {
            Self::Connect(ConnectError::Refused(_)) => (StatusCode::BAD_GATEWAY, 14, "upstream-connect-refused"),
            Self::Connect(ConnectError::TimedOut(..)) => (StatusCode::GATEWAY_TIMEOUT, 14, "upstream-connect-timeout"),
            Self::Connect(ConnectError::Other(..)) => (StatusCode::BAD_GATEWAY, 14, "upstream-connect-failed"),
            Self::Handshake(_) => (StatusCode::BAD_GATEWAY, 14, "upstream-handshake-failed"),
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, 14, "upstream-reset"),
            Self::ResponseTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, 4, "upstream-response-timeout"),
            Self::DrainDeadline => (StatusCode::SERVICE_UNAVAILABLE, 14, "drain-deadline"),
        }
    }

    /// The response the client gets. gRPC clients get a trailers-only response with `grpc-status`, so
    /// their libraries see a status (UNAVAILABLE is retryable), not a protocol error.
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        let (status, grpc_status, cause) = self.classify();
        let message = self.to_string();
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
}
