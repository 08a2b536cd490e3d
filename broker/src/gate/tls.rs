//! The gate's TLS identity: the certificate chain and key the broker presents
//! to robots, read from PEM files at start so that a bad file stops the start
//! with its name rather than failing every handshake later.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsAcceptor;

/// A TLS server for `cert_file` (chain, leaf first) and `key_file`; clients are
/// not asked for certificates (they log in inside the encrypted link).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsAcceptor> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("tls file {}: {e}", path.display()))
    };
    let certs: Vec<pki_types::CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read(cert_file)?.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("tls certificate file {}: {e}", cert_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "tls certificate file {} has no certificate",
        cert_file.display()
    );
    let key = rustls_pemfile::private_key(&mut read(key_file)?.as_slice())
        .map_err(|e| anyhow::anyhow!("tls key file {}: {e}", key_file.display()))?
        .ok_or_else(|| anyhow::anyhow!("tls key file {} has no private key", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        anyhow::anyhow!(
            "tls key {} does not go with certificate {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
