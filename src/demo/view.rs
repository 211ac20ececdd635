//! The demo's live view: per protocol sent / ok / failed, retries the client's Ebb made, and per pod
//! its connections, requests in flight, drain phase and deadline. Redrawn in place on a terminal;
//! plain lines once a second otherwise.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::demo::load::Load;

/// What the view shows of one pod.
#[derive(Debug, Clone, Default)]
pub struct PodView {
    pub name: String,
    /// Its Ebb's admin address; `None` while it is restarting.
    pub admin: Option<SocketAddr>,
    /// What the demo is doing to it: serving, draining (trigger), restarting, killed.
    pub doing: String,
    pub connections: u64,
    pub in_flight: u64,
    pub phase: String,
    pub deadline_in_ms: Option<u64>,
}

/// Shared between the demo and the view task.
#[derive(Debug, Default)]
pub struct Board {
    pub pods: Vec<PodView>,
    pub retries: u64,
    pub client_telemetry: Option<SocketAddr>,
    pub note: String,
}

/// Reads each pod's `/status` and the client's retries into the board.
pub async fn refresh(board: &Mutex<Board>) {
    let (pods, telemetry) = match board.lock() {
        Ok(b) => (b.pods.iter().map(|p| p.admin).collect::<Vec<_>>(), b.client_telemetry),
        Err(_) => return,
    };
    let mut states = Vec::new();
    for admin in pods {
        let s = match admin {
            Some(a) => crate::cli::call(a, http::Method::GET, "/status")
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()),
            None => None,
        };
        states.push(s);
    }
    let retries = match telemetry {
        Some(t) => crate::cli::call(t, http::Method::GET, "/metrics").await.ok().map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| l.starts_with("ebb_cluster_retries_total{"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        }),
        None => None,
    };
    if let Ok(mut b) = board.lock() {
        for (p, s) in b.pods.iter_mut().zip(states) {
            let Some(s) = s else { continue };
            p.connections = s["counts"]["connections"].as_u64().unwrap_or(0);
            p.in_flight = s["counts"]["in_flight_requests"].as_u64().unwrap_or(0);
            p.phase = s["state"].as_str().unwrap_or("-").to_string();
            p.deadline_in_ms = s["drain"]["time_to_deadline_ms"].as_u64();
        }
        if let Some(r) = retries {
            b.retries = r;
        }
    }
}

/// The view as lines.
pub fn render(board: &Board, load: &Load, elapsed: Duration, total: Duration) -> Vec<String> {
    let mut out = vec![format!(
        "ebb demo  {:>5.1}s / {:.0}s   retries by the client's Ebb: {}   {}",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        board.retries,
        board.note
    )];
    out.push(format!("  {:<12} {:>9} {:>9} {:>7}", "protocol", "sent", "ok", "failed"));
    for (kind, c) in &load.kinds {
        out.push(format!(
            "  {:<12} {:>9} {:>9} {:>7}",
            kind.as_str(),
            c.sent.load(Relaxed),
            c.ok.load(Relaxed),
            c.failed.load(Relaxed)
        ));
    }
    out.push(format!(
        "  {:<8} {:<22} {:>6} {:>9}  {:<12} {}",
        "pod", "doing", "conns", "in flight", "phase", "deadline"
    ));
    for p in &board.pods {
        let deadline = p.deadline_in_ms.map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        out.push(format!(
            "  {:<8} {:<22} {:>6} {:>9}  {:<12} {}",
            p.name, p.doing, p.connections, p.in_flight, p.phase, deadline
        ));
    }
    out
}

/// Draws the view until `stop`: in place on a terminal, a line a second otherwise.
pub async fn run(
    board: Arc<Mutex<Board>>,
    load: Arc<Load>,
    total: Duration,
    tty: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut drawn = 0usize;
    let period = if tty { Duration::from_millis(250) } else { Duration::from_secs(1) };
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        refresh(&board).await;
        let lines = match board.lock() {
            Ok(b) => render(&b, &load, started.elapsed(), total),
            Err(_) => return,
        };
        if tty {
            if drawn > 0 {
                print!("\x1b[{drawn}A\x1b[J");
            }
            for l in &lines {
                println!("{l}");
            }
            drawn = lines.len();
        } else {
            let sent: u64 = load.kinds.iter().map(|(_, c)| c.sent.load(Relaxed)).sum();
            let ok: u64 = load.kinds.iter().map(|(_, c)| c.ok.load(Relaxed)).sum();
            let failed: u64 = load.kinds.iter().map(|(_, c)| c.failed.load(Relaxed)).sum();
            let pods = board
                .lock()
                .map(|b| {
                    b.pods.iter().map(|p| format!("{}={}/{}", p.name, p.doing, p.phase)).collect::<Vec<_>>().join(" ")
                })
                .unwrap_or_default();
            println!("[{:>5.1}s] sent {sent} ok {ok} failed {failed}  {pods}", started.elapsed().as_secs_f64());
        }
        if *stop.borrow() {
            return;
        }
    }
}
