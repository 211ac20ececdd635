//! Hostile HTTP/2 peers and an origin that shows what they cost: an origin that counts the body bytes
//! its responses have handed to hyper (so a test can see when flow control has stopped the upstream),
//! holds requests until released, and can advertise a low SETTINGS_MAX_CONCURRENT_STREAMS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

type Body = BoxBody<Bytes, hyper::Error>;

/// A running HTTP/2 origin for hostile-client tests.
#[derive(Clone, Debug)]
pub struct CountingOrigin {
    pub addr: SocketAddr,
    /// Requests received, any route.
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted (Ebb's upstream connections).
    pub conns: Arc<AtomicUsize>,
    /// Connections that have ended.
    pub closed: Arc<AtomicUsize>,
    /// Body bytes of `/big` responses taken by hyper so far (sent or buffered for sending).
    pub produced: Arc<AtomicU64>,
    /// Requests that reached `/hold`.
    pub held: Arc<watch::Sender<usize>>,
    release: Arc<Semaphore>,
}

impl CountingOrigin {
    /// Waits until `n` requests have reached `/hold`; false after `timeout`.
    pub async fn holding(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.held.subscribe();
        let reached = matches!(tokio::time::timeout(timeout, rx.wait_for(|h| *h >= n)).await, Ok(Ok(_)));
        reached
    }

    /// Lets `n` `/hold` requests answer.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    /// Waits until `produced` has not moved for `quiet` (the upstream is stopped by flow control);
    /// returns the count then, or `None` if it kept moving for `timeout`.
    pub async fn produced_settles(&self, quiet: Duration, timeout: Duration) -> Option<u64> {
        let until = tokio::time::Instant::now() + timeout;
        let mut last = self.produced.load(Ordering::SeqCst);
        let mut since = tokio::time::Instant::now();
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = self.produced.load(Ordering::SeqCst);
            if now != last {
                last = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= quiet {
                return Some(now);
            }
        }
        None
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn route(o: CountingOrigin, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/big" => {
            let total = query(&req, "bytes").unwrap_or(1 << 20);
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let produced = o.produced.clone();
            let frames = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                let produced = produced.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(chunk.len() as u64);
                        produced.fetch_add(n, Ordering::SeqCst);
                        (Ok::<_, hyper::Error>(Frame::data(chunk.slice(..n as usize))), left - n)
                    })
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
        "/hold" => {
            o.held.send_modify(|n| *n += 1);
            // Bounded so a test that forgets to release fails instead of hanging.
            if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(60), o.release.acquire()).await {
                p.forget();
            }
            Response::new(Full::new(Bytes::from_static(b"held")).map_err(|n| match n {}).boxed())
        }
        _ => Response::new(Full::new(Bytes::from_static(b"ok")).map_err(|n| match n {}).boxed()),
    }
}

/// An HTTP/2 origin; `max_streams` is the SETTINGS_MAX_CONCURRENT_STREAMS it advertises (hyper's
/// default when `None`).
pub async fn counting_origin(max_streams: Option<u32>) -> CountingOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = CountingOrigin {
        addr: listener.local_addr().unwrap(),
        hits: Arc::default(),
        conns: Arc::default(),
        closed: Arc::default(),
        produced: Arc::default(),
        held: Arc::new(watch::Sender::new(0)),
        release: Arc::new(Semaphore::new(0)),
    };
    let o = origin.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // As Ebb's own sockets: without it a new connection's first response waits out a delayed ACK.
            let _ = stream.set_nodelay(true);
            o.conns.fetch_add(1, Ordering::SeqCst);
            let closed = o.closed.clone();
            let o = o.clone();
            let svc = service_fn(move |req| {
                o.hits.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                async move { Ok::<_, Infallible>(route(o, req).await) }
            });
            tokio::spawn(async move {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new());
                if let Some(max) = max_streams {
                    b.max_concurrent_streams(max);
                }
                let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    origin
}
