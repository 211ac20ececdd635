//! A real gRPC echo service (tonic's server and client machinery, prost messages), served over hyper's
//! HTTP/2 server: unary and server-streaming.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// Server streaming: how many replies.
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// Delay before each reply.
    #[prost(uint64, tag = "3")]
    pub delay_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

pub const UNARY: &str = "/ebb.test.Echo/Unary";
pub const STREAM: &str = "/ebb.test.Echo/Stream";

struct Unary;

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<EchoReply>, Status>> + Send>>;
    fn call(&mut self, req: Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let r = req.into_inner();
            tokio::time::sleep(Duration::from_millis(r.delay_ms)).await;
            if r.message == "fail" {
                return Err(Status::invalid_argument("asked to fail"));
            }
            let mut res = Response::new(EchoReply { message: r.message, seq: 0 });
            res.metadata_mut().insert("x-echo", "1".parse().unwrap());
            Ok(res)
        })
    }
}

struct Streamer;

type ReplyStream = Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, Status>> + Send>>;

impl tonic::server::ServerStreamingService<EchoRequest> for Streamer {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<ReplyStream>, Status>> + Send>>;
    fn call(&mut self, req: Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let r = req.into_inner();
            let s = futures_util::stream::unfold(0u32, move |seq| {
                let msg = r.message.clone();
                async move {
                    if seq >= r.count {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(r.delay_ms)).await;
                    Some((Ok(EchoReply { message: msg, seq }), seq + 1))
                }
            });
            Ok(Response::new(Box::pin(s) as ReplyStream))
        })
    }
}

/// Starts the echo service on an ephemeral port.
pub async fn server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let res = match req.uri().path() {
                    UNARY => {
                        tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default())
                            .unary(Unary, req)
                            .await
                    }
                    STREAM => {
                        tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default())
                            .server_streaming(Streamer, req)
                            .await
                    }
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok::<_, Infallible>(res)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A tonic client over a real channel to `addr`.
pub async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

pub async fn unary(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    req: EchoRequest,
) -> Result<Response<EchoReply>, Status> {
    c.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    c.unary(Request::new(req), PathAndQuery::from_static(UNARY), ProstCodec::<EchoRequest, EchoReply>::default()).await
}

pub async fn stream(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    req: EchoRequest,
) -> Result<tonic::Streaming<EchoReply>, Status> {
    c.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(c.server_streaming(
        Request::new(req),
        PathAndQuery::from_static(STREAM),
        ProstCodec::<EchoRequest, EchoReply>::default(),
    )
    .await?
    .into_inner())
}
