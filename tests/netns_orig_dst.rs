//! SO_ORIGINAL_DST for real: an iptables REDIRECT inside a namespace this test makes sends a client's
//! connection to Ebb, which reads where it was going and forwards it there.

mod support;

use std::time::Duration;

use support::netns::Netns;
use support::process::EbbProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn redirected_connection_reaches_its_original_destination() {
    let ns = Netns::new();
    // The app inside the pod namespace: a TCP service on port 9000 of every address that names itself
    // (Ebb forwards inbound to the original destination, the pod IP).
    let mut app = ns
        .command("python3")
        .args(["-c", "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9000));s.listen()\nwhile True:\n  c,_=s.accept();d=c.recv(100);c.sendall(b'app9000:'+d);c.close()"])
        .spawn()
        .unwrap();
    ns.wait_listening(9000);
    let ebb = EbbProcess::start_wrapped(
        &["ip", "netns", "exec", &ns.name],
        env!("CARGO_BIN_EXE_ebb"),
        "inbound: { bind: 0.0.0.0:0, detect_timeout: 5s }\noutbound: { enabled: false }\n\
         admin: { bind: 127.0.0.1:0 }\ntelemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n",
        |_| {},
    );
    let inbound_port = ebb.addr("inbound").port();
    ns.iptables_restore(&format!(
        "*nat\n-A PREROUTING -p tcp -d {} --dport 9000 -j REDIRECT --to-ports {inbound_port}\nCOMMIT\n",
        ns.pod_ip
    ));
    let target = format!("{}:9000", ns.pod_ip);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Connect to the app's address from outside the pod; nothing listens there but iptables.
        let mut idle = tokio::net::TcpStream::connect(&target).await.unwrap();
        // While this connection sits in detection, Ebb lists it with the original destination.
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            let out =
                ns.exec(&[env!("CARGO_BIN_EXE_ebb"), "status", "--json", "--admin", &ebb.addr("admin").to_string()]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if !v["connections"].as_array().unwrap().is_empty() {
                break v;
            }
            assert!(tokio::time::Instant::now() < until, "the redirected connection never showed up: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let conn = &status["connections"][0];
        assert_eq!(conn["direction"], "inbound");
        assert_eq!(conn["orig_dst"], target, "original destination preserved");
        assert_eq!(conn["client_addr"].as_str().unwrap().split(':').next().unwrap(), ns.host_ip);

        // Bytes reach the app at the original destination and come back.
        idle.write_all(b"\x01ping").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut out)).await.unwrap().unwrap();
        assert_eq!(out, b"app9000:\x01ping");
    });
    let _ = app.kill();
    let _ = app.wait();
}

/// Dialling Ebb's capture port directly: the original destination is Ebb itself, and forwarding it would
/// loop. Ebb closes it at once, before reading anything, and says why in its log.
#[test]
fn unredirected_connection_to_ebb_itself_is_refused() {
    let ns = Netns::new();
    let mut ebb = EbbProcess::start_wrapped(
        &["ip", "netns", "exec", &ns.name],
        env!("CARGO_BIN_EXE_ebb"),
        // A long detection timeout, so a connection that went to detection instead would stay open.
        "inbound: { bind: 0.0.0.0:0, detect_timeout: 10s }\noutbound: { enabled: false }\n\
         admin: { bind: 127.0.0.1:0 }\ntelemetry: { bind: 127.0.0.1:0 }\nhealth: { bind: 127.0.0.1:0 }\n",
        |_| {},
    );
    let target = format!("{}:{}", ns.pod_ip, ebb.addr("inbound").port());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(&target).await.unwrap();
        let client = s.local_addr().unwrap();
        // Nothing is written: Ebb closes without reading, which with nothing unread is a plain FIN, so
        // this read ends with a clean end of stream and no bytes.
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let read = read.expect("closed by Ebb, not left open");
        assert_eq!(
            read.expect("a clean close (FIN), not a reset"),
            0,
            "no answer: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(2), "closed at once: {:?}", started.elapsed());
        client
    });
    let refused = ebb.wait_log("Connection refused", Duration::from_secs(5));
    assert_eq!(refused["reason"], "original destination is Ebb itself", "{refused}");
    assert_eq!(refused["client.addr"], client.to_string(), "{refused}");
    // Never tracked as a connection: nothing was opened, nothing is listed.
    let out = ns.exec(&[env!("CARGO_BIN_EXE_ebb"), "status", "--json", "--admin", &ebb.addr("admin").to_string()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["connections"], serde_json::json!([]), "{v}");
    assert_eq!(v["status"]["counts"]["connections"], 0, "{v}");
}
