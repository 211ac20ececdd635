//! Opens N client connections to a proxy, sends one request on each, then keeps them all open and
//! idle until stdin closes: the load for measuring memory per idle connection and how fast a drain
//! closes them (benches/idle.sh).
//!
//! `idle_conns --addr 127.0.0.1:8000 --proto h1|h2 --conns 10000`

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: std::net::SocketAddr = arg("--addr").and_then(|a| a.parse().ok()).expect("--addr ip:port");
    let h2 = arg("--proto").as_deref() == Some("h2");
    let n: u64 = arg("--conns").and_then(|v| v.parse().ok()).unwrap_or(1000);
    let open = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let mut keep = Vec::new();
    for i in 0..n {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("connection {i}: {e}");
                break;
            }
        };
        let io = TokioIo::new(stream);
        let req = || {
            http::Request::get(format!("http://{addr}/"))
                .header("host", "idle.test")
                .body(Full::new(Bytes::new()))
                .unwrap_or_default()
        };
        let closed = closed.clone();
        if h2 {
            let Ok((mut tx, conn)) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.await;
                closed.fetch_add(1, Relaxed);
            });
            if let Ok(res) = tx.send_request(req()).await {
                let _ = res.into_body().collect().await;
            }
            keep.push(Box::new(tx) as Box<dyn std::any::Any>);
        } else {
            let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(io).await else { continue };
            tokio::spawn(async move {
                let _ = conn.await;
                closed.fetch_add(1, Relaxed);
            });
            let mut r = req();
            *r.uri_mut() = http::Uri::from_static("/");
            if let Ok(res) = tx.send_request(r).await {
                let _ = res.into_body().collect().await;
            }
            keep.push(Box::new(tx) as Box<dyn std::any::Any>);
        }
        open.fetch_add(1, Relaxed);
    }
    println!("open {}", open.load(Relaxed));
    // Report closes as they happen, until stdin closes.
    let c = closed.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = c.load(Relaxed);
            if now != last {
                println!("closed {now}");
                last = now;
            }
        }
    });
    let mut buf = [0u8; 1];
    let _ = tokio::io::stdin().read(&mut buf).await;
    drop(keep);
}
