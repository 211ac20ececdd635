//! Closing a client connection never turns into a reset that eats the response: bytes the client sent
//! after Ebb stopped reading (PINGs after the final GOAWAY, a pipelined request after `Connection:
//! close`) sit unread when Ebb closes, and a plain close would make the kernel send RST and drop the
//! response bytes not yet transmitted. With `drain.linger: 0` (a plain close) both tests lose bytes.

mod support;

use std::time::Duration;

use ebb::conntrack::ConnState;
use ebb::drain::Trigger;
use support::h2frame::{
    frame, get_block, read_frame, Frame, ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, MAX_STREAM_ID, PING,
    PREFACE, SETTINGS, WINDOW_UPDATE,
};
use support::{eventually, origin, proxy_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: usize = 192 * 1024;

/// Waits until Ebb has finished with its only connection: lingering, or (with a plain close) gone.
async fn ebb_is_done_with_it(running: &ebb::app::Running) -> bool {
    eventually(Duration::from_secs(5), async || {
        let conns = running.track.snapshot();
        conns.is_empty() || conns.iter().all(|c| c.state == ConnState::Lingering)
    })
    .await
}

/// Ebb in front of `origin`, already announcing a drain, so every response it sends ends its
/// connection. `EBB_TEST_NO_LINGER=1` turns lingering off, to see these tests fail on a plain close.
async fn draining_proxy(origin: std::net::SocketAddr) -> ebb::app::Running {
    let running = proxy_to(origin, |c| {
        c.drain.announce = Duration::from_secs(20);
        c.drain.timeout = Duration::from_secs(30);
        if std::env::var_os("EBB_TEST_NO_LINGER").is_some() {
            c.drain.linger = Duration::ZERO;
        }
    })
    .await;
    running.drain.trigger_applied(Trigger::new("test")).await.unwrap();
    running
}

#[tokio::test]
async fn h2_client_pinging_after_the_final_goaway_gets_every_byte() {
    let o = origin::http2("h2").await;
    let running = draining_proxy(o.addr).await;
    // A small receive buffer keeps most of the response in Ebb's send queue while this client is
    // not reading: the bytes a reset would throw away.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = sock.connect(running.addr("web").unwrap()).await.unwrap();
    // Big windows, so the whole response can be written without waiting for this client.
    let mut settings = vec![0, 4];
    settings.extend_from_slice(&(8u32 << 20).to_be_bytes());
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &settings)).await.unwrap();
    s.write_all(&frame(WINDOW_UPDATE, 0, 0, &(8u32 << 20).to_be_bytes())).await.unwrap();
    let block = get_block(&format!("/big?bytes={BODY}"), "t");
    // Wait for the PING of the server's GOAWAY pair; then open the stream and answer the PING in one
    // write, so the stream is accepted and the final GOAWAY comes before the response body.
    loop {
        let f = read_frame(&mut s).await.unwrap();
        match f.kind {
            SETTINGS if !f.has(ACK) => s.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap(),
            PING if !f.has(ACK) => {
                let mut out = frame(HEADERS, END_STREAM | END_HEADERS, 1, &block);
                out.extend(frame(PING, ACK, 0, &f.payload));
                s.write_all(&out).await.unwrap();
                break;
            }
            _ => {}
        }
    }
    let mut last_stream_id = None;
    let mut data = 0usize;
    let mut ended = false;
    while last_stream_id.is_none() {
        let f = read_frame(&mut s).await.unwrap();
        match f.kind {
            DATA => {
                data += f.payload.len();
                ended |= f.has(END_STREAM);
            }
            GOAWAY if f.last_stream_id() != MAX_STREAM_ID => last_stream_id = Some(f.last_stream_id()),
            // The shutdown's second round trip: the final GOAWAY follows its ack.
            PING if !f.has(ACK) => s.write_all(&frame(PING, ACK, 0, &f.payload)).await.unwrap(),
            _ => {}
        }
    }
    assert_eq!(last_stream_id, Some(1), "the request was accepted");
    assert!(!ended, "the body comes after the final GOAWAY");
    // Now stop reading and keep talking (PINGs), until Ebb has finished its side of the connection.
    let pinger = async {
        loop {
            if s.write_all(&frame(PING, 0, 0, &[7; 8])).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        done = ebb_is_done_with_it(&running) => assert!(done, "Ebb finished writing the response"),
        _ = pinger => panic!("the connection failed while the response was being written"),
    }
    // Read the rest: every DATA byte up to END_STREAM, then a clean end.
    while !ended {
        match read_frame(&mut s).await {
            Ok(Frame { kind: DATA, flags, stream: 1, payload }) => {
                data += payload.len();
                ended |= flags & END_STREAM != 0;
            }
            Ok(_) => {}
            Err(e) => panic!("connection ended after {data} of {BODY} body bytes: {e}"),
        }
    }
    assert_eq!(data, BODY);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    assert!(end.is_ok(), "closed with FIN, not reset: {end:?}");
}

#[tokio::test]
async fn h1_pipelined_request_after_connection_close_does_not_eat_the_response() {
    let o = origin::http1("h1").await;
    let running = draining_proxy(o.addr).await;
    let mut s = TcpStream::connect(running.addr("web").unwrap()).await.unwrap();
    let request = format!("GET /big?bytes={BODY} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    // Read the head only, then pipeline the next request as a keep-alive client would.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    assert!(ebb_is_done_with_it(&running).await, "Ebb finished writing the response");
    // The body, whole, then a clean end; the pipelined request was never answered (the client
    // resends it, as it must after `Connection: close`).
    let mut body = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await.unwrap();
    let chunked_len = dechunk(&body);
    assert!(end.is_ok(), "closed with FIN, not reset, after {} body bytes: {end:?}", chunked_len.unwrap_or(0));
    assert_eq!(chunked_len, Some(BODY), "the whole body and nothing else");
}

/// The payload length of a chunked body that ends with its last chunk, or `None` if cut short.
fn dechunk(mut b: &[u8]) -> Option<usize> {
    let mut total = 0;
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line_end]).ok()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return (b == b"\r\n").then_some(total);
        }
        if b.len() < size + 2 {
            return None;
        }
        total += size;
        b = &b[size + 2..];
    }
}
