//! Caravan's Kubernetes operator: CRD types, the Agent, Share and TrustGrant
//! controllers and their pure building blocks (child objects, validation,
//! status, declared shares and grants), the client of the agents' admin
//! API, plus the plumbing (metrics, health, leader election) the binary
//! wires together.
#![forbid(unsafe_code)]

pub mod agent_api;
pub mod agentref;
pub mod children;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod declared;
pub mod grants;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod podspec;
pub mod shares;
pub mod sleep;
pub mod status;
pub mod validate;

/// Installs aws-lc-rs as the process-wide rustls crypto provider. kube 5
/// builds its TLS config from the process default; when two providers are
/// compiled in (ring from one crate, aws-lc-rs from another) rustls cannot
/// choose and the first API call panics. Call this first thing in `main`.
pub fn install_crypto_provider() {
    // An error only means a provider is installed already, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[doc(hidden)]
pub mod testutil;
