//! Probes: the I/O half of health checking. One HTTP(S) or TCP check of one component, bounded
//! by a timeout, reporting what it saw; no decision is taken here.

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// The most of a response body read to look for `body_contains` (health pages are small).
const MAX_BODY: usize = 64 * 1024;

/// How one component is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `GET <site url><path>` (`http://` or `https://`); healthy when the status is in `expect_status` and the body
    /// contains `body_contains` (when set).
    Http {
        /// Path on the site, starting with `/`.
        path: String,
        /// Accepted status codes, e.g. `200..=399`.
        expect_status: RangeInclusive<u16>,
        /// Text the body must contain.
        body_contains: Option<String>,
    },
    /// A TCP connection to `addr` (`host:port`) can be opened.
    Tcp {
        /// `host:port`.
        addr: String,
    },
}

/// One component of a site and how to probe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Component name (metrics, logs, status page).
    pub name: String,
    /// Whether the component counts towards the site being `down`.
    pub critical: bool,
    /// The check.
    pub kind: ProbeKind,
}

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the probe timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection could not be opened (refused, unreachable, DNS).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The TLS handshake failed: the site's certificate is not trusted (not signed by the
    /// configured CA or the system roots), does not name the URL's host, or has expired.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The site answered with a status outside the accepted range.
    #[error("status {0}")]
    Status(u16),
    /// The body did not contain the expected text.
    #[error("status {0}, body lacks {1:?}")]
    BodyMismatch(u16, String),
    /// The exchange broke after connecting (reset, protocol error, body error).
    #[error("request failed: {0}")]
    Request(String),
    /// The probe cannot be built (bad URL, unsupported scheme).
    #[error("cannot probe: {0}")]
    Invalid(String),
}

impl ProbeError {
    /// Whether a connection to the site was made before the failure (an unreachable site is down
    /// whatever its components say).
    pub fn connected(&self) -> bool {
        matches!(
            self,
            ProbeError::Status(_) | ProbeError::BodyMismatch(..) | ProbeError::Request(_)
        )
    }
}

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The component passed.
    pub ok: bool,
    /// A connection to the site was made (false: refused, unreachable or timed out).
    pub connected: bool,
    /// Wall time the probe took.
    pub duration: Duration,
    /// `"200"` or the failure, for logs and the status page.
    pub detail: String,
}

/// Runs probes over one pooled HTTP(S) client (connections to a site are reused between
/// rounds).
#[derive(Clone, Debug)]
pub struct Prober {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl Prober {
    /// A prober whose probes each fail after `timeout`; `https://` sites are verified against
    /// the system roots.
    pub fn new(timeout: Duration) -> Self {
        Prober::with_tls(timeout, crate::tls::with_roots(crate::tls::system_roots()))
    }

    /// A prober whose `https://` probes verify the site's certificate with `tls` (see
    /// [`crate::tls::client_config`]); SNI and the certificate name come from the URL's host.
    pub fn with_tls(timeout: Duration, tls: rustls::ClientConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        // The TLS layer above decides the scheme; the TCP connector must accept https URIs.
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(https);
        Prober { client, timeout }
    }

    /// The per-probe timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Probes one component of the site at `base_url`.
    pub async fn probe(&self, base_url: &str, spec: &ProbeSpec) -> ProbeOutcome {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.timeout, self.check(base_url, &spec.kind)).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(self.timeout)),
            };
        let duration = started.elapsed();
        match result {
            Ok(detail) => ProbeOutcome {
                ok: true,
                connected: true,
                duration,
                detail,
            },
            Err(e) => ProbeOutcome {
                ok: false,
                connected: e.connected(),
                duration,
                detail: e.to_string(),
            },
        }
    }

    /// Probes every component of one site concurrently; `result[i]` belongs to `specs[i]`.
    /// Bounded by the probe timeout, whatever the site does.
    pub async fn probe_site(&self, base_url: &str, specs: &[ProbeSpec]) -> Vec<ProbeOutcome> {
        futures_util::future::join_all(specs.iter().map(|s| self.probe(base_url, s))).await
    }

    async fn check(&self, base_url: &str, kind: &ProbeKind) -> Result<String, ProbeError> {
        match kind {
            ProbeKind::Tcp { addr } => {
                tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| ProbeError::Connect(e.to_string()))?;
                Ok("connected".into())
            }
            ProbeKind::Http {
                path,
                expect_status,
                body_contains,
            } => {
                let url = format!("{}{}", base_url.trim_end_matches('/'), path);
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| ProbeError::Invalid(format!("{url}: {e}")))?;
                if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
                    return Err(ProbeError::Invalid(format!(
                        "{url}: only http:// and https:// sites can be probed"
                    )));
                }
                let req = http::Request::get(uri)
                    .header(http::header::USER_AGENT, "gsb-health")
                    .body(Empty::new())
                    .map_err(|e| ProbeError::Invalid(e.to_string()))?;
                let resp = self.client.request(req).await.map_err(|e| {
                    if let Some(tls) = crate::tls::tls_failure(&e) {
                        ProbeError::Tls(tls)
                    } else if e.is_connect() {
                        ProbeError::Connect(error_chain(&e))
                    } else {
                        ProbeError::Request(error_chain(&e))
                    }
                })?;
                let status = resp.status().as_u16();
                // Always read the (small) body so the pooled connection can be reused.
                let body = Limited::new(resp.into_body(), MAX_BODY).collect().await;
                if !expect_status.contains(&status) {
                    return Err(ProbeError::Status(status));
                }
                if let Some(needle) = body_contains {
                    let body = body
                        .map_err(|e| ProbeError::Request(e.to_string()))?
                        .to_bytes();
                    if !String::from_utf8_lossy(&body).contains(needle.as_str()) {
                        return Err(ProbeError::BodyMismatch(status, needle.clone()));
                    }
                }
                Ok(status.to_string())
            }
        }
    }
}

/// The error and its sources on one line (hyper's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.1 server on port 0 answering every request with `status` and `body`, or
    /// never answering when `hang` is set.
    async fn server(
        status: u16,
        body: &'static str,
        hang: bool,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(answer(sock, status, body, hang));
            }
        });
        (url, task)
    }

    /// The same server over TLS with `cert` (signed for `localhost`); its URL uses `localhost`.
    async fn tls_server(
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> (String, tokio::task::JoinHandle<()>) {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(sock).await {
                        answer(tls, 200, "ok", false).await;
                    }
                });
            }
        });
        (url, task)
    }

    async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut sock: S,
        status: u16,
        body: &'static str,
        hang: bool,
    ) {
        let mut buf = vec![0u8; 4096];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) if hang => continue,
                Ok(_) => {
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// A CA named `ca_name` and a `localhost` certificate it signed: (CA store, leaf cert, key).
    fn ca_and_leaf(
        ca_name: &str,
    ) -> (
        rustls::RootCertStore,
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        (roots, leaf.der().clone(), key)
    }

    #[tokio::test]
    async fn https_probe_trusts_only_the_configured_ca() {
        let (roots, cert, key) = ca_and_leaf("gsb test CA");
        let (url, task) = tls_server(cert, key).await;
        let trusting = Prober::with_tls(Duration::from_secs(2), crate::tls::with_roots(roots));
        let ok = trusting
            .probe(&url, &http("/health", 200..=399, Some("ok")))
            .await;
        assert!(ok.ok && ok.connected, "{ok:?}");

        let (other_ca, _, _) = ca_and_leaf("another CA");
        let strict = Prober::with_tls(Duration::from_secs(2), crate::tls::with_roots(other_ca));
        let bad = strict.probe(&url, &http("/health", 200..=399, None)).await;
        assert!(!bad.ok && !bad.connected, "{bad:?}");
        assert!(
            bad.detail.starts_with("TLS handshake failed") && bad.detail.contains("UnknownIssuer"),
            "{bad:?}"
        );
        task.abort();
    }

    fn http(path: &str, expect: RangeInclusive<u16>, body: Option<&str>) -> ProbeSpec {
        ProbeSpec {
            name: "web".into(),
            critical: true,
            kind: ProbeKind::Http {
                path: path.into(),
                expect_status: expect,
                body_contains: body.map(Into::into),
            },
        }
    }

    #[tokio::test]
    async fn http_probe_checks_status_and_body() {
        let (url, task) = server(200, "status: OK", false).await;
        let p = Prober::new(Duration::from_secs(2));
        let ok = p.probe(&url, &http("/health", 200..=399, Some("OK"))).await;
        assert!(ok.ok && ok.connected, "{ok:?}");
        assert_eq!(ok.detail, "200");
        let bad_body = p
            .probe(&url, &http("/health", 200..=399, Some("READY")))
            .await;
        assert!(!bad_body.ok && bad_body.connected, "{bad_body:?}");
        let bad_status = p.probe(&url, &http("/health", 204..=204, None)).await;
        assert!(!bad_status.ok && bad_status.connected);
        assert_eq!(bad_status.detail, "status 200");
        task.abort();
    }

    #[tokio::test]
    async fn server_error_fails_but_counts_as_connected() {
        let (url, task) = server(503, "no", false).await;
        let out = Prober::new(Duration::from_secs(2))
            .probe(&url, &http("/", 200..=399, None))
            .await;
        assert!(!out.ok && out.connected);
        assert_eq!(out.detail, "status 503");
        task.abort();
    }

    #[tokio::test]
    async fn refused_connection_is_not_connected() {
        // Bind then drop: nothing listens on the port afterwards.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let p = Prober::new(Duration::from_secs(2));
        let out = p
            .probe(&format!("http://{addr}"), &http("/", 200..=399, None))
            .await;
        assert!(!out.ok && !out.connected, "{out:?}");
        let tcp = ProbeSpec {
            name: "db".into(),
            critical: true,
            kind: ProbeKind::Tcp {
                addr: addr.to_string(),
            },
        };
        let out = p.probe("http://unused", &tcp).await;
        assert!(!out.ok && !out.connected, "{out:?}");
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_on_a_listening_port() {
        let (url, task) = server(200, "", false).await;
        let addr = url.trim_start_matches("http://").to_string();
        let tcp = ProbeSpec {
            name: "db".into(),
            critical: true,
            kind: ProbeKind::Tcp { addr },
        };
        assert!(
            Prober::new(Duration::from_secs(2))
                .probe("http://unused", &tcp)
                .await
                .ok
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_hung_site_fails_at_the_timeout_without_delaying_the_other() {
        let (hung, t1) = server(200, "", true).await;
        let (fine, t2) = server(200, "ok", false).await;
        let p = Prober::new(Duration::from_millis(300));
        let specs = [http("/a", 200..=399, None), http("/b", 200..=399, None)];
        let started = Instant::now();
        let fine_done = async {
            let r = p.probe_site(&fine, &specs).await;
            (r, started.elapsed())
        };
        let (hung_res, (fine_res, fine_elapsed)) =
            tokio::join!(p.probe_site(&hung, &specs), fine_done);
        assert!(
            hung_res
                .iter()
                .all(|o| !o.ok && o.detail.starts_with("timed out")),
            "{hung_res:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bounded by the timeout"
        );
        assert!(fine_res.iter().all(|o| o.ok), "{fine_res:?}");
        assert!(
            fine_elapsed < Duration::from_millis(250),
            "healthy site answered in {fine_elapsed:?}"
        );
        t1.abort();
        t2.abort();
    }
}
