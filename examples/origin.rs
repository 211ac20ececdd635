//! A fast benchmark origin: answers every request with `200 ok\n` (with a content-length), over
//! HTTP/1.1 on one address and HTTP/2 with prior knowledge (h2c) on another.
//!
//! ```text
//! cargo run --release --example origin -- [--h1 ADDR] [--h2 ADDR]
//!     [--delay-min-ms N --delay-max-ms M] [--threads N]
//! ```
//!
//! Both addresses default to `127.0.0.1:0`; once bound it prints one line, `origin h1=ADDR h2=ADDR`.
//! With a delay range every response waits a uniformly random time in `[min, max]` ms first (a slow
//! app, for drain benchmarks). `--threads 1` (the default) runs on a current-thread runtime.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::runtime::Builder;

const USAGE: &str = "usage: origin [--h1 ADDR] [--h2 ADDR] [--threads N] \
                     [--delay-min-ms N --delay-max-ms M] [--body-bytes N]";

#[derive(Default)]
struct Args {
    h1: Option<SocketAddr>,
    h2: Option<SocketAddr>,
    delay_ms: (u64, u64),
    threads: usize,
    /// Response body size; 0 answers `ok\n`.
    body_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--h1" => args.h1 = Some(value.parse().map_err(|e| bad(&e))?),
            "--h2" => args.h2 = Some(value.parse().map_err(|e| bad(&e))?),
            "--delay-min-ms" => args.delay_ms.0 = value.parse().map_err(|e| bad(&e))?,
            "--delay-max-ms" => args.delay_ms.1 = value.parse().map_err(|e| bad(&e))?,
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--body-bytes" => args.body_bytes = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.delay_ms.1 < args.delay_ms.0 {
        args.delay_ms.1 = args.delay_ms.0;
    }
    Ok(args)
}

type Reply = Result<Response<Full<Bytes>>, Infallible>;

async fn respond(_req: Request<Incoming>, delay_ms: (u64, u64), body: Bytes) -> Reply {
    if delay_ms.1 > 0 {
        let ms = fastrand::u64(delay_ms.0..=delay_ms.1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    Ok(Response::new(Full::new(body)))
}

/// Accepts forever, serving each connection as HTTP/2 (`h2`) or HTTP/1.1 keep-alive.
async fn serve(listener: TcpListener, h2: bool, delay_ms: (u64, u64), body: Bytes) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                eprintln!("origin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let body = body.clone();
        let svc = service_fn(move |req| respond(req, delay_ms, body.clone()));
        tokio::spawn(async move {
            // Errors are clients going away mid-connection; an origin has nothing to add.
            let _ = if h2 {
                let mut b = http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new()).max_concurrent_streams(1000);
                b.serve_connection(io, svc).await
            } else {
                let mut b = http1::Builder::new();
                b.timer(TokioTimer::new());
                b.serve_connection(io, svc).await
            };
        });
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("origin: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let mut builder = if args.threads <= 1 {
        Builder::new_current_thread()
    } else {
        let mut b = Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = builder.enable_all().build();
    let rt = rt.unwrap_or_else(|e| {
        eprintln!("origin: cannot start a runtime: {e}");
        std::process::exit(1);
    });
    rt.block_on(async move {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let bind = |addr: Option<SocketAddr>| async move {
            let addr = addr.unwrap_or(any);
            TcpListener::bind(addr).await.unwrap_or_else(|e| {
                eprintln!("origin: cannot bind {addr}: {e}");
                std::process::exit(1);
            })
        };
        let (h1, h2) = (bind(args.h1).await, bind(args.h2).await);
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("origin h1={} h2={}", addr(&h1), addr(&h2));
        let _ = std::io::stdout().flush();
        let body =
            if args.body_bytes == 0 { Bytes::from_static(b"ok\n") } else { Bytes::from(vec![b'x'; args.body_bytes]) };
        tokio::spawn(serve(h1, false, args.delay_ms, body.clone()));
        serve(h2, true, args.delay_ms, body).await;
    });
}
