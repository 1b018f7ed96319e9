//! Client TLS toward `https://` sites: which certificates are trusted (the system roots, or one
//! PEM CA file for a private CA) and the rustls client config built from that, shared by the
//! probes and the proxy's forwarder so both judge a site's certificate the same way.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CaFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// The crypto provider of every gsb TLS config (the listener uses ring too).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the CA certificates of a PEM file; an error says whether the file is unreadable, not
/// PEM, holds no certificate, or holds one rustls cannot use as a trust anchor.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, CaFileError> {
    let fail = |message: String| CaFileError {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(fail(
            "no CERTIFICATE in the file; expected the PEM CA certificate(s) that sign the site's certificate"
                .into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| fail(format!("certificate cannot be a trust anchor: {e}")))?;
    }
    Ok(roots)
}

/// The trust anchors of the operating system (`rustls-native-certs`). Certificates that cannot
/// be read or parsed are skipped with a warning: one bad file in `/etc/ssl/certs` must not stop
/// the proxy.
pub fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "loading system CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::warn!(added, ignored, "some system CA certificates cannot be used");
    }
    if roots.is_empty() {
        tracing::warn!("no system CA certificates found: https:// sites need a ca_file");
    }
    roots
}

/// The client config for a site: TLS 1.2 and 1.3 with ring, verified against `ca_file` when
/// given, else the system roots. ALPN is left to the connector (it sets h2/http/1.1).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, CaFileError> {
    let roots = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => system_roots(),
    };
    Ok(with_roots(roots))
}

/// A client config trusting exactly `roots`.
pub fn with_roots(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // ring implements both versions: this cannot fail with this provider.
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Whether the error, or one of its sources, is a TLS failure (a certificate not trusted, a
/// name mismatch, a failed handshake); its text if so.
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // tokio-rustls wraps the rustls error in an io::Error, and hyper-rustls wraps that in
        // another; `io::Error::source()` skips the wrapped error, so unwrap them by hand.
        let mut wrapped = err.downcast_ref::<std::io::Error>();
        while let Some(io) = wrapped {
            let Some(inner) = io.get_ref() else { break };
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
            wrapped = inner.downcast_ref::<std::io::Error>();
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_ca_file(&missing).unwrap_err();
        assert!(e.to_string().contains("cannot read it"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = load_ca_file(&empty).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_ca_file(&garbage).unwrap_err();
        assert!(e.to_string().contains("trust anchor"), "{e}");

        let good = dir.path().join("ca.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(load_ca_file(&good).unwrap().len(), 1);
        assert!(client_config(Some(&good)).is_ok());
    }
}
