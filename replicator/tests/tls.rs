//! The database links over TLS: both sites' servers with `ssl = on` and a certificate of a
//! test CA; the replicator with `ca_file` replicates with every connection (SQL and
//! replication) encrypted, and refuses a server whose certificate another CA signed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;

use common::{count, start};
use gsb_replicator::Config;
use gsb_tests::pg::PgServer;
use gsb_tests::wait_until;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`) in `dir`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

/// Turns TLS on in `srv` with a certificate for 127.0.0.1 signed by the CA `ca` of `dir`.
async fn serve_tls(srv: &PgServer, dir: &Path, ca: &str) {
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "ext.cnf",
        ],
    );
    // Into the data directory, owned as it is (the server runs as `postgres` under root).
    let data = srv.cluster().data_dir();
    let meta = std::fs::metadata(data).unwrap();
    for f in ["server.pem", "server.key"] {
        let to = data.join(f);
        std::fs::copy(dir.join(f), &to).unwrap();
        std::os::unix::fs::chown(&to, Some(meta.uid()), Some(meta.gid())).unwrap();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let c = srv.client("postgres").await;
    for q in [
        "ALTER SYSTEM SET ssl_cert_file = 'server.pem'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "ALTER SYSTEM SET ssl = on",
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(q).await.unwrap();
    }
    wait_until(Duration::from_secs(10), "ssl on", || async {
        c.query_one("SHOW ssl", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            == "on"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ca_file_every_database_link_is_tls_and_a_foreign_certificate_is_refused() {
    let (ps, bs) = common::servers(common::SITE_TABLES).await;
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path(), "ca");
    ca(dir.path(), "other");
    serve_tls(&ps, dir.path(), "ca").await;
    serve_tls(&bs, dir.path(), "ca").await;
    let extra = |ca: &str| format!("ca_file = \"{}\"\n", dir.path().join(ca).display());
    // Another CA's roots: the servers are not trusted, and the check says why.
    let other = Config::from_toml_str(&common::config_text(&ps, &bs, &extra("other.pem"))).unwrap();
    for (site, r) in gsb_replicator::check_databases(&other).await {
        let e = r
            .expect_err("a certificate of an untrusted CA is refused")
            .to_string();
        assert!(
            e.contains(site.as_str()) && e.to_lowercase().contains("certificate"),
            "{e}"
        );
    }
    let config = Config::from_toml_str(&common::config_text(&ps, &bs, &extra("ca.pem"))).unwrap();
    let r = start(&config);
    let (p, b) = (ps.client("site").await, bs.client("site").await);
    common::wait_streaming(&p, &b).await;
    p.batch_execute("INSERT INTO users (id, email) VALUES (gen_random_uuid(), 'over tls')")
        .await
        .unwrap();
    b.batch_execute("INSERT INTO meetings (id, topic) VALUES (gen_random_uuid(), 'over tls')")
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "rows both ways", || async {
        count(&b, "SELECT count(*) FROM users WHERE email = 'over tls'").await == 1
            && count(&p, "SELECT count(*) FROM meetings WHERE topic = 'over tls'").await == 1
    })
    .await;
    // Every connection of the replicator on each server, the walsenders included, is TLS.
    for c in [&p, &b] {
        let q = "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl), \
                 count(*) FILTER (WHERE a.backend_type = 'walsender' AND s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name LIKE 'gsb-%'";
        let row = c.query_one(q, &[]).await.unwrap();
        let (tls, plain, walsenders): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert!(
            tls >= 2 && plain == 0 && walsenders == 1,
            "tls {tls}, plain {plain}, walsenders {walsenders}"
        );
    }
    r.shutdown().await;
}
