//! A reference site served in-process on port 0 over a real PostgreSQL server.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use gsb_site::{Role, SiteOptions};
use gsb_tests::pg::PgServer;
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous: two cores are shared by every engineer's builds and tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Starts a PostgreSQL server without blocking the runtime's other worker.
pub async fn start_pg() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("starting PostgreSQL")
}

/// One running site; cancelled (and so stopped) on drop.
pub struct Site {
    pub url: String,
    pub http: Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), gsb_site::Error>>>,
}

impl Site {
    /// Serves a site on 127.0.0.1:0 for `dsn` without waiting for its database.
    pub async fn spawn(dsn: String, role: Role, allow_faults: bool) -> Site {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().unwrap();
        let opts = SiteOptions {
            role,
            dsn,
            listen: addr,
            allow_faults,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gsb_site::serve(listener, opts, shutdown.clone()));
        let http = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        Site {
            url: format!("http://{addr}"),
            http,
            shutdown,
            task: Some(task),
        }
    }

    /// Serves a site on database `db` of `pg` and waits until its schema is installed.
    pub async fn start(pg: &PgServer, db: &str, role: Role, allow_faults: bool) -> Site {
        let dsn = tokio::task::block_in_place(|| pg.create_db(db));
        let site = Site::spawn(dsn, role, allow_faults).await;
        site.wait_health("api", 200).await;
        site
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http.get(self.at(path)).send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.http
            .post(self.at(path))
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    pub async fn put(&self, path: &str, body: Value) -> Response {
        self.http
            .put(self.at(path))
            .json(&body)
            .send()
            .await
            .expect("PUT")
    }

    /// Status of `/health/{component}`, or 0 when the site did not answer.
    pub async fn health(&self, component: &str) -> u16 {
        match self
            .http
            .get(self.at(&format!("/health/{component}")))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Polls `/health/{component}` until it answers `status`; on timeout the panic shows the
    /// last answer, so a failure says why the component stayed in the wrong state.
    pub async fn wait_health(&self, component: &str, status: u16) {
        let url = self.at(&format!("/health/{component}"));
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let last = match self.http.get(&url).send().await {
                Ok(r) if r.status().as_u16() == status => return,
                Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => format!("no answer: {e}"),
            };
            if tokio::time::Instant::now() >= end {
                panic!("timed out after {DEADLINE:?} waiting for /health/{component} -> {status}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a user through the API and returns its JSON.
    pub async fn create_user(&self, email: &str, name: &str) -> Value {
        let r = self
            .post(
                "/api/users",
                serde_json::json!({"email": email, "name": name}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.unwrap()
    }

    /// Schedules a meeting through the API and returns its JSON.
    pub async fn create_meeting(&self, host: &Value, topic: &str) -> Value {
        let r = self
            .post(
                "/api/meetings",
                serde_json::json!({"host_id": host["id"], "topic": topic}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json().await.unwrap()
    }

    /// Asks the site to shut down without waiting for it.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// True once `serve` has returned.
    pub fn is_finished(&self) -> bool {
        match &self.task {
            Some(t) => t.is_finished(),
            None => true,
        }
    }

    /// Cancels the site and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), gsb_site::Error> {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("site stops within the deadline")
            .expect("site task did not panic")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Body of an error response, checking it is JSON with an `error` string.
pub async fn error_body(r: Response) -> Value {
    let v: Value = r.json().await.expect("error body is JSON");
    assert!(v["error"].is_string(), "error body {v}");
    v
}
