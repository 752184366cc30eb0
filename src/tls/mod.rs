//! TLS: the mesh CA, workload identity, and the rustls client and server configs.
//!
//! - [`ca`]: the CA's files, tokens, issuing; `outrider ca init|token|serve` ([`ca::CaCommand`]).
//! - [`ca_server`]: the CA's HTTPS endpoint `POST /v1/sign`; [`ca_client`] calls it.
//! - [`identity`]: a workload's key and certificate, renewed in the background.
//! - [`mtls`]: rustls configs and verifiers for mesh mTLS, [`mtls::peer_spiffe_id`].
//! - [`spiffe`]: the [`spiffe::SpiffeId`] type and authorization patterns.

pub mod ca;
pub mod ca_client;
pub mod ca_server;
pub mod identity;
pub mod mtls;
pub mod spiffe;
pub mod token;

pub use ca::{run_ca, CaCommand};
pub use ca_client::FetchError;
pub use identity::{IdentityConfig, WorkloadIdentity};
pub use mtls::{client_config, peer_spiffe_id, server_config, RootInfo, TrustBundle, MESH_ALPN};
pub use spiffe::SpiffeId;

/// Installs aws-lc-rs as the process's rustls crypto provider. Idempotent; every TLS
/// constructor here calls it, and `main` does too.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first; rustls then uses that one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}
