//! The control plane's gRPC over TLS (docs/architecture.md §15): the plane's listener terminating TLS
//! and saying who each caller proved to be, and the client side every sidecar and `ebb ctl` dials with
//! (the plane's certificate checked against a trust bundle and the plane's SPIFFE ID; a client
//! certificate when the caller has one).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::verify::{cert_info, common_name, ExpectIdentity};
use crate::transport::stream::MaybeTls;

/// How long a caller has to finish its handshake: a connection that stalls in it holds only its own task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who called the plane, as far as the connection proves it.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE ID of a verified client certificate.
    pub identity: Option<String>,
    /// The subject common name of that certificate: the node id, in one the plane's CA issued.
    pub node: Option<String>,
}

/// The caller behind a gRPC request (the plane's listener attaches it to every request).
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or_default()
}

/// One accepted connection to the plane, plaintext or TLS, and who is behind it.
#[derive(Debug)]
pub struct PlaneConn {
    io: MaybeTls<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>,
    caller: Caller,
}

impl tonic::transport::server::Connected for PlaneConn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for PlaneConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlaneConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The certificate the plane presents, swapped whole when it renews its own.
#[derive(Debug)]
pub struct ServingCert(pub ArcSwap<CertifiedKey>);

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// A certified key from PEM.
pub fn certified(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err("no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| "no PEM private key".to_string())?;
    CertifiedKey::from_der(chain, key, &crate::tls::provider()).map_err(|e| e.to_string())
}

/// Trust anchors from PEM.
pub fn roots(bundle_pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle_pem).filter_map(Result::ok) {
        roots.add(ca).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate".into());
    }
    Ok(roots)
}

/// The plane's TLS: its certificate, and client certificates optional (a sidecar asking for its first
/// certificate has none) but verified against `roots` when presented.
pub fn server_config(cert: Arc<ServingCert>, roots: RootCertStore) -> Result<Arc<ServerConfig>, String> {
    let provider = crate::tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The plane's connections from `listener`: each handshake runs on its own task (one slow caller
/// never holds up the next), and a connection is handed over once it is done.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
) -> impl Stream<Item = std::io::Result<PlaneConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: the listener stays, the next accept may work.
                    tracing::warn!(error = %e, "Control plane accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let conn = match acceptor {
                    None => PlaneConn {
                        io: MaybeTls::Plain(tcp),
                        caller: Caller { remote: Some(remote), ..Default::default() },
                    },
                    Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                            let caller = Caller {
                                remote: Some(remote),
                                identity: leaf.and_then(|c| cert_info(c).ok()).map(|i| i.id),
                                node: leaf.and_then(|c| common_name(c)),
                            };
                            PlaneConn { io: MaybeTls::Tls(Box::new(tls)), caller }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %remote, error = %e, "Control plane TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How a client reaches the plane: its address, and TLS when the address is `https://`.
#[derive(Clone, Debug)]
pub struct Dial {
    /// `http://host:port` for tonic (TLS, when on, is done by the connector below).
    uri: String,
    pub connect_timeout: Duration,
    tls: Option<DialTls>,
}

/// The certificate a caller presents to the plane, read at each dial (it renews).
pub type ClientCert = Arc<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// The TLS side of [`Dial`].
#[derive(Clone)]
pub struct DialTls {
    roots: Arc<RootCertStore>,
    /// The SPIFFE ID the plane's certificate must carry.
    expected: Arc<str>,
    /// This caller's certificate, when it has one.
    client: Option<ClientCert>,
}

impl std::fmt::Debug for DialTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialTls").field("expected", &self.expected).field("client", &self.client.is_some()).finish()
    }
}

/// Why a plane address or its TLS settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}: must be a URL like http://10.0.0.2:15010 or https://plane:15010")]
    Address(String),
    #[error("{0}")]
    Tls(String),
}

impl Dial {
    /// A plaintext dial of `address` (`http://`), or TLS (`https://`) checked with `tls`.
    pub fn new(address: &str, connect_timeout: Duration, tls: Option<DialTls>) -> Result<Self, DialError> {
        let uri = match (address.strip_prefix("https://"), address.strip_prefix("http://")) {
            (Some(rest), _) => {
                if tls.is_none() {
                    return Err(DialError::Tls(format!("{address}: https needs a trust bundle for the plane")));
                }
                format!("http://{rest}")
            }
            (None, Some(_)) => address.to_string(),
            _ => return Err(DialError::Address(address.into())),
        };
        let tls = if address.starts_with("https://") { tls } else { None };
        Endpoint::from_shared(uri.clone()).map_err(|_| DialError::Address(address.into()))?;
        Ok(Self { uri, connect_timeout, tls })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A connected channel (HTTP/2 keep-alive on, so a dead plane is noticed on a quiet stream).
    pub async fn channel(&self) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| format!("bad address: {e}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let Some(tls) = &self.tls else {
            return endpoint.connect().await.map_err(|e| format!("connect: {e}"));
        };
        let config = tls.client_config().map_err(|e| format!("tls: {e}"))?;
        let connector = tower::service_fn(move |uri: http::Uri| {
            let config = config.clone();
            async move {
                let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let name =
                    ServerName::try_from(host).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        endpoint.connect_with_connector(connector).await.map_err(|e| {
            // tonic's own text is "transport error"; the cause (a certificate refused) is underneath.
            let mut text = format!("connect: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        })
    }
}

impl DialTls {
    /// The plane's certificate must chain to `bundle_pem` and carry `expected`; `client` gives the
    /// certificate to present, if any, at each dial.
    pub fn new(bundle_pem: &[u8], expected: &str, client: Option<ClientCert>) -> Result<Self, DialError> {
        let roots = roots(bundle_pem).map_err(DialError::Tls)?;
        Ok(Self { roots: Arc::new(roots), expected: Arc::from(expected), client })
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let builder = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectIdentity::new(self.roots.clone(), self.expected.clone())));
        let mut config = match self.client.as_ref().and_then(|f| f()) {
            Some(key) => builder.with_client_cert_resolver(Arc::new(crate::tls::identity::Fixed(key))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}
