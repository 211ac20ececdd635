//! Opaque TCP through Ebb: echo with half-close, declared opaque ports, TLS passthrough.

mod support;

use std::time::Duration;

use ebb::config::Direction;
use support::{base_config, listener, origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn opaque_echo_with_half_close() {
    let echo = origin::tcp_echo().await;
    let mut c = base_config();
    let mut l = listener("tcp", echo, Direction::Outbound);
    l.detect_timeout = Duration::from_millis(200);
    c.listeners.push(l);
    let ebb = ebb::app::start(c).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(ebb.addr("tcp").unwrap()).await.unwrap();
    // Not HTTP: decided at once from the first bytes, no detection timeout.
    s.write_all(b"\x00\x01binary payload").await.unwrap();
    s.shutdown().await.unwrap(); // half-close: we are done sending
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_eq!(out, b"\x00\x01binary payloadbye", "echo, then the server's reply to our FIN");
}

#[tokio::test]
async fn declared_opaque_listener_does_not_wait_for_detection() {
    let greeter = origin::tcp_greeter(b"220 smtp ready\r\n").await;
    let mut c = base_config();
    let mut l = listener("smtp", greeter, Direction::Outbound);
    l.opaque = true;
    l.detect_timeout = Duration::from_secs(30);
    c.listeners.push(l);
    let ebb = ebb::app::start(c).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(ebb.addr("smtp").unwrap()).await.unwrap();
    let mut buf = [0u8; 16];
    // The server speaks first; with detection it would wait 30 s.
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await.expect("greeting at once").unwrap();
    assert_eq!(&buf, b"220 smtp ready\r\n");
}

#[tokio::test]
async fn server_first_protocol_falls_back_after_detect_timeout() {
    let greeter = origin::tcp_greeter(b"hello").await;
    let mut c = base_config();
    let mut l = listener("db", greeter, Direction::Outbound);
    l.detect_timeout = Duration::from_millis(300);
    c.listeners.push(l);
    let ebb = ebb::app::start(c).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(ebb.addr("db").unwrap()).await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test]
async fn tls_client_hello_is_forwarded_opaque() {
    let echo = origin::tcp_echo().await;
    let mut c = base_config();
    c.listeners.push(listener("tls", echo, Direction::Outbound));
    let ebb = ebb::app::start(c).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(ebb.addr("tls").unwrap()).await.unwrap();
    let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    s.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(buf, hello);
    let snap = ebb.track.snapshot();
    assert_eq!(snap[0].protocol, "opaque");
}
