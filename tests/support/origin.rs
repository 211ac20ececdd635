//! Origins: one hyper service served as HTTP/1.1 or HTTP/2, with routes tests need.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

/// A running origin.
#[derive(Clone, Debug)]
pub struct Origin {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub hits: Arc<AtomicUsize>,
    pub conns: Arc<AtomicUsize>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn route(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut res = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(500))).await;
            Response::new(full("slow"))
        }
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
    let origin = Origin { addr, name, hits: Arc::default(), conns: Arc::default() };
    let o = origin.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            o.conns.fetch_add(1, Ordering::SeqCst);
            let hits = o.hits.clone();
            let svc = service_fn(move |req| {
                hits.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, Infallible>(route(name, req).await) }
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
