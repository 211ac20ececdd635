//! Config push latency of the reference control plane: N sidecar clients (raw `StreamResources`
//! streams that ACK every response, as a sidecar does) subscribe to a running plane; each round
//! rewrites the mesh file and measures the time until every client has ACKed the new version.
//!
//! `plane_bench --plane http://127.0.0.1:15010 --mesh mesh.yaml --sidecars 100 --rounds 10`
//! (benches/plane.sh starts the plane and reads its memory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb::control::pb::{self, mesh_control_client::MeshControlClient};
use ebb::control::{CLUSTER_TYPE, TYPES};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// The mesh file for round `round`: one cluster whose endpoint weight changes every round.
fn mesh(round: u32) -> String {
    format!(
        "clusters:\n  - name: web\n    addresses: [10.96.0.10:80]\n    endpoints:\n      - {{ addr: 10.0.0.5:8080, weight: {}, node: web-0 }}\n      - {{ addr: 10.0.0.6:8080, node: web-1 }}\n",
        1 + round % 900
    )
}

/// One client: subscribes to every type, ACKs everything, and publishes the cluster version it ACKed.
async fn sidecar(plane: String, id: usize, acked: watch::Sender<String>) -> Result<(), String> {
    let mut client = MeshControlClient::connect(plane).await.map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel(8);
    for (i, t) in TYPES.iter().enumerate() {
        let node = (i == 0).then(|| pb::Node { id: format!("bench-{id}"), ..Default::default() });
        tx.send(pb::DiscoveryRequest { node, type_url: t.to_string(), ..Default::default() })
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut stream = client.stream_resources(ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    while let Some(res) = stream.message().await.map_err(|e| e.to_string())? {
        let ack = pb::DiscoveryRequest {
            version_info: res.version_info.clone(),
            type_url: res.type_url.clone(),
            response_nonce: res.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack).await.map_err(|e| e.to_string())?;
        if res.type_url == CLUSTER_TYPE {
            acked.send_replace(res.version_info);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let plane = arg("--plane").unwrap_or_else(|| "http://127.0.0.1:15010".into());
    let path = arg("--mesh").expect("--mesh FILE (the plane's mesh file)");
    let n: usize = arg("--sidecars").and_then(|v| v.parse().ok()).unwrap_or(10);
    let rounds: u32 = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(10);
    std::fs::write(&path, mesh(0)).expect("write mesh");
    let mut acks = Vec::new();
    for id in 0..n {
        let (tx, rx) = watch::channel(String::new());
        acks.push(rx);
        let plane = plane.clone();
        tokio::spawn(async move {
            if let Err(e) = sidecar(plane, id, tx).await {
                eprintln!("sidecar {id}: {e}");
            }
        });
    }
    let acks = Arc::new(acks);
    // Everyone on the first version.
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        for rx in acks.iter() {
            let mut rx = rx.clone();
            let _ = rx.wait_for(|v| !v.is_empty()).await;
        }
    })
    .await;
    assert!(first.is_ok(), "not every sidecar got the first config within 30 s");
    println!("connected {n}");
    let mut latencies = Vec::new();
    for round in 1..=rounds {
        let before: Vec<String> = acks.iter().map(|rx| rx.borrow().clone()).collect();
        let t0 = Instant::now();
        std::fs::write(&path, mesh(round)).expect("write mesh");
        let all = tokio::time::timeout(Duration::from_secs(30), async {
            for (rx, old) in acks.iter().zip(&before) {
                let mut rx = rx.clone();
                let _ = rx.wait_for(|v| v != old).await;
            }
        })
        .await;
        assert!(all.is_ok(), "round {round}: not every sidecar ACKed within 30 s");
        let d = t0.elapsed();
        latencies.push(d);
        println!("round {round} all {n} acked in {:.1} ms", d.as_secs_f64() * 1000.0);
        // Rounds apart, so the file's modification is seen as a new one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "sidecars {n} rounds {rounds} push-to-all-acked ms: min {:.1} p50 {:.1} max {:.1}",
        ms(latencies[0]),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1])
    );
}
