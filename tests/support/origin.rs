//! Origins: one hyper service served as HTTP/1.1 or HTTP/2, with routes tests need.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

type Body = BoxBody<Bytes, hyper::Error>;

/// A running origin.
#[derive(Clone, Debug)]
pub struct Origin {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub hits: Arc<AtomicUsize>,
    pub conns: Arc<AtomicUsize>,
    /// How many requests have reached `/slow` or `/hold`: a test that must act while a request is in
    /// flight waits for this instead of guessing how long the request takes to get here.
    pub arrived: Arc<watch::Sender<usize>>,
    /// Permits for `/hold` requests to answer (`release`).
    held: Arc<Semaphore>,
}

/// How long `/hold` waits for `release` before giving up, so a test that forgot it fails instead of
/// hanging.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

impl Origin {
    /// Waits until `n` requests in all have reached `/slow` or `/hold`; panics after `timeout`.
    pub async fn arrivals(&self, n: usize, timeout: Duration) {
        let mut rx = self.arrived.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|seen| *seen >= n)).await;
        assert!(
            reached.is_ok_and(|r| r.is_ok()),
            "{}: {} of {n} requests arrived within {timeout:?}",
            self.name,
            *self.arrived.borrow()
        );
    }

    /// Lets `n` `/hold` requests (already waiting or still to come) answer.
    pub fn release(&self, n: usize) {
        self.held.add_permits(n);
    }
}

/// What routes share with the origin's owner.
#[derive(Clone)]
struct Shared {
    arrived: Arc<watch::Sender<usize>>,
    held: Arc<Semaphore>,
}

impl Shared {
    fn arrive(&self) {
        self.arrived.send_modify(|n| *n += 1);
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// A gRPC unary reply to the test echo service's `Unary` method, answered here (not by tonic) so the
/// origin's request count covers gRPC too.
async fn grpc_unary(req: Request<Incoming>) -> Response<Body> {
    use prost::Message;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return grpc_status(13, &format!("request body: {e}")),
    };
    // One length-prefixed message, uncompressed.
    let Some(msg) = body
        .get(5..)
        .filter(|m| body[0] == 0 && m.len() == u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize)
    else {
        return grpc_status(13, "bad gRPC framing");
    };
    let Ok(echo) = super::grpc::EchoRequest::decode(msg) else {
        return grpc_status(13, "bad EchoRequest");
    };
    let reply = super::grpc::EchoReply { message: echo.message, seq: 0 }.encode_to_vec();
    let mut framed = BytesMut::with_capacity(5 + reply.len());
    framed.put_u8(0);
    framed.put_u32(reply.len() as u32);
    framed.put_slice(&reply);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames = futures_util::stream::iter([
        Ok::<_, hyper::Error>(Frame::data(framed.freeze())),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
    r
}

/// A trailers-only gRPC error.
fn grpc_status(code: u32, message: &str) -> Response<Body> {
    let mut r = Response::new(full(""));
    r.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
    r.headers_mut().insert("grpc-status", code.into());
    r.headers_mut().insert("grpc-message", message.parse().unwrap_or_else(|_| "error".parse().unwrap()));
    r
}

async fn route(name: &'static str, shared: Shared, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut res = match path.as_str() {
        "/slow" => {
            shared.arrive();
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(500))).await;
            Response::new(full("slow"))
        }
        "/hold" => {
            shared.arrive();
            // Permits stay until taken, so a release that comes before this waits is not lost.
            match tokio::time::timeout(HOLD_LIMIT, shared.held.acquire()).await {
                Ok(Ok(p)) => {
                    p.forget();
                    Response::new(full("held"))
                }
                _ => {
                    let mut r = Response::new(full("hold never released"));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            }
        }
        super::grpc::UNARY => grpc_unary(req).await,
        "/echo" => Response::new(req.into_body().boxed()),
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            Response::new(full(n.to_string()))
        }
        "/big" => {
            let total = query(&req, "bytes").unwrap_or(1 << 20);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let frames = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(chunk.len() as u64);
                        (Ok::<_, hyper::Error>(Frame::data(chunk.slice(..n as usize))), left - n)
                    })
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
        "/headers" => {
            let mut s = String::new();
            for (k, v) in req.headers() {
                s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            s.push_str(&format!("uri: {}\n", req.uri()));
            Response::new(full(s))
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = upgrade.await {
                    let mut io = TokioIo::new(up);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            r
        }
        p if p.starts_with("/status/") => {
            let code = p[8..].parse().unwrap_or(500);
            let mut r = Response::new(full("status"));
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        _ => Response::new(full("ok")),
    };
    res.headers_mut().insert("x-origin", name.parse().unwrap());
    res
}

async fn serve(name: &'static str, h2: bool) -> Origin {
    serve_on(name, h2, "127.0.0.1:0".parse().unwrap()).await
}

/// An origin bound to `addr` (HTTP/2 when `h2`).
pub async fn serve_on(name: &'static str, h2: bool, addr: SocketAddr) -> Origin {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = Origin {
        addr,
        name,
        hits: Arc::default(),
        conns: Arc::default(),
        arrived: Arc::new(watch::Sender::new(0)),
        held: Arc::new(Semaphore::new(0)),
    };
    let o = origin.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            o.conns.fetch_add(1, Ordering::SeqCst);
            let hits = o.hits.clone();
            let shared = Shared { arrived: o.arrived.clone(), held: o.held.clone() };
            let svc = service_fn(move |req| {
                hits.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(name, shared, req).await) }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    origin
}

/// An HTTP/1.1 origin.
pub async fn http1(name: &'static str) -> Origin {
    serve(name, false).await
}

/// An HTTP/2 (h2c prior knowledge) origin.
pub async fn http2(name: &'static str) -> Origin {
    serve(name, true).await
}

/// A TCP echo server that, on the client's FIN, writes `bye` and closes (proves half-close works).
pub async fn tcp_echo() -> SocketAddr {
    tcp_echo_on("127.0.0.1:0".parse().unwrap()).await
}

/// The echo server bound to `addr`.
pub async fn tcp_echo_on(addr: SocketAddr) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A server-first TCP service (like SMTP or MySQL): greets as soon as a client connects.
pub async fn tcp_greeter(greeting: &'static [u8]) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    addr
}
