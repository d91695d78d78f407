//! HTTPS: the rustls server configuration from `server.tls.cert_path` and `key_path`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| pem_error("server.tls.cert_path", cert_path, error))?;
    if certs.is_empty() {
        bail!(
            "server.tls.cert_path {}: no PEM certificate in the file",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| match error {
        pem::Error::NoItemsFound => anyhow::anyhow!(
            "server.tls.key_path {}: no PEM private key in the file",
            key_path.display()
        ),
        other => pem_error("server.tls.key_path", key_path, other),
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

/// Names the setting and the file: "cannot read" for I/O errors, "invalid PEM" else.
fn pem_error(setting: &str, path: &Path, error: pem::Error) -> anyhow::Error {
    match error {
        pem::Error::Io(error) => {
            anyhow::Error::from(error).context(format!("cannot read {setting} {}", path.display()))
        }
        other => anyhow::anyhow!("{setting} {}: invalid PEM: {other}", path.display()),
    }
}
