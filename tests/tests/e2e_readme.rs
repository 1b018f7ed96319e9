//! The README's walkthrough, command by command, against `gsb up`: every shell command below is
//! quoted verbatim from README.md (the test checks that) and run with `sh`, only the default
//! addresses, the demo directory and `cargo run -p gsb --` replaced by this test's values.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gsb_tests::{free_port, gsb_bin, wait_for, wait_until, Proc};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const STEP1: &str = "curl http://127.0.0.1:8080/detectbackup.php";
const STEP2_JSON: &str = "json='content-type: application/json'";
const STEP2: &str = r#"user=$(curl -s -H "$json" localhost:8080/api/users -d '{"email":"ada@example.com","name":"Ada"}' | sed 's/.*"id":"\([^"]*\)".*/\1/')
   curl -s -H "$json" localhost:8080/api/meetings -d "{\"host_id\":\"$user\",\"topic\":\"standup\"}""#;
const STEP4_DETECT: &str = "curl localhost:8080/detectbackup.php";
const STEP4_LIST: &str = "curl localhost:8080/api/meetings";
const STEP5: &str =
    r#"curl -s -H "$json" localhost:8080/api/users -d '{"email":"bob@example.com","name":"Bob"}'"#;
const STEP6_LIST: &str = "curl localhost:8080/api/users";
const STEP7: &str = "gsb verify --config /var/tmp/gsb-demo/gsb.toml";
const DRILL_FAULT: &str = r#"curl -H 'content-type: application/json' <primary site URL>/_faults -d '{"component":"meetings","broken":true}'"#;
const DRILL_TOKEN: &str = "export GSB_ADMIN_TOKEN=$(cat /var/tmp/gsb-demo/admin.token)";
const DRILL_FAILOVER: &str = r#"gsb failover --to backup --reason "meetings broken on primary""#;
const DRILL_STATUS: &str = "gsb status";
const DRILL_FAILBACK: &str = "gsb failback";

/// The walkthrough promises "within about two seconds"; the slack is for a loaded machine.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(15);
/// `gsb up` holds down failback for 10 s and dwells 10 s.
const FAILBACK_DEADLINE: Duration = Duration::from_secs(60);

struct Demo {
    dir: PathBuf,
    listen: String,
    admin: String,
    http: reqwest::Client,
}

impl Demo {
    /// The README command with this test's addresses and directory.
    fn translate(&self, cmd: &str) -> String {
        cmd.replace("cargo run -p gsb --", "gsb")
            .replace("127.0.0.1:8080", &self.listen)
            .replace("localhost:8080", &self.listen)
            .replace("127.0.0.1:9090", &self.admin)
            .replace("/var/tmp/gsb-demo", &self.dir.display().to_string())
    }

    /// Runs README commands (one script) with `sh -e`; returns (success, stdout, stderr).
    async fn sh(&self, script: &str) -> (bool, String, String) {
        let script = self.translate(script);
        let bin_dir = gsb_bin().parent().unwrap().to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = tokio::process::Command::new("sh")
            .args(["-ec", &script])
            .env("PATH", path)
            // `gsb status` and friends default to 127.0.0.1:9090; this test's admin is elsewhere.
            .env("GSB_ADMIN", format!("http://{}", self.admin))
            .env_remove("GSB_ADMIN_TOKEN")
            .kill_on_drop(true)
            .output()
            .await
            .expect("running sh");
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("$ {script}\n{o}{e}(exit {:?})", out.status.code());
        (out.status.success(), o, e)
    }

    async fn detect(&self) -> String {
        self.sh(STEP4_DETECT).await.1
    }

    fn stack(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("stack.json")).expect("stack.json"))
            .expect("stack.json is JSON")
    }
}

/// When the test fails midway, `gsb up` is SIGKILLed (by `Proc`) and cannot stop its children:
/// kill its process group and every pid it listed, so a failing run leaves nothing behind.
struct Cleanup {
    pgid: Pid,
    stack_json: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Only on failure: after a clean Ctrl-C these pids are gone and may belong to others.
        if !std::thread::panicking() {
            return;
        }
        let _ = signal::killpg(self.pgid, Signal::SIGKILL);
        let Ok(text) = std::fs::read(&self.stack_json) else {
            return;
        };
        let stack: Value = serde_json::from_slice(&text).unwrap_or_default();
        let pids = ["primary", "backup"]
            .iter()
            .flat_map(|s| ["pid", "postgres_pid"].map(|k| stack[s][k].as_i64()))
            .chain(["replicator_pid", "proxy_pid"].map(|k| stack[k].as_i64()));
        for pid in pids.flatten() {
            let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn line_after<'a>(output: &'a str, label: &str) -> Option<&'a str> {
    let line = output.lines().find(|l| l.contains(label))?;
    let rest = line.split_once(label)?.1.trim_start();
    Some(rest.split("   ").next().unwrap_or(rest).trim())
}

/// Whether `pid` has exited and waits to be reaped (state `Z` in `/proc/<pid>/stat`).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

fn pid_alive(pid: u64) -> bool {
    signal::kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_works_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    for cmd in [
        STEP1,
        STEP2_JSON,
        STEP2,
        STEP4_DETECT,
        STEP4_LIST,
        STEP5,
        STEP6_LIST,
        STEP7,
        DRILL_FAULT,
        DRILL_TOKEN,
        DRILL_FAILOVER,
        DRILL_STATUS,
        DRILL_FAILBACK,
    ] {
        assert!(
            readme.contains(cmd),
            "README.md no longer has the command {cmd:?}: update this test"
        );
    }

    // `gsb up` as the README runs it, on free ports; PostgreSQL (run as `postgres`) must reach
    // the directory, as the README's /var/tmp choice ensures.
    let tmp = tempfile::Builder::new()
        .prefix("gsb-readme-")
        .tempdir()
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let demo = Demo {
        dir: tmp.path().join("gsb-demo"),
        listen: format!("127.0.0.1:{}", free_port()),
        admin: format!("127.0.0.1:{}", free_port()),
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    };
    let mut up = Proc::spawn(
        "gsb-up",
        Command::new(gsb_bin())
            // Its own process group, like a shell job: Ctrl-C below goes to the whole group.
            .process_group(0)
            .arg("up")
            .arg("--dir")
            .arg(&demo.dir)
            .args([
                "--listen",
                &demo.listen,
                "--admin-listen",
                &demo.admin,
                "--allow-faults",
            ]),
    );
    let _cleanup = Cleanup {
        pgid: Pid::from_raw(up.pid() as i32),
        stack_json: demo.dir.join("stack.json"),
    };
    let up_ref = &mut up;
    wait_for(Duration::from_secs(120), "gsb up to print its URLs", || {
        let running = up_ref.is_running();
        let out = up_ref.output();
        async move {
            assert!(running, "gsb up exited during start:\n{out}");
            out.contains("simulate a disaster").then_some(())
        }
    })
    .await;
    let printed = up.output();
    for url in [
        format!("http://{}/", demo.listen),
        format!("http://{}/detectbackup.php", demo.listen),
        format!("http://{}/", demo.admin),
        format!("http://{}/metrics", demo.admin),
    ] {
        assert!(
            printed.contains(&url),
            "gsb up did not print {url}:\n{printed}"
        );
    }
    let disaster = line_after(&printed, "simulate a disaster:")
        .expect("disaster command")
        .to_owned();
    let bring_back = line_after(&printed, "bring it back:")
        .expect("bring-back command")
        .to_owned();
    let stack = demo.stack();
    assert_eq!(
        disaster,
        format!(
            "kill -9 {} {}",
            stack["primary"]["pid"], stack["primary"]["postgres_pid"]
        ),
        "the printed disaster command and stack.json disagree"
    );
    assert_eq!(bring_back, format!("kill -HUP {}", up.pid()));

    // The config `gsb up` wrote is one an SRE could start from: it passes `gsb check-config`.
    let (ok, out, err) = demo
        .sh(&format!(
            "gsb check-config --config {}/gsb.toml",
            demo.dir.display()
        ))
        .await;
    assert!(
        ok,
        "check-config rejects the config gsb up wrote: {out} {err}"
    );

    // 1. Open the site; ask where you are served.
    let home = demo
        .http
        .get(format!("http://{}/", demo.listen))
        .send()
        .await
        .unwrap();
    assert_eq!(home.status(), 200);
    let (ok, out, _) = demo.sh(STEP1).await;
    assert!(ok && out == "Primary", "step 1: {out:?}");

    // 2. Schedule a meeting.
    // The terminal keeps `$json` for step 5.
    let (ok, out, err) = demo.sh(&format!("{STEP2_JSON}\n{STEP2}")).await;
    assert!(
        ok && out.contains("\"topic\":\"standup\"") && out.contains("\"status\":\"scheduled\""),
        "step 2 (schedule a meeting) did not schedule it: stdout {out:?} stderr {err:?}"
    );

    // A reader takes a few seconds between steps; by then the meeting is on the backup.
    let backup_meetings = format!(
        "{}/api/meetings",
        demo.stack()["backup"]["url"].as_str().unwrap()
    );
    let t0 = std::time::Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the standup replicated to the backup",
        || async {
            match demo.http.get(&backup_meetings).send().await {
                Ok(r) => r.text().await.unwrap_or_default().contains("standup"),
                Err(_) => false,
            }
        },
    )
    .await;
    eprintln!(
        "the meeting reached the backup {:?} after step 2",
        t0.elapsed()
    );

    // 3. Kill the primary with the printed command (its site and its database).
    let (ok, _, err) = demo.sh(&disaster).await;
    assert!(ok, "step 3: {err}");
    let killed_at = std::time::Instant::now();

    // 4. The same URL serves the backup, and the meeting is still listed.
    wait_until(
        FAILOVER_DEADLINE,
        "step 4: detectbackup to print Backup",
        || async { demo.detect().await == "Backup" },
    )
    .await;
    eprintln!(
        "README step 4: served by the backup {:?} after the kill (gsb up: interval 500ms, fall 3)",
        killed_at.elapsed()
    );
    let (ok, out, _) = demo.sh(STEP4_LIST).await;
    assert!(
        ok && out.contains("standup"),
        "step 4: meetings on the backup: {out}"
    );

    // 5. Create a user on the backup.
    let (ok, out, _) = demo.sh(&format!("{STEP2_JSON}\n{STEP5}")).await;
    assert!(ok && out.contains("\"name\":\"Bob\""), "step 5: {out}");

    // 6. Bring the primary back; the status page answers; failback; Bob on the primary.
    let (ok, _, err) = demo.sh(&bring_back).await;
    assert!(ok, "step 6: {err}");
    let hup_at = std::time::Instant::now();
    let page = demo
        .http
        .get(format!("http://{}/", demo.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "the status page");
    wait_until(
        FAILBACK_DEADLINE,
        "step 6: detectbackup to print Primary again",
        || async { demo.detect().await == "Primary" },
    )
    .await;
    eprintln!(
        "README step 6: failback {:?} after the SIGHUP (gsb up: failback_after 10s)",
        hup_at.elapsed()
    );
    let users = demo
        .http
        .get(format!("http://{}/api/users", demo.listen))
        .send()
        .await
        .unwrap();
    assert_eq!(
        users
            .headers()
            .get("x-gsb-site")
            .and_then(|v| v.to_str().ok()),
        Some("primary")
    );
    let (ok, out, _) = demo.sh(STEP6_LIST).await;
    assert!(
        ok && out.contains("Bob"),
        "step 6: users on the primary: {out}"
    );

    // 7. Both sites hold the same data.
    wait_until(
        Duration::from_secs(30),
        "step 7: verify to exit 0",
        || async { demo.sh(STEP7).await.0 },
    )
    .await;

    // Partial failure drill.
    let primary_url = demo.stack()["primary"]["url"].as_str().unwrap().to_owned();
    let (ok, out, _) = demo
        .sh(&DRILL_FAULT.replace("<primary site URL>", &primary_url))
        .await;
    assert!(ok && out.contains("meetings"), "drill: fault switch: {out}");
    wait_until(
        Duration::from_secs(15),
        "drill: the status page to show degraded",
        || async {
            match demo
                .http
                .get(format!("http://{}/", demo.admin))
                .send()
                .await
            {
                Ok(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .to_lowercase()
                    .contains("degraded"),
                Err(_) => false,
            }
        },
    )
    .await;
    assert_eq!(
        demo.detect().await,
        "Primary",
        "drill: a partial failure moved traffic"
    );
    let (ok, _, err) = demo.sh(&format!("{DRILL_TOKEN}\n{DRILL_FAILOVER}")).await;
    assert!(ok, "drill: gsb failover: {err}");
    wait_until(
        FAILOVER_DEADLINE,
        "drill: traffic on the backup",
        || async { demo.detect().await == "Backup" },
    )
    .await;
    let (ok, out, err) = demo.sh(&format!("{DRILL_TOKEN}\n{DRILL_STATUS}")).await;
    assert!(
        ok && out.to_lowercase().contains("backup"),
        "drill: gsb status: {out} {err}"
    );
    let (ok, _, err) = demo.sh(&format!("{DRILL_TOKEN}\n{DRILL_FAILBACK}")).await;
    assert!(ok, "drill: gsb failback: {err}");
    wait_until(
        FAILOVER_DEADLINE,
        "drill: traffic back on the primary",
        || async { demo.detect().await == "Primary" },
    )
    .await;

    // Ctrl-C stops everything and leaves no process behind.
    let stack = demo.stack();
    signal::killpg(Pid::from_raw(up.pid() as i32), Signal::SIGINT).expect("Ctrl-C");
    // Wait for the exit without reaping (a zombie keeps its pid), then reap it with its status.
    let pid = up.pid();
    wait_until(
        Duration::from_secs(30),
        "gsb up to exit after Ctrl-C",
        || async move { is_zombie(pid) },
    )
    .await;
    let st = up.terminate();
    assert!(
        st.success(),
        "gsb up exited with {st} after Ctrl-C:\n{}",
        up.tail(30)
    );
    for who in ["primary", "backup"] {
        for key in ["pid", "postgres_pid"] {
            if let Some(pid) = stack[who][key].as_u64() {
                assert!(!pid_alive(pid), "{who} {key} {pid} still runs after Ctrl-C");
            }
        }
    }
    for key in ["replicator_pid", "proxy_pid"] {
        if let Some(pid) = stack[key].as_u64() {
            assert!(!pid_alive(pid), "{key} {pid} still runs after Ctrl-C");
        }
    }
}
