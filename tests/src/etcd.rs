//! A real etcd cluster on loopback for fleet tests (Debian's `etcd`, 3.4): members on free
//! ports, data in a temporary directory, each member killable and restartable on its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::proc::Proc;
use crate::wait::{free_port, wait_until};

/// The `etcd` binary: `$GSB_ETCD`, else `etcd` on PATH; panics with the fix when missing.
pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GSB_ETCD") {
        return PathBuf::from(p);
    }
    for dir in std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
    {
        let p = dir.join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!("no `etcd` binary on PATH: install it with `apt-get install -y etcd-server` (./.ci/run does)");
}

/// One member's fixed settings (ports are kept across restarts).
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    proc: Option<Proc>,
}

/// A running etcd cluster; every member is killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members (3 for a real quorum) and waits until the cluster answers.
    pub async fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::Builder::new()
            .prefix("gsb-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.path().join(format!("m{i}")),
                proc: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial,
            token: format!("gsb-test-{}-{}", std::process::id(), free_port()),
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30)).await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let proc = Proc::spawn(
            &format!("etcd-{}", m.name),
            Command::new(etcd_bin()).args(member_args(
                &m.name,
                &m.data,
                m.client,
                m.peer,
                &self.initial,
                &self.token,
            )),
        );
        self.members[i].proc = Some(proc);
    }

    /// Client URLs of every member (down ones included: clients must cope).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// `etcd = [...]` for a gsb config.
    pub fn toml_endpoints(&self) -> String {
        let quoted: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Starts member `i` again on its data (after [`EtcdCluster::kill`]).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Waits until every running member reports itself healthy (it has a leader).
    pub async fn wait_healthy(&self, deadline: Duration) {
        let client = reqwest::Client::new();
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let url = format!("http://127.0.0.1:{}/health", m.client);
            wait_until(deadline, &format!("etcd member {} healthy", m.name), || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    match client
                        .get(&url)
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                    {
                        Ok(r) => r.text().await.is_ok_and(|t| t.contains("\"true\"")),
                        Err(_) => false,
                    }
                }
            })
            .await;
        }
    }

    /// The index of the current raft leader (asked through etcd's JSON gateway), if any.
    pub async fn leader(&self) -> Option<usize> {
        let client = reqwest::Client::new();
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            let v: Option<serde_json::Value> = async {
                let r = client
                    .post(format!(
                        "http://127.0.0.1:{}/v3/maintenance/status",
                        m.client
                    ))
                    .body("{}")
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .ok()?;
                r.json().await.ok()
            }
            .await;
            let id = v
                .as_ref()
                .and_then(|v| v["header"]["member_id"].as_str().map(str::to_owned));
            if let Some(l) = v.as_ref().and_then(|v| v["leader"].as_str()) {
                leader = Some(l.to_owned());
            }
            ids.push(id);
        }
        let leader = leader?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
    }

    /// `etcdctl` against the cluster (for checks a user would make by hand).
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(args)
            .output()
            .expect("running etcdctl")
    }
}

/// The command line of one member of a loopback cluster (shared with `gsb up`'s recipe in
/// spirit: short heartbeats for fast tests, compaction so the fleet's frequent writes do not
/// grow the store without bound).
fn member_args(
    name: &str,
    data: &Path,
    client: u16,
    peer: u16,
    initial: &str,
    token: &str,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls=http://127.0.0.1:{client}"),
        format!("--advertise-client-urls=http://127.0.0.1:{client}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        format!("--initial-cluster={initial}"),
        format!("--initial-cluster-token={token}"),
        "--initial-cluster-state=new".into(),
        "--heartbeat-interval=100".into(),
        "--election-timeout=1000".into(),
        "--auto-compaction-mode=revision".into(),
        "--auto-compaction-retention=10000".into(),
        "--logger=zap".into(),
        "--log-level=warn".into(),
    ]
}
