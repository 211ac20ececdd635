//! The state machine on paused time: phases, deadlines, scope and when the process may exit.

use super::*;
use crate::domain::Direction;

fn drain(timeout: u64, announce: u64) -> (Arc<Drain>, Arc<ConnTrack>) {
    let track = ConnTrack::new(Arc::new(Metrics::new()));
    let cfg = DrainConfig {
        timeout: Duration::from_secs(timeout),
        announce: Duration::from_secs(announce),
        ..DrainConfig::default()
    };
    (Drain::new(cfg, track.clone()), track)
}

fn addr() -> std::net::SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

/// A running controller (`timeout`, `announce` in seconds) and one open connection in `direction`.
fn running(
    timeout: u64,
    announce: u64,
    direction: Direction,
) -> (Arc<Drain>, crate::conntrack::ConnHandle, tokio::task::JoinHandle<Report>) {
    let (d, track) = drain(timeout, announce);
    let conn = track.open(direction, direction.as_str().into(), addr(), addr());
    let task = tokio::spawn(d.clone().run());
    (d, conn, task)
}

#[tokio::test(start_paused = true)]
async fn idle_drain_ends_right_after_announce() {
    let (d, _track) = drain(25, 5);
    let task = tokio::spawn(d.clone().run());
    let t0 = Instant::now();
    d.trigger(Trigger::exit("test")).unwrap();
    let report = task.await.unwrap();
    assert_eq!(report.phase, Phase::Drained);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn open_connection_holds_until_it_closes() {
    let (d, conn, task) = running(25, 5, Direction::Inbound);
    let t0 = Instant::now();
    d.trigger(Trigger::exit("test")).unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(d.view().phase, Phase::Closing);
    drop(conn);
    let report = task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
    assert_eq!(report.closed_gracefully, 1);
    assert_eq!(report.at_start.connections, 1);
}

#[tokio::test(start_paused = true)]
async fn second_trigger_shortens_never_lengthens() {
    let (d, conn, _task) = running(25, 5, Direction::Inbound);
    let t0 = Instant::now();
    d.trigger_applied(Trigger::new("first")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.trigger_applied(Trigger { timeout: Some(Duration::from_secs(10)), ..Trigger::new("shorter") }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.trigger_applied(Trigger { timeout: Some(Duration::from_secs(60)), ..Trigger::new("longer") }).await.unwrap();
    d.watch(Direction::Inbound).reached(Phase::Deadline).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(11));
    drop(conn);
}

#[tokio::test(start_paused = true)]
async fn zero_timeout_closes_at_once() {
    let (d, conn, _task) = running(25, 5, Direction::Inbound);
    let t0 = Instant::now();
    d.trigger(Trigger { now: true, ..Trigger::exit("now") }).unwrap();
    d.watch(Direction::Outbound).reached(Phase::Deadline).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    drop(conn);
}

#[tokio::test(start_paused = true)]
async fn inbound_drain_leaves_outbound_serving_and_the_process_up() {
    let (d, _out, task) = running(25, 5, Direction::Outbound);
    d.trigger(Trigger::new("prestop")).unwrap();
    let report = d.drained().await;
    assert_eq!(report.inbound, Phase::Drained);
    assert_eq!(report.outbound, Phase::Serving);
    assert_eq!(d.watch(Direction::Outbound).phase(), Phase::Serving);
    // Long past the deadline: outbound is never cut, and the controller does not end the process.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(d.watch(Direction::Outbound).phase(), Phase::Serving);
    assert!(!task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn sigterm_after_inbound_drain_exits_once_outbound_is_empty() {
    let (d, out, task) = running(25, 5, Direction::Outbound);
    d.trigger(Trigger::new("prestop")).unwrap();
    d.drained().await;
    d.trigger_applied(Trigger::exit("sigterm")).await.unwrap();
    // The app's outbound connection is told to go at once, and the listener still accepts.
    assert_eq!(d.watch(Direction::Outbound).phase(), Phase::Announcing);
    assert_eq!(d.watch(Direction::Inbound).phase(), Phase::Drained);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!task.is_finished());
    drop(out);
    let report = task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(2), "exits when outbound empties, no announce wait");
    assert_eq!(report.outbound, Phase::Drained);
    assert!(report.exit);
}

#[tokio::test(start_paused = true)]
async fn sigterm_after_inbound_drain_with_nothing_left_exits_at_once() {
    let (d, _track) = drain(25, 5);
    let task = tokio::spawn(d.clone().run());
    d.trigger(Trigger::new("prestop")).unwrap();
    d.drained().await;
    let t0 = Instant::now();
    d.trigger(Trigger::exit("sigterm")).unwrap();
    task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn sigterm_during_inbound_drain_brings_outbound_along() {
    let (d, track) = drain(25, 5);
    let inb = track.open(Direction::Inbound, "in".into(), addr(), addr());
    let out = track.open(Direction::Outbound, "out".into(), addr(), addr());
    let task = tokio::spawn(d.clone().run());
    d.trigger_applied(Trigger::new("prestop")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(d.watch(Direction::Inbound).phase(), Phase::Closing);
    d.trigger_applied(Trigger::exit("sigterm")).await.unwrap();
    // Outbound joins where the drain stands, under the same deadline.
    assert_eq!(d.watch(Direction::Outbound).phase(), Phase::Closing);
    drop(inb);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "outbound still open");
    drop(out);
    let report = task.await.unwrap();
    assert_eq!(report.phase, Phase::Drained);
}

#[tokio::test(start_paused = true)]
async fn deadline_cuts_and_the_drain_ends_after_the_grace() {
    let (d, _stuck, task) = running(10, 5, Direction::Inbound);
    let t0 = Instant::now();
    d.trigger(Trigger::exit("sigterm")).unwrap();
    d.watch(Direction::Inbound).reached(Phase::Deadline).await;
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
    let report = task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(10) + FORCE_GRACE * 4);
    assert_eq!(report.phase, Phase::Drained);
}

#[tokio::test(start_paused = true)]
async fn phases_are_reported_in_order() {
    let (d, conn, task) = running(10, 2, Direction::Inbound);
    d.trigger(Trigger::exit("sigterm")).unwrap();
    d.watch(Direction::Inbound).reached(Phase::Closing).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(conn);
    let report = task.await.unwrap();
    let phases: Vec<(Phase, u64)> = report.phases.iter().map(|p| (p.phase, p.at_ms)).collect();
    assert_eq!(phases, vec![(Phase::Announcing, 0), (Phase::Closing, 2000), (Phase::Drained, 3000)]);
}

#[tokio::test(start_paused = true)]
async fn a_closing_listener_and_an_accepted_connection_hold_the_drain() {
    use crate::conntrack::HoldKind;
    let (d, track) = drain(25, 2);
    let listener = track.hold(Direction::Inbound, HoldKind::Listener);
    let task = tokio::spawn(d.clone().run());
    d.trigger(Trigger::exit("sigterm")).unwrap();
    d.watch(Direction::Inbound).reached(Phase::Closing).await;
    // No connection is listed, but the listener is still taking its accept queue: exiting now would
    // reset whatever it takes.
    let accepted = track.hold(Direction::Inbound, HoldKind::Accepted);
    drop(listener);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "a connection accepted but not yet listed holds the drain");
    let conn = track.open(Direction::Inbound, "in".into(), addr(), addr());
    drop(accepted);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished());
    drop(conn);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_eager_lane_does_not_wait_for_its_open_listener() {
    use crate::conntrack::HoldKind;
    let (d, track) = drain(25, 5);
    let _outbound_listener = track.hold(Direction::Outbound, HoldKind::Listener);
    let task = tokio::spawn(d.clone().run());
    d.trigger(Trigger::new("prestop")).unwrap();
    d.drained().await;
    let t0 = Instant::now();
    d.trigger(Trigger::exit("sigterm")).unwrap();
    task.await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO, "outbound empty: exit at once, listener or not");
}
