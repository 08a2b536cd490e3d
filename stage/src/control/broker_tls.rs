//! TLS to the MQTT broker: a rustls client that trusts the CA in one PEM file
//! (the field's own, not the system's store: a cluster's broker certificate is
//! usually self-issued). The `lime` tools use it too.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, RootCertStore};

/// A transport for rumqttc that verifies the broker against `ca_file`.
pub fn transport(ca_file: &Path) -> anyhow::Result<rumqttc::Transport> {
    let config = client_config(ca_file)?;
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

fn client_config(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| anyhow::anyhow!("broker CA file {}: {e}", ca_file.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("broker CA file {}: {e}", ca_file.display()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    anyhow::ensure!(
        added > 0,
        "broker CA file {} holds no usable certificate",
        ca_file.display()
    );
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let e = client_config(&path).unwrap_err().to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no usable certificate"),
            "{e}"
        );
        let e = client_config(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
