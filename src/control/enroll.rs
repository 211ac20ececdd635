//! The sidecar's identity from the control plane's CA (docs/architecture.md §15): a key made here, a
//! CSR proved by the node's bootstrap token, and a short-lived certificate, renewed at about 70 % of
//! its life (jittered, so a fleet started together does not renew together) by proving the
//! certificate it holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::IdentityConfig;
use crate::control::pb::{self, mesh_identity_client::MeshIdentityClient};
use crate::control::tls::Dial;
use crate::tls::identity::{Identity, Loaded};
use crate::upstream::retry::full_jitter;

/// Why no certificate came.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The plane could not be asked (down, unreachable, its certificate not the one expected):
    /// worth trying again.
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
    /// The plane said no (a bad token, a node it does not know): trying again changes nothing.
    #[error("the control plane refused a certificate: {0}")]
    Refused(String),
    /// The token file cannot be read.
    #[error("control_plane.token: cannot read {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    /// What came back does not make an identity.
    #[error("the issued certificate does not load: {0}")]
    Bad(String),
}

/// Where a plane-issued identity's parts came from, for error messages.
fn names() -> IdentityConfig {
    let from = PathBuf::from("(issued by the control plane)");
    IdentityConfig { cert: from.clone(), key: from.clone(), trust_bundle: from }
}

/// Reads the bootstrap token (trimmed: a file written by `echo` ends in a newline).
pub fn read_token(path: &Path) -> Result<String, EnrollError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| EnrollError::Token { path: path.to_owned(), source })
}

/// Asks the plane for a certificate for `node`, proving it with `token` (or, empty, with the
/// certificate `dial` presents).
pub async fn obtain(dial: &Dial, node: &str, token: &str) -> Result<Loaded, EnrollError> {
    let (key, csr) = crate::control::ca::key_and_csr(node).map_err(|e| EnrollError::Bad(e.to_string()))?;
    let channel = dial.channel().await.map_err(EnrollError::Unreachable)?;
    let req = pb::IssueCertificateRequest { node_id: node.to_string(), csr_pem: csr, token: token.to_string() };
    let res = MeshIdentityClient::new(channel).issue_certificate(req).await.map_err(|s| {
        use tonic::Code;
        match s.code() {
            Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition => {
                EnrollError::Refused(s.message().to_string())
            }
            _ => EnrollError::Unreachable(s.to_string()),
        }
    })?;
    let res = res.into_inner();
    crate::tls::identity::load_pem(
        &names(),
        res.certificate_chain_pem.as_bytes(),
        key.as_bytes(),
        res.trust_bundle_pem.as_bytes(),
    )
    .map_err(|e| EnrollError::Bad(e.to_string()))
}

/// The first certificate, before anything is served: tried until the plane answers (a sidecar
/// without its identity cannot serve mTLS); a refusal ends the start, naming the token file.
pub async fn first(
    dial: &Dial,
    node: &str,
    token: &Path,
    backoff: (Duration, Duration),
) -> Result<Loaded, EnrollError> {
    let mut attempt = 0u32;
    loop {
        let t = read_token(token)?;
        match obtain(dial, node, &t).await {
            Ok(l) => {
                tracing::info!(identity = %l.info.id, serial = %l.info.serial, expires_in_s = l.seconds_to_expiry(), "Identity issued by the control plane");
                return Ok(l);
            }
            Err(EnrollError::Unreachable(e)) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "No identity yet: the control plane is not reachable; trying again");
                }
                let wait = full_jitter(backoff.0, backoff.1, attempt, fastrand::f64()).max(Duration::from_millis(10));
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// When to renew a certificate that expires at `not_after` (Unix seconds), seen from `now`, just after
/// it came: at 65 to 75 % of the life it has left, `jitter` (0..1) choosing where. Counted from now,
/// not from `not_before`, which the CA backdates for clock skew.
pub fn renew_at(now: SystemTime, not_after: i64, jitter: f64) -> SystemTime {
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
    let left = end.duration_since(now).unwrap_or_default();
    now + left.mul_f64(0.65 + 0.10 * jitter.clamp(0.0, 1.0))
}

/// Renews `identity` for as long as the process runs: with the certificate it holds, and with the
/// token if the plane no longer takes that (a plane whose mesh file changed, or a new CA). A failed
/// renewal is tried again with backoff; the old certificate serves until it expires.
pub async fn renew(identity: Arc<Identity>, dial: Dial, node: String, token: PathBuf, backoff: (Duration, Duration)) {
    loop {
        let now = SystemTime::now();
        let at = renew_at(now, identity.current().info.not_after, fastrand::f64());
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let mut attempt = 0u32;
        loop {
            let result = match obtain(&dial, &node, "").await {
                Err(EnrollError::Refused(why)) => {
                    tracing::info!(reason = %why, "Renewal by certificate refused; trying the bootstrap token");
                    match read_token(&token) {
                        Ok(t) => obtain(&dial, &node, &t).await,
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            match result {
                Ok(loaded) => {
                    identity.install(loaded);
                    break;
                }
                Err(e) => {
                    let left = identity.current().seconds_to_expiry();
                    tracing::warn!(error = %e, expires_in_s = left, "Identity renewal failed; the current certificate serves meanwhile");
                    let wait =
                        full_jitter(backoff.0, backoff.1, attempt, fastrand::f64()).max(Duration::from_millis(10));
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_between_65_and_75_percent_of_the_life_left() {
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(secs(renew_at(now, 2000, 0.0)), 1650);
        assert_eq!(secs(renew_at(now, 2000, 0.5)), 1700);
        assert_eq!(secs(renew_at(now, 2000, 1.0)), 1750);
        // Already expired: renew at once.
        assert_eq!(secs(renew_at(now, 900, 0.5)), 1000);
    }
}
