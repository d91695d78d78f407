//! The process-wide TLS crypto provider, shared by every rustls user: the HTTPS server,
//! the JWKS client, and anything else that opens TLS connections.

/// Installs ring as the process-wide rustls provider. The crates are built without a
/// default provider (so no second crypto library is compiled in), and reqwest panics
/// when a client is built before one is installed. Installing twice is harmless.
pub fn install_crypto_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}
