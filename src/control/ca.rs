//! The reference control plane's certificate authority: kept in a directory (made there on first
//! start), it signs sidecars' CSRs into short-lived workload certificates and issues the plane's own
//! serving certificate and the operator's (docs/architecture.md §15).
//!
//! A workload certificate carries the node's SPIFFE ID as its one URI SAN, and the node id as its
//! subject common name: the ID is what peers authorise, the common name is what binds a control stream
//! to one sidecar (many pods share a service account, hence an ID; each is one node).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// The plane's own SPIFFE ID under `trust_domain` (what sidecars expect its certificate to carry).
pub fn plane_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ebb/control-plane")
}

/// The operator's SPIFFE ID under `trust_domain` (allowed `MeshAdmin` unless `--operator` says else).
pub fn operator_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ebb/operator")
}

/// The shortest certificate life the CA issues: renewal needs room between 70 % and expiry.
pub const MIN_CERT_LIFE: Duration = Duration::from_secs(10);

/// How far back a new certificate's validity starts: a peer whose clock is a little behind must not
/// see a certificate from its future.
const BACKDATE: Duration = Duration::from_secs(300);

/// Why the CA could not be opened or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("--ca-dir {dir}: {what}: {source}")]
    Io { dir: PathBuf, what: String, source: std::io::Error },
    #[error("--ca-dir {0}: holds one of ca.crt and ca.key; give both (an existing CA) or neither (a new one)")]
    Half(PathBuf),
    #[error("--ca-dir {dir}: ca.crt and ca.key do not make a CA: {reason}")]
    Load { dir: PathBuf, reason: String },
    #[error("the certificate request does not parse or its signature is wrong: {0}")]
    Csr(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A certificate the CA signed.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    pub identity: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The mesh's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    trust_domain: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).field("dir", &self.dir).finish()
    }
}

/// Writes `contents` to `path` readable by the owner alone (a key must never be world-readable, not
/// even for the instant between create and chmod).
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A random positive serial of 16 bytes (RFC 5280 allows 20; unpredictable, so never reused).
fn serial() -> Result<SerialNumber, CaError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| CaError::Sign("no randomness".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from(bytes.to_vec()))
}

impl Ca {
    /// Opens the CA in `dir` (`ca.crt`, `ca.key`), or makes one there when neither file exists, with
    /// an operator certificate beside it (`operator.crt`, `operator.key`) for `ebb ctl`.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| CaError::Io { dir: dir.to_owned(), what, source }
        };
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("reading ca.crt"))?;
                let key_pem = std::fs::read_to_string(&key_path).map_err(io("reading ca.key"))?;
                let load = |reason: String| CaError::Load { dir: dir.to_owned(), reason };
                let key = KeyPair::from_pem(&key_pem).map_err(|e| load(format!("ca.key: {e}")))?;
                let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| load(format!("ca.crt: {e}")))?;
                Ok(Self { issuer, cert_pem, trust_domain: trust_domain.to_string(), dir: dir.to_owned() })
            }
            (false, false) => {
                std::fs::create_dir_all(dir).map_err(io("creating the directory"))?;
                let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
                let mut params =
                    CertificateParams::new(Vec::<String>::new()).map_err(|e| CaError::Sign(e.to_string()))?;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.distinguished_name.push(DnType::CommonName, format!("Ebb mesh CA for {trust_domain}"));
                params.key_usages =
                    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
                let now = SystemTime::now();
                params.not_before = offset(now - BACKDATE);
                params.not_after = offset(now + Duration::from_secs(10 * 365 * 24 * 3600));
                params.serial_number = Some(serial()?);
                let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
                write_private(&key_path, &key.serialize_pem()).map_err(io("writing ca.key"))?;
                std::fs::write(&cert_path, cert.pem()).map_err(io("writing ca.crt"))?;
                let ca = Self {
                    issuer: Issuer::new(params, key),
                    cert_pem: cert.pem(),
                    trust_domain: trust_domain.to_string(),
                    dir: dir.to_owned(),
                };
                let (op, op_key) = ca.issue_with_key(
                    &operator_id(trust_domain),
                    "operator",
                    Duration::from_secs(365 * 24 * 3600),
                    &[],
                )?;
                write_private(&dir.join("operator.key"), &op_key).map_err(io("writing operator.key"))?;
                std::fs::write(dir.join("operator.crt"), op.cert_pem).map_err(io("writing operator.crt"))?;
                tracing::info!(dir = %dir.display(), trust_domain, "Made a new mesh CA and an operator certificate");
                Ok(ca)
            }
            _ => Err(CaError::Half(dir.to_owned())),
        }
    }

    /// The CA certificate, PEM: the trust bundle every identity it issues chains to.
    pub fn bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// What every certificate this CA issues says: `identity` as the one URI SAN, `common_name` as
    /// the subject, `names` as DNS or IP SANs (for clients that check those), valid for `life`.
    fn params(
        identity: &str,
        common_name: &str,
        life: Duration,
        names: &[String],
    ) -> Result<(CertificateParams, SystemTime, SystemTime), CaError> {
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(sign)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        let uri = identity.try_into().map_err(sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into().map_err(sign)?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(serial()?);
        let now = SystemTime::now();
        let (from, until) = (now - BACKDATE, now + life);
        params.not_before = offset(from);
        params.not_after = offset(until);
        Ok((params, from, until))
    }

    /// Signs the public key of `csr_pem` (its signature checked; its names ignored) for `identity`
    /// and `node`, valid for `life`.
    pub fn sign_csr(&self, csr_pem: &str, identity: &str, node: &str, life: Duration) -> Result<Issued, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        let (params, not_before, not_after) = Self::params(identity, node, life, &[])?;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued { cert_pem: cert.pem(), identity: identity.to_string(), not_before, not_after })
    }

    /// A certificate and a new key made here (the plane's own, the operator's): `(issued, key PEM)`.
    pub fn issue_with_key(
        &self,
        identity: &str,
        common_name: &str,
        life: Duration,
        names: &[String],
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let (params, not_before, not_after) = Self::params(identity, common_name, life, names)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((
            Issued { cert_pem: cert.pem(), identity: identity.to_string(), not_before, not_after },
            key.serialize_pem(),
        ))
    }
}

/// A key made here and a CSR for it, PEM: `(key, csr)`. The sidecar's side: the key never leaves it.
pub fn key_and_csr(node: &str) -> Result<(String, String), CaError> {
    let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
    let key = KeyPair::generate().map_err(sign)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(sign)?;
    params.distinguished_name.push(DnType::CommonName, node);
    let csr = params.serialize_request(&key).map_err(sign)?;
    Ok((key.serialize_pem(), csr.pem().map_err(sign)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn a_csr_is_signed_for_the_mapped_identity_whatever_it_asked_for() {
        let dir = std::env::temp_dir().join(format!("ebb-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::open(&dir, "cluster.local").unwrap();
        // The key never travels: only the CSR does.
        let (_key, csr) = key_and_csr("web-0").unwrap();
        let issued =
            ca.sign_csr(&csr, "spiffe://cluster.local/ns/default/sa/web", "web-0", Duration::from_secs(3600)).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let info = crate::tls::verify::cert_info(&der).unwrap();
        assert_eq!(info.id, "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(crate::tls::verify::common_name(&der).as_deref(), Some("web-0"));
        // Opened again, the same CA: what it issued still chains.
        let again = Ca::open(&dir, "cluster.local").unwrap();
        assert_eq!(again.bundle_pem(), ca.bundle_pem());
        // A CSR whose signature was tampered with is refused (one base64 digit of its last line).
        let mut lines: Vec<String> = csr.lines().map(str::to_string).collect();
        let sig = lines.len() - 2;
        let flipped: String = lines[sig]
            .char_indices()
            .map(|(i, c)| {
                if i == 2 {
                    if c == 'A' {
                        'B'
                    } else {
                        'A'
                    }
                } else {
                    c
                }
            })
            .collect();
        lines[sig] = flipped;
        let bad = lines.join("\n");
        assert!(matches!(
            ca.sign_csr(&bad, "spiffe://cluster.local/x", "web-0", Duration::from_secs(60)),
            Err(CaError::Csr(_))
        ));
        // Half a CA is an error, not a silent new one.
        std::fs::remove_file(dir.join("ca.key")).unwrap();
        assert!(matches!(Ca::open(&dir, "cluster.local"), Err(CaError::Half(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
