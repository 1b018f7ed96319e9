//! End-to-end tests of the proxy's data path: the real `gsb proxy` binary in front of two test
//! upstreams, over loopback, listeners on free ports. Waits poll a condition with a deadline.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gsb_tests::upstream::{self, Upstream};
use gsb_tests::{free_port, gsb_bin, wait_until, Proc};
use tokio_tungstenite::tungstenite::Message;

const READY: Duration = Duration::from_secs(15);

/// A running `gsb proxy` with its config directory.
struct Gsb {
    proc: Proc,
    port: u16,
    admin: u16,
    tls_port: u16,
    dir: tempfile::TempDir,
}

/// Config pieces a test changes; the rest is small and fast.
struct Opts {
    /// Extra lines for `[proxy]`.
    proxy: String,
    /// The `[health]` timing lines.
    health: String,
    /// Extra lines for `[failover]`.
    failover: String,
    /// Write a TLS pair and listen with TLS too.
    tls: bool,
    /// Run with `--log-format json`.
    log_json: bool,
    /// A PEM CA written to `ca.pem` and set as both sites' `ca_file` (for `https://` sites).
    ca_pem: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            proxy: String::new(),
            health: "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2".into(),
            failover: String::new(),
            tls: false,
            log_json: false,
            ca_pem: None,
        }
    }
}

/// Writes a self-signed pair for `localhost` into `dir`; returns the certificate PEM.
fn write_cert(dir: &std::path::Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let pem = ck.cert.pem();
    // Key first, then cert: the watcher sees a consistent pair once both are written (a
    // mismatched intermediate state is refused and retried at the next change).
    std::fs::write(dir.join("key.pem.tmp"), ck.key_pair.serialize_pem()).expect("key");
    std::fs::write(dir.join("cert.pem.tmp"), &pem).expect("cert");
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).expect("rename key");
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).expect("rename cert");
    pem
}

impl Gsb {
    async fn start(primary: &Upstream, backup: &Upstream, opts: Opts) -> Gsb {
        Gsb::start_urls(&primary.url(), &backup.url(), opts).await
    }

    /// [`Gsb::start`] with sites given by URL.
    async fn start_urls(primary: &str, backup: &str, opts: Opts) -> Gsb {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, admin, tls_port) = (free_port(), free_port(), free_port());
        let tls = if opts.tls {
            write_cert(dir.path());
            format!("tls = {{ listen = \"127.0.0.1:{tls_port}\", cert = \"cert.pem\", key = \"key.pem\" }}")
        } else {
            String::new()
        };
        // A relative path: resolved beside the config file like the other files.
        let ca_file = match &opts.ca_pem {
            Some(pem) => {
                std::fs::write(dir.path().join("ca.pem"), pem).expect("write ca.pem");
                "ca_file = \"ca.pem\"".to_owned()
            }
            None => String::new(),
        };
        let config = format!(
            r#"
[proxy]
listen = "127.0.0.1:{port}"
header_read_timeout = "1s"
{tls}
{proxy}

[admin]
listen = "127.0.0.1:{admin}"

[sites.primary]
url = "{p}"
public_url = "https://primary.example"
{ca_file}
[sites.backup]
url = "{b}"
{ca_file}

[health]
{health}
[[health.components]]
name = "web"
path = "/health/web"

[failover]
failback_after = "1s"
min_dwell = "1s"
{failover}
"#,
            proxy = opts.proxy,
            health = opts.health,
            failover = opts.failover,
            p = primary,
            b = backup,
        );
        let path: PathBuf = dir.path().join("gsb.toml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = Command::new(gsb_bin());
        cmd.arg("proxy")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,gsb_proxy=debug");
        if opts.log_json {
            cmd.arg("--log-format").arg("json");
        }
        let proc = Proc::spawn("gsb-proxy", &mut cmd);
        let gsb = Gsb {
            proc,
            port,
            admin,
            tls_port,
            dir,
        };
        let client = reqwest::Client::new();
        let url = gsb.url("/detectbackup");
        wait_until(READY, "the proxy answers detectbackup", || {
            let (client, url) = (client.clone(), url.clone());
            async move { matches!(client.get(url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
        gsb
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    async fn detect(&self) -> String {
        match reqwest::get(self.url("/detectbackup")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// One raw HTTP/1.1 exchange (`Connection: close`): status line + headers, and body.
fn raw_request(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    (head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_are_rewritten_and_detectbackup_is_answered_by_the_proxy() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;

    let request =
        "GET /echo/a?b=1 HTTP/1.1\r\nHost: meet.example\r\nX-Forwarded-For: 192.0.2.7\r\n\
         Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic eA==\r\nTE: trailers\r\nX-Kept: yes\r\n\r\n";
    let port = gsb.port;
    let (head, body) = tokio::task::spawn_blocking(move || raw_request(port, request))
        .await
        .expect("join");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-upstream: primary"),
        "{head}"
    );
    assert!(
        !gsb.proc.output().contains("gsb::access"),
        "the request log is off by default"
    );
    let body = body.trim_start_matches(|c: char| c.is_ascii_hexdigit() || c == '\r' || c == '\n');
    let json_end = body.rfind('}').expect("json body");
    let v: serde_json::Value = serde_json::from_str(&body[..=json_end]).expect("echo json");
    let h = &v["headers"];
    assert_eq!(v["path"], "/echo/a?b=1");
    assert_eq!(h["host"][0], "meet.example", "Host is kept");
    assert_eq!(h["x-forwarded-for"][0], "192.0.2.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "meet.example");
    assert_eq!(h["x-kept"][0], "yes");
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(h.get(gone).is_none(), "{gone} must not reach the site: {h}");
    }

    for path in [
        "/detectbackup.php",
        "/primary/detectbackup.php",
        "/detectbackup",
    ] {
        let r = reqwest::get(gsb.url(path)).await.expect("detectbackup");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert!(
            r.headers().get("x-upstream").is_none(),
            "answered by the proxy, not a site"
        );
        assert_eq!(r.text().await.expect("body"), "Primary");
    }
    assert_eq!(
        primary.requests_to("/detectbackup.php") + primary.requests_to("/detectbackup"),
        0
    );

    let metrics = gsb.metrics().await;
    assert!(
        metrics.contains(r#"gsb_requests_total{code="200",site="primary"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("gsb_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways_intact() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    const N: usize = 8 * 1024 * 1024;
    let data = upstream::pattern(N);
    let c = client();

    // Upload, streamed in 64 KiB chunks (no Content-Length: chunked through the proxy).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let v: serde_json::Value = c
        .post(gsb.url("/echo"))
        .body(body)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("json");
    assert_eq!(v["body_bytes"], N as u64);
    assert_eq!(v["body_fnv"], upstream::fnv1a(&data));

    // Download.
    let got = c
        .get(gsb.url(&format!("/bytes?n={N}")))
        .send()
        .await
        .expect("download")
        .bytes()
        .await
        .expect("body");
    assert_eq!(got.len(), N);
    assert!(got[..] == data[..], "downloaded bytes differ");

    // Both at once: the site streams the upload back while it arrives.
    let got = c
        .post(gsb.url("/mirror"))
        .body(data.clone())
        .send()
        .await
        .expect("mirror")
        .bytes()
        .await
        .expect("body");
    assert!(got[..] == data[..], "mirrored bytes differ");

    // A streamed answer arrives chunk by chunk, not buffered until the end.
    let started = Instant::now();
    let mut r = c
        .get(gsb.url("/stream?chunks=3&delay_ms=700"))
        .send()
        .await
        .expect("stream");
    let first = r.chunk().await.expect("chunk").expect("a first chunk");
    assert_eq!(&first[..], b"chunk 0\n");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "first chunk took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_is_served() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let h2: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: hyper::Uri = gsb.url("/echo/h2").parse().expect("uri");
    let resp = h2.get(uri).await.expect("h2 request");
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.headers()["x-upstream"], "primary");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["version"], "HTTP/1.1", "sites are spoken to in HTTP/1.1");
    assert_eq!(
        v["headers"]["host"][0],
        format!("127.0.0.1:{}", gsb.port),
        ":authority becomes Host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_is_tunnelled_and_cut_after_the_drain_timeout() {
    let (primary, backup) = upstream::start_pair().await;
    let opts = Opts {
        failover: "drain_timeout = \"2s\"".into(),
        ..Opts::default()
    };
    let gsb = Gsb::start(&primary, &backup, opts).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gsb.port))
        .await
        .expect("ws");
    ws.send(Message::text("hello")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("in time")
        .expect("msg")
        .expect("ok");
    assert_eq!(echo.into_text().expect("text"), "hello");

    // The primary fails its health check: traffic moves; the tunnel on the primary keeps working
    // during the drain window, then is closed.
    primary.set_component("web", 503);
    wait_until(
        Duration::from_secs(10),
        "failover to the backup",
        || async { gsb.detect().await == "Backup" },
    )
    .await;
    let moved = Instant::now();
    ws.send(Message::text("still there"))
        .await
        .expect("send while draining");
    let echo = tokio::time::timeout(Duration::from_secs(1), ws.next())
        .await
        .expect("in time")
        .expect("msg")
        .expect("ok");
    assert_eq!(echo.into_text().expect("text"), "still there");
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "the tunnel must be closed after the drain timeout"
    );
    assert!(
        moved.elapsed() >= Duration::from_millis(1000),
        "closed too early: {:?}",
        moved.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_serves_and_picks_up_a_new_certificate() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(
        &primary,
        &backup,
        Opts {
            tls: true,
            ..Opts::default()
        },
    )
    .await;
    let first_pem = std::fs::read_to_string(gsb.dir.path().join("cert.pem")).expect("cert");
    let trusting = |pem: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem"))
            .build()
            .expect("client")
    };
    let url = format!("https://localhost:{}/echo", gsb.tls_port);
    let r = trusting(&first_pem).get(&url).send().await.expect("https");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "https");

    let second_pem = write_cert(gsb.dir.path());
    let second = trusting(&second_pem);
    wait_until(
        Duration::from_secs(10),
        "the new certificate is served",
        || {
            let (c, url) = (second.clone(), url.clone());
            async move { matches!(c.get(url).send().await, Ok(r) if r.status() == 200) }
        },
    )
    .await;
    // A fresh client trusting only the old certificate is now refused.
    assert!(trusting(&first_pem).get(&url).send().await.is_err());

    // A broken pair is refused and the current one kept.
    std::fs::write(gsb.dir.path().join("cert.pem"), "garbage").expect("write");
    wait_until(Duration::from_secs(5), "the refusal is logged", || async {
        gsb.proc.output().contains("new TLS certificate refused")
    })
    .await;
    let r = trusting(&second_pem)
        .get(&url)
        .send()
        .await
        .expect("still served with the last good pair");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_is_retried_on_the_backup_when_the_primary_refuses_connections() {
    let (primary, backup) = upstream::start_pair().await;
    // Slow probes and a high fall count: the health checker does not move traffic during the test,
    // so the request path meets a dead active site.
    let opts = Opts {
        health: "interval = \"30s\"\ntimeout = \"1s\"\nrise = 1\nfall = 5".into(),
        proxy: "request_log = true".into(),
        log_json: true,
        ..Opts::default()
    };
    let gsb = Gsb::start(&primary, &backup, opts).await;
    primary.stop().await;

    let c = client();
    let r = c.get(gsb.url("/echo/retry")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "backup");
    assert_eq!(
        gsb.detect().await,
        "Primary",
        "the route itself did not move"
    );

    // A POST with a body that could not connect is retried too: nothing reached the primary.
    let v: serde_json::Value = c
        .post(gsb.url("/echo/post"))
        .body("payload")
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(v["upstream"], "backup");
    assert_eq!(v["body_bytes"], 7);

    let metrics = gsb.metrics().await;
    assert!(
        metrics.contains(r#"gsb_retries_total{from="primary",to="backup"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"gsb_upstream_errors_total{kind="connect",site="primary"}"#),
        "{metrics}"
    );

    // request_log = true with --log-format json: one machine-readable line per request.
    let access = |path: &'static str| {
        let log = gsb.proc.output();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "gsb::access" && v["path"] == path)
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(5), "the request log line", || async {
        access("/echo/post").len() == 1
    })
    .await;
    let line = &access("/echo/post")[0];
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["status"], 200);
    assert_eq!(line["site"], "backup");
    assert_eq!(line["retried"], true);
    assert!(line["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    assert_eq!(access("/echo/retry").len(), 1, "one line per request");
    assert!(
        !access("/detectbackup").is_empty(),
        "local answers are logged too"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_is_not_retried_after_it_reached_the_site_but_get_is() {
    let (primary, backup) = upstream::start_pair().await;
    let opts = Opts {
        proxy: "upstream_timeout = \"500ms\"".into(),
        ..Opts::default()
    };
    let gsb = Gsb::start(&primary, &backup, opts).await;
    let c = client();

    let r = c
        .post(gsb.url("/slow?ms=3000"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 504);
    assert_eq!(primary.requests_to("/slow"), 1);
    assert_eq!(
        backup.requests_to("/slow"),
        0,
        "a POST the primary may have processed is not sent again"
    );

    let r = c.get(gsb.url("/slow?ms=3000")).send().await.expect("get");
    assert_eq!(r.status(), 503, "both sites timed out");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        backup.requests_to("/slow"),
        1,
        "an idempotent GET is retried once on the backup"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_waiting_on_a_site_that_goes_down_is_answered_by_the_backup() {
    // A black-holed primary accepts nothing and answers nothing: GETs already sent to it would
    // wait out `upstream_timeout`. When traffic moves because it is down, they move too.
    let (primary, backup) = upstream::start_pair().await;
    let opts = Opts {
        proxy: "upstream_timeout = \"30s\"".into(),
        ..Opts::default()
    };
    let gsb = Gsb::start(&primary, &backup, opts).await;
    let c = client();
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), gsb.url("/slow?ms=30000&only=primary"));
        async move {
            let started = std::time::Instant::now();
            let r = c.get(url).send().await.expect("get");
            let site = r.headers()["x-upstream"].to_str().unwrap().to_owned();
            (r.status(), site, r.text().await.unwrap(), started.elapsed())
        }
    });
    gsb_tests::wait_until(
        Duration::from_secs(10),
        "the GET reached the primary",
        || async { primary.requests_to("/slow") == 1 },
    )
    .await;
    primary.set_component("web", 503);
    let (status, site, body, took) = waiting.await.expect("client task");
    assert_eq!(
        (status.as_u16(), site.as_str(), body.as_str()),
        (200, "backup", "slow done")
    );
    assert!(
        took < Duration::from_secs(10),
        "answered {took:?} after it was sent: it waited on the dead site instead of moving"
    );
    assert_eq!(gsb.detect().await, "Backup");
    assert!(
        gsb.metrics().await.contains("kind=\"moved\""),
        "the move is counted in gsb_upstream_errors_total"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_at_the_header_timeout() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    let cut_after = |first_bytes: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let started = Instant::now();
            s.write_all(first_bytes).expect("write");
            let mut buf = [0u8; 1024];
            // Keep trickling bytes: the limit is on the whole head, not between bytes.
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                }
            }
        })
    };
    let half_head = cut_after(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("join");
    let nothing = cut_after(b"").await.expect("join");
    for (what, took) in [("half a request head", half_head), ("no bytes", nothing)] {
        assert!(
            took >= Duration::from_millis(800),
            "{what}: cut too early ({took:?})"
        );
        assert!(
            took < Duration::from_secs(5),
            "{what}: not cut at the 1s header timeout ({took:?})"
        );
    }
    // The proxy still serves others.
    assert_eq!(
        reqwest::get(gsb.url("/x")).await.expect("get").status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_mode_answers_307_to_the_active_site() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(
        &primary,
        &backup,
        Opts {
            proxy: "mode = \"redirect\"".into(),
            ..Opts::default()
        },
    )
    .await;
    let r = client()
        .get(gsb.url("/meet/join?id=42"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"],
        "https://primary.example/meet/join?id=42"
    );

    primary.set_component("web", 503);
    wait_until(
        Duration::from_secs(10),
        "failover to the backup",
        || async { gsb.detect().await == "Backup" },
    )
    .await;
    let r = client()
        .get(gsb.url("/meet/join?id=42"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"],
        format!("{}/meet/join?id=42", backup.url()),
        "no public_url: the url"
    );
    assert_eq!(
        primary.requests() + backup.requests(),
        0,
        "redirect mode forwards nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_0() {
    let (primary, backup) = upstream::start_pair().await;
    let mut gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let url = gsb.url("/slow?ms=1500");
    let slow = tokio::spawn(async move { client().get(url).send().await?.text().await });
    wait_until(
        Duration::from_secs(5),
        "the slow request reached the site",
        || async { primary.requests_to("/slow") == 1 },
    )
    .await;
    let port = gsb.port;
    let status = tokio::task::spawn_blocking(move || gsb.proc.terminate())
        .await
        .expect("join");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(slow.await.expect("join").expect("answer"), "slow done");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "not listening after exit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn both_sites_dead_answers_503_with_retry_after() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    primary.stop().await;
    backup.stop().await;
    let c = client();
    let check = || async {
        let r = c.get(gsb.url("/echo")).send().await.expect("get");
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let body = r.text().await.expect("body");
        assert!(body.contains("no site can serve"), "{body}");
    };
    // Before the health checker notices (connect fails on both), and after (none available).
    check().await;
    wait_until(
        Duration::from_secs(10),
        "both sites are seen down",
        || async {
            let m = gsb.metrics().await;
            m.contains(r#"gsb_site_state{site="primary",state="down"} 1"#)
                && m.contains(r#"gsb_site_state{site="backup",state="down"} 1"#)
        },
    )
    .await;
    check().await;
}

/// The proxy keeps its connections to a site between requests; a site that closes them (here:
/// restarted) must cost no request, even with no other site to retry on.
#[tokio::test(flavor = "multi_thread")]
async fn kept_site_connections_closed_by_the_site_cost_no_request() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    backup.stop().await;
    wait_until(
        Duration::from_secs(10),
        "the backup is seen down",
        || async {
            let m = gsb.metrics().await;
            m.contains(r#"gsb_site_state{site="backup",state="down"} 1"#)
        },
    )
    .await;
    let c = client();
    for round in 0..3 {
        for i in 0..3 {
            let r = c
                .get(gsb.url(&format!("/echo/kept{round}-{i}")))
                .send()
                .await
                .expect("get");
            assert_eq!(r.status(), 200, "round {round}, request {i}");
            assert_eq!(r.headers()["x-upstream"], "primary");
        }
        // Closes every connection the proxy keeps to it.
        primary.restart().await;
    }
    let metrics = gsb.metrics().await;
    assert!(
        !metrics.contains(r#"gsb_upstream_errors_total{kind="protocol",site="primary"}"#),
        "{metrics}"
    );
}

/// A request for `path` with `n` extra headers of `size` bytes of value each.
fn request_with_headers(path: &str, n: usize, size: usize) -> String {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: meet.example\r\nConnection: close\r\n");
    for i in 0..n {
        r.push_str(&format!("X-Fill-{i}: {}\r\n", "v".repeat(size)));
    }
    r.push_str("\r\n");
    r
}

/// Sends `request` on a fresh connection; the status line's code.
async fn status_of(port: u16, request: String) -> u16 {
    let (head, _) = tokio::task::spawn_blocking(move || raw_request(port, &request))
        .await
        .expect("join");
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_or_too_many_request_headers_get_431_and_never_reach_the_site() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    // Defaults: 32 KiB of head, 100 headers.
    for (what, path, n, size, want) in [
        ("one 100 KB header", "/echo/huge", 1, 100_000, 431),
        ("150 small headers", "/echo/many", 150, 8, 431),
        ("20 KB of headers", "/echo/fits", 20, 1000, 200),
        ("90 small headers", "/echo/fits-count", 90, 8, 200),
    ] {
        let got = status_of(port, request_with_headers(path, n, size)).await;
        assert_eq!(got, want, "{what}");
        let reached = primary.requests_to(path) + backup.requests_to(path);
        assert_eq!(
            reached,
            u64::from(want == 200),
            "{what}: forwarded {reached} times"
        );
    }
    // The proxy still serves others.
    assert_eq!(
        reqwest::get(gsb.url("/x")).await.expect("get").status(),
        200
    );

    // Configured lower: both limits apply, and HTTP/2 clients get 431 too.
    let gsb = Gsb::start(
        &primary,
        &backup,
        Opts {
            proxy: "max_header_bytes = 4096\nmax_headers = 20".into(),
            ..Opts::default()
        },
    )
    .await;
    let port = gsb.port;
    for (what, path, n, size, want) in [
        ("8 KB of headers", "/echo/big8k", 8, 1000, 431),
        ("30 headers", "/echo/thirty", 30, 8, 431),
        ("2 KB in 10 headers", "/echo/ok", 10, 200, 200),
    ] {
        let got = status_of(port, request_with_headers(path, n, size)).await;
        assert_eq!(got, want, "{what} (max_header_bytes 4096, max_headers 20)");
        let reached = primary.requests_to(path) + backup.requests_to(path);
        assert_eq!(
            reached,
            u64::from(want == 200),
            "{what}: forwarded {reached} times"
        );
    }
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for (what, path, n, size, want) in [
        ("h2: 30 headers", "/echo/h2-thirty", 30, 8, 431),
        ("h2: 8 KB of headers", "/echo/h2-big", 8, 1000, 431),
        ("h2: 10 headers", "/echo/h2-ok", 10, 8, 200),
    ] {
        let mut req = hyper::Request::get(gsb.url(path));
        for i in 0..n {
            req = req.header(format!("x-fill-{i}"), "v".repeat(size));
        }
        let req = req.body(http_body_util::Empty::new()).expect("request");
        let resp = h2.request(req).await.expect("h2 request");
        assert_eq!(resp.version(), hyper::Version::HTTP_2, "{what}");
        assert_eq!(resp.status().as_u16(), want, "{what}");
        let reached = primary.requests_to(path) + backup.requests_to(path);
        assert_eq!(
            reached,
            u64::from(want == 200),
            "{what}: forwarded {reached} times"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keep_alive_connection_serves_requests_after_idling_and_pipelined_ones() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    let text = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut text = String::new();
        // Reads until `n` answers (each echo body names its path once) have arrived in all.
        let mut read_answers = |s: &mut TcpStream, n: usize| {
            let mut tmp = [0u8; 4096];
            while text.matches("\"path\"").count() < n {
                let k = s.read(&mut tmp).expect("read");
                assert!(k > 0, "closed by the proxy after: {text}");
                text.push_str(&String::from_utf8_lossy(&tmp[..k]));
            }
        };
        for i in 0..3 {
            s.write_all(format!("GET /echo/seq{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .expect("write");
            read_answers(&mut s, i + 1);
            // Idle between requests: the connection is parked, not closed.
            std::thread::sleep(Duration::from_millis(300));
        }
        // Two requests in one write (pipelined), then one sent in two halves.
        s.write_all(
            b"GET /echo/p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/p2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("write");
        read_answers(&mut s, 5);
        s.write_all(b"GET /echo/half HTTP/1.1\r\nHo")
            .expect("write");
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"st: x\r\n\r\n").expect("write");
        read_answers(&mut s, 6);
        text
    })
    .await
    .expect("join");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 6, "{text}");
    for path in [
        "/echo/seq0",
        "/echo/seq1",
        "/echo/seq2",
        "/echo/p1",
        "/echo/p2",
        "/echo/half",
    ] {
        assert_eq!(primary.requests_to(path), 1, "{path} forwarded once");
    }
}

/// Throughput and latency through the proxy vs. straight to the site, with `wrk` (ignored: a
/// measurement, not a check). Run:
/// `cargo test -p gsb-tests --test proxy_forwarding -- --ignored --nocapture measure_with_wrk`
/// (set `GSB_BIN=target/release/gsb` for release figures).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_with_wrk() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    for (what, url) in [
        ("direct", format!("{}/x", primary.url())),
        ("proxied", gsb.url("/x")),
    ] {
        let out = tokio::task::spawn_blocking(move || {
            Command::new("wrk")
                .args(["-t2", "-c32", "-d5s", "--latency", &url])
                .output()
        })
        .await
        .expect("join")
        .expect("wrk is installed");
        println!("---- {what} ----\n{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// A CA named `name`, and a `localhost` certificate it signed: (CA PEM, leaf PEM, leaf key PEM).
fn ca_and_site_cert(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("leaf cert");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// `GET /status` on the admin listener.
async fn status(gsb: &Gsb) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{}/status", gsb.admin))
        .await
        .expect("status")
        .json()
        .await
        .expect("status json")
}

/// The `/status` entry of `site`.
fn site_view<'a>(status: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    status["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|v| v["site"] == site))
        .unwrap_or_else(|| panic!("{site} in /status: {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn https_sites_are_verified_against_their_ca_file() {
    let (ca_pem, cert, key) = ca_and_site_cert("gsb test CA");
    let primary = upstream::start_tls("primary", &cert, &key).await;
    // The backup's certificate is signed by a CA the proxy was not told to trust.
    let (rogue_ca_pem, rogue_cert, rogue_key) = ca_and_site_cert("rogue CA");
    let backup = upstream::start_tls("backup", &rogue_cert, &rogue_key).await;
    assert!(primary.url().starts_with("https://localhost:"));
    let gsb = Gsb::start(
        &primary,
        &backup,
        Opts {
            ca_pem: Some(ca_pem.clone()),
            ..Opts::default()
        },
    )
    .await;

    // Forwarded over TLS: ALPN picked h2 toward the site; the client's Host header is kept.
    let r = client().get(gsb.url("/echo")).send().await.expect("echo");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "primary");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["version"], "HTTP/2.0", "{v}");
    assert_eq!(v["headers"]["host"][0], format!("127.0.0.1:{}", gsb.port));
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "http");

    // A WebSocket to an https site goes over HTTP/1.1 (an h2 connection cannot upgrade).
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gsb.port))
        .await
        .expect("ws through the proxy to the https site");
    ws.send(Message::text("over tls")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("in time")
        .expect("msg")
        .expect("ok");
    assert_eq!(echo.into_text().expect("text"), "over tls");
    drop(ws);

    // Probes: the primary is healthy over TLS; the backup is down, and /status says why.
    let mut last = serde_json::Value::Null;
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            last = status(&gsb).await;
            let (p, b) = (site_view(&last, "primary"), site_view(&last, "backup"));
            if p["verdict"] == "healthy" && b["verdict"] == "down" && b["reachable"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "primary healthy, backup down and unreachable: {last}"
    );
    let b = site_view(&last, "backup");
    let probe = b["components"][0]["last"].as_str().unwrap_or_default();
    assert!(
        probe.starts_with("TLS handshake failed") && probe.contains("UnknownIssuer"),
        "the backup's probe must say its certificate is not trusted: {b}"
    );

    // With the primary gone, the untrusted backup is not served: no request reaches it.
    primary.stop().await;
    wait_until(
        Duration::from_secs(10),
        "the proxy answers without a site",
        || async {
            let r = client().get(gsb.url("/echo")).send().await.expect("answer");
            r.status() == 502 || r.status() == 503
        },
    )
    .await;
    for _ in 0..5 {
        let r = client().get(gsb.url("/echo")).send().await.expect("answer");
        assert!(
            r.status() == 502 || r.status() == 503,
            "the untrusted backup must not serve: {}",
            r.status()
        );
        assert!(r.headers().get("x-upstream").is_none());
    }
    assert_eq!(
        backup.requests(),
        0,
        "nothing forwarded to the untrusted site"
    );

    // The operator trusts the backup's CA too (same ca_file path, new content) and reloads:
    // its probes and forwarding pick it up, and traffic moves to it.
    std::fs::write(
        gsb.dir.path().join("ca.pem"),
        format!("{ca_pem}{rogue_ca_pem}"),
    )
    .expect("rewrite ca.pem");
    let pid = nix::unistd::Pid::from_raw(gsb.proc.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_until(
        Duration::from_secs(10),
        "the backup serves after the reload",
        || async {
            match client().get(gsb.url("/echo")).send().await {
                Ok(r) => r.headers().get("x-upstream").is_some_and(|v| v == "backup"),
                Err(_) => false,
            }
        },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "traffic moved to the now trusted backup",
        || async { gsb.detect().await == "Backup" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_ca_file_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gsb.toml");
    std::fs::write(dir.path().join("ca.pem"), "no certificate here\n").expect("ca");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [sites.primary]\nurl = \"https://localhost:1\"\nca_file = \"ca.pem\"\n\
             [sites.backup]\nurl = \"https://localhost:2\"\n",
            free_port(),
            free_port()
        ),
    )
    .expect("config");
    let out = Command::new(gsb_bin())
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .expect("run gsb proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("sites.primary.ca_file") && stderr.contains("no CERTIFICATE"),
        "{stderr}"
    );
}

/// A raw HTTP/1.1 site for the fast path's failure cases, answering `raw <path>` with
/// keep-alive. On each connection, a request for `/stale...` after the first is read and then
/// the connection is closed without an answer (a kept connection the site dropped just as the
/// proxy reused it); `/cut` gets a head announcing 1000 bytes, 10 of them, and a close (a site
/// killed mid-answer); `/badchunk` a chunked head whose first chunk size is not hex, in the
/// same write, and a close; `/silent` a head announcing 100000 bytes, 10 of them, and then
/// nothing for 30 s with the connection open (a site hung mid-answer). `/health/...` is
/// always answered. Returns its URL and the count of
/// `/stale` requests it read.
async fn raw_site() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stale = std::sync::Arc::new(AtomicU64::new(0));
    let seen = stale.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0;
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut tmp = [0u8; 4096];
                        match tcp.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    if path.starts_with("/stale") {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if served > 0 {
                            return;
                        }
                    }
                    if path == "/cut" {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                            .await;
                        return;
                    }
                    if path == "/silent" {
                        let _ = tcp
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789",
                            )
                            .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    if path == "/badchunk" {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n")
                            .await;
                        return;
                    }
                    if !path.starts_with("/health") {
                        served += 1;
                    }
                    let body = format!("raw {path}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, stale)
}

/// Reads one HTTP/1.1 answer (Content-Length or chunked body) from `s`; `leftover` keeps bytes
/// of the next one. Returns the head and the decoded body (none for an answer to HEAD).
fn read_answer(s: &mut TcpStream, leftover: &mut Vec<u8>, head_req: bool) -> (String, Vec<u8>) {
    let fill = |buf: &mut Vec<u8>, s: &mut TcpStream| {
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).expect("read");
        assert!(
            n > 0,
            "closed mid-answer after {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    };
    let end = loop {
        if let Some(i) = leftover.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(leftover, s);
    };
    let head = String::from_utf8_lossy(&leftover[..end]).to_lowercase();
    leftover.drain(..end);
    let mut body = Vec::new();
    if head_req {
        return (head, body);
    }
    if head.contains("transfer-encoding: chunked") {
        loop {
            let line = loop {
                if let Some(i) = leftover.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(leftover, s);
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&leftover[..line]).trim(), 16)
                .expect("chunk size");
            while leftover.len() < line + 2 + size + 2 {
                fill(leftover, s);
            }
            body.extend_from_slice(&leftover[line + 2..line + 2 + size]);
            leftover.drain(..line + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while leftover.len() < len {
            fill(leftover, s);
        }
        body = leftover.drain(..len).collect();
    }
    (head, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn fast_path_keeps_one_connection_for_bodies_and_chunked_answers() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut left = Vec::new();
        let mut out = Vec::new();
        for i in 0..4usize {
            let body = vec![b'a' + i as u8; 1000 * (i + 1)];
            let head = format!(
                "POST /echo/body{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).expect("head");
            s.write_all(&body).expect("body");
            out.push(read_answer(&mut s, &mut left, false));
        }
        s.write_all(b"GET /stream?chunks=3&delay_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("stream");
        out.push(read_answer(&mut s, &mut left, false));
        // The same connection still serves, and HEAD gets no body.
        s.write_all(b"HEAD /echo/head HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("head and get");
        let (head, body) = read_answer(&mut s, &mut left, true);
        assert!(head.starts_with("http/1.1 200") && body.is_empty(), "{head}");
        out.push(read_answer(&mut s, &mut left, false));
        out
    })
    .await
    .expect("join");
    for (i, (head, body)) in answers.iter().take(4).enumerate() {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let v: serde_json::Value = serde_json::from_slice(body).expect("echo json");
        assert_eq!(v["body_bytes"], 1000 * (i + 1), "{v}");
        assert_eq!(v["headers"]["x-forwarded-proto"][0], "http", "{v}");
        assert_eq!(v["headers"]["x-forwarded-for"][0], "127.0.0.1", "{v}");
    }
    let (head, body) = &answers[4];
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(body, b"chunk 0\nchunk 1\nchunk 2\n");
    let (head, _) = &answers[5];
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(primary.requests_to("/echo/after"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_fast_path_does_not_take_is_served_by_hyper_and_smuggling_is_refused() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    // A chunked request body, an HTTP/1.0 client, Expect: 100-continue.
    let (head, body) = raw_request(
        port,
        "POST /echo/te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"body_bytes\":5"), "{body}");
    let (head, body) = raw_request(port, "GET /echo/ten HTTP/1.0\r\nHost: x\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(body.contains("/echo/ten"), "{body}");
    let (head, body) = raw_request(
        port,
        "PUT /echo/expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    // hyper's `100 Continue` first, then the answer.
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    assert!(
        body.contains("200 OK") && body.contains("\"body_bytes\":2"),
        "{body}"
    );
    // Two different lengths: refused.
    let got = status_of(
        port,
        "POST /echo/two-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(),
    )
    .await;
    assert_eq!(got, 400);
    assert_eq!(primary.requests_to("/echo/two-cl"), 0);
    // Length and chunked: the chunked body counts, nothing is smuggled behind it.
    let (head, _) = tokio::task::spawn_blocking(move || {
        raw_request(
            port,
            "POST /echo/cl-te HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
    })
    .await
    .expect("join");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    assert_eq!(
        primary.requests_to("/echo/smuggled"),
        0,
        "smuggled request reached the site"
    );
    // An upgrade still goes through hyper (the WebSocket test covers the tunnel).
    let (head, _) = raw_request(
        port,
        "GET /echo/up HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fast_path_retries_a_stale_site_connection_and_survives_a_site_cut_mid_answer() {
    let (url, stale) = raw_site().await;
    let backup = upstream::start("backup").await;
    let primary = upstream::start("unused").await;
    let gsb = Gsb::start_urls(&url, &backup.url(), Opts::default()).await;
    drop(primary);
    let port = gsb.port;
    let c = client();
    // The first answer leaves a kept connection; the site closes it on the next request
    // without answering: a GET goes once more on a new connection to the same site.
    for i in 0..3 {
        let r = c
            .get(gsb.url(&format!("/stale{i}")))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.expect("body"), format!("raw /stale{i}"));
    }
    assert!(
        stale.load(std::sync::atomic::Ordering::SeqCst) >= 4,
        "some GET met a stale connection"
    );
    assert_eq!(
        backup.requests(),
        0,
        "retried on the same site, not the backup"
    );
    // Killed mid-answer: the client sees a short answer and a closed connection, quickly.
    let (got, body) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut out = Vec::new();
        let got = s.read_to_end(&mut out);
        (got.is_ok(), out)
    })
    .await
    .expect("join");
    assert!(got, "closed, not hung");
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0123456789"), "{text}");
    // A malformed chunked body that came with the head: nothing has reached the client yet,
    // so it is a failed answer, not the site's 200 and a cut: a GET goes to the other site,
    // a POST gets a 502 from the proxy.
    let r = c.get(gsb.url("/badchunk")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(backup.requests(), 1, "the GET was answered by the backup");
    let r = c.post(gsb.url("/badchunk")).send().await.expect("post");
    assert_eq!(r.status(), 502);
    assert_eq!(backup.requests(), 1, "the POST was not retried");
    // The proxy is fine.
    let r = c.get(gsb.url("/after-cut")).send().await.expect("get");
    assert_eq!(r.text().await.expect("body"), "raw /after-cut");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_whose_site_goes_silent_mid_body_is_cut_after_the_upstream_timeout() {
    let (url, _) = raw_site().await;
    let backup = upstream::start("backup").await;
    let opts = Opts {
        proxy: "upstream_timeout = \"1s\"".into(),
        ..Opts::default()
    };
    let gsb = Gsb::start_urls(&url, &backup.url(), opts).await;
    let port = gsb.port;
    // A GET takes the fast path; a chunked POST goes to hyper. Both cut the answer.
    for request in [
        "GET /silent HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /silent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let (got, body, took) = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let started = std::time::Instant::now();
            s.write_all(request.as_bytes()).expect("write");
            let mut out = Vec::new();
            let got = s.read_to_end(&mut out);
            (got.map_err(|e| e.kind()), out, started.elapsed())
        })
        .await
        .expect("join");
        let text = String::from_utf8_lossy(&body);
        assert!(got.is_ok(), "closed by the proxy, not left hanging: {got:?} after {text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("0123456789"), "the short answer, then the close: {text}");
        assert!(took >= Duration::from_millis(900), "cut after the timeout, not before: {took:?}");
    }
    // The proxy serves on.
    let r = client().get(gsb.url("/after")).send().await.expect("get");
    assert_eq!(r.text().await.expect("body"), "raw /after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_head_gets_its_own_header_timeout_after_a_slow_answer() {
    let (primary, backup) = upstream::start_pair().await;
    let gsb = Gsb::start(&primary, &backup, Opts::default()).await;
    let port = gsb.port;
    let second = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // The first answer takes longer than the 1s header timeout; half of the next head is
        // already there, the rest comes just after the answer.
        s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo/second HTTP/1.1\r\n")
            .expect("first");
        let mut left = Vec::new();
        let (head, _) = read_answer(&mut s, &mut left, false);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"Host: x\r\n\r\n").expect("rest");
        read_answer(&mut s, &mut left, false).0
    })
    .await
    .expect("join");
    assert!(second.starts_with("http/1.1 200"), "{second}");
}
