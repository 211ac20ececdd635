//! Hostile HTTP/2 clients sharing an upstream with well-behaved ones (issue 11, point 1): a client that
//! never grants flow-control credit, or that holds every stream the upstream allows, must not stall
//! another client of the same upstream.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::attacker::counting_origin;
use support::h2raw::RawH2;
use support::{client, eventually, proxy_to};

/// How long the victim may take for a small response: orders of magnitude above the ~1 ms it takes
/// with no attacker, well below the upstream stalls this guards against.
const VICTIM_BOUND: Duration = Duration::from_secs(2);

/// The victim: a normal HTTP/2 client on its own connection asks for a small response; the whole body
/// must arrive within `VICTIM_BOUND`. Returns how long it took.
async fn victim(addr: std::net::SocketAddr) -> Duration {
    let (mut tx, _task) = client::h2(addr).await;
    let started = Instant::now();
    let fetched = tokio::time::timeout(VICTIM_BOUND, async {
        let res = tx.send_request(client::get_h2(addr, "/small")).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    })
    .await;
    let took = started.elapsed();
    eprintln!("victim latency: {took:?}");
    match fetched {
        Ok(Ok((status, body))) => assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..])),
        Ok(Err(e)) => panic!("victim failed after {took:?}: {e}"),
        Err(_) => panic!("victim got no whole response within {VICTIM_BOUND:?}"),
    }
    took
}

/// Three streams for 8 MiB each from a client that never sends WINDOW_UPDATE: Ebb must stop each of
/// those upstream streams at its own window, leaving the shared upstream connection's window open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_grants_window_does_not_stall_others() {
    let o = counting_origin(None).await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();

    // Raw frames: the attacker reads what arrives but never grants credit beyond the initial 64 KiB.
    let attacker = RawH2::connect(addr).await;
    for id in [1, 3, 5] {
        attacker.get(id, &addr.to_string(), "/big?bytes=8388608");
    }
    assert!(
        eventually(Duration::from_secs(5), async || o.hits.load(Ordering::SeqCst) >= 3).await,
        "the attacker's three requests reach the origin"
    );
    // Once the origin stops producing, flow control has stopped it: Ebb holds all it is going to hold.
    let produced = o
        .produced_settles(Duration::from_millis(200), Duration::from_secs(10))
        .await
        .expect("flow control stops the origin's 3 x 8 MiB");
    eprintln!("origin produced {produced} bytes for the stalled attacker before stopping");

    victim(addr).await;
    assert_eq!(o.conns.load(Ordering::SeqCst), 1, "the victim shared the attacker's upstream connection");
    // Bounded buffering: each stalled stream took under 1 MiB from the origin (its upstream stream
    // window and a chunk or two in flight), where one shared window used to take 5 MiB for the three.
    assert!(produced < 3 << 20, "origin produced {produced} bytes for three stalled streams");
    drop(attacker);
}

/// A client holding every stream the upstream allows (slow responses) must not queue everyone else:
/// Ebb opens a second upstream connection for the next request, and closes it again once unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_holding_all_upstream_streams_does_not_queue_others() {
    const LIMIT: u32 = 10;
    let o = counting_origin(Some(LIMIT)).await;
    // Reaped every 150 ms, so the extra connection's close is seen quickly.
    let ebb = proxy_to(o.addr, |c| c.upstream.idle_timeout = Duration::from_millis(300)).await;
    let addr = ebb.addr("web").unwrap();

    let attacker = RawH2::connect(addr).await;
    for i in 0..LIMIT {
        attacker.get(1 + 2 * i, &addr.to_string(), "/hold");
    }
    assert!(o.holding(LIMIT as usize, Duration::from_secs(5)).await, "the attacker holds every upstream stream");

    victim(addr).await;
    assert_eq!(o.conns.load(Ordering::SeqCst), 2, "a second upstream connection took the victim's request");
    o.release(LIMIT as usize);
    // Once a reap interval passes with no stream on it, the extra connection goes; the first one stays.
    assert!(
        eventually(Duration::from_secs(3), async || o.closed.load(Ordering::SeqCst) == 1).await,
        "the extra upstream connection is closed once unused ({} closed)",
        o.closed.load(Ordering::SeqCst)
    );
    drop(attacker);
}

/// The same with the attacker's streams stalled mid-body rather than waiting for headers: a stream
/// counts against its upstream connection until its response body ends, so the victim's request goes
/// to a second connection instead of queueing behind streams h2 still has open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stalling_all_upstream_streams_mid_body_does_not_queue_others() {
    const LIMIT: u32 = 3;
    let o = counting_origin(Some(LIMIT)).await;
    let ebb = proxy_to(o.addr, |_| {}).await;
    let addr = ebb.addr("web").unwrap();

    let attacker = RawH2::connect(addr).await;
    for i in 0..LIMIT {
        attacker.get(1 + 2 * i, &addr.to_string(), "/big?bytes=8388608");
    }
    assert!(
        eventually(Duration::from_secs(5), async || o.hits.load(Ordering::SeqCst) >= LIMIT as usize).await,
        "the attacker's requests reach the origin"
    );
    o.produced_settles(Duration::from_millis(200), Duration::from_secs(10))
        .await
        .expect("flow control stops the origin");

    victim(addr).await;
    assert_eq!(o.conns.load(Ordering::SeqCst), 2, "a second upstream connection took the victim's request");
    drop(attacker);
}
