//! Mesh mTLS (docs/architecture.md §15): this workload's identity, how peers' identities are checked,
//! and the TLS that sidecars speak to each other.
//!
//! Every rustls config is built with [`provider`] passed explicitly: nothing depends on a process-wide
//! default provider, so a test or an embedding that installs another cannot change what Ebb does.

pub mod identity;
pub mod mesh;
pub mod verify;

use std::sync::Arc;

/// The one crypto provider of every TLS config Ebb builds: ring (a short C build, fast handshakes).
///
/// rustls marks ring's provider deprecated for lacking post-quantum key exchange (X25519MLKEM768),
/// which only aws-lc-rs offers; the mesh's peers are all Ebb, so both ends agree on X25519 and the
/// choice can change in one place (docs/architecture.md §15 has the measurement behind it).
///
/// Key exchange is X25519 first, then P-256: rustls 0.23.48 lists P-384 first for ring, and its
/// ECDH is the slowest of the three (three quarters of a handshake's CPU in a profile here).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::kx_group;
            let mut p = rustls::crypto::ring::default_provider();
            p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
            Arc::new(p)
        })
        .clone()
}
