//! Long-lived connections at the drain deadline: a WebSocket is closed with Close 1001 both ways between
//! frames, opaque TCP gets a FIN both ways; neither is reset, and the report names them as forced.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ebb::config::Direction;
use ebb::drain::{Phase, Trigger};
use futures_util::{SinkExt, StreamExt};
use support::{base_config, listener, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Every wait in these tests is bounded by this.
const BOUND: Duration = Duration::from_secs(5);
/// The drain deadline, from the trigger.
const DEADLINE: Duration = Duration::from_millis(300);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn timing(c: &mut ebb::config::Config) {
    c.drain.announce = Duration::from_millis(100);
    c.drain.timeout = Duration::from_secs(10);
}

fn drain(ebb: &ebb::app::Running) {
    ebb.drain.trigger(Trigger { timeout: Some(DEADLINE), ..Trigger::new("test") }).unwrap();
}

async fn deadline_reached(ebb: &ebb::app::Running) {
    within("deadline phase", ebb.drain.watch(Direction::Inbound).reached(Phase::Deadline)).await;
}

/// A WebSocket origin for one connection: the server end is handed to the test to drive.
async fn ws_origin() -> (SocketAddr, tokio::task::JoinHandle<Ws>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio_tungstenite::accept_async(s).await.unwrap()
    });
    (addr, server)
}

/// A WebSocket client through Ebb, and the origin's end of the same WebSocket, having exchanged one
/// message each way (so the splice is in place).
async fn ws_pair(ebb: &ebb::app::Running, server: tokio::task::JoinHandle<Ws>) -> (Ws, Ws) {
    let s = TcpStream::connect(ebb.addr("web").unwrap()).await.unwrap();
    let (mut client, res) = within("client handshake", tokio_tungstenite::client_async("ws://a/ws", s)).await.unwrap();
    assert_eq!(res.status(), 101);
    let mut server = within("origin handshake", server).await.unwrap();
    client.send(Message::text("hello")).await.unwrap();
    let got = within("origin reads", server.next()).await.unwrap().unwrap();
    assert_eq!(got, Message::text("hello"));
    server.send(got).await.unwrap();
    let echo = within("client reads the echo", client.next()).await.unwrap().unwrap();
    assert_eq!(echo, Message::text("hello"));
    (client, server)
}

/// What one end saw from the drain on: data messages, then the peer's Close, then a clean end.
#[derive(Debug)]
struct Ending {
    messages: Vec<Message>,
    close: Option<CloseFrame>,
}

/// Reads to the end of the WebSocket (answering the peer's Close on the way); panics on an error, as
/// a reset or a broken frame would be one.
async fn read_to_end(who: &str, ws: &mut Ws) -> Ending {
    let mut ending = Ending { messages: Vec::new(), close: None };
    loop {
        match within(who, ws.next()).await {
            None => return ending,
            Some(Ok(Message::Close(f))) => {
                ending.close = Some(f.unwrap_or_else(|| panic!("{who}: Close without code")))
            }
            Some(Ok(m)) => {
                assert!(ending.close.is_none(), "{who}: data after Close: {m:?}");
                ending.messages.push(m);
            }
            Some(Err(e)) => panic!("{who}: {e} (so far: {ending:?})"),
        }
    }
}

fn assert_going_away(who: &str, ending: &Ending) {
    let close = ending.close.as_ref().unwrap_or_else(|| panic!("{who}: no Close frame: {ending:?}"));
    assert_eq!(close.code, CloseCode::Away, "{who}: {close:?}");
}

async fn assert_forced(ebb: ebb::app::Running, doing: &str) {
    let report = within("drain ends", ebb.wait()).await;
    assert_eq!(report.forced_closes, 1, "{report:?}");
    assert_eq!(report.forced.len(), 1, "{report:?}");
    assert_eq!(report.forced[0].doing, doing);
}

#[tokio::test]
async fn websocket_gets_close_1001_both_ways_at_deadline() {
    let (origin, server) = ws_origin().await;
    let ebb = proxy_to(origin, timing).await;
    let (mut client, mut server) = ws_pair(&ebb, server).await;

    drain(&ebb);
    deadline_reached(&ebb).await;
    let (client_end, server_end) = tokio::join!(read_to_end("client", &mut client), read_to_end("origin", &mut server));
    assert_going_away("client", &client_end);
    assert_going_away("origin", &server_end);
    assert!(client_end.messages.is_empty() && server_end.messages.is_empty());
    drop((client, server));
    assert_forced(ebb, "upgraded").await;
}

/// One binary frame of `len` bytes whose payload is `i as u8`, masked (as a client sends) when `mask`
/// is given.
fn binary_frame(len: u16, mask: Option<[u8; 4]>) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut frame = vec![0x82, 126];
    frame.extend_from_slice(&len.to_be_bytes());
    match mask {
        Some(key) => {
            frame[1] |= 0x80;
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => frame.extend_from_slice(&payload),
    }
    (frame, payload)
}

fn conn_bytes(ebb: &ebb::app::Running) -> (u64, u64) {
    let snap = ebb.track.snapshot();
    assert_eq!(snap.len(), 1, "{snap:?}");
    (snap[0].bytes_in, snap[0].bytes_out)
}

#[tokio::test]
async fn websocket_frames_in_flight_at_deadline_are_finished_before_the_close() {
    let (origin, server) = ws_origin().await;
    let ebb = proxy_to(origin, timing).await;
    let (mut client, mut server) = ws_pair(&ebb, server).await;

    // Each side sends the first half of a frame, written under the WebSocket library as raw bytes, and
    // Ebb has read both halves before the drain begins.
    let (to_server, client_payload) = binary_frame(1000, Some([7, 1, 200, 42]));
    let (to_client, server_payload) = binary_frame(1000, None);
    let (before_in, before_out) = conn_bytes(&ebb);
    client.get_mut().write_all(&to_server[..500]).await.unwrap();
    server.get_mut().write_all(&to_client[..500]).await.unwrap();
    let relayed = support::eventually(BOUND, async || {
        let (bytes_in, bytes_out) = conn_bytes(&ebb);
        bytes_in >= before_in + 500 && bytes_out >= before_out + 500
    })
    .await;
    assert!(relayed, "half frames relayed");

    drain(&ebb);
    deadline_reached(&ebb).await;
    // The rest of each frame, after the deadline: Ebb must relay it before its Close, not cut the frame.
    client.get_mut().write_all(&to_server[500..]).await.unwrap();
    server.get_mut().write_all(&to_client[500..]).await.unwrap();
    let (client_end, server_end) = tokio::join!(read_to_end("client", &mut client), read_to_end("origin", &mut server));
    assert_eq!(client_end.messages, vec![Message::binary(server_payload)]);
    assert_eq!(server_end.messages, vec![Message::binary(client_payload)]);
    assert_going_away("client", &client_end);
    assert_going_away("origin", &server_end);
    drop((client, server));
    assert_forced(ebb, "upgraded").await;
}

#[tokio::test]
async fn opaque_tcp_gets_fin_both_ways_at_deadline() {
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = base_config();
    let mut l = listener("tcp", origin.local_addr().unwrap(), Direction::Inbound);
    l.opaque = true;
    c.listeners.push(l);
    timing(&mut c);
    let ebb = ebb::app::start(c).await.unwrap();
    let mut client = TcpStream::connect(ebb.addr("tcp").unwrap()).await.unwrap();
    let (mut server, _) = within("origin accepts", origin.accept()).await.unwrap();
    let mut buf = [0u8; 4];
    client.write_all(b"ping").await.unwrap();
    within("origin reads", server.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    within("client reads", client.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"pong");

    drain(&ebb);
    // The server's last words before the deadline; the client reads them only after it.
    let last = b"last words before the deadline";
    server.write_all(last).await.unwrap();
    let relayed = support::eventually(BOUND, async || conn_bytes(&ebb).1 >= 4 + last.len() as u64).await;
    assert!(relayed, "last words relayed");
    deadline_reached(&ebb).await;

    let mut got = Vec::new();
    let read = within("client reads to EOF", client.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "client: {read:?} (a reset, not a FIN)");
    assert_eq!(got, last);
    let read = within("origin reads EOF", server.read(&mut buf)).await;
    assert!(matches!(read, Ok(0)), "origin: {read:?} (a reset, not a FIN)");
    // Within the grace Ebb still reads what the server sends (and drops it): a socket closed under it
    // would answer with a reset, and the second write would fail.
    for late in [&b"too late"[..], b"still too late"] {
        let wrote = within("origin writes after the FIN", server.write_all(late)).await;
        assert!(wrote.is_ok(), "origin: {wrote:?}");
    }
    drop((client, server));
    assert_forced(ebb, "forwarding").await;
}

/// An upgraded connection idle for `downstream.upgrade_idle_timeout` is ended as at the deadline (a
/// WebSocket: Close 1001 each way, then a clean end, no reset) but not as forced: counted in
/// `ebb_idle_timeouts_total{protocol="websocket"}`, the connection gone. Before, nothing ended it.
#[tokio::test]
async fn an_idle_websocket_gets_close_1001_both_ways_and_is_counted() {
    let (origin, server) = ws_origin().await;
    let ebb = proxy_to(origin, |c| {
        timing(c);
        c.downstream.upgrade_idle_timeout = Duration::from_millis(400);
    })
    .await;
    let (mut client, mut server) = ws_pair(&ebb, server).await;
    let (client_end, server_end) = tokio::join!(read_to_end("client", &mut client), read_to_end("origin", &mut server));
    assert_going_away("client", &client_end);
    assert_going_away("origin", &server_end);
    // Counted once the relay has returned, just after both ends saw theirs.
    let series = "ebb_idle_timeouts_total{protocol=\"websocket\"} 1\n";
    let counted = support::eventually(BOUND, async || ebb.drain.metrics().render().contains(series)).await;
    assert!(counted, "{}", ebb.drain.metrics().render());
    assert!(support::eventually(BOUND, async || ebb.track.snapshot().is_empty()).await, "the connection is gone");
    assert_eq!(ebb.drain.report().forced_closes, 0, "an idle close is not a forced one");
}
