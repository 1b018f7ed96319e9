//! TLS termination: rustls (ring), TLS 1.2 and 1.3, ALPN h2 and http/1.1, and a certificate that
//! is reloaded without a restart when its files change.
//!
//! The server config resolves the certificate per handshake from an `ArcSwap`; a watcher task
//! polls the files' modification times and swaps in a new pair only if it loads and matches (a
//! bad new pair is refused with a log line and the old one is kept).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("proxy.tls: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the expected kind.
    #[error("proxy.tls: {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// A site's `ca_file` cannot be read or holds no usable CA certificate.
    #[error("{key}: {source}")]
    CaFile {
        /// `sites.primary.ca_file` or `sites.backup.ca_file`.
        key: String,
        /// What is wrong with the file.
        source: gsb_health::tls::CaFileError,
    },
    /// rustls refused the pair (unsupported key type, key does not match the certificate...).
    #[error("proxy.tls: {cert} / {key}: {source}")]
    Rustls {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain and private key and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_path_buf(),
            message: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            message: "no CERTIFICATE in the file".into(),
        });
    }
    let private = rustls_pemfile::private_key(&mut read(key)?)
        .map_err(|e| TlsError::Pem {
            path: key.to_path_buf(),
            message: format!("bad PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: key.to_path_buf(),
            message: "no PRIVATE KEY (PKCS#8, PKCS#1 or SEC1) in the file".into(),
        })?;
    CertifiedKey::from_der(certs, private, &provider()).map_err(|source| TlsError::Rustls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

/// The current certificate, swapped by the reload watcher, read at every handshake.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// `(cert, key)` file paths; a config reload may point them elsewhere.
    paths: ArcSwap<(PathBuf, PathBuf)>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Loads the pair once (an error here stops the start: fix the files).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let pair = load_pair(cert, key)?;
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(pair),
            paths: ArcSwap::from_pointee((cert.to_path_buf(), key.to_path_buf())),
        }))
    }

    /// The rustls server config: TLS 1.2+, ALPN h2 and http/1.1, this store as the resolver.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| {
                let paths = self.paths.load();
                TlsError::Rustls {
                    cert: paths.0.clone(),
                    key: paths.1.clone(),
                    source,
                }
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the files; on success the new pair serves the next handshakes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let paths = self.paths.load_full();
        let pair = load_pair(&paths.0, &paths.1)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// Serves `pair` (already loaded from `cert` and `key`) from now on and watches those files
    /// instead (a config reload that moved the files).
    pub fn replace(&self, cert: &Path, key: &Path, pair: CertifiedKey) {
        self.paths
            .store(Arc::new((cert.to_path_buf(), key.to_path_buf())));
        self.current.store(Arc::new(pair));
    }

    /// The certificate and key files watched now.
    pub fn paths(&self) -> (PathBuf, PathBuf) {
        let p = self.paths.load();
        (p.0.clone(), p.1.clone())
    }

    /// The DER of the certificate served now (for tests and logs).
    pub fn current_cert_der(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// Polls the files every `every` until `shutdown`; reloads when either changes.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut seen = self.stamps();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.stamps();
            if now == seen {
                continue;
            }
            // Remember the new stamps even on failure: a half-written pair is retried when the
            // files change again, not logged every second.
            seen = now;
            match self.reload() {
                Ok(()) => {
                    tracing::info!(cert = %self.paths.load().0.display(), "TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate refused; still serving the previous one")
                }
            }
        }
    }

    fn stamps(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        let paths = self.paths.load();
        [stamp(&paths.0), stamp(&paths.1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
        (cert, key, ck.cert.der().to_vec())
    }

    /// A real handshake over loopback: ALPN picks h2 when offered, TLS 1.2 clients are served.
    #[tokio::test]
    async fn handshake_negotiates_alpn_and_accepts_tls12() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key, der) = write_pair(dir.path(), "localhost");
        let store = CertStore::load(&cert, &key).expect("loads");
        let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config().expect("config"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let tls = acceptor.accept(tcp).await.expect("handshake");
                drop(tls);
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .expect("root");
        for (versions, alpn, want) in [
            (
                vec![&rustls::version::TLS13],
                vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                (b"h2".to_vec(), rustls::ProtocolVersion::TLSv1_3),
            ),
            (
                vec![&rustls::version::TLS12],
                vec![b"http/1.1".to_vec()],
                (b"http/1.1".to_vec(), rustls::ProtocolVersion::TLSv1_2),
            ),
        ] {
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&versions)
                .expect("versions")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = connector
                .connect(name, tcp)
                .await
                .expect("client handshake");
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(&want.0[..]));
            assert_eq!(conn.protocol_version(), Some(want.1));
        }
        server.await.expect("server");
    }

    #[test]
    fn loads_and_refuses_a_mismatched_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key, der) = write_pair(dir.path(), "a.example");
        let store = CertStore::load(&cert, &key).expect("loads");
        assert_eq!(store.current_cert_der(), der);
        store.server_config().expect("config");

        // A key from another pair does not match the certificate: refused, old pair kept.
        let other =
            rcgen::generate_simple_self_signed(vec!["b.example".to_owned()]).expect("rcgen");
        std::fs::write(&key, other.key_pair.serialize_pem()).expect("write key");
        assert!(matches!(store.reload(), Err(TlsError::Rustls { .. })));
        assert_eq!(store.current_cert_der(), der);

        std::fs::write(&cert, "not pem").expect("write");
        assert!(matches!(load_pair(&cert, &key), Err(TlsError::Pem { .. })));
        assert!(matches!(
            load_pair(&dir.path().join("missing.pem"), &key),
            Err(TlsError::Read { .. })
        ));
    }
}
