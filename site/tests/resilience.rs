//! Health reflects real state: the database dying and returning, a late database, a
//! recreated schema, and the fault switch.

mod common;

use common::{start_pg, Site, DEADLINE};
use gsb_site::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

const COMPONENTS: [&str; 4] = ["web", "meetings", "api", "db"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_red_when_the_database_dies_and_green_after_restart() {
    let mut pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    for c in COMPONENTS {
        assert_eq!(site.health(c).await, 200, "{c} healthy at start");
    }
    let host = site.create_user("h@example.com", "H").await;

    tokio::task::block_in_place(|| pg.kill());
    for c in ["db", "meetings", "api"] {
        site.wait_health(c, 503).await;
    }
    assert_eq!(site.health("web").await, 200, "the process itself is fine");
    let r = site.get("/health/db").await;
    assert!(r.text().await.unwrap().starts_with("db: "), "reason given");
    let r = site
        .post("/api/users", json!({"email": "x@example.com", "name": "X"}))
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    tokio::task::block_in_place(|| pg.restart());
    for c in COMPONENTS {
        site.wait_health(c, 200).await;
    }
    // The pool reconnected: reads and writes work again and old data is there.
    let got = site
        .get(&format!("/api/users/{}", host["id"].as_str().unwrap()))
        .await;
    assert_eq!(got.status(), StatusCode::OK);
    site.create_meeting(&host, "After the crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_its_database_and_installs_the_schema_when_it_appears() {
    let mut pg = start_pg().await;
    let dsn = tokio::task::block_in_place(|| pg.create_db("site"));
    tokio::task::block_in_place(|| pg.stop());

    let site = Site::spawn(dsn, Role::Backup, false).await;
    site.wait_health("web", 200).await;
    assert_eq!(site.health("db").await, 503);
    assert_eq!(site.health("api").await, 503);
    let r = site.get("/detectbackup").await;
    assert_eq!(
        r.text().await.unwrap(),
        "Backup",
        "answers without a database"
    );

    tokio::task::block_in_place(|| pg.restart());
    site.wait_health("api", 200).await;
    site.wait_health("meetings", 200).await;
    site.create_user("late@example.com", "Late").await;
    site.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstalls_tables_dropped_under_it() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let db = pg.client("site").await;
    db.batch_execute("DROP TABLE users").await.unwrap();
    let r = site.get("/api/users").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    gsb_tests::wait_until(DEADLINE, "users table reinstalled", || async {
        site.get("/api/users").await.status() == StatusCode::OK
    })
    .await;
    site.create_user("again@example.com", "Again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_its_tables_in_public_when_a_schema_is_named_like_its_role() {
    // `gsb up` connects as role `gsb`, and the replicator creates schema `gsb`: a restarted site
    // must still find (and, if missing, recreate) its tables in `public`, not in `gsb`.
    let pg = start_pg().await;
    let dsn = tokio::task::block_in_place(|| pg.create_db("site"));
    let db = pg.client("site").await;
    db.batch_execute("CREATE SCHEMA gsb").await.unwrap();
    let site = Site::spawn(dsn, Role::Primary, false).await;
    site.wait_health("api", 200).await;
    site.create_user("ada@example.com", "Ada").await;
    let rows = db
        .query(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'users'",
            &[],
        )
        .await
        .unwrap();
    let schemas: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        schemas,
        vec!["public".to_string()],
        "users table created outside public"
    );
    let n: i64 = db
        .query_one("SELECT count(*) FROM public.users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the user was written outside public.users");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_switch_is_404_without_the_flag_and_breaks_exactly_one_component() {
    let pg = start_pg().await;
    let plain = Site::start(&pg, "plain", Role::Primary, false).await;
    assert_eq!(plain.get("/_faults").await.status(), StatusCode::NOT_FOUND);
    let r = plain
        .post("/_faults", json!({"component": "meetings", "broken": true}))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(plain.health("meetings").await, 200);

    let site = Site::start(&pg, "drill", Role::Primary, true).await;
    let host = site.create_user("h@example.com", "H").await;
    let r = site
        .post("/_faults", json!({"component": "meetings", "broken": true}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let listed: Value = site.get("/_faults").await.json().await.unwrap();
    assert_eq!(listed["broken"], json!(["meetings"]));

    for c in COMPONENTS {
        let expected = if c == "meetings" { 503 } else { 200 };
        assert_eq!(site.health(c).await, expected, "{c}");
    }
    let r = site
        .post(
            "/api/meetings",
            json!({"host_id": host["id"], "topic": "t"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        site.get("/api/users").await.status(),
        StatusCode::OK,
        "users unaffected"
    );
    let home = site.get("/").await;
    assert_eq!(
        home.status(),
        StatusCode::OK,
        "home page degrades, not fails"
    );
    assert!(home
        .text()
        .await
        .unwrap()
        .contains("Meetings are unavailable"));

    let r = site
        .post("/_faults", json!({"component": "disk", "broken": true}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "component");

    site.post(
        "/_faults",
        json!({"component": "meetings", "broken": false}),
    )
    .await;
    for c in COMPONENTS {
        assert_eq!(site.health(c).await, 200, "{c} after repair");
    }
    site.create_meeting(&host, "Works again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_and_lets_running_requests_finish() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let host = site.create_user("h@example.com", "H").await;
    let m = site.create_meeting(&host, "Drain").await;
    let id = uuid::Uuid::parse_str(m["id"].as_str().unwrap()).unwrap();

    // Hold the meeting's row lock so a `start` request stays in flight inside the site.
    let locker = pg.client("site").await;
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute("SELECT 1 FROM meetings WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let http = site.http.clone();
        let url = site.at(&format!("/api/meetings/{id}/start"));
        async move {
            http.post(url)
                .json(&json!({}))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    let watcher = pg.client("site").await;
    gsb_tests::wait_until(
        DEADLINE,
        "the start request waits on the row lock",
        || async {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 1
        },
    )
    .await;

    site.cancel();
    let addr = site.url.trim_start_matches("http://").to_owned();
    gsb_tests::wait_until(DEADLINE, "the listener is closed", || async {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;
    assert!(!site.is_finished(), "serve waits for the running request");

    locker.batch_execute("COMMIT").await.unwrap();
    let status = in_flight
        .await
        .unwrap()
        .expect("the in-flight request got an answer");
    assert_eq!(status, StatusCode::OK);
    site.stop().await.expect("clean stop after the drain");
}
