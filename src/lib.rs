//! Outrider: a sidecar proxy. Outbound egress with an allowlist (explicit and transparent),
//! inbound routing to the local app, mesh mTLS with auto-issued identities.
//!
//! `main.rs` is thin; every piece lives here so that tests can drive it in-process.

pub mod access_log;
pub mod admin;
pub mod alloc;
pub mod body;
pub mod cache;
pub mod config;
pub mod episode;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod server;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod tls;
pub mod workers;
