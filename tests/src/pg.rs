//! Real PostgreSQL servers for tests: start N on free ports in temporary directories, stop,
//! `kill -9`, restart on the same port and data; removed on drop (also when a test panics).

use std::time::Duration;

pub use gsb_pgctl::{Cluster, ClusterOptions};

/// How long `client` keeps retrying a connection (a restarted server may still be recovering).
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// A PostgreSQL server for one test; panics with a clear message on any failure.
#[derive(Debug)]
pub struct PgServer {
    cluster: Cluster,
}

impl PgServer {
    /// Starts a server (fsync off) in a temporary directory on a free port.
    pub fn start() -> PgServer {
        let mut cluster = Cluster::init(ClusterOptions {
            fsync: false,
            ..ClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("test PostgreSQL server: initdb failed: {e}"));
        cluster
            .start()
            .unwrap_or_else(|e| panic!("test PostgreSQL server: start failed: {e}"));
        PgServer { cluster }
    }

    /// Starts a server like [`PgServer::start`] with extra `name=value` settings applied after
    /// the defaults (e.g. `wal_level=replica` for a server the logical capture must refuse).
    pub fn start_with(settings: &[(&str, &str)]) -> PgServer {
        let mut cluster = Cluster::init(ClusterOptions {
            fsync: false,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("test PostgreSQL server: initdb failed: {e}"));
        cluster
            .start()
            .unwrap_or_else(|e| panic!("test PostgreSQL server: start failed: {e}"));
        PgServer { cluster }
    }

    /// Starts `n` servers concurrently.
    pub fn start_many(n: usize) -> Vec<PgServer> {
        let handles: Vec<_> = (0..n)
            .map(|_| std::thread::spawn(PgServer::start))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("starting a test server panicked"))
            })
            .collect()
    }

    /// Connection string for database `db` (see [`PgServer::create_db`]).
    pub fn dsn(&self, db: &str) -> String {
        self.cluster.dsn(db)
    }

    /// Creates database `db` if missing and returns its connection string.
    pub fn create_db(&self, db: &str) -> String {
        self.cluster
            .create_database(db)
            .unwrap_or_else(|e| panic!("creating database {db}: {e}"));
        self.dsn(db)
    }

    /// A connected client on database `db` (created if missing); its connection task is spawned.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        if db != "postgres" {
            self.create_db(db);
        }
        connect(&self.dsn(db)).await
    }

    /// The TCP port (kept across restarts).
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// The postmaster pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.cluster.pid()
    }

    /// Fast shutdown.
    pub fn stop(&mut self) {
        self.cluster
            .stop()
            .unwrap_or_else(|e| panic!("stopping the test server: {e}"));
    }

    /// SIGKILL of the postmaster and its backends (a crash).
    pub fn kill(&mut self) {
        self.cluster
            .kill()
            .unwrap_or_else(|e| panic!("killing the test server: {e}"));
    }

    /// Starts again on the same port and data directory (after `stop` or `kill`).
    pub fn restart(&mut self) {
        self.cluster
            .start()
            .unwrap_or_else(|e| panic!("restarting the test server: {e}"));
    }

    /// The underlying cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}

/// Connects to `dsn` (retrying while the server starts up) and spawns the connection task.
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
    loop {
        match tokio_postgres::connect(dsn, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                // Ends by itself when the client is dropped.
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connecting to {dsn}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_start_concurrently_and_are_independent() {
        let servers = tokio::task::spawn_blocking(|| PgServer::start_many(2))
            .await
            .unwrap();
        assert_ne!(servers[0].port(), servers[1].port());
        let a = servers[0].client("site").await;
        let b = servers[1].client("site").await;
        a.batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        b.batch_execute("CREATE TABLE t(x int)").await.unwrap();
        let n: i64 = b
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "servers share nothing");
    }

    #[tokio::test]
    async fn kill9_and_restart_keeps_committed_data_and_port() {
        let mut s = PgServer::start();
        let port = s.port();
        {
            let c = s.client("site").await;
            c.batch_execute("CREATE TABLE t(x int); INSERT INTO t SELECT generate_series(1, 100)")
                .await
                .unwrap();
        }
        let old_pid = s.pid().unwrap();
        s.kill();
        assert!(s.pid().is_none());
        s.restart();
        assert_eq!(s.port(), port);
        assert_ne!(s.pid().unwrap(), old_pid);
        let c = s.client("site").await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100);
        drop(c);
        s.stop();
        s.restart();
        let c = s.client("site").await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100);
    }

    #[test]
    fn drop_stops_the_server_and_removes_the_directory() {
        let s = PgServer::start();
        let dir = s.cluster().data_dir().to_path_buf();
        let pid = s.pid().unwrap();
        assert!(dir.join("PG_VERSION").is_file());
        drop(s);
        assert!(!dir.exists(), "data directory removed");
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "postmaster gone"
        );
    }

    #[test]
    fn drop_during_a_panic_still_cleans_up() {
        let dir = std::sync::Arc::new(std::sync::Mutex::new(None));
        let d2 = dir.clone();
        let r = std::panic::catch_unwind(move || {
            let s = PgServer::start();
            *d2.lock().unwrap() = Some(s.cluster().data_dir().to_path_buf());
            panic!("test failure");
        });
        assert!(r.is_err());
        let dir = dir.lock().unwrap().clone().unwrap();
        assert!(!dir.exists());
    }
}
