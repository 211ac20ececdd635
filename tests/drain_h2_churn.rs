//! HTTP/2 clients that churn through a drain: every connection accepted during the announce phase is told
//! to go at once, its clients move to a new one, and not one stream is lost on the way.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use ebb::drain::Trigger;
use support::h2churn::{Churn, ChurnOptions};
use support::{origin, proxy_to};

/// Several DATA frames per response (16 KiB frames), so client WINDOW_UPDATEs are still arriving while
/// Ebb finishes a connection.
const BODY: usize = 160 * 1024;
const CONNS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_churn_through_announce_loses_no_stream() {
    let o = origin::http2("a").await;
    let ebb = proxy_to(o.addr, |c| {
        c.drain.announce = Duration::from_secs(3);
        c.drain.timeout = Duration::from_secs(15);
    })
    .await;
    let churn = Churn::start(ChurnOptions {
        addr: ebb.addr("web").unwrap(),
        authority: "app.test".into(),
        path: format!("/big?bytes={BODY}"),
        conns: CONNS,
        streams: 10,
        // Past the announce phase: the last second meets a closed listener, which must cost nothing.
        duration: Duration::from_secs(4),
    });
    let mut progress = churn.progress.clone();
    let warm = tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|p| p.completed >= 50))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(warm, "streams complete before the drain: {:?}", *progress.borrow());
    ebb.drain.trigger(Trigger::new("test")).unwrap();

    let report = churn.finish().await;
    println!("churn: {}", serde_json::to_string_pretty(&report).unwrap());
    let drain = tokio::time::timeout(Duration::from_secs(20), ebb.wait()).await.expect("the drain ends");
    println!(
        "drain: accepted during announce {}, goaway sent {}, forced {}, requests completed {}",
        drain.accepted_during_announce, drain.goaway_sent, drain.forced_closes, drain.requests_completed
    );

    assert_eq!(report.broken, 0, "lost streams: {:#?}", report.broken_samples);
    assert!(report.anomalies.is_empty(), "{:#?}", report.anomalies);
    // Nothing sends a GOAWAY before the drain: streams completed on the connections clients moved to
    // were all served during it.
    assert!(report.completed_after_goaway > 0, "no stream completed after a client moved: {report:?}");
    assert!(report.connections as usize > 10 * CONNS, "connections churned on GOAWAY: {}", report.connections);
    assert!(report.goaways as usize > 10 * CONNS, "connections told to go: {}", report.goaways);
    // A stream the origin answered but the client did not complete is a loss; refused streams never
    // reach the origin.
    assert_eq!(o.hits.load(SeqCst) as u64, report.completed, "origin answers vs completed streams");
    assert_eq!(drain.forced_closes, 0);
    // Every connection Ebb closed was closed by its client too, after reading everything: Ebb's own
    // report can tell, and says nothing was cut short.
    assert_eq!(drain.linger_cut_short, 0);
}
