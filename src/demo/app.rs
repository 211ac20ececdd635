//! The demo's built-in app: an HTTP/1.1 and an HTTP/2 server (the HTTP/2 one also serves gRPC unary
//! and server-streaming calls) with a configurable latency and response size.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// gRPC paths the app serves.
pub const UNARY: &str = "/demo.Echo/Unary";
pub const STREAM: &str = "/demo.Echo/Stream";
/// Messages in a server-streaming reply.
pub const STREAM_MESSAGES: usize = 5;

/// How the app answers.
#[derive(Clone, Copy, Debug)]
pub struct AppOptions {
    pub latency: Duration,
    pub size: usize,
}

/// A running app: its two listeners.
#[derive(Debug, Clone, Copy)]
pub struct App {
    pub h1: SocketAddr,
    pub h2: SocketAddr,
}

/// One gRPC length-prefixed message.
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

fn trailers_ok() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("0"));
    t
}

async fn handle(opts: AppOptions, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    // Read the request whole first (a gRPC message, or nothing).
    let _ = req.into_body().collect().await;
    tokio::time::sleep(opts.latency).await;
    match path.as_str() {
        UNARY => {
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(Frame::data(grpc_frame(&vec![b'u'; opts.size.min(64 * 1024)]))),
                Ok(Frame::trailers(trailers_ok())),
            ]);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            r
        }
        STREAM => {
            let size = opts.size.min(64 * 1024);
            let step = opts.latency / 4;
            let frames = futures_util::stream::unfold(0usize, move |i| async move {
                if i > STREAM_MESSAGES {
                    return None;
                }
                if i == STREAM_MESSAGES {
                    return Some((Ok::<_, Infallible>(Frame::trailers(trailers_ok())), i + 1));
                }
                tokio::time::sleep(step).await;
                Some((Ok(Frame::data(grpc_frame(&vec![b's'; size]))), i + 1))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
            r
        }
        "/work" => Response::new(Full::new(Bytes::from(vec![b'x'; opts.size])).boxed()),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")).boxed());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// Starts the app on two loopback ports.
pub async fn start(opts: AppOptions) -> std::io::Result<App> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    start_on(opts, any, any).await
}

/// Starts the app with HTTP/1.1 on `h1` and HTTP/2 (and gRPC) on `h2` (`ebb demo-app`, the app of
/// the container tests).
pub async fn start_on(opts: AppOptions, h1: SocketAddr, h2: SocketAddr) -> std::io::Result<App> {
    let h1 = TcpListener::bind(h1).await?;
    let h2 = TcpListener::bind(h2).await?;
    let app = App { h1: h1.local_addr()?, h2: h2.local_addr()? };
    for (listener, http2) in [(h1, false), (h2, true)] {
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let svc = service_fn(move |req| async move { Ok::<_, Infallible>(handle(opts, req).await) });
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    if http2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
    }
    Ok(app)
}
