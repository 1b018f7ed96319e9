//! The site's HTTP surface against a real PostgreSQL server, over real HTTP on port 0.

mod common;

use common::{error_body, start_pg, Site};
use gsb_site::Role;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_round_trip_newest_first_and_stop_gracefully() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;

    let alice = site.create_user("alice@example.com", "Alice").await;
    let bob = site.create_user("bob@example.com", "Bob").await;
    assert_eq!(alice["email"], "alice@example.com");
    assert_eq!(alice["name"], "Alice");
    assert!(alice["created_at"].is_string());

    let r = site
        .get(&format!("/api/users/{}", alice["id"].as_str().unwrap()))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-gsb-site"], "primary");
    let got: Value = r.json().await.unwrap();
    assert_eq!(got, alice);

    let list: Vec<Value> = site.get("/api/users").await.json().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], bob["id"], "newest first");
    let one: Vec<Value> = site.get("/api/users?limit=1").await.json().await.unwrap();
    assert_eq!(one.len(), 1);

    let r = site
        .get("/api/users/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-gsb-site"], "primary");

    // The rows are really in PostgreSQL, in the agreed table.
    let db = pg.client("site").await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    site.stop().await.expect("serve returns Ok on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meeting_state_machine_and_usage_report() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let host = site.create_user("host@example.com", "Host").await;
    let guest = site.create_user("guest@example.com", "Guest").await;

    let r = site
        .post(
            "/api/meetings",
            json!({"host_id": host["id"], "topic": "Standup",
                   "start_time": "2030-01-02T09:30:00Z", "duration_minutes": 15}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let m: Value = r.json().await.unwrap();
    assert_eq!(m["status"], "scheduled");
    assert_eq!(m["duration_minutes"], 15);
    assert_eq!(m["start_time"], "2030-01-02T09:30:00Z");
    let id = m["id"].as_str().unwrap().to_owned();
    let path = |action: &str| format!("/api/meetings/{id}/{action}");

    // Ending a meeting that never started is illegal.
    let r = site.post(&path("end"), json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(error_body(r).await["status"], "scheduled");

    let r = site.post(&path("start"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "in_progress");
    let r = site.post(&path("start"), json!({})).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    for _ in 0..2 {
        let r = site
            .post(&path("join"), json!({"user_id": guest["id"]}))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["usage"]["kind"], "join");
        assert_eq!(body["usage"]["site"], "primary");
        assert_eq!(body["usage"]["user_id"], guest["id"]);
    }

    let r = site.post(&path("end"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let ended: Value = r.json().await.unwrap();
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["usage"]["kind"], "meeting_end");
    assert_eq!(ended["usage"]["minutes"], 1, "at least one minute");

    for action in ["start", "end"] {
        let r = site.post(&path(action), json!({})).await;
        assert_eq!(r.status(), StatusCode::CONFLICT, "{action} after end");
        assert_eq!(error_body(r).await["status"], "ended");
    }
    let r = site
        .post(&path("join"), json!({"user_id": guest["id"]}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    let got: Value = site
        .get(&format!("/api/meetings/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["status"], "ended");
    let r = site
        .post(
            "/api/meetings/00000000-0000-4000-8000-000000000000/start",
            json!({}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A usage row written on the backup and merged here counts under `backup`.
    let db = pg.client("site").await;
    db.execute(
        "INSERT INTO usage_records (id, meeting_id, kind, minutes, site) \
         VALUES (gen_random_uuid(), gen_random_uuid(), 'meeting_end', 42, 'backup')",
        &[],
    )
    .await
    .unwrap();
    let report: Value = site.get("/api/usage/report").await.json().await.unwrap();
    assert_eq!(report["joins"], 2);
    assert_eq!(report["meetings_ended"], 2);
    assert_eq!(report["minutes"], 43);
    assert_eq!(
        report["by_site"]["primary"],
        json!({"joins": 2, "meetings_ended": 1, "minutes": 1})
    );
    assert_eq!(
        report["by_site"]["backup"],
        json!({"joins": 0, "meetings_ended": 1, "minutes": 42})
    );

    let list: Vec<Value> = site
        .get("/api/meetings?status=ended")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minutes_of_an_ended_meeting_count_from_its_start() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Backup, false).await;
    let host = site.create_user("h@example.com", "H").await;
    let m = site.create_meeting(&host, "Long one").await;
    let id = m["id"].as_str().unwrap();
    let r = site
        .post(&format!("/api/meetings/{id}/start"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // Pretend it started 90 minutes ago (as if the start arrived by replication).
    let db = pg.client("site").await;
    db.execute(
        "UPDATE meetings SET updated_at = now() - interval '90 minutes' WHERE id = $1",
        &[&uuid::Uuid::parse_str(id).unwrap()],
    )
    .await
    .unwrap();
    let ended: Value = site
        .post(&format!("/api/meetings/{id}/end"), json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ended["usage"]["minutes"], 90);
    assert_eq!(ended["usage"]["site"], "backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_pages_client_versions_and_html() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;

    let r = site
        .put("/api/config/site_name", json!({"value": "Acme <Meet>"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    site.put("/api/config/max_participants", json!({"value": "100"}))
        .await;
    let all: Value = site.get("/api/config").await.json().await.unwrap();
    assert_eq!(
        all,
        json!({"max_participants": "100", "site_name": "Acme <Meet>"})
    );
    let one: Value = site
        .get("/api/config/max_participants")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["value"], "100");
    assert_eq!(
        site.get("/api/config/nope").await.status(),
        StatusCode::NOT_FOUND
    );

    let r = site
        .put(
            "/api/pages/help/faq",
            json!({"title": "FAQ", "body": "Ask <us> anything"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = site.get("/pages/help/faq").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("FAQ"));
    assert!(
        page.contains("Ask &lt;us&gt; anything"),
        "body escaped: {page}"
    );
    assert!(page.contains("Acme &lt;Meet&gt;"), "site name from config");
    assert_eq!(
        site.get("/pages/missing").await.status(),
        StatusCode::NOT_FOUND
    );

    let r = site
        .put(
            "/api/client_versions/windows",
            json!({"version": "5.17.1", "download_url": "https://dl.example.com/win.exe"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    site.put(
        "/api/client_versions/mac",
        json!({"version": "5.17.0", "download_url": "https://dl.example.com/mac.pkg"}),
    )
    .await;
    site.put(
        "/api/client_versions/windows",
        json!({"version": "5.18.0", "download_url": "https://dl.example.com/win2.exe"}),
    )
    .await;
    let list: Value = site.get("/api/client_versions").await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["platform"], "mac");
    assert_eq!(list[1]["version"], "5.18.0", "PUT replaces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_forms_schedule_and_start_a_meeting() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Backup, false).await;

    let r = site
        .http
        .post(site.at("/users"))
        .form(&[("name", "Dana Doe"), ("email", "dana@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let users_page = site.get("/users").await.text().await.unwrap();
    assert!(users_page.contains("Dana Doe"));
    let users: Vec<Value> = site.get("/api/users").await.json().await.unwrap();
    let host = users[0]["id"].as_str().unwrap().to_owned();

    let r = site
        .http
        .post(site.at("/meetings"))
        .form(&[
            ("topic", "Board & review"),
            ("host_id", host.as_str()),
            ("start_time", "2031-03-04T10:00"),
            ("duration_minutes", "45"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/meetings/"), "{location}");

    let home = site.get("/").await;
    assert_eq!(home.headers()["x-gsb-site"], "backup");
    let home = home.text().await.unwrap();
    assert!(home.contains("<strong>Backup</strong>"), "role banner");
    assert!(home.contains("Board &amp; review"));
    assert!(home.contains("2031-03-04 10:00 UTC"));

    let r = site
        .http
        .post(site.at(&format!("{location}/start")))
        .form(&[("go", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let page = site.get(&location).await.text().await.unwrap();
    assert!(
        page.contains("<dd id=\"status\">in_progress</dd>"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectbackup_answers_each_sites_own_role() {
    let pg = start_pg().await;
    let primary = Site::start(&pg, "primary_site", Role::Primary, false).await;
    let backup = Site::start(&pg, "backup_site", Role::Backup, false).await;
    for (site, expected) in [(&primary, "Primary"), (&backup, "Backup")] {
        for path in [
            "/detectbackup.php",
            "/meet/detectbackup.php",
            "/detectbackup",
        ] {
            let r = site.get(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()["content-type"], "text/plain");
            assert_eq!(r.headers()["cache-control"], "no-store");
            assert_eq!(r.text().await.unwrap(), expected, "{path}");
        }
    }
    let r = primary.post("/detectbackup", json!({})).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_field() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let host = site.create_user("h@example.com", "H").await;

    let r = site
        .http
        .post(site.at("/api/users"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(error_body(r).await["error"]
        .as_str()
        .unwrap()
        .contains("invalid JSON"));

    let cases = [
        ("/api/users", json!({"name": "No Mail"}), "email"),
        (
            "/api/users",
            json!({"email": "x@example.com", "name": 7}),
            "name",
        ),
        (
            "/api/users",
            json!({"email": "not-an-address", "name": "N"}),
            "email",
        ),
        ("/api/meetings", json!({"topic": "t"}), "host_id"),
        (
            "/api/meetings",
            json!({"host_id": "nope", "topic": "t"}),
            "host_id",
        ),
        ("/api/meetings", json!({"host_id": host["id"]}), "topic"),
        (
            "/api/meetings",
            json!({"host_id": host["id"], "topic": "t", "duration_minutes": 0}),
            "duration_minutes",
        ),
        (
            "/api/meetings",
            json!({"host_id": host["id"], "topic": "t", "start_time": "soon"}),
            "start_time",
        ),
    ];
    for (path, body, field) in cases {
        let r = site.post(path, body.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let err = error_body(r).await;
        assert_eq!(err["field"], field, "{body} -> {err}");
        assert!(err["error"].as_str().unwrap().contains(field), "{err}");
    }
    let r = site.put("/api/config/k", json!({"val": "x"})).await;
    assert_eq!(error_body(r).await["field"], "value");
    let r = site.get("/api/users/not-a-uuid").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = site.get("/api/users?limit=0").await;
    assert_eq!(error_body(r).await["field"], "limit");

    assert_eq!(
        site.get("/no/such/route").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        site.get("/api/nothing").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = site
        .http
        .delete(site.at("/api/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, HEAD, POST");
    assert_eq!(r.headers()["x-gsb-site"], "primary");

    let big = format!(
        "{{\"email\":\"a@b.c\",\"name\":\"{}\"}}",
        "x".repeat(1024 * 1024 + 1)
    );
    let r = site
        .http
        .post(site.at("/api/users"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await;
    // The site answers 413 as soon as the limit is passed and closes; a client still writing the
    // rest of the body may see that close (broken pipe) before it reads the answer.
    match r {
        Ok(r) => assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => assert!(
            format!("{e:?}").contains("BodyWrite"),
            "only a refused body write may fail the request: {e:?}"
        ),
    }

    // Nothing invalid was stored.
    let users: Vec<Value> = site.get("/api/users").await.json().await.unwrap();
    assert_eq!(users.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_sent_with_curls_default_form_content_type_is_read_as_json() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let r = site
        .http
        .post(site.at("/api/users"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"email":"curl@example.com","name":"Curl"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "Curl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ends_write_exactly_one_usage_row() {
    let pg = start_pg().await;
    let site = Site::start(&pg, "site", Role::Primary, false).await;
    let host = site.create_user("h@example.com", "H").await;
    let m = site.create_meeting(&host, "Race").await;
    let id = m["id"].as_str().unwrap().to_owned();
    let r = site
        .post(&format!("/api/meetings/{id}/start"), json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let url = site.at(&format!("/api/meetings/{id}/end"));
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let http = site.http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                http.post(url)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut ok = 0;
    for a in attempts {
        match a.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 1, "exactly one end succeeds");
    let report: Value = site.get("/api/usage/report").await.json().await.unwrap();
    assert_eq!(report["meetings_ended"], 1);
}
