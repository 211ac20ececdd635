//! Clients that keep control of their connection: keep-alive, HTTP/2 multiplexing, admin calls.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// An HTTP/1.1 connection; the task driving it reports whether it ended cleanly.
pub async fn h1(
    addr: SocketAddr,
) -> (http1::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    let task = tokio::spawn(conn.with_upgrades());
    (tx, task)
}

/// An HTTP/2 connection (prior knowledge).
pub async fn h2(
    addr: SocketAddr,
) -> (http2::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    (tx, task)
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).header("host", "app.test").body(Full::new(Bytes::new())).unwrap()
}

pub fn get_h2(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()
}

/// A GET for an absolute `uri` as given (its authority need not be the address dialled).
pub fn get_h2_uri(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

/// Reads a whole response body as text.
pub async fn text(res: Response<Incoming>) -> String {
    String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// One request on a fresh connection: status and body.
pub async fn fetch(addr: SocketAddr, method: &str, path: &str) -> (StatusCode, String) {
    let (mut tx, _task) = h1(addr).await;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    (status, text(res).await)
}

/// GET on an admin endpoint, parsed as JSON.
pub async fn json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = fetch(addr, "GET", path).await;
    assert!(status.is_success(), "{path}: {status} {body}");
    serde_json::from_str(&body).unwrap()
}

/// Opens a raw connection to `addr` and asks for a WebSocket upgrade of `/ws`: the stream and the
/// response head, lowercased.
pub async fn ws_upgrade(addr: SocketAddr) -> (TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut b)).await.unwrap().unwrap();
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap().to_lowercase())
}
