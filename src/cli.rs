//! The operator commands (`ebb status`, `ebb drain`, `ebb wait-ready`): small clients of the admin API.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Why a command could not talk to the local Ebb.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach Ebb's admin API at {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("admin API request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("admin API answered {0}: {1}")]
    Status(StatusCode, String),
    #[error("bad answer from the admin API: {0}")]
    Decode(#[from] serde_json::Error),
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, CliError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| CliError::Connect(addr, e))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| CliError::Status(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(tx.send_request(req).await?)
}

/// One admin API call; the body of a 2xx answer.
pub async fn call(addr: SocketAddr, method: Method, path: &str) -> Result<Bytes, CliError> {
    let res = send(addr, method, path).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(CliError::Status(status, String::from_utf8_lossy(&body).trim().to_string()));
    }
    Ok(body)
}

fn ms(v: &Value) -> String {
    let ms = v.as_u64().unwrap_or(0);
    if ms >= 1000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `ebb status`: what the local Ebb holds, as a table (or the raw JSON).
pub async fn status(addr: SocketAddr, raw: bool) -> Result<(), CliError> {
    let status: Value = serde_json::from_slice(&call(addr, Method::GET, "/status").await?)?;
    let conns: Value = serde_json::from_slice(&call(addr, Method::GET, "/connections").await?)?;
    if raw {
        println!("{}", serde_json::json!({ "status": status, "connections": conns }));
        return Ok(());
    }
    let c = &status["counts"];
    println!(
        "state {}  ready {}  uptime {}  version {}",
        s(&status["state"]),
        status["ready"],
        ms(&status["uptime_ms"]),
        s(&status["version"])
    );
    println!("listeners:");
    for l in status["listeners"].as_array().into_iter().flatten() {
        println!("  {:<12} {:<9} {:<22} -> {}", s(&l["name"]), s(&l["direction"]), s(&l["addr"]), s(&l["target"]));
    }
    println!(
        "connections: {} (inbound {}, outbound {}), in-flight requests {}",
        c["connections"], c["inbound"], c["outbound"], c["in_flight_requests"]
    );
    let rows = conns.as_array().cloned().unwrap_or_default();
    if !rows.is_empty() {
        println!(
            "  {:>6} {:<9} {:<7} {:<10} {:<22} {:<22} {:>8} {:>9} {:>12}",
            "ID", "DIR", "PROTO", "STATE", "CLIENT", "ORIG_DST", "AGE", "IN-FLIGHT", "BYTES IN/OUT"
        );
    }
    for r in &rows {
        println!(
            "  {:>6} {:<9} {:<7} {:<10} {:<22} {:<22} {:>8} {:>9} {:>12}",
            s(&r["id"]),
            s(&r["direction"]),
            s(&r["protocol"]),
            s(&r["state"]),
            s(&r["client_addr"]),
            s(&r["orig_dst"]),
            ms(&r["age_ms"]),
            r["in_flight"].as_array().map_or(0, Vec::len),
            format!("{}/{}", r["bytes_in"], r["bytes_out"]),
        );
        for q in r["in_flight"].as_array().into_iter().flatten() {
            println!("         in flight: {} {} for {}", s(&q["method"]), s(&q["uri"]), ms(&q["age_ms"]));
        }
    }
    let clusters = status["clusters"].as_array().cloned().unwrap_or_default();
    if !clusters.is_empty() {
        println!("clusters:");
    }
    for cl in &clusters {
        let addrs: Vec<String> = cl["addresses"].as_array().into_iter().flatten().map(s).collect();
        println!(
            "  {:<16} {:<11} in flight {:<5} connections {:<5} for {}",
            s(&cl["name"]),
            s(&cl["lb"]),
            cl["requests_in_flight"],
            cl["connections"],
            addrs.join(", ")
        );
        for e in cl["endpoints"].as_array().into_iter().flatten() {
            println!(
                "    {:<22} {:<10} weight {:<4} outstanding {:<5} ejections {}",
                s(&e["addr"]),
                s(&e["state"]),
                e["weight"],
                e["outstanding"],
                e["ejections"]
            );
        }
    }
    let d = &status["drain"];
    if !d.is_null() {
        println!(
            "drain: {} (trigger {}, scope {}), {} elapsed, deadline in {}",
            s(&d["phase"]),
            s(&d["trigger"]),
            s(&d["scope"]),
            ms(&d["elapsed_ms"]),
            ms(&d["time_to_deadline_ms"])
        );
        let holding = d["holding"].as_array().map_or(0, Vec::len);
        if holding > 0 {
            println!("  holding the drain: {holding} connection(s), listed above");
        }
    }
    Ok(())
}

/// Options of `ebb drain`.
#[derive(Clone, Debug, Default)]
pub struct DrainOptions {
    pub wait: bool,
    pub timeout: Option<Duration>,
    pub scope: Option<String>,
    pub now: bool,
    pub exit: bool,
    /// Before the drain: sleep, GET a URL, run a command (an app's own preStop, kept by `ebb inject`).
    pub first_sleep: Option<Duration>,
    pub first_get: Option<String>,
    pub first: Vec<String>,
}

/// Runs what must come before the drain, in the order Kubernetes would have run the app's own
/// preStop. A failure is said and the drain goes on: the app's hook failing must not cost the drain.
async fn run_first(o: &DrainOptions) {
    if let Some(d) = o.first_sleep {
        tokio::time::sleep(d).await;
    }
    if let Some(url) = &o.first_get {
        match get_url(url).await {
            Ok(status) => eprintln!("ebb drain: GET {url}: {status}"),
            Err(e) => eprintln!("ebb drain: GET {url} failed ({e}); draining anyway"),
        }
    }
    if let Some((prog, args)) = o.first.split_first() {
        let (prog, args) = (prog.clone(), args.to_vec());
        let status = tokio::task::spawn_blocking(move || std::process::Command::new(&prog).args(&args).status()).await;
        match status {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => eprintln!("ebb drain: {} exited with {s}; draining anyway", o.first.join(" ")),
            Ok(Err(e)) => eprintln!("ebb drain: cannot run {}: {e}; draining anyway", o.first[0]),
            Err(e) => eprintln!("ebb drain: {e}; draining anyway"),
        }
    }
}

/// GETs an `http://IP:PORT/path` URL (what a Kubernetes `httpGet` hook sends), returning the status.
pub async fn get_url(url: &str) -> Result<StatusCode, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs".into());
    }
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" { "127.0.0.1" } else { host };
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("`{host}` is not an IP address"))?;
    let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let res = send(addr, Method::GET, path).await.map_err(|e| e.to_string())?;
    Ok(res.status())
}

/// `ebb drain`: starts (or shortens) a drain; with `wait`, follows it to the end and prints the report.
pub async fn drain(addr: SocketAddr, o: &DrainOptions) -> Result<(), CliError> {
    run_first(o).await;
    let mut q = Vec::new();
    if let Some(t) = o.timeout {
        q.push(format!("timeout={}ms", t.as_millis()));
    }
    if let Some(s) = &o.scope {
        q.push(format!("scope={s}"));
    }
    if o.now {
        q.push("now=1".into());
    }
    if o.exit {
        q.push("exit=1".into());
    }
    let path = if q.is_empty() { "/drain".to_string() } else { format!("/drain?{}", q.join("&")) };
    let started: Value = serde_json::from_slice(&call(addr, Method::POST, &path).await?)?;
    if !o.wait {
        println!("drain {} (deadline in {})", s(&started["phase"]), ms(&started["time_to_deadline_ms"]));
        return Ok(());
    }
    let res = send(addr, Method::GET, "/drain?watch=1").await?;
    let mut body = res.into_body();
    let mut buf = BytesMut::new();
    let mut last = started;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(i + 1);
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                let n = &v["now"];
                let msg = format!(
                    "[{}] connections {}  http/2 connections {}  in-flight {}  deadline in {}",
                    s(&v["phase"]),
                    n["connections"],
                    n["http2_connections"],
                    n["in_flight_requests"],
                    ms(&v["time_to_deadline_ms"])
                );
                if tty {
                    eprint!("\r\x1b[2K{msg}");
                } else {
                    eprintln!("{msg}");
                }
                let _ = std::io::stderr().flush();
                last = v;
            }
        }
    }
    if tty {
        eprintln!();
    }
    println!(
        "drained in {}: {} connections closed gracefully, {} forced, {} requests completed, {} GOAWAY, {} Connection: close",
        ms(&last["elapsed_ms"]),
        last["closed_gracefully"],
        last["forced_closes"],
        last["requests_completed"],
        last["goaway_sent"],
        last["connection_close_sent"]
    );
    for f in last["forced"].as_array().into_iter().flatten() {
        println!(
            "  forced: conn {} {} {} from {} (age {}, {})",
            s(&f["conn_id"]),
            s(&f["direction"]),
            s(&f["protocol"]),
            s(&f["client_addr"]),
            ms(&f["age_ms"]),
            s(&f["doing"])
        );
    }
    println!("{}", serde_json::to_string(&last).unwrap_or_default());
    Ok(())
}

/// `ebb wait-ready`: polls readiness until ready or `timeout`; `Ok(false)` when time ran out.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(res) = send(addr, Method::GET, "/ready").await {
            if res.status() == StatusCode::OK {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
