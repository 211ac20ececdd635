//! This workload's mesh identity: certificate chain, key and trust bundle, read from files (the layout
//! cert-manager's CSI driver and SPIFFE helpers write) and read again whenever they change.
//!
//! A reload swaps the whole identity at once: handshakes from then on use the new one, connections
//! already up keep theirs. A new file that does not load (half written, wrong key, no SPIFFE ID) leaves
//! the old identity in place and is reported once per distinct failure (docs/architecture.md §15).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::mesh::{Alpn, MESH_ALPNS};
use super::verify::{cert_info, subject, CertError, CertInfo, ExpectIdentity};
use crate::config::IdentityConfig;

/// Why an identity could not be loaded; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity.{key}: cannot read {path}: {source}")]
    Read { key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("identity.{key}: {path} holds no PEM {what}")]
    Empty { key: &'static str, path: PathBuf, what: &'static str },
    #[error("identity.cert: {path}: the leaf certificate: {source}")]
    Leaf { path: PathBuf, source: CertError },
    #[error("identity.key: {path} does not belong to the certificate ({source})")]
    KeyMismatch { path: PathBuf, source: rustls::Error },
    #[error("identity.trust_bundle: {path}: {source}")]
    Bundle { path: PathBuf, source: rustls::Error },
    #[error("identity: cannot build the TLS configuration: {0}")]
    Config(String),
}

/// One loaded identity, with the TLS configurations made from it.
#[derive(Debug)]
pub struct Loaded {
    pub info: CertInfo,
    pub key: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    /// Subjects of the trust bundle's certificates, for `/status`.
    pub bundle_subjects: Vec<String>,
    /// The mesh server side: this certificate, a verified client certificate required, mesh ALPNs.
    pub server: Arc<ServerConfig>,
    /// Client configurations by the identity dialled and the protocol offered, made on first use:
    /// each keeps its own session cache, so reconnects to a peer resume instead of a full handshake.
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

/// The identity a client configuration dials, and the protocol it offers.
type ClientKey = (Arc<str>, Alpn);

impl Loaded {
    fn new(
        info: CertInfo,
        key: Arc<CertifiedKey>,
        roots: Arc<RootCertStore>,
        bundle_subjects: Vec<String>,
    ) -> Result<Self, IdentityError> {
        let provider = super::provider();
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| IdentityError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(Fixed(key.clone())));
        server.alpn_protocols = MESH_ALPNS.iter().map(|a| a.wire().to_vec()).collect();
        Ok(Self { info, key, roots, bundle_subjects, server: Arc::new(server), clients: Mutex::new(HashMap::new()) })
    }

    /// The client configuration for dialling `expected` and speaking `alpn` inside.
    pub fn client(&self, expected: &Arc<str>, alpn: Alpn) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut clients = match self.clients.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = clients.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let mut config = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectIdentity::new(self.roots.clone(), expected.clone())))
            .with_client_cert_resolver(Arc::new(Fixed(self.key.clone())));
        config.alpn_protocols = vec![alpn.wire().to_vec()];
        let config = Arc::new(config);
        clients.insert((expected.clone(), alpn), config.clone());
        Ok(config)
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn seconds_to_expiry(&self) -> i64 {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.info.not_after - now
    }
}

/// The one certificate this side presents, whoever asks.
#[derive(Debug)]
pub struct Fixed(pub Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read { key, path: path.to_owned(), source })
}

/// Loads an identity from PEM bytes: `cert` (leaf first, then intermediates), `key`, `bundle`.
/// `paths` name the files in errors.
pub fn load_pem(paths: &IdentityConfig, cert: &[u8], key: &[u8], bundle: &[u8]) -> Result<Loaded, IdentityError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert).filter_map(Result::ok).collect();
    let Some(leaf) = chain.first() else {
        return Err(IdentityError::Empty { key: "cert", path: paths.cert.clone(), what: "certificate" });
    };
    let info = cert_info(leaf).map_err(|source| IdentityError::Leaf { path: paths.cert.clone(), source })?;
    let key_der = PrivateKeyDer::from_pem_slice(key).map_err(|_| IdentityError::Empty {
        key: "key",
        path: paths.key.clone(),
        what: "private key",
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, &super::provider())
        .map_err(|source| IdentityError::KeyMismatch { path: paths.key.clone(), source })?;
    let mut roots = RootCertStore::empty();
    let mut subjects = Vec::new();
    for ca in CertificateDer::pem_slice_iter(bundle).filter_map(Result::ok) {
        subjects.push(subject(&ca));
        roots.add(ca).map_err(|source| IdentityError::Bundle { path: paths.trust_bundle.clone(), source })?;
    }
    if roots.is_empty() {
        return Err(IdentityError::Empty {
            key: "trust_bundle",
            path: paths.trust_bundle.clone(),
            what: "certificate",
        });
    }
    Loaded::new(info, Arc::new(certified), Arc::new(roots), subjects)
}

/// Loads the identity the config names.
pub fn load(paths: &IdentityConfig) -> Result<Loaded, IdentityError> {
    let cert = read("cert", &paths.cert)?;
    let key = read("key", &paths.key)?;
    let bundle = read("trust_bundle", &paths.trust_bundle)?;
    load_pem(paths, &cert, &key, &bundle)
}

/// What a file looked like: modified time, length, inode (a rename over it changes the inode even
/// when a coarse clock leaves the time alone).
type Stamp = Option<(SystemTime, u64, u64)>;

/// What the files looked like when last read: a change in any of them means read them all again.
fn stamp(paths: &IdentityConfig) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    [&paths.cert, &paths.key, &paths.trust_bundle]
        .iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino()))))
        .collect()
}

/// The current identity, swapped whole when its files change.
#[derive(Debug)]
pub struct Identity {
    /// The files it is read from; none for an identity the control plane's CA issued (renewed by
    /// `control::enroll`, installed with [`Identity::install`]).
    paths: Option<IdentityConfig>,
    current: ArcSwap<Loaded>,
    /// What the files looked like at the last attempt, loaded or not.
    seen: Mutex<Vec<Stamp>>,
    /// The last reload failure, so that it is said once, not at every poll.
    last_error: Mutex<Option<String>>,
}

/// How often the files are checked for a change: a `stat` of three files, cheap enough to do often,
/// and rotation tools replace certificates well before they expire.
pub const POLL: Duration = Duration::from_secs(1);

impl Identity {
    /// Loads the identity; an error here fails the start (there is no old identity to keep).
    pub fn open(paths: &IdentityConfig) -> Result<Arc<Self>, IdentityError> {
        let seen = stamp(paths);
        let loaded = load(paths)?;
        Ok(Arc::new(Self {
            paths: Some(paths.clone()),
            current: ArcSwap::from_pointee(loaded),
            seen: Mutex::new(seen),
            last_error: Mutex::new(None),
        }))
    }

    /// An identity the control plane issued, held in memory only (its key never touches a disk).
    pub fn issued(loaded: Loaded) -> Arc<Self> {
        Arc::new(Self {
            paths: None,
            current: ArcSwap::from_pointee(loaded),
            seen: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
        })
    }

    /// Puts a renewed identity in place: handshakes from now on use it.
    pub fn install(&self, loaded: Loaded) {
        self.swap(loaded, "Identity renewed");
    }

    /// Swaps in `loaded`, saying `what` happened with the old and new serials.
    fn swap(&self, loaded: Loaded, what: &'static str) {
        let old = self.current();
        tracing::info!(
            identity = %loaded.info.id,
            serial = %loaded.info.serial,
            old_serial = %old.info.serial,
            expires_in_s = loaded.seconds_to_expiry(),
            "{what}"
        );
        self.current.store(Arc::new(loaded));
    }

    /// The identity handshakes use now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Reads the files again if they changed since the last look. `Ok(true)`: a new identity is in
    /// place; `Err`: the files changed but do not load, and the old identity stays.
    pub fn reload_if_changed(&self) -> Result<bool, IdentityError> {
        let Some(paths) = &self.paths else { return Ok(false) };
        let now = stamp(paths);
        {
            let mut seen = match self.seen.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        self.swap(load(paths)?, "Identity reloaded");
        Ok(true)
    }

    /// Watches the files until the process ends, reloading on change; `seen` hears the identity in
    /// place after each look, and whether it is new (reloaded from files or installed by a renewal).
    /// A failure is logged once until the files change into something else.
    pub async fn watch(self: Arc<Self>, seen: impl Fn(&Loaded, bool) + Send + 'static) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = self.current();
        loop {
            tick.tick().await;
            let this = self.clone();
            // File reads block; a poll must not stall a worker that serves connections.
            let Ok(result) = tokio::task::spawn_blocking(move || this.reload_if_changed()).await else { continue };
            let reloaded = matches!(result, Ok(true));
            if let Err(e) = result {
                let text = e.to_string();
                let mut last = match self.last_error.lock() {
                    Ok(l) => l,
                    Err(p) => p.into_inner(),
                };
                if last.as_deref() != Some(&*text) {
                    tracing::warn!(error = %text, identity = %self.current().info.id, "New identity files do not load; keeping the current identity");
                    *last = Some(text);
                }
            } else if reloaded {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = None;
                }
            }
            let now = self.current();
            let new = !Arc::ptr_eq(&now, &before);
            seen(&now, new);
            before = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a workload certificate for `id` with a one-byte `serial`, as PEM (cert, key, CA).
    fn issue(id: &str, serial: u8) -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType, SerialNumber};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        leaf.serial_number = Some(SerialNumber::from(vec![serial]));
        (leaf.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem(), ca_pem)
    }

    fn write(dir: &Path, (cert, key, ca): &(String, String, String)) {
        std::fs::write(dir.join("tls.key"), key).unwrap();
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("ca.crt"), ca).unwrap();
    }

    #[test]
    fn a_bad_new_file_keeps_the_old_identity_and_a_good_one_replaces_it() {
        let dir = std::env::temp_dir().join(format!("ebb-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths =
            IdentityConfig { cert: dir.join("tls.crt"), key: dir.join("tls.key"), trust_bundle: dir.join("ca.crt") };
        let id = "spiffe://cluster.local/ns/default/sa/web";
        write(&dir, &issue(id, 1));
        let identity = Identity::open(&paths).unwrap();
        assert_eq!((identity.current().info.id.as_str(), identity.current().info.serial.as_str()), (id, "01"));
        assert!(!identity.reload_if_changed().unwrap(), "nothing changed");

        // Half written: the certificate is cut short. The old identity stays, and the error names the key.
        std::fs::write(&paths.cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
        let err = identity.reload_if_changed().unwrap_err().to_string();
        assert!(err.starts_with("identity.cert:"), "{err}");
        assert_eq!(identity.current().info.serial, "01");

        // A key that belongs to another certificate.
        let (cert2, _, ca2) = issue(id, 2);
        let (_, other_key, _) = issue(id, 3);
        write(&dir, &(cert2, other_key, ca2));
        let err = identity.reload_if_changed().unwrap_err().to_string();
        assert!(err.starts_with("identity.key:"), "{err}");
        assert_eq!(identity.current().info.serial, "01");

        write(&dir, &issue(id, 4));
        assert!(identity.reload_if_changed().unwrap());
        assert_eq!(identity.current().info.serial, "04");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
