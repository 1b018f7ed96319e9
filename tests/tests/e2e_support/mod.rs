//! Shared setup of the end-to-end failover stories: the two-site stack built from its real
//! pieces (two PostgreSQL servers from the harness, `gsb site` x2, `gsb replicator`, `gsb proxy`)
//! with short timings, plus the few calls a user or an SRE makes against it.
//!
//! Each story file includes this with `mod e2e_support;` and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gsb_tests::pg::PgServer;
use gsb_tests::{free_port, gsb_bin, wait_for, wait_until, Proc};
use serde_json::{json, Value};

/// Index of the primary in the per-site arrays.
pub const PRIMARY: usize = 0;
/// Index of the backup in the per-site arrays.
pub const BACKUP: usize = 1;
/// Role names as `gsb site --role` and `X-Gsb-Site` spell them.
pub const ROLES: [&str; 2] = ["primary", "backup"];

/// How long a freshly started component may take to answer (PostgreSQL startup on 2 busy cores).
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long the proxy may take to move traffic after a full failure (interval 100ms, fall 2:
/// ~0.3 s expected; the slack is for a loaded CI machine).
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(5);
/// How long a row may take to reach the other site (target: well under a second).
pub const REPLICATION_DEADLINE: Duration = Duration::from_secs(15);
/// How long failback may take once the primary is back (failback_after 1s, min_dwell 1s).
pub const FAILBACK_DEADLINE: Duration = Duration::from_secs(30);

/// What a story needs from its stack.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Start the sites with `--allow-faults` (partial-failure drills).
    pub allow_faults: bool,
    /// `[failover] failback_after`.
    pub failback_after: &'static str,
    /// A `[[maintenance]]` window that starts now (the current UTC minute) and ends this long
    /// after the proxy's config is written.
    pub maintenance_ends_in: Option<Duration>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            allow_faults: false,
            failback_after: "1s",
            maintenance_ends_in: None,
        }
    }
}

/// The running two-site stack. Fields drop in order: processes first, then databases, then files.
pub struct Stack {
    /// `gsb proxy`.
    pub proxy: Option<Proc>,
    /// `gsb replicator`.
    pub replicator: Option<Proc>,
    /// `gsb site` per role.
    pub sites: [Option<Proc>; 2],
    /// The sites' PostgreSQL servers.
    pub pg: Vec<PgServer>,
    /// Connection string of each site's database.
    pub dsns: [String; 2],
    /// Base URL of each site (`http://127.0.0.1:port`), bypassing the proxy.
    pub site_urls: [String; 2],
    /// The one URL users know.
    pub proxy_url: String,
    /// The admin listener (metrics, status, failover API).
    pub admin_url: String,
    /// The replicator's metrics/status listener.
    pub replicator_url: String,
    /// Admin bearer token.
    pub token: String,
    /// The config file shared by the proxy and the replicator.
    pub config: PathBuf,
    /// HTTP client (no system proxy, short timeouts).
    pub http: reqwest::Client,
    /// When the maintenance window (if any) ends.
    pub maintenance_end: Option<Instant>,
    opts: StackOptions,
    site_ports: [u16; 2],
    /// Config, token and state file live here.
    pub dir: tempfile::TempDir,
}

/// A response reduced to what the stories check.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `X-Gsb-Site` of the site that answered (empty when the proxy answered itself).
    pub site: String,
    /// The body as text.
    pub body: String,
}

impl Reply {
    /// The body parsed as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("expected JSON ({e}), got {}: {}", self.status, self.body))
    }
}

impl Stack {
    /// Starts two PostgreSQL servers, both sites, the replicator and the proxy; returns once the
    /// proxy serves the primary.
    pub async fn start(opts: StackOptions) -> Stack {
        let pg = tokio::task::spawn_blocking(|| {
            let servers = PgServer::start_many(2);
            for s in &servers {
                s.create_db("site");
            }
            servers
        })
        .await
        .expect("starting PostgreSQL servers");
        let dsns = [pg[0].dsn("site"), pg[1].dsn("site")];
        let site_ports = [free_port(), free_port()];
        let dir = tempfile::Builder::new()
            .prefix("gsb-e2e-")
            .tempdir()
            .expect("temp dir");
        let token = format!("e2e-token-{}", std::process::id());
        std::fs::write(dir.path().join("admin.token"), &token).expect("writing the token");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("http client");
        let mut stack = Stack {
            proxy: None,
            replicator: None,
            sites: [None, None],
            pg,
            site_urls: site_ports.map(|p| format!("http://127.0.0.1:{p}")),
            dsns,
            proxy_url: format!("http://127.0.0.1:{}", free_port()),
            admin_url: format!("http://127.0.0.1:{}", free_port()),
            replicator_url: format!("http://127.0.0.1:{}", free_port()),
            token,
            config: dir.path().join("gsb.toml"),
            http,
            maintenance_end: None,
            opts,
            site_ports,
            dir,
        };
        stack.start_site(PRIMARY).await;
        stack.start_site(BACKUP).await;
        // The replicator reads the config's [replicator]; the proxy part is rewritten below with
        // the maintenance window computed at the last moment.
        stack.write_config();
        stack.start_replicator().await;
        stack.write_config();
        stack.start_proxy().await;
        stack
    }

    /// Writes the one config file (proxy + replicator sections).
    fn write_config(&mut self) {
        let addr = |url: &str| url.trim_start_matches("http://").to_owned();
        let mut maintenance = String::new();
        if let Some(ends_in) = self.opts.maintenance_ends_in {
            // A window starting at the current UTC minute, lasting until `ends_in` from now.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_secs();
            let (hh, mm, ss) = ((now / 3600) % 24, (now / 60) % 60, now % 60);
            let duration = ss + ends_in.as_secs();
            maintenance = format!(
                "\n[[maintenance]]\nstart = \"{hh:02}:{mm:02}\"\nduration = \"{duration}s\"\ntimezone = \"UTC\"\n"
            );
            self.maintenance_end = Some(Instant::now() + ends_in);
        }
        let text = format!(
            r#"# Written by the e2e stories: short timings so failover/failback happen in seconds.
[proxy]
listen = "{proxy}"

[admin]
listen = "{admin}"
token_file = "{dir}/admin.token"

[sites.primary]
url = "{p_url}"
[sites.backup]
url = "{b_url}"

[health]
interval = "100ms"
timeout = "300ms"
rise = 2
fall = 2
[[health.components]]
name = "web"
path = "/health/web"
critical = false
[[health.components]]
name = "meetings"
path = "/health/meetings"
[[health.components]]
name = "api"
path = "/health/api"
[[health.components]]
name = "db"
path = "/health/db"

[failover]
auto = true
failback = "auto"
failback_after = "{failback_after}"
min_dwell = "1s"
drain_timeout = "5s"
replicator_status = "{repl}/status"
failback_max_wait = "5m"
state_file = "{dir}/gsb-proxy.state"
{maintenance}
[replicator]
primary_dsn = "{p_dsn}"
backup_dsn = "{b_dsn}"
two_way = ["users", "meetings"]
config_tables = ["site_config", "custom_pages", "client_versions"]
usage_tables = ["usage_records"]
metrics_listen = "{repl_addr}"
"#,
            proxy = addr(&self.proxy_url),
            admin = addr(&self.admin_url),
            dir = self.dir.path().display(),
            p_url = self.site_urls[PRIMARY],
            b_url = self.site_urls[BACKUP],
            failback_after = self.opts.failback_after,
            repl = self.replicator_url,
            repl_addr = addr(&self.replicator_url),
            p_dsn = self.dsns[PRIMARY],
            b_dsn = self.dsns[BACKUP],
        );
        std::fs::write(&self.config, text).expect("writing gsb.toml");
    }

    /// Starts `gsb site` for `site` and waits until its meetings answer (tables installed).
    pub async fn start_site(&mut self, site: usize) {
        let mut cmd = Command::new(gsb_bin());
        cmd.args([
            "site",
            "--role",
            ROLES[site],
            "--dsn",
            &self.dsns[site],
            "--listen",
            &format!("127.0.0.1:{}", self.site_ports[site]),
        ]);
        if self.opts.allow_faults {
            cmd.arg("--allow-faults");
        }
        let mut proc = Proc::spawn(&format!("{}-site", ROLES[site]), &mut cmd);
        let url = format!("{}/health/meetings", self.site_urls[site]);
        wait_ready(&self.http, &mut proc, &url).await;
        self.sites[site] = Some(proc);
    }

    /// Starts `gsb replicator` and waits for its `/status`.
    pub async fn start_replicator(&mut self) {
        let mut proc = Proc::spawn(
            "replicator",
            Command::new(gsb_bin())
                .args(["replicator", "--config"])
                .arg(&self.config),
        );
        let url = format!("{}/status", self.replicator_url);
        wait_ready(&self.http, &mut proc, &url).await;
        self.replicator = Some(proc);
    }

    /// Starts `gsb proxy` and waits until it serves the primary.
    pub async fn start_proxy(&mut self) {
        let mut proc = Proc::spawn(
            "proxy",
            Command::new(gsb_bin())
                .args(["proxy", "--config"])
                .arg(&self.config),
        );
        let url = format!("{}/healthz", self.admin_url);
        wait_ready(&self.http, &mut proc, &url).await;
        self.proxy = Some(proc);
        if self.opts.maintenance_ends_in.is_none() {
            self.wait_served_by("Primary", START_DEADLINE).await;
        }
    }

    /// A crash of the replicator (SIGKILL).
    pub fn kill_replicator(&mut self) {
        self.replicator.take().expect("replicator running").kill9();
    }

    /// A full failure of the primary: its site process and its PostgreSQL server, SIGKILL both.
    pub fn kill_primary(&mut self) {
        self.sites[PRIMARY]
            .take()
            .expect("primary site running")
            .kill9();
        tokio::task::block_in_place(|| self.pg[PRIMARY].kill());
    }

    /// The primary comes back: its PostgreSQL server (same port and data), then its site.
    pub async fn restart_primary(&mut self) {
        tokio::task::block_in_place(|| self.pg[PRIMARY].restart());
        self.start_site(PRIMARY).await;
    }

    /// A request through the proxy; `None` when no HTTP answer came at all.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> Option<Reply> {
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        let site = resp
            .headers()
            .get("x-gsb-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = resp.text().await.ok()?;
        Some(Reply { status, site, body })
    }

    /// GET `url`; panics when nothing answers.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(reqwest::Method::GET, url, None)
            .await
            .unwrap_or_else(|| panic!("GET {url}: no answer"))
    }

    /// POST JSON to `url`; panics when nothing answers.
    pub async fn post(&self, url: &str, body: &Value) -> Reply {
        self.send(reqwest::Method::POST, url, Some(body))
            .await
            .unwrap_or_else(|| panic!("POST {url}: no answer"))
    }

    /// PUT JSON to `url`; panics when nothing answers.
    pub async fn put(&self, url: &str, body: &Value) -> Reply {
        self.send(reqwest::Method::PUT, url, Some(body))
            .await
            .unwrap_or_else(|| panic!("PUT {url}: no answer"))
    }

    /// What detectbackup says through the proxy right now.
    pub async fn detect(&self) -> Option<String> {
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("{}/detectbackup.php", self.proxy_url),
                None,
            )
            .await?;
        (r.status == 200).then_some(r.body)
    }

    /// Waits until detectbackup through the proxy says `who` (`Primary` or `Backup`); returns
    /// how long it took.
    pub async fn wait_served_by(&self, who: &str, deadline: Duration) -> Duration {
        let t0 = Instant::now();
        wait_until(deadline, &format!("detectbackup to say {who}"), || async {
            self.detect().await.as_deref() == Some(who)
        })
        .await;
        t0.elapsed()
    }

    /// Creates a user at `base` (the proxy or a site); asserts 201 and where it landed.
    pub async fn create_user(&self, base: &str, name: &str, expect_site: &str) -> Value {
        let email = format!("{}@example.com", name.to_lowercase());
        let r = self
            .post(
                &format!("{base}/api/users"),
                &json!({"email": email, "name": name}),
            )
            .await;
        assert_eq!(r.status, 201, "creating user {name}: {}", r.body);
        assert_eq!(
            r.site, expect_site,
            "user {name} was written on the wrong site"
        );
        r.json()
    }

    /// Schedules a meeting at `base`; asserts 201 and where it landed.
    pub async fn create_meeting(
        &self,
        base: &str,
        host_id: &str,
        topic: &str,
        expect_site: &str,
    ) -> Value {
        let r = self
            .post(
                &format!("{base}/api/meetings"),
                &json!({"host_id": host_id, "topic": topic}),
            )
            .await;
        assert_eq!(r.status, 201, "scheduling {topic}: {}", r.body);
        assert_eq!(
            r.site, expect_site,
            "meeting {topic} was written on the wrong site"
        );
        r.json()
    }

    /// `start`, `end` or `join` (with `user_id`) on a meeting at `base`; asserts 200.
    pub async fn meeting_action(
        &self,
        base: &str,
        id: &str,
        action: &str,
        user_id: Option<&str>,
        expect_site: &str,
    ) -> Value {
        let body = user_id.map_or_else(|| json!({}), |u| json!({ "user_id": u }));
        let r = self
            .post(&format!("{base}/api/meetings/{id}/{action}"), &body)
            .await;
        assert_eq!(r.status, 200, "{action} meeting {id}: {}", r.body);
        assert_eq!(r.site, expect_site, "{action} landed on the wrong site");
        r.json()
    }

    /// Waits until GET `url` answers 200 and returns the JSON body.
    pub async fn wait_json(&self, url: &str, what: &str, deadline: Duration) -> Value {
        wait_for(deadline, what, || async {
            let r = self.send(reqwest::Method::GET, url, None).await?;
            (r.status == 200).then(|| r.json())
        })
        .await
    }

    /// The proxy's `/status` JSON.
    pub async fn proxy_status(&self) -> Value {
        let r = self.get(&format!("{}/status", self.admin_url)).await;
        assert_eq!(r.status, 200, "GET /status: {}", r.body);
        r.json()
    }

    /// The proxy's `/metrics` text.
    pub async fn proxy_metrics(&self) -> String {
        let r = self.get(&format!("{}/metrics", self.admin_url)).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
    }

    /// The replicator's `/status` JSON, `None` while it does not answer.
    pub async fn replicator_status(&self) -> Option<Value> {
        let r = self
            .send(
                reqwest::Method::GET,
                &format!("{}/status", self.replicator_url),
                None,
            )
            .await?;
        (r.status == 200).then(|| r.json())
    }

    /// Runs `gsb <args>` (admin commands get `--admin` and the token in the environment).
    pub async fn gsb(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(gsb_bin());
        cmd.args(args)
            .env("GSB_ADMIN", &self.admin_url)
            .env("GSB_ADMIN_TOKEN", &self.token)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("gsb {args:?} did not finish within 60s"))
            .unwrap_or_else(|e| panic!("running gsb {args:?}: {e}"));
        eprintln!(
            "$ gsb {}\n{}{}(exit {:?})",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code()
        );
        out
    }

    /// `gsb verify --config <config>` until it exits 0 (replication is asynchronous).
    pub async fn wait_verify_equal(&self, deadline: Duration) {
        let config = self.config.display().to_string();
        wait_until(
            deadline,
            "gsb verify to report both sites equal",
            || async {
                self.gsb(&["verify", "--config", &config])
                    .await
                    .status
                    .success()
            },
        )
        .await;
    }
}

/// The value of the sample `name{labels...}` in Prometheus text, if present. `labels` are
/// `key="value"` pairs that must all appear in the sample's label set.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name).then_some((rest, value))
        })
        .find(|(set, _)| {
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.parse().ok())
}

/// Polls `url` until it answers 2xx; panics with the process's output if it exits or the
/// deadline passes first.
async fn wait_ready(http: &reqwest::Client, proc: &mut Proc, url: &str) {
    let end = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        if let Some(st) = proc.try_status() {
            panic!(
                "exited ({st}) before {url} answered; output:\n{}",
                proc.tail(60)
            );
        }
        if Instant::now() > end {
            panic!(
                "{url} did not answer within {START_DEADLINE:?}; output:\n{}",
                proc.tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
