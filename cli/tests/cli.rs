//! The `gsb` command line as users meet it (also makes `cargo test --workspace` build the `gsb`
//! binary that the end-to-end tests of other packages run).

use std::process::Command;

fn gsb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gsb"))
}

fn check_config(path: &std::path::Path) -> std::process::Output {
    gsb()
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run gsb check-config")
}

#[test]
fn help_lists_every_contract_command() {
    let out = gsb().arg("--help").output().expect("run gsb --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "proxy",
        "replicator",
        "up",
        "status",
        "failover",
        "failback",
        "auto",
        "verify",
        "copy-config",
        "check-config",
        "site",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(cmd)),
            "`gsb --help` does not list `{cmd}`:\n{help}"
        );
    }
}

#[test]
fn check_config_names_the_bad_key_and_exits_64() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gsb.toml");
    std::fs::write(
        &path,
        "[sites.primary]\nurl = \"http://127.0.0.1:8001\"\n[sites.backup]\nurl = \"http://127.0.0.1:8002\"\n[health]\nrise = 0\n",
    )
    .expect("write config");
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(64), "bad config exits 64");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("health.rise"),
        "the message names the key: {err}"
    );

    std::fs::write(
        &path,
        "[sites.primary]\nurl = \"http://127.0.0.1:8001\"\n[sites.backup]\nurl = \"http://127.0.0.1:8002\"\n",
    )
    .expect("write config");
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_validates_the_coordination_section() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gsb.toml");
    let sites = "[sites.primary]\nurl = \"http://127.0.0.1:8001\"\n[sites.backup]\nurl = \"http://127.0.0.1:8002\"\n";
    for (section, key) in [
        ("[coordination]\netcd = []\n", "coordination.etcd"),
        (
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"100ms\"\n",
            "coordination.lease_ttl",
        ),
        (
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nquorum = \"most\"\n",
            "quorum",
        ),
        (
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nleader = \"me\"\n",
            "leader",
        ),
    ] {
        std::fs::write(&path, format!("{sites}{section}")).expect("write config");
        let out = check_config(&path);
        assert_eq!(out.status.code(), Some(64), "{section}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "{section}: the message names {key}: {err}"
        );
    }
    std::fs::write(
        &path,
        format!("{sites}[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nname = \"p1\"\nregion = \"west\"\non_loss = \"local\"\nlocal_after = \"1m\"\n"),
    )
    .expect("write config");
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
