//! TLS handshake load: `conns` loops each opening a new TLS 1.3 connection with a client certificate
//! (no session resumption: every connection is a full handshake), sending one HTTP/1.1 request with
//! `Connection: close` and reading the answer to its end; prints one JSON line and exits 0.
//!
//! ```text
//! cargo run --release --example tlsdial -- --addr 127.0.0.1:8443 --ca ca.crt --cert c.crt --key c.key
//!     [--alpn ebb-mesh/http/1.1] [--conns 8] [--duration 10s]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(name = "tlsdial", about = "New TLS connections per second; prints the report as one JSON line")]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    /// The CA the server's certificate chains to (its name is not checked: mesh certificates name a
    /// SPIFFE ID, not the address).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "ebb-mesh/http/1.1")]
    alpn: String,
    /// Connections at a time.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// Chain checked against the CA; the name is not (see `Args::ca`).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let algs = self.provider.signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algs)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let provider = ebb::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&args.ca)? {
        roots.add(ca?)?;
    }
    let chain = CertificateDer::pem_file_iter(&args.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly { roots: Arc::new(roots), provider }))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![args.alpn.clone().into_bytes()];
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    rt.block_on(async {
        let until = tokio::time::Instant::now() + args.duration;
        let mut loops = Vec::new();
        for _ in 0..args.conns {
            let (connector, done, failed, addr) = (connector.clone(), done.clone(), failed.clone(), args.addr);
            loops.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    let one = async {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        let mut tls = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await?;
                        tls.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n").await?;
                        let mut buf = Vec::new();
                        tls.read_to_end(&mut buf).await?;
                        if buf.starts_with(b"HTTP/1.1 200") {
                            Ok(())
                        } else {
                            Err(std::io::Error::other("not 200"))
                        }
                    };
                    match one.await {
                        Ok(()) => done.fetch_add(1, Relaxed),
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                }
            }));
        }
        for l in loops {
            let _ = l.await;
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Relaxed), failed.load(Relaxed));
    println!(r#"{{"completed":{done},"failed":{failed},"seconds":{secs:.3},"per_second":{:.1}}}"#, done as f64 / secs);
    Ok(())
}
