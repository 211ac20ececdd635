//! Certificates made in the test with rcgen: a CA, and workload certificates with a SPIFFE ID signed by
//! it, written as the PEM files Ebb's `identity` names. No key is ever checked in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A workload certificate for `id` with `serial` (one byte, shown as two hex digits), valid from
    /// an hour ago for `life`, or already expired.
    pub fn issue(&self, id: &str, serial: u8, life: Lifetime) -> Leaf {
        assert!(serial < 0x80, "a one-byte positive serial");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, id);
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from(vec![serial]));
        let now = time::OffsetDateTime::now_utc();
        match life {
            Lifetime::Valid(d) => {
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + time::Duration::try_from(d).unwrap();
            }
            Lifetime::Expired => {
                params.not_before = now - time::Duration::days(2);
                params.not_after = now - time::Duration::days(1);
            }
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

/// How long a certificate is valid.
#[derive(Clone, Copy)]
pub enum Lifetime {
    Valid(Duration),
    Expired,
}

pub const DAY: Lifetime = Lifetime::Valid(Duration::from_secs(86_400));

/// A workload certificate and its key.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

/// The three files of an identity, in a directory of their own.
pub struct IdentityFiles {
    pub dir: PathBuf,
}

impl IdentityFiles {
    pub fn write(dir: &Path, leaf: &Leaf, bundle: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let files = Self { dir: dir.to_owned() };
        files.replace(leaf, bundle);
        files
    }

    /// Replaces the files as rotation tools do: each written aside, then renamed over the old one.
    pub fn replace(&self, leaf: &Leaf, bundle: &str) {
        for (name, text) in [("tls.key", &*leaf.key), ("tls.crt", &*leaf.cert), ("ca.crt", bundle)] {
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        }
    }

    pub fn config(&self) -> ebb::config::IdentityConfig {
        ebb::config::IdentityConfig {
            cert: self.dir.join("tls.crt"),
            key: self.dir.join("tls.key"),
            trust_bundle: self.dir.join("ca.crt"),
        }
    }
}
