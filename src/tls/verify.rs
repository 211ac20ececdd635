//! Checking a peer's certificate: chained to the trust bundle, and naming the one identity expected.
//!
//! A mesh identity is a SPIFFE ID in the certificate's URI SAN (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`),
//! not a DNS name, so rustls' own server-name check does not apply: the chain is verified with its
//! WebPKI routine and the identity compared here, exactly.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What a certificate says about itself, as far as the mesh cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE ID (the one `spiffe://` URI SAN).
    pub id: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Serial number, hex with colons.
    pub serial: String,
}

/// Why a certificate cannot stand for a mesh identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("not a DER X.509 certificate")]
    Malformed,
    #[error("no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("{0} spiffe:// URI SANs; a workload certificate has exactly one")]
    SeveralSpiffeIds(usize),
}

/// The identity, expiry and serial of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| CertError::Malformed)?;
    let ids: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(CertError::Malformed),
    };
    let id = match ids.len() {
        0 => return Err(CertError::NoSpiffeId),
        1 => ids.into_iter().next().unwrap_or_default(),
        n => return Err(CertError::SeveralSpiffeIds(n)),
    };
    let validity = cert.validity();
    Ok(CertInfo {
        id,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
    })
}

/// The subject of a DER certificate, for `/status` (empty when it does not parse).
pub fn subject(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der).map(|(_, c)| c.subject().to_string()).unwrap_or_default()
}

/// The subject common name of a DER certificate: the node id in a certificate the control plane's CA
/// issued (docs/architecture.md §15).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// The peer's certificate did not name the identity this connection was dialled for.
#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub got: String,
}

/// Verifies a mesh server: chained to the trust bundle, valid now, and its SPIFFE ID exactly
/// `expected`. The server name handed to rustls is ignored (Ebb dials addresses, not names).
#[derive(Debug)]
pub struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    expected: Arc<str>,
    algs: WebPkiSupportedAlgorithms,
}

impl ExpectIdentity {
    pub fn new(roots: Arc<RootCertStore>, expected: Arc<str>) -> Self {
        Self { roots, expected, algs: super::provider().signature_verification_algorithms }
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let info = cert_info(end_entity).map_err(other)?;
        if *info.id != *self.expected {
            return Err(other(WrongIdentity { expected: self.expected.to_string(), got: info.id }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Why a mesh handshake failed, as counted and as named in `x-ebb-error` (`upstream-tls-<cause>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCause {
    /// The peer's certificate names another identity.
    WrongIdentity,
    /// A certificate in the handshake is expired (or not yet valid).
    Expired,
    /// A certificate does not chain to the trust bundle.
    Untrusted,
    /// The client presented no certificate.
    NoClientCertificate,
    /// The peer refused this side's certificate (an alert after it was sent).
    Rejected,
    /// Anything else: not TLS, a protocol error, the connection closed mid-handshake.
    Failed,
}

impl TlsCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongIdentity => "wrong-identity",
            Self::Expired => "expired",
            Self::Untrusted => "untrusted",
            Self::NoClientCertificate => "no-client-certificate",
            Self::Rejected => "rejected-by-peer",
            Self::Failed => "handshake-failed",
        }
    }

    /// The cause of a failed handshake, from the I/O error tokio-rustls returned.
    pub fn of(e: &std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) else { return Self::Failed };
        use rustls::AlertDescription as A;
        match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::Untrusted,
                CertificateError::Other(o) if o.0.downcast_ref::<WrongIdentity>().is_some() => Self::WrongIdentity,
                _ => Self::Failed,
            },
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::AlertReceived(A::CertificateRequired) => Self::NoClientCertificate,
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::CertificateUnknown
                | A::UnknownCA
                | A::CertificateExpired
                | A::UnsupportedCertificate
                | A::AccessDenied,
            ) => Self::Rejected,
            _ => Self::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_workload_certificate_has_exactly_one_spiffe_id() {
        let uri = |u: &str| rcgen::SanType::URI(u.try_into().unwrap());
        let one = self_signed(vec![uri("spiffe://td/ns/a/sa/b"), uri("https://example.com/x")]);
        assert_eq!(cert_info(&one).unwrap().id, "spiffe://td/ns/a/sa/b");
        let none = self_signed(vec![rcgen::SanType::DnsName("web.example".try_into().unwrap())]);
        assert_eq!(cert_info(&none), Err(CertError::NoSpiffeId));
        let two = self_signed(vec![uri("spiffe://td/a"), uri("spiffe://td/b")]);
        assert_eq!(cert_info(&two), Err(CertError::SeveralSpiffeIds(2)));
        assert_eq!(cert_info(b"not a certificate"), Err(CertError::Malformed));
    }
}
