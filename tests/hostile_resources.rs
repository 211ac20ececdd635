//! Clients that cost Ebb resources without doing anything: one-byte clients that become opaque tunnels,
//! idle keep-alive connections, and a reconnect loop of refused connections that would fill the log.
//!
//! `EBB_TEST_NO_LIMITS=1` sets every limit to 0 (disabled), to see the in-process tests fail without
//! them; `EBB_TEST_BIN=/path/to/ebb` runs the process tests against another build (an older one).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::config::Direction;
use support::process::EbbProcess;
use support::{base_config, client, eventually, h2frame, listener, origin, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn no_limits() -> bool {
    std::env::var_os("EBB_TEST_NO_LIMITS").is_some()
}

/// `d`, or 0 (disabled) under `EBB_TEST_NO_LIMITS`.
fn limit(d: Duration) -> Duration {
    if no_limits() {
        Duration::ZERO
    } else {
        d
    }
}

fn ebb_bin() -> String {
    std::env::var("EBB_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ebb").to_string())
}

/// An upstream that accepts, reads until EOF and counts both.
struct Sink {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    eofs: Arc<AtomicUsize>,
}

async fn sink() -> Sink {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, eofs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, e) = (accepted.clone(), eofs.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            a.fetch_add(1, SeqCst);
            let e = e.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => {
                            e.fetch_add(1, SeqCst);
                            return;
                        }
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            });
        }
    });
    Sink { addr, accepted, eofs }
}

async fn metrics(running: &ebb::app::Running) -> String {
    client::fetch(running.telemetry.unwrap(), "GET", "/metrics").await.1
}

/// Whether the connection is closed (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_clients_beyond_the_limit_are_closed_and_idle_tunnels_end() {
    const CLIENTS: usize = 300;
    const LIMIT: usize = 20;
    const DETECT: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(600);
    let up = sink().await;
    let mut c = base_config();
    let mut l = listener("tcp", up.addr, Direction::Outbound);
    l.detect_timeout = DETECT;
    l.max_connections = if no_limits() { 0 } else { LIMIT };
    c.listeners.push(l);
    c.downstream.tcp_idle_timeout = limit(IDLE);
    let running = ebb::app::start(c).await.unwrap();
    let addr = running.addr("tcp").unwrap();

    // Each client sends one byte and waits.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\x01").await.unwrap();
        clients.push(s);
    }
    let want = format!(r#"ebb_connections_rejected_total{{listener="tcp",reason="limit"}} {}"#, CLIENTS - LIMIT);
    let counted = eventually(Duration::from_secs(3), async || metrics(&running).await.contains(&want)).await;
    assert!(counted, "{want} not in the metrics: {}", metrics(&running).await);
    let live = running.track.counts().connections;
    assert!(live <= LIMIT, "{live} connections served at once, limit {LIMIT}");
    // The connections over the limit were closed at once; those admitted are still detecting.
    let reads = clients.iter_mut().map(|s| closed_within(s, Duration::from_millis(150)));
    let closed = futures_util::future::join_all(reads).await;
    assert_eq!(closed.iter().filter(|c| **c).count(), CLIENTS - LIMIT, "closed at accept");

    // The admitted ones became opaque tunnels, each with an upstream connection...
    let tunnels = eventually(Duration::from_secs(3), async || up.accepted.load(SeqCst) == LIMIT).await;
    assert!(tunnels, "upstream connections: {}", up.accepted.load(SeqCst));
    let opened = Instant::now();
    // ...which nothing ends before the idle timeout...
    tokio::time::sleep(IDLE / 2).await;
    assert_eq!(up.eofs.load(SeqCst), 0, "closed before the idle timeout");
    // ...and the idle timeout ends with a FIN to the upstream and to the client.
    let ended = eventually(Duration::from_secs(3), async || up.eofs.load(SeqCst) == LIMIT).await;
    assert!(ended, "upstream EOFs after {:?}: {} of {LIMIT}", opened.elapsed(), up.eofs.load(SeqCst));
    assert!(opened.elapsed() >= IDLE - DETECT, "{:?}", opened.elapsed());
    let mut open = clients.iter_mut().zip(&closed).filter(|(_, c)| !**c).map(|(s, _)| s).collect::<Vec<_>>();
    for s in open.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(2)).await, "the client got its FIN");
    }
    drop(clients);
    let gone = eventually(Duration::from_secs(5), async || running.track.counts().connections == 0).await;
    assert!(gone, "still tracked: {:?}", running.track.counts());
    let m = metrics(&running).await;
    assert!(m.contains(&format!(r#"ebb_idle_timeouts_total{{protocol="opaque"}} {LIMIT}"#)), "{m}");
}

/// Waits (at most 3 s) for a client connection task to end without error; returns how long it took.
async fn ends_cleanly<E: std::fmt::Debug>(conn: tokio::task::JoinHandle<Result<(), E>>, what: &str) -> Duration {
    let t0 = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    let took = t0.elapsed();
    let ended = ended.unwrap_or_else(|_| panic!("{what} still open after {took:?}"));
    ended.unwrap().unwrap_or_else(|e| panic!("{what} did not end cleanly: {e:?}"));
    took
}

#[tokio::test]
async fn idle_http1_keepalive_connection_is_closed_after_its_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(300);
    let o = origin::http1("a").await;
    let running = proxy_to(o.addr, |c| c.downstream.http1_idle_timeout = limit(IDLE)).await;
    let (mut tx, conn) = client::h1(running.addr("web").unwrap()).await;
    // A request that takes longer than the idle timeout is not idle.
    let res = tx.send_request(client::get("/slow?ms=700")).await.unwrap();
    assert_eq!(res.status(), 200);
    client::text(res).await;
    // Then the connection idles, and Ebb closes it cleanly (the client's connection ends without error).
    let took = ends_cleanly(conn, "keep-alive connection").await;
    assert!(took >= IDLE - Duration::from_millis(50), "closed after {took:?}");
    let m = metrics(&running).await;
    assert!(m.contains(r#"ebb_idle_timeouts_total{protocol="http1"} 1"#), "{m}");

    // A client that trickles its first request's headers and stalls is not served forever either.
    let mut slow = TcpStream::connect(running.addr("web").unwrap()).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: 1").await.unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "stalled request headers still open after {:?}", t0.elapsed());
}

#[tokio::test]
async fn idle_http2_connection_gets_goaway_after_its_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(300);
    let o = origin::http2("h2").await;
    let running = proxy_to(o.addr, |c| c.downstream.http2_idle_timeout = limit(IDLE)).await;
    let web = running.addr("web").unwrap();
    let (mut tx, conn) = client::h2(web).await;
    // A stream open longer than the idle timeout keeps the connection busy.
    let res = tx.send_request(client::get_h2(web, "/slow?ms=700")).await.unwrap();
    assert_eq!(res.status(), 200);
    client::text(res).await;
    ends_cleanly(conn, "HTTP/2 connection (GOAWAY)").await;
    let m = metrics(&running).await;
    assert!(m.contains(r#"ebb_idle_timeouts_total{protocol="http2"} 1"#), "{m}");
}

/// The events of a rate-limited log site that `lines` account for: a line written stands for itself
/// and the `suppressed` it reports (held back before it), a summary of the site for its `suppressed`.
fn accounted(lines: &[serde_json::Value], message: &str, site: &str) -> u64 {
    let held = |l: &serde_json::Value| l["suppressed"].as_u64().unwrap_or_else(|| panic!("no `suppressed` in {l}"));
    lines
        .iter()
        .map(|l| match l["message"].as_str() {
            Some(m) if m == message => 1 + held(l),
            Some("Repeated log lines suppressed") if l["site"] == site => held(l),
            _ => 0,
        })
        .sum()
}

const PROCESS_CONFIG: &str = "inbound: { bind: 127.0.0.1:0 }\noutbound: { enabled: false }\n\
    admin: { bind: 127.0.0.1:0 }\ntelemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n";

/// A connection straight to the inbound capture port (not redirected) is refused as a loop, and
/// logged; a client reconnecting in a loop must not turn that into a line per attempt.
#[test]
fn a_thousand_refused_connections_write_a_handful_of_log_lines() {
    const N: usize = 1000;
    let mut ebb = EbbProcess::start_wrapped(&[], &ebb_bin(), PROCESS_CONFIG, |_| {});
    let inbound = ebb.addr("inbound");
    let health = ebb.addr("health");
    // Startup lines are not the flood's.
    ebb.log_lines();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = Instant::now();
    rt.block_on(async {
        // 50 at a time, each until Ebb has closed it: then every refusal has been logged (or not).
        let sem = Arc::new(tokio::sync::Semaphore::new(50));
        let mut tasks = Vec::new();
        for _ in 0..N {
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(inbound).await.unwrap();
                assert!(closed_within(&mut s, Duration::from_secs(5)).await, "refused connection closed");
                drop(permit);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Health keeps answering.
        assert_eq!(client::fetch(health, "GET", "/healthz/live").await.0, 200);
    });
    let flood = t0.elapsed();
    // Every refusal is written or counted in a later line; the last summary comes an interval after the
    // last line written.
    ebb.wait_lines("a log line or a count for every refusal", Duration::from_secs(5), |seen| {
        accounted(seen, "Connection refused", "connection refused") >= N as u64
    });
    let lines = ebb.log_lines();
    assert_eq!(accounted(&lines, "Connection refused", "connection refused"), N as u64, "{lines:?}");
    let refused = lines.iter().filter(|l| l["message"] == "Connection refused").count();
    let after = lines.len();
    eprintln!("{N} refused connections in {flood:?}: {after} log lines ({refused} `Connection refused`)");
    for l in lines.iter().take(6) {
        eprintln!("  {l}");
    }
    // One line a second at most, plus one summary.
    let allowed = flood.as_secs() as usize + 3;
    assert!(after <= allowed, "{after} log lines for {N} refused connections in {flood:?}");
    assert!(refused >= 1, "the refusal is still logged once");
}

/// Counts a process's open file descriptors and resident memory.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// 2,000 one-byte clients against a real process: prints its descriptors and memory before, while
/// the tunnels are open, and after the idle timeout. A measurement, not an assertion:
/// `cargo test --test hostile_resources -- --ignored --nocapture` (with `EBB_TEST_BIN` for another
/// build; `EBB_TEST_MAX_CONNECTIONS` for another limit, default 10000).
#[test]
#[ignore]
fn measure_two_thousand_one_byte_clients() {
    const CLIENTS: usize = 2000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(sink());
    let max = std::env::var("EBB_TEST_MAX_CONNECTIONS").unwrap_or_else(|_| "10000".into());
    // An older build rejects the new keys: `EBB_TEST_OLD_CONFIG=1` leaves them out.
    let keys = if std::env::var_os("EBB_TEST_OLD_CONFIG").is_some() {
        String::new()
    } else {
        format!(", max_connections: {max}")
    };
    let idle = if keys.is_empty() { String::new() } else { "downstream: { tcp_idle_timeout: 3s }\n".into() };
    let yaml = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n{idle}\
         listeners:\n  - {{ name: tcp, bind: 127.0.0.1:0, target: {}, direction: outbound, detect_timeout: 1s{keys} }}\n",
        up.addr
    );
    let ebb = EbbProcess::start_wrapped(&[], &ebb_bin(), &yaml, |_| {});
    let pid = ebb.child.id();
    let addr = ebb.addr("tcp");
    let before = fds_and_rss(pid);
    let clients = rt.block_on(one_byte_clients(addr, CLIENTS));
    std::thread::sleep(Duration::from_millis(2000));
    let open = fds_and_rss(pid);
    let upstream_open = up.accepted.load(SeqCst) - up.eofs.load(SeqCst);
    std::thread::sleep(Duration::from_millis(4000));
    let after = fds_and_rss(pid);
    let upstream_after = up.accepted.load(SeqCst) - up.eofs.load(SeqCst);
    eprintln!(
        "{CLIENTS} one-byte clients: fds {} -> {} (tunnels open, {upstream_open} upstream) -> {} (after 6 s, \
         {upstream_after} upstream); RSS {} -> {} -> {} KiB",
        before.0, open.0, after.0, before.1, open.1, after.1
    );
    drop(clients);
}

/// `n` clients that each send one byte (too little to tell a protocol) and then wait.
async fn one_byte_clients(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"\x01").await;
        v.push(s);
    }
    v
}

/// Ebb with 128 file descriptors against 300 one-byte clients and no connection limit: accepts and
/// upstream connects fail with EMFILE. Each failure is counted, the warnings come once a second (the
/// accept loop used to warn every 20 ms), upstream connects say `local-fd-exhausted`, and once the
/// clients are gone the process serves again: `/healthz/live` answers.
#[test]
fn descriptor_exhaustion_is_logged_once_a_second_and_health_answers_after() {
    const CLIENTS: usize = 300;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(sink());
    let yaml = format!(
        "inbound: {{ enabled: false }}\noutbound: {{ enabled: false }}\nadmin: {{ bind: 127.0.0.1:0 }}\n\
         telemetry: {{ bind: 127.0.0.1:0 }}\nhealth: {{ bind: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: tcp, bind: 127.0.0.1:0, target: {}, direction: outbound, detect_timeout: 300ms }}\n",
        up.addr
    );
    let mut ebb = EbbProcess::start_wrapped(&["prlimit", "--nofile=128:128"], &ebb_bin(), &yaml, |_| {});
    let (addr, health, telemetry) = (ebb.addr("tcp"), ebb.addr("health"), ebb.addr("telemetry"));
    ebb.log_lines();
    let t0 = Instant::now();
    let clients = rt.block_on(async {
        let v = one_byte_clients(addr, CLIENTS).await;
        // Two seconds of exhaustion: accepts failing, detections ending, upstream connects failing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        v
    });
    let exhausted = t0.elapsed();
    drop(clients);
    let served = rt.block_on(eventually(Duration::from_secs(5), async || {
        let s = TcpStream::connect(health).await;
        s.is_ok() && client::fetch(health, "GET", "/healthz/live").await.0 == 200
    }));
    assert!(served, "health answers once descriptors are free again");
    let m = rt.block_on(client::fetch(telemetry, "GET", "/metrics")).1;
    let failed_accepts = ["fd_exhausted", "other"]
        .map(|reason| support::sample(&m, &format!(r#"ebb_accept_errors_total{{listener="tcp",reason="{reason}"}}"#)))
        .iter()
        .sum::<u64>();
    // Every failed accept is written or counted in a later line (the last summary an interval after the
    // last line written). Upstream connects have no counter to wait for: their lines are bounded below
    // all the same.
    ebb.wait_lines("a log line or a count for every failed accept", Duration::from_secs(5), |seen| {
        accounted(seen, "Accept failed", "accept failed") >= failed_accepts
    });
    let lines = ebb.log_lines();
    assert_eq!(accounted(&lines, "Accept failed", "accept failed"), failed_accepts, "{lines:?}");
    let count = |msg: &str| lines.iter().filter(|l| l["message"] == msg).count();
    let accept = count("Accept failed");
    let connect = count("Upstream connect failed");
    eprintln!(
        "{exhausted:?} of exhaustion: {} log lines ({accept} `Accept failed`, {connect} `Upstream connect failed`)",
        lines.len()
    );
    for l in lines.iter().take(8) {
        eprintln!("  {l}");
    }
    let per_site = exhausted.as_secs() as usize + 2;
    assert!(accept >= 1 && accept <= per_site, "{accept} `Accept failed` lines in {exhausted:?}");
    assert!(connect >= 1 && connect <= per_site, "{connect} `Upstream connect failed` lines in {exhausted:?}");
    assert!(lines.len() <= 4 * per_site, "{} log lines in {exhausted:?}", lines.len());
    assert!(
        lines.iter().filter(|l| l["message"] == "Upstream connect failed").all(|l| l["reason"] == "local-fd-exhausted"),
        "{lines:?}"
    );
    assert!(m.contains(r#"ebb_accept_errors_total{listener="tcp",reason="fd_exhausted"}"#), "{m}");
}

/// An HTTP/2 client that vanished (it never answers a PING; a node gone, a NAT entry dropped) is
/// found by Ebb's PINGs and closed, instead of holding its connection until the idle timeout.
#[tokio::test]
async fn http2_client_that_never_answers_pings_is_closed() {
    let o = origin::http2("h2").await;
    let running = proxy_to(o.addr, |c| {
        c.downstream.http2_keepalive_interval = limit(Duration::from_millis(200));
        c.downstream.http2_keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut s = TcpStream::connect(running.addr("web").unwrap()).await.unwrap();
    // Preface and empty SETTINGS, then silence: nothing is acknowledged, PINGs included.
    s.write_all(&[h2frame::PREFACE, &h2frame::frame(h2frame::SETTINGS, 0, 0, &[])].concat()).await.unwrap();
    let t0 = Instant::now();
    let mut pings = 0;
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(f) = h2frame::read_frame(&mut s).await {
            if f.kind == h2frame::PING && !f.has(h2frame::ACK) {
                pings += 1;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "connection still open after {:?} ({pings} PINGs unanswered)", t0.elapsed());
    assert!(pings >= 1, "closed without a PING");
    let gone = eventually(Duration::from_secs(3), async || running.track.counts().connections == 0).await;
    assert!(gone, "still tracked: {:?}", running.track.counts());
}
