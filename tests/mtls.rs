//! Mesh mTLS between two Ebbs in this process: a client Ebb whose cluster endpoint has an identity
//! dials the server Ebb over TLS 1.3; the server Ebb terminates it and serves the app. Certificates are
//! made here with rcgen; every socket is on loopback, port 0.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ebb::config::{AuthorizationRule, Direction, MtlsMode};
use http::{Request, StatusCode};
use http_body_util::Full;
use support::pki::{Ca, IdentityFiles, Leaf, Lifetime, DAY};
use support::process::tempdir::Dir;
use support::{base_config, client, eventually, listener, origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
/// The service address the client app dials: matched against the cluster, never dialled.
const VIP: &str = "127.0.0.1:9";
const WAIT: Duration = Duration::from_secs(5);

/// The server side: an inbound listener `in` in front of `target`, with `files` as its identity.
async fn server_ebb(
    files: &IdentityFiles,
    target: SocketAddr,
    tweak: impl FnOnce(&mut ebb::config::Config),
) -> ebb::app::Running {
    let mut cfg = base_config();
    let mut l = listener("in", target, Direction::Inbound);
    l.detect_timeout = Duration::from_millis(300);
    cfg.listeners.push(l);
    cfg.identity = Some(files.config());
    tweak(&mut cfg);
    cfg.validate().expect("valid server config");
    ebb::telemetry::init_logging(&cfg.log);
    ebb::app::start(cfg).await.expect("server Ebb starts")
}

/// The client side: an outbound listener `out` whose cluster sends to `endpoint`, which must prove
/// `expect`.
async fn client_ebb(files: &IdentityFiles, endpoint: SocketAddr, expect: &str) -> ebb::app::Running {
    let mut cfg = base_config();
    let mut l = listener("out", VIP.parse().unwrap(), Direction::Outbound);
    l.detect_timeout = Duration::from_millis(300);
    cfg.listeners.push(l);
    cfg.identity = Some(files.config());
    let mut c = support::one_endpoint_cluster("web", VIP.parse().unwrap(), endpoint, Some(expect));
    // A failed handshake is answered at once, not retried against the same endpoint.
    c.retry.num_retries = 0;
    cfg.clusters.push(c);
    cfg.validate().expect("valid client config");
    ebb::app::start(cfg).await.expect("client Ebb starts")
}

/// A CA, and the server's and the client's identity files signed by it.
struct Pki {
    ca: Ca,
    _dir: Dir,
    web: IdentityFiles,
    client: IdentityFiles,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::new("mesh CA");
        let dir = Dir::new();
        let web = IdentityFiles::write(&dir.0.join("web"), &ca.issue(WEB, 1, DAY), &ca.pem);
        let client = IdentityFiles::write(&dir.0.join("client"), &ca.issue(CLIENT, 20, DAY), &ca.pem);
        Self { ca, _dir: dir, web, client }
    }
}

/// One GET on a fresh HTTP/1.1 connection: status, `x-ebb-error`, body.
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let (mut tx, _task) = client::h1(addr).await;
    let req = Request::get(path).header("host", "web.test").body(Full::new(Bytes::new())).unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status();
    let cause = res.headers().get("x-ebb-error").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, cause, client::text(res).await)
}

async fn metrics(ebb: &ebb::app::Running) -> String {
    client::fetch(ebb.telemetry.unwrap(), "GET", "/metrics").await.1
}

async fn metric(ebb: &ebb::app::Running, series: &str) -> u64 {
    support::sample(&metrics(ebb).await, series)
}

/// The inbound connections the server Ebb lists with the identity their client proved.
fn peers(ebb: &ebb::app::Running) -> Vec<Option<String>> {
    ebb.track.snapshot().into_iter().map(|c| c.peer_identity).collect()
}

/// A rustls client of the test's own: the mesh ALPN `alpn`, `leaf` as its certificate (none: no
/// client certificate), trusting `ca`.
fn test_client(ca: &Ca, leaf: Option<&Leaf>, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(ebb::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(l) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(l.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    // The workload certificate names a SPIFFE ID, not a DNS name: the test checks the serial itself.
    config.dangerous().set_certificate_verifier(Arc::new(AnyServer(ebb::tls::provider())));
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Accepts any server certificate (the test reads it instead).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The serial of the certificate the server at `addr` presents to a new handshake.
async fn served_serial(addr: SocketAddr, ca: &Ca, leaf: &Leaf) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = test_client(ca, Some(leaf), b"ebb-mesh/http/1.1").connect(name, tcp).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    ebb::tls::verify::cert_info(&der).unwrap().serial
}

#[tokio::test]
async fn http1_http2_and_tcp_cross_the_mesh_over_mtls() {
    let pki = Pki::new();
    // HTTP/1.1: the server Ebb lists the connection under the client's proven identity.
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |_| {}).await;
    let client = client_ebb(&pki.client, server.addr("in").unwrap(), WEB).await;
    let out = client.addr("out").unwrap();
    assert_eq!(get(out, "/").await, (StatusCode::OK, String::new(), "ok".into()));
    assert_eq!(peers(&server), vec![Some(CLIENT.to_string())], "the server side knows who called");
    assert_eq!(metric(&client, r#"ebb_mtls_handshakes_total{direction="outbound",cause="ok"}"#).await, 1);
    assert_eq!(metric(&server, r#"ebb_mtls_handshakes_total{direction="inbound",cause="ok"}"#).await, 1);
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // HTTP/2 (h2c from the app, `ebb-mesh/h2` between the sidecars, h2c to an HTTP/2 app).
    let app2 = origin::http2("web2").await;
    let server2 = server_ebb(&pki.web, app2.addr, |_| {}).await;
    let client2 = client_ebb(&pki.client, server2.addr("in").unwrap(), WEB).await;
    let out2 = client2.addr("out").unwrap();
    let (mut tx, _t) = client::h2(out2).await;
    let res = tx.send_request(client::get_h2(out2, "/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(client::text(res).await, "ok");
    assert_eq!(
        server2.track.snapshot().iter().map(|c| (c.protocol, c.peer_identity.clone())).collect::<Vec<_>>(),
        vec![("http2", Some(CLIENT.to_string()))]
    );

    // Opaque TCP, with a half-close passing through both TLS hops.
    let echo = origin::tcp_echo().await;
    let server3 = server_ebb(&pki.web, echo, |_| {}).await;
    let client3 = client_ebb(&pki.client, server3.addr("in").unwrap(), WEB).await;
    let mut s = tokio::net::TcpStream::connect(client3.addr("out").unwrap()).await.unwrap();
    s.write_all(b"\x00\x01binary payload").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"\x00\x01binary payloadbye");
    assert_eq!(metric(&server3, r#"ebb_mtls_handshakes_total{direction="inbound",cause="ok"}"#).await, 1);
}

#[tokio::test]
async fn wrong_identity_untrusted_ca_expired_and_missing_client_certificates_are_refused_each_with_its_cause() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |_| {}).await;
    let in_addr = server.addr("in").unwrap();

    // The server proves WEB; the client expects someone else.
    let wrong = client_ebb(&pki.client, in_addr, "spiffe://cluster.local/ns/default/sa/db").await;
    let (status, cause, _) = get(wrong.addr("out").unwrap(), "/").await;
    assert_eq!((status, cause.as_str()), (StatusCode::BAD_GATEWAY, "upstream-tls-wrong-identity"));
    assert_eq!(
        metric(&wrong, r#"ebb_mtls_handshake_errors_total{direction="outbound",cause="wrong-identity"}"#).await,
        1
    );

    // The server's certificate comes from a CA the client does not trust.
    let other_ca = Ca::new("another CA");
    let rogue_dir = Dir::new();
    let rogue = IdentityFiles::write(&rogue_dir.0, &other_ca.issue(WEB, 7, DAY), &other_ca.pem);
    let rogue_server = server_ebb(&rogue, app.addr, |_| {}).await;
    let untrusting = client_ebb(&pki.client, rogue_server.addr("in").unwrap(), WEB).await;
    let (status, cause, _) = get(untrusting.addr("out").unwrap(), "/").await;
    assert_eq!((status, cause.as_str()), (StatusCode::BAD_GATEWAY, "upstream-tls-untrusted"));

    // The server's certificate has expired.
    let expired_dir = Dir::new();
    let expired = IdentityFiles::write(&expired_dir.0, &pki.ca.issue(WEB, 8, Lifetime::Expired), &pki.ca.pem);
    let expired_server = server_ebb(&expired, app.addr, |_| {}).await;
    let late = client_ebb(&pki.client, expired_server.addr("in").unwrap(), WEB).await;
    let (status, cause, _) = get(late.addr("out").unwrap(), "/").await;
    assert_eq!((status, cause.as_str()), (StatusCode::BAD_GATEWAY, "upstream-tls-expired"));

    // A client with no certificate: the server ends the handshake and counts why.
    let tcp = tokio::net::TcpStream::connect(in_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(in_addr.ip().into());
    let result = async {
        let mut tls = test_client(&pki.ca, None, b"ebb-mesh/http/1.1").connect(name, tcp).await?;
        // TLS 1.3: the client's side completes first; the server's refusal arrives with the next read.
        tls.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n").await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    assert!(result.is_err(), "served without a client certificate: {result:?}");
    let series = r#"ebb_mtls_handshake_errors_total{direction="inbound",cause="no-client-certificate"}"#;
    assert!(eventually(WAIT, async || metrics(&server).await.contains(&format!("{series} 1"))).await);
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the app");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_foreign_tls_while_permissive_serves_them() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let permissive = server_ebb(&pki.web, app.addr, |_| {}).await;
    assert_eq!(get(permissive.addr("in").unwrap(), "/").await.0, StatusCode::OK, "plaintext is served");

    let strict = server_ebb(&pki.web, app.addr, |c| c.listeners[0].mtls = MtlsMode::Strict).await;
    let in_addr = strict.addr("in").unwrap();
    let (mut tx, conn) = client::h1(in_addr).await;
    let req = Request::get("/").header("host", "web.test").body(Full::new(Bytes::new())).unwrap();
    assert!(tx.send_request(req).await.is_err(), "plaintext got an answer under strict");
    let _ = conn.await;
    assert_eq!(metric(&strict, r#"ebb_mtls_refused_total{listener="in",reason="plaintext"}"#).await, 1);

    // TLS that is not the mesh's (an `h2` ALPN) is refused too.
    let tcp = tokio::net::TcpStream::connect(in_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(in_addr.ip().into());
    let client = pki.ca.issue(CLIENT, 50, DAY);
    assert!(test_client(&pki.ca, Some(&client), b"h2").connect(name, tcp).await.is_err());
    assert_eq!(metric(&strict, r#"ebb_mtls_refused_total{listener="in",reason="not-mesh-tls"}"#).await, 1);

    // Mesh TLS is served.
    let meshed = client_ebb(&pki.client, in_addr, WEB).await;
    assert_eq!(get(meshed.addr("out").unwrap(), "/").await.0, StatusCode::OK);
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 2, "the plaintext and the mesh request");
}

#[tokio::test]
async fn the_apps_own_tls_passes_through_byte_for_byte() {
    let pki = Pki::new();
    let echo = origin::tcp_echo().await;
    let server = server_ebb(&pki.web, echo, |_| {}).await;
    // A real ClientHello for the app's own TLS (ALPN h2, an SNI), as bytes.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca.pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(ebb::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "api.example.com".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100);

    let mut s = tokio::net::TcpStream::connect(server.addr("in").unwrap()).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await.unwrap().unwrap();
    let mut want = hello.clone();
    want.extend_from_slice(b"bye");
    assert_eq!(got, want, "the app's TLS reached it untouched");
    let snap = server.track.snapshot();
    assert!(snap.iter().all(|c| c.peer_identity.is_none()), "not terminated: {snap:?}");
}

#[tokio::test]
async fn authorization_lets_only_listed_identities_call_a_port() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let port = app.addr.port();
    let allow = |ids: &[&str]| {
        let rule = AuthorizationRule { port, allow: ids.iter().map(|s| s.to_string()).collect() };
        move |c: &mut ebb::config::Config| c.inbound.authorization = vec![rule]
    };
    let closed = server_ebb(&pki.web, app.addr, allow(&["spiffe://cluster.local/ns/default/sa/admin"])).await;
    let denied = client_ebb(&pki.client, closed.addr("in").unwrap(), WEB).await;
    let (status, cause, _) = get(denied.addr("out").unwrap(), "/").await;
    assert_eq!((status, cause.as_str()), (StatusCode::FORBIDDEN, "unauthorized"));
    let (status, _, _) = get(closed.addr("in").unwrap(), "/").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "plaintext has no identity to be allowed with");
    let m = metrics(&closed).await;
    assert_eq!(
        support::sample(&m, &format!(r#"ebb_authorization_denied_total{{identity="{CLIENT}",port="{port}"}}"#)),
        1
    );
    assert_eq!(
        support::sample(&m, &format!(r#"ebb_authorization_denied_total{{identity="plaintext",port="{port}"}}"#)),
        1
    );
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    let open = server_ebb(&pki.web, app.addr, allow(&[CLIENT])).await;
    let allowed = client_ebb(&pki.client, open.addr("in").unwrap(), WEB).await;
    assert_eq!(get(allowed.addr("out").unwrap(), "/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn certificates_replaced_under_load_lose_nothing_and_new_handshakes_present_the_new_one() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |_| {}).await;
    let client = client_ebb(&pki.client, server.addr("in").unwrap(), WEB).await;
    let in_addr = server.addr("in").unwrap();
    let probe = pki.ca.issue(CLIENT, 60, DAY);
    assert_eq!(served_serial(in_addr, &pki.ca, &probe).await, "01");

    // Load: workers sending on fresh connections (each a new pair of handshakes downstream of the
    // client Ebb's pool), bounded in count; the files are replaced while it runs.
    let out = client.addr("out").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match get(out, "/").await {
                    (StatusCode::OK, _, _) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        }));
    }
    assert!(eventually(WAIT, async || app.hits.load(std::sync::atomic::Ordering::SeqCst) >= 20).await);
    pki.web.replace(&pki.ca.issue(WEB, 2, DAY), &pki.ca.pem);
    pki.client.replace(&pki.ca.issue(CLIENT, 21, DAY), &pki.ca.pem);
    let admin = server.admin.unwrap();
    assert!(
        eventually(WAIT, async || client::json(admin, "/status").await["identity"]["serial"] == "02").await,
        "the server Ebb took the new certificate"
    );
    let reloaded_at = app.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(eventually(WAIT, async || app.hits.load(std::sync::atomic::Ordering::SeqCst) >= reloaded_at + 20).await);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for w in support::joined(workers).await {
        let (ok, failed) = w;
        assert!(failed.is_empty(), "requests failed across the rotation: {failed:?}");
        total += ok;
    }
    assert!(total >= 40, "{total} requests");
    assert_eq!(served_serial(in_addr, &pki.ca, &probe).await, "02", "a new handshake presents the new certificate");
    assert_eq!(metric(&server, "ebb_identity_reloads_total").await, 1);
    assert!(metric(&server, "ebb_identity_expiry_seconds").await > 86_000);
}

#[tokio::test]
async fn identity_errors_name_the_key() {
    let dir = Dir::new();
    let mut cfg = base_config();
    cfg.identity = Some(ebb::config::IdentityConfig {
        cert: dir.0.join("missing.crt"),
        key: dir.0.join("missing.key"),
        trust_bundle: dir.0.join("ca.crt"),
    });
    let err = ebb::app::start(cfg).await.unwrap_err().to_string();
    assert!(err.starts_with("identity.cert: cannot read"), "{err}");

    let mut cfg = base_config();
    cfg.inbound.mtls = MtlsMode::Strict;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("inbound.mtls") && err.contains("needs `identity`"), "{err}");

    let mut cfg = base_config();
    cfg.clusters.push(support::one_endpoint_cluster(
        "web",
        VIP.parse().unwrap(),
        "127.0.0.1:1".parse().unwrap(),
        Some("web"),
    ));
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("clusters[0].endpoints[0].identity") && err.contains("not a SPIFFE ID"), "{err}");
}

#[tokio::test]
async fn a_drain_over_mtls_answers_the_request_in_flight_then_sends_close_notify() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |c| {
        c.drain.announce = Duration::from_secs(2);
        c.drain.timeout = Duration::from_secs(10);
    })
    .await;
    let in_addr = server.addr("in").unwrap();
    let tcp = tokio::net::TcpStream::connect(in_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(in_addr.ip().into());
    let leaf = pki.ca.issue(CLIENT, 30, DAY);
    let mut tls = test_client(&pki.ca, Some(&leaf), b"ebb-mesh/http/1.1").connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /hold HTTP/1.1\r\nhost: web.test\r\n\r\n").await.unwrap();
    // In flight at the app when the drain begins.
    app.arrivals(1, WAIT).await;
    server.drain.trigger_applied(ebb::drain::Trigger::new("test")).await.unwrap();
    app.release(1);
    // `read_to_end` succeeds only on a clean TLS end: tokio-rustls reports a close without
    // `close_notify` as an error (UnexpectedEof).
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("close_notify, then EOF");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with("held"), "{text}");
    assert_eq!(server.drain.report().connection_close_sent, 1);
}

#[tokio::test]
async fn grpc_unary_and_streaming_and_a_websocket_cross_the_mesh_over_mtls() {
    use support::grpc::{self, EchoRequest};
    let pki = Pki::new();
    // gRPC: h2 from the app, `ebb-mesh/h2` between the sidecars.
    let grpc_app = grpc::server().await;
    let server = server_ebb(&pki.web, grpc_app, |_| {}).await;
    let client = client_ebb(&pki.client, server.addr("in").unwrap(), WEB).await;
    let mut c = grpc::client(client.addr("out").unwrap()).await;
    let res = grpc::unary(&mut c, EchoRequest { message: "hi".into(), ..Default::default() }).await.unwrap();
    assert_eq!(res.into_inner().message, "hi");
    let mut s = grpc::stream(&mut c, EchoRequest { message: "s".into(), count: 20, delay_ms: 1 }).await.unwrap();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.message, "s");
        n += 1;
    }
    assert_eq!(n, 20, "every streamed message arrived");
    assert_eq!(peers(&server), vec![Some(CLIENT.to_string())]);

    // WebSocket: an HTTP/1.1 upgrade inside `ebb-mesh/http/1.1`, then bytes both ways.
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |_| {}).await;
    let client = client_ebb(&pki.client, server.addr("in").unwrap(), WEB).await;
    let (mut s, head) = client::ws_upgrade(client.addr("out").unwrap()).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"ping through two sidecars").await.unwrap();
    let mut echo = [0u8; 25];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"ping through two sidecars");
    assert_eq!(peers(&server), vec![Some(CLIENT.to_string())]);
}

/// `openssl s_client` against a strict server sidecar, sending one request: its output (stdout and
/// stderr together).
async fn s_client(addr: SocketAddr, ca: &std::path::Path, cert: Option<&IdentityFiles>) -> String {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-alpn", "ebb-mesh/http/1.1", "-tls1_3"]);
    cmd.arg("-CAfile").arg(ca);
    if let Some(files) = cert {
        let c = files.config();
        cmd.arg("-cert").arg(c.cert).arg("-key").arg(c.key);
    }
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("openssl (Debian package openssl) runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n").await.unwrap();
    // Kept open until the server has answered and closed: s_client ends at the server's close.
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("openssl ends").unwrap();
    drop(stdin);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn an_outside_tls_client_sees_tls13_and_the_mesh_alpn_and_needs_a_certificate() {
    let pki = Pki::new();
    let app = origin::http1("web").await;
    let server = server_ebb(&pki.web, app.addr, |c| c.listeners[0].mtls = MtlsMode::Strict).await;
    let in_addr = server.addr("in").unwrap();
    let ca = pki.web.config().trust_bundle;

    let with = s_client(in_addr, &ca, Some(&pki.client)).await;
    assert!(with.contains("New, TLSv1.3, Cipher is"), "{with}");
    assert!(with.contains("ALPN protocol: ebb-mesh/http/1.1"), "{with}");
    assert!(with.contains("HTTP/1.1 200 OK"), "{with}");

    let without = s_client(in_addr, &ca, None).await;
    assert!(!without.contains("HTTP/1.1 200"), "served without a client certificate: {without}");
    assert!(without.to_lowercase().contains("certificate required"), "{without}");
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
