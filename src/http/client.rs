//! Upstream HTTP connections: one pool per endpoint, and a per-downstream-connection session that keeps
//! using the same upstream connection so the per-request path takes no shared lock.
//!
//! HTTP/1.1: a downstream connection's requests arrive one at a time, so its session holds one upstream
//! connection and hands it back to the endpoint's idle pool when the downstream connection ends.
//! HTTP/2: one multiplexed upstream connection per endpoint, shared by every session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::UpstreamConfig;
use crate::http::error::ProxyError;
use crate::telemetry::metrics::Metrics;
use crate::transport::connect::connect;

type H1 = http1::SendRequest<Incoming>;
type H2 = http2::SendRequest<Incoming>;

/// Every upstream endpoint Ebb has talked to.
#[derive(Debug)]
pub struct Upstreams {
    cfg: UpstreamConfig,
    metrics: Arc<Metrics>,
    endpoints: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl Upstreams {
    pub fn new(cfg: UpstreamConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { cfg, metrics, endpoints: Mutex::new(HashMap::new()) })
    }

    /// The endpoint for `addr`; looked up once per downstream connection, not per request.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        let mut map = match self.endpoints.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(addr)
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    addr,
                    cfg: self.cfg.clone(),
                    metrics: self.metrics.clone(),
                    idle: Mutex::new(Vec::new()),
                    h2: Mutex::new(None),
                    h2_connecting: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Closes idle connections past their idle timeout, and forgets endpoints nothing uses any more
    /// (outbound passthrough meets many destinations); run periodically.
    pub fn reap_idle(&self) {
        let Ok(mut map) = self.endpoints.lock() else { return };
        map.retain(|_, ep| {
            ep.reap();
            // Only the map holds it and it keeps no connection: nothing is lost by forgetting it.
            Arc::strong_count(ep) > 1 || !ep.is_empty()
        });
    }
}

#[derive(Debug)]
struct Idle {
    tx: H1,
    since: Instant,
}

/// One upstream address and its connections.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    cfg: UpstreamConfig,
    metrics: Arc<Metrics>,
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<H2>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl Endpoint {
    fn checkout(&self) -> Option<H1> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < self.cfg.idle_timeout && i.tx.is_ready() {
                return Some(i.tx);
            }
        }
        None
    }

    fn checkin(&self, tx: H1) {
        if !tx.is_ready() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.cfg.max_idle_per_endpoint {
                idle.push(Idle { tx, since: Instant::now() });
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.idle.lock().map(|i| i.is_empty()).unwrap_or(true) && self.cached_h2().is_none()
    }

    fn reap(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let timeout = self.cfg.idle_timeout;
            idle.retain(|i| i.since.elapsed() < timeout && i.tx.is_ready());
        }
    }

    async fn connect_h1(&self) -> Result<H1, ProxyError> {
        let stream = connect(self.addr, self.cfg.connect_timeout).await.inspect_err(|_| {
            self.metrics.upstream_connect_errors.inc();
        })?;
        let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(ProxyError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "Upstream connection ended");
                }
            }
            .instrument(tracing::debug_span!("upstream", server.addr = %addr, protocol = "http1")),
        );
        Ok(tx)
    }

    async fn h2_sender(&self) -> Result<H2, ProxyError> {
        match self.cached_h2() {
            Some(tx) => Ok(tx),
            // Boxed: the connect and handshake futures are large, and every request's future would
            // carry (and move) their space even though few requests ever connect.
            None => Box::pin(self.connect_h2()).await,
        }
    }

    async fn connect_h2(&self) -> Result<H2, ProxyError> {
        // One connect at a time, so a burst of streams shares one new connection.
        let _connecting = self.h2_connecting.lock().await;
        if let Some(tx) = self.cached_h2() {
            return Ok(tx);
        }
        let stream = connect(self.addr, self.cfg.connect_timeout).await.inspect_err(|_| {
            self.metrics.upstream_connect_errors.inc();
        })?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ProxyError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "Upstream connection ended");
                }
            }
            .instrument(tracing::debug_span!("upstream", server.addr = %addr, protocol = "http2")),
        );
        if let Ok(mut slot) = self.h2.lock() {
            *slot = Some(tx.clone());
        }
        Ok(tx)
    }

    /// Drops the shared connection so the next request opens a new one.
    fn forget_h2(&self) {
        if let Ok(mut slot) = self.h2.lock() {
            *slot = None;
        }
    }

    fn cached_h2(&self) -> Option<H2> {
        let slot = self.h2.lock().ok()?;
        slot.as_ref().filter(|tx| !tx.is_closed()).cloned()
    }
}

/// A downstream connection's view of its upstream.
#[derive(Debug)]
pub struct Session {
    endpoint: Arc<Endpoint>,
    h1: Mutex<Option<H1>>,
}

impl Session {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        Self { endpoint, h1: Mutex::new(None) }
    }

    /// Sends an HTTP/1.1 request. A request handed back unsent (the pooled connection closed under
    /// it: the keep-alive race) is sent once more on a new connection; it never reached the upstream.
    pub async fn send_h1(&self, req: Request<Incoming>, upgrade: bool) -> Result<Response<Incoming>, ProxyError> {
        let mut tx = match self.take_h1().await {
            Some(tx) => tx,
            // Boxed for the same reason as `connect_h2`: the fast path stays small.
            None => Box::pin(self.endpoint.connect_h1()).await?,
        };
        let res = match tx.try_send_request(req).await {
            Ok(res) => res,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    tracing::debug!(error = %e.error(), "Pooled connection closed before the request; resending");
                    tx = Box::pin(self.endpoint.connect_h1()).await?;
                    tx.send_request(req).await.map_err(ProxyError::Upstream)?
                }
                None => return Err(ProxyError::Upstream(e.into_error())),
            },
        };
        if !upgrade {
            if let Ok(mut slot) = self.h1.lock() {
                *slot = Some(tx);
            }
        }
        Ok(res)
    }

    async fn take_h1(&self) -> Option<H1> {
        let cached = self.h1.lock().ok().and_then(|mut s| s.take());
        if let Some(mut tx) = cached {
            // Ready once the previous response has been read whole; an error means it closed.
            if tx.ready().await.is_ok() {
                return Some(tx);
            }
        }
        self.endpoint.checkout()
    }

    /// Sends an HTTP/2 request on the endpoint's shared connection. When that connection is going away
    /// (GOAWAY received, closed) and hands the request back unsent, it goes out once more on a new one.
    pub async fn send_h2(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ProxyError> {
        let mut tx = self.endpoint.h2_sender().await?;
        if tx.ready().await.is_err() {
            self.endpoint.forget_h2();
            tx = self.endpoint.h2_sender().await?;
            tx.ready().await.map_err(ProxyError::Upstream)?;
        }
        match tx.try_send_request(req).await {
            Ok(res) => Ok(res),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    tracing::debug!(error = %e.error(), "Upstream HTTP/2 connection going away; resending");
                    self.endpoint.forget_h2();
                    let mut tx = self.endpoint.h2_sender().await?;
                    tx.ready().await.map_err(ProxyError::Upstream)?;
                    tx.send_request(req).await.map_err(ProxyError::Upstream)
                }
                None => Err(ProxyError::Upstream(e.into_error())),
            },
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(tx) = self.h1.get_mut().ok().and_then(|s| s.take()) {
            self.endpoint.checkin(tx);
        }
    }
}
