//! One local PostgreSQL server: `initdb`, start as a child process, stop, crash.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::Error;

/// How long a server may take to accept connections after it was started.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// How long the drop path waits for an immediate shutdown before SIGKILL.
const DROP_DEADLINE: Duration = Duration::from_secs(5);
/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(15);
/// Start attempts when a port or a stale shared memory block is still in use.
const START_ATTEMPTS: usize = 20;
/// File name of the server log inside the data directory.
const LOG_FILE: &str = "gsb-postgres.log";

/// How to create a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Data directory; `None` = a temporary directory removed when the cluster is dropped.
    pub dir: Option<PathBuf>,
    /// TCP port on 127.0.0.1; `None` = a free port picked at init.
    pub port: Option<u16>,
    /// Name of the superuser role created by initdb (default `gsb`).
    pub superuser: String,
    /// `fsync` setting (default true); tests turn it off for speed, never production.
    pub fsync: bool,
    /// Extra `-c name=value` server settings, applied after the defaults.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            dir: None,
            port: None,
            superuser: "gsb".to_owned(),
            fsync: true,
            settings: Vec::new(),
        }
    }
}

/// One local PostgreSQL server listening on 127.0.0.1 only, its socket in the data directory.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    /// Whether the port was picked by us (then a bind failure may retry on another port).
    port_auto: bool,
    port: u16,
    superuser: String,
    fsync: bool,
    settings: Vec<(String, String)>,
    /// The OS user the server runs as when we are root (postgres refuses root).
    run_as: Option<(Uid, Gid)>,
    child: Option<Child>,
    /// Kept last so the directory is removed after the server stopped (see `Drop`).
    temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Finds the directory holding `initdb` and `postgres`: `PATH` first, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn find_bin_dir() -> Result<PathBuf, Error> {
        let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let initdb = dir.join("initdb");
                if initdb.is_file() {
                    // Debian links /usr/bin tools to a wrapper; follow to the real bin dir.
                    if let Ok(real) = fs::canonicalize(&initdb) {
                        if let Some(parent) = real.parent() {
                            if has_both(parent) {
                                return Ok(parent.to_path_buf());
                            }
                        }
                    }
                    if has_both(&dir) {
                        return Ok(dir);
                    }
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                has_both(&bin).then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, b)| b)
            .ok_or(Error::BinariesNotFound)
    }

    /// Creates the cluster with initdb (skipped if the directory already holds one).
    pub fn init(opts: ClusterOptions) -> Result<Cluster, Error> {
        let bin_dir = Self::find_bin_dir()?;
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name("postgres")
                .map_err(|e| Error::io("looking up the postgres user", e.into()))?
                .ok_or(Error::NoPostgresUser)?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let (data_dir, temp) = match &opts.dir {
            Some(d) => {
                fs::create_dir_all(d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("gsb-pg-")
                    .tempdir()
                    .map_err(|e| Error::io("creating a temporary directory", e))?;
                let d = t.path().join("data");
                fs::create_dir(&d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
                if let Some((uid, gid)) = run_as {
                    chown(t.path(), uid, gid)?;
                }
                (d, Some(t))
            }
        };
        let initialised = data_dir.join("PG_VERSION").is_file();
        if !initialised {
            if let Some((uid, gid)) = run_as {
                chown(&data_dir, uid, gid)?;
            }
            // postgres insists on a private data directory.
            fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", data_dir.display()), e))?;
            let mut cmd = Command::new(bin_dir.join("initdb"));
            cmd.arg("-D")
                .arg(&data_dir)
                .args(["--auth=trust", "--encoding=UTF8", "--locale=C", "-U"])
                .arg(&opts.superuser)
                .current_dir(&data_dir);
            if !opts.fsync {
                cmd.arg("--no-sync");
            }
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid.as_raw()).gid(gid.as_raw());
            }
            let out = cmd.output().map_err(|e| {
                Error::io(format!("running {}", bin_dir.join("initdb").display()), e)
            })?;
            if !out.status.success() {
                return Err(Error::InitDb {
                    dir: data_dir,
                    status: out.status.to_string(),
                    output: format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            tracing::debug!(dir = %data_dir.display(), "initdb done");
        }
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        Ok(Cluster {
            bin_dir,
            data_dir,
            port_auto: opts.port.is_none(),
            port,
            superuser: opts.superuser,
            fsync: opts.fsync,
            settings: opts.settings,
            run_as,
            child: None,
            temp,
        })
    }

    /// Starts postgres as a child process and waits until it accepts connections.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match self.start_once() {
                Ok(()) => return Ok(()),
                Err(Retry::No(e)) => return Err(e),
                Err(Retry::Yes { err, new_port }) => {
                    if new_port && self.port_auto {
                        self.port = free_port()?;
                    }
                    last_err = Some(err);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(last_err.unwrap_or(Error::NotRunning(self.data_dir.clone())))
    }

    fn start_once(&mut self) -> Result<(), Retry> {
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Retry::No(Error::io(format!("opening {}", log_path.display()), e)))?;
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| Retry::No(Error::io("duplicating the log handle", e)))?;
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string());
        let socket_dir = self.data_dir.display().to_string();
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("unix_socket_directories".into(), socket_dir),
            ("max_connections".into(), "100".into()),
            ("shared_buffers".into(), "32MB".into()),
            ("logging_collector".into(), "off".into()),
            // The replicator's logical capture: decoding from the WAL, the remote commit
            // timestamp and origin of every row version, a slot and a sender per direction
            // (plus headroom for `gsb resync` and a second replicator).
            ("wal_level".into(), "logical".into()),
            ("track_commit_timestamp".into(), "on".into()),
            ("max_replication_slots".into(), "10".into()),
            ("max_wal_senders".into(), "10".into()),
        ];
        // fsync=off survives a process crash (kill -9), not an OS crash: fine for tests.
        // synchronous_commit stays on, so an acknowledged commit survives `kill`.
        if !self.fsync {
            settings.push(("fsync".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(self.settings.iter().cloned());
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: `kill` takes the backends down with the postmaster, like a crash.
            .process_group(0);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        let child = cmd.spawn().map_err(|e| {
            Retry::No(Error::io(
                format!("starting {}", self.bin_dir.join("postgres").display()),
                e,
            ))
        })?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.child = None;
                let tail = read_from(&log_path, log_start);
                let err = Error::StartFailed {
                    dir: self.data_dir.clone(),
                    port: self.port,
                    reason: format!("postgres exited ({status})"),
                    log_tail: last_lines(&tail, 20),
                };
                // A port taken by someone else, or shared memory of a just-killed server.
                let busy = tail.contains("already in use")
                    || tail.contains("still in use")
                    || tail.contains("could not bind");
                return Err(if busy {
                    Retry::Yes {
                        err,
                        new_port: tail.contains("could not bind")
                            || tail.contains("Address already in use"),
                    }
                } else {
                    Retry::No(err)
                });
            }
            if self.ready(pid) {
                tracing::debug!(port = self.port, pid, "postgres ready");
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                return Err(Retry::No(Error::StartFailed {
                    dir: self.data_dir.clone(),
                    port: self.port,
                    reason: format!("not ready within {}s", START_DEADLINE.as_secs()),
                    log_tail: last_lines(&read_from(&log_path, log_start), 20),
                }));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Ready = postmaster.pid names our child with status "ready" and the port accepts TCP.
    fn ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        let ours = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid);
        let ready = lines.get(7).map(|l| l.trim()) == Some("ready");
        ours && ready
            && TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
                Duration::from_secs(1),
            )
            .is_ok()
    }

    /// Fast shutdown (SIGINT: disconnect clients, checkpoint) and wait for the exit.
    pub fn stop(&mut self) -> Result<(), Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT);
        if wait_deadline(&mut child, STOP_DEADLINE) {
            return Ok(());
        }
        let _ = signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = child.wait();
        Err(Error::StopTimeout {
            pid,
            secs: STOP_DEADLINE.as_secs(),
        })
    }

    /// SIGKILL the postmaster and its backends at once (a crash), for tests.
    pub fn kill(&mut self) -> Result<(), Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Backends call setsid(), so the process group does not reach them: list them first.
        let backends = children_of(pid);
        let _ = signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        for b in &backends {
            let _ = signal::kill(Pid::from_raw(*b as i32), Signal::SIGKILL);
        }
        child
            .wait()
            .map_err(|e| Error::io("waiting for the killed postmaster", e))?;
        // A backend still attached to shared memory would block the restart.
        let deadline = Instant::now() + DROP_DEADLINE;
        while backends.iter().any(|b| alive(*b)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// A libpq-style connection string for `dbname` as the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port, self.superuser, dbname
        )
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (stdout and stderr of postgres).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// Whether the data directory is temporary (removed on drop).
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }

    /// The superuser role name.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// Creates database `name` unless it exists (idempotent, safe to race).
    pub fn create_database(&self, name: &str) -> Result<(), Error> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::BadName(name.to_owned()));
        }
        let exists = self.psql(&format!(
            "SELECT 1 FROM pg_database WHERE datname = '{name}'"
        ))?;
        if exists.trim() == "1" {
            return Ok(());
        }
        match self.psql(&format!("CREATE DATABASE \"{name}\"")) {
            Err(Error::Psql { output, .. }) if output.contains("already exists") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn psql(&self, sql: &str) -> Result<String, Error> {
        let out = Command::new(self.bin_dir.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(&self.superuser)
            .args(["-d", "postgres", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("running psql", e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Psql {
                port: self.port,
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }
}

impl Drop for Cluster {
    /// Immediate shutdown (SIGQUIT, which still releases shared memory), SIGKILL as last resort.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = signal::kill(pid, Signal::SIGQUIT);
            if !wait_deadline(&mut child, DROP_DEADLINE) {
                let _ = signal::killpg(pid, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
    }
}

enum Retry {
    No(Error),
    Yes { err: Error, new_port: bool },
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("binding 127.0.0.1:0 to find a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("reading a local address", e))
}

fn chown(path: &Path, uid: Uid, gid: Gid) -> Result<(), Error> {
    nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| {
        Error::io(
            format!("chown {} to the postgres user", path.display()),
            e.into(),
        )
    })
}

/// Pids whose parent is `ppid` (from /proc; empty where /proc is missing).
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let (_, parent) = proc_stat(pid)?;
            (parent == ppid).then_some(pid)
        })
        .collect()
}

/// (state, ppid) of a process from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Waits for the child to exit; false if it is still running at the deadline.
fn wait_deadline(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() > deadline => return false,
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_binaries() {
        let d = Cluster::find_bin_dir().expect("postgres installed");
        assert!(d.join("postgres").is_file());
    }

    #[test]
    fn init_start_create_stop() {
        let mut c = Cluster::init(ClusterOptions {
            fsync: false,
            ..Default::default()
        })
        .unwrap();
        c.start().unwrap();
        assert!(c.pid().is_some());
        c.create_database("site").unwrap();
        c.create_database("site").unwrap();
        assert!(c.dsn("site").contains(&format!("port={}", c.port())));
        c.stop().unwrap();
        assert!(c.pid().is_none());
        assert!(matches!(c.create_database("x y"), Err(Error::BadName(_))));
    }
}
