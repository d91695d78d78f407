//! HTTPS: the rustls server configuration from `server.tls.cert_path` and `key_path`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rustls::ServerConfig;

use crate::config::TlsSettings;

/// `None` when TLS is not configured; an error naming the setting when a file is
/// missing, holds no PEM certificate or key, or the key does not fit the certificate.
pub fn server_config(settings: &TlsSettings) -> anyhow::Result<Option<ServerConfig>> {
    match settings.paths() {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => load(cert, key).map(Some),
        _ => bail!("server.tls.cert_path and server.tls.key_path must be set together"),
    }
}

fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<ServerConfig> {
    let certs = rustls_pemfile::certs(&mut open("server.tls.cert_path", cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert_path {}: invalid PEM", cert_path.display()))?;
    if certs.is_empty() {
        bail!(
            "server.tls.cert_path {}: no PEM certificate in the file",
            cert_path.display()
        );
    }
    let key = rustls_pemfile::private_key(&mut open("server.tls.key_path", key_path)?)
        .with_context(|| format!("server.tls.key_path {}: invalid PEM", key_path.display()))?
        .ok_or_else(|| {
            anyhow!(
                "server.tls.key_path {}: no PEM private key in the file",
                key_path.display()
            )
        })?;
    // The provider is named here rather than taken from the process default, so serving
    // TLS does not depend on `install_crypto_provider` having run first.
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("server.tls: no usable TLS protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "server.tls: the key in {} does not fit the certificate in {}",
                key_path.display(),
                cert_path.display()
            )
        })
}

fn open(setting: &str, path: &Path) -> anyhow::Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .with_context(|| format!("cannot read {setting} {}", path.display()))
}
