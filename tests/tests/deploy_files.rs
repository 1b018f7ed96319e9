//! Checks of the operations surface in `deploy/`: every file parses, names only metrics, keys and
//! commands the project really has (read from the sources at test time, so a rename in `proxy/`
//! or `replicator/` fails here), and the real `gsb` binary accepts the example configs.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_yaml_ng::Value as Yaml;

/// The workspace root (this crate lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yml" || e == "yaml")
}

/// All YAML documents of a file (Kubernetes files hold several, separated by `---`).
fn yaml_docs(path: &Path) -> Result<Vec<Yaml>> {
    use serde::Deserialize;
    let text = read(path)?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value =
            Yaml::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `a.b.c` lookup in a YAML mapping; `None` when a step is missing.
fn yget<'a>(v: &'a Yaml, dotted: &str) -> Option<&'a Yaml> {
    dotted.split('.').try_fold(v, |cur, key| cur.get(key))
}

fn ystr<'a>(v: &'a Yaml, dotted: &str) -> Option<&'a str> {
    yget(v, dotted).and_then(Yaml::as_str)
}

/// Every Kubernetes object in `deploy/kubernetes/`, with the file it came from.
fn k8s_objects() -> Result<Vec<(PathBuf, Yaml)>> {
    let mut out = Vec::new();
    for path in files_under(&deploy("kubernetes"))? {
        if !is_yaml(&path) || path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        for doc in yaml_docs(&path)? {
            out.push((path.clone(), doc));
        }
    }
    Ok(out)
}

fn find_object<'a>(objects: &'a [(PathBuf, Yaml)], kind: &str, name: &str) -> Result<&'a Yaml> {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| ystr(o, "kind") == Some(kind) && ystr(o, "metadata.name") == Some(name))
        .with_context(|| format!("deploy/kubernetes has no {kind} named {name}"))
}

/// Metric names the project exports: every `"gsb_..."` string literal in the product crates'
/// sources (that is how metrics are registered).
fn exported_metrics() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for krate in ["proxy", "replicator", "health", "fleet", "cli"] {
        let dir = root().join(krate).join("src");
        if !dir.is_dir() {
            continue;
        }
        for path in files_under(&dir)? {
            if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path)?;
                for (i, _) in text.match_indices("\"gsb_") {
                    let name: String = text[i + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if text[i + 1 + name.len()..].starts_with('"') {
                        names.insert(name);
                    }
                }
            }
        }
    }
    Ok(names)
}

/// The `gsb_*` metric names a PromQL expression uses (histogram series mapped to their family).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    for (i, _) in expr.match_indices("gsb_") {
        // Only at the start of an identifier: not inside `job_name` or a label value like "xgsb_".
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            continue;
        }
        let name: String = expr[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

/// Checks every metric used is exported; a histogram's `_bucket`/`_sum`/`_count` counts as its
/// family. Returns the families used.
fn check_metrics(
    what: &str,
    used: &BTreeMap<String, String>,
    exported: &BTreeSet<String>,
) -> Result<BTreeSet<String>> {
    let mut families = BTreeSet::new();
    let mut unknown = Vec::new();
    for (name, place) in used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| exported.contains(*base))
            })
            .unwrap_or(name);
        if exported.contains(family) {
            families.insert(family.to_owned());
        } else {
            unknown.push(format!("{name} (in {place})"));
        }
    }
    ensure!(
        unknown.is_empty(),
        "{what} uses metrics gsb does not export: {unknown:?}\nexported: {exported:?}"
    );
    Ok(families)
}

#[test]
fn every_yaml_file_parses() -> Result<()> {
    let mut count = 0;
    for path in files_under(&root().join("deploy"))? {
        if is_yaml(&path) {
            let docs = yaml_docs(&path)?;
            ensure!(
                !docs.is_empty(),
                "{} holds no YAML document",
                path.display()
            );
            count += docs.len();
        }
    }
    ensure!(
        count >= 10,
        "expected the kubernetes manifests and prometheus rules, found {count} documents"
    );
    Ok(())
}

#[test]
fn kubernetes_manifests_have_what_operations_need() -> Result<()> {
    let objects = k8s_objects()?;
    for (path, o) in &objects {
        for key in ["apiVersion", "kind", "metadata.name"] {
            ensure!(
                ystr(o, key).is_some(),
                "{}: an object without {key}",
                path.display()
            );
        }
    }

    // Kustomize lists every manifest, and every manifest it lists exists.
    let kustomization = &yaml_docs(&deploy("kubernetes/kustomization.yaml"))?[0];
    let listed: BTreeSet<String> = yget(kustomization, "resources")
        .and_then(Yaml::as_sequence)
        .context("kustomization.yaml: resources")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let present: BTreeSet<String> = files_under(&deploy("kubernetes"))?
        .iter()
        .filter(|p| is_yaml(p))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .filter(|n| n != "kustomization.yaml")
        .collect();
    ensure!(
        listed == present,
        "kustomization resources {listed:?} differ from the files {present:?}"
    );

    // Proxy: several replicas, ready on /healthz, config and token mounted from ConfigMap/Secret.
    let proxy = find_object(&objects, "Deployment", "gsb-proxy")?;
    let replicas = yget(proxy, "spec.replicas")
        .and_then(Yaml::as_u64)
        .context("proxy replicas")?;
    ensure!(
        replicas >= 2,
        "the proxy runs {replicas} replica(s); it should be several"
    );
    let pod = yget(proxy, "spec.template.spec").context("proxy pod spec")?;
    let container = &yget(pod, "containers")
        .and_then(Yaml::as_sequence)
        .context("containers")?[0];
    ensure!(
        ystr(container, "readinessProbe.httpGet.path") == Some("/healthz"),
        "proxy readiness must be on /healthz"
    );
    let args: Vec<&str> = yget(container, "args")
        .and_then(Yaml::as_sequence)
        .context("proxy args")?
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    ensure!(
        args.windows(2).any(|w| w == ["proxy", "--config"]),
        "proxy container args {args:?} must run `gsb proxy --config`"
    );
    let volumes = yget(pod, "volumes")
        .and_then(Yaml::as_sequence)
        .context("proxy volumes")?;
    let config_map = volumes
        .iter()
        .find_map(|v| ystr(v, "configMap.name"))
        .context("proxy config from a ConfigMap")?;
    find_object(&objects, "ConfigMap", config_map)?;
    let secrets: Vec<&str> = volumes
        .iter()
        .filter_map(|v| ystr(v, "secret.secretName"))
        .collect();
    let token_secret = secrets
        .iter()
        .find(|s| s.contains("token"))
        .with_context(|| format!("proxy mounts no admin token Secret (mounts {secrets:?})"))?;
    find_object(&objects, "Secret", token_secret)?;

    // A PodDisruptionBudget selects the proxy pods.
    let proxy_labels = yget(proxy, "spec.selector.matchLabels").context("proxy selector")?;
    ensure!(
        selects_pods(&objects, "PodDisruptionBudget", proxy_labels),
        "no PodDisruptionBudget selects the proxy pods"
    );
    let service_selects_proxy = objects.iter().any(|(_, o)| {
        ystr(o, "kind") == Some("Service") && yget(o, "spec.selector") == Some(proxy_labels)
    });
    ensure!(service_selects_proxy, "no Service selects the proxy pods");

    // Replicator: a lock-elected pair, scraped.
    let replicator = find_object(&objects, "Deployment", "gsb-replicator")?;
    ensure!(
        yget(replicator, "spec.replicas").and_then(Yaml::as_u64) == Some(2),
        "replicator: 2 replicas (active + standby)"
    );
    // Annotation keys contain dots, so they are looked up directly, not by a dotted path.
    let scraped = yget(replicator, "spec.template.metadata.annotations")
        .and_then(|a| a.get("prometheus.io/scrape"))
        .and_then(Yaml::as_str)
        == Some("true")
        || objects
            .iter()
            .any(|(_, o)| ystr(o, "kind") == Some("ServiceMonitor"));
    ensure!(
        scraped,
        "the replicator's metrics are not scraped (annotations or ServiceMonitor)"
    );

    fleet_manifests(&objects, proxy, &secrets)
}

/// The fleet on Kubernetes: the proxies' `[coordination]` names the members of the etcd
/// StatefulSet, which runs three members that survive a zone, keep their data and compact.
fn fleet_manifests(objects: &[(PathBuf, Yaml)], proxy: &Yaml, secrets: &[&str]) -> Result<()> {
    let config_map = yget(proxy, "spec.template.spec.volumes")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .find_map(|v| ystr(v, "configMap.name"))
        .context("proxy config ConfigMap")?;
    // The key has a dot, so it is looked up directly, not by a dotted path.
    let text = yget(find_object(objects, "ConfigMap", config_map)?, "data")
        .and_then(|d| d.get("gsb.toml"))
        .and_then(Yaml::as_str)
        .context("the proxy ConfigMap has no gsb.toml")?;
    let config: toml::Table = toml::from_str(text).context("the proxy's gsb.toml")?;
    let coordination = config
        .get("coordination")
        .and_then(toml::Value::as_table)
        .context("the proxies run as a fleet: [coordination] in the proxy ConfigMap")?;
    ensure!(
        coordination.get("name").is_none(),
        "[coordination] name must be left out on Kubernetes (every pod shares the ConfigMap; the default is the pod name)"
    );
    let endpoints: Vec<&str> = coordination
        .get("etcd")
        .and_then(toml::Value::as_array)
        .context("[coordination] etcd")?
        .iter()
        .filter_map(toml::Value::as_str)
        .collect();

    let etcd = objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| ystr(o, "kind") == Some("StatefulSet"))
        .context("no etcd StatefulSet")?;
    let name = ystr(etcd, "metadata.name").context("StatefulSet name")?;
    let namespace = ystr(etcd, "metadata.namespace").unwrap_or("gsb");
    ensure!(
        yget(etcd, "spec.replicas").and_then(Yaml::as_u64) == Some(3),
        "etcd: 3 members (2 keep quorum)"
    );
    ensure!(
        ystr(etcd, "spec.podManagementPolicy") == Some("Parallel"),
        "etcd: podManagementPolicy Parallel (members bootstrap together)"
    );
    ensure!(
        yget(etcd, "spec.volumeClaimTemplates")
            .and_then(Yaml::as_sequence)
            .is_some_and(|v| !v.is_empty()),
        "etcd: a persistent volume per member (volumeClaimTemplates)"
    );
    let labels = yget(etcd, "spec.selector.matchLabels").context("etcd selector")?;
    ensure!(
        selects_pods(objects, "PodDisruptionBudget", labels),
        "no PodDisruptionBudget selects the etcd pods"
    );
    let pod = yget(etcd, "spec.template.spec").context("etcd pod spec")?;
    let spread_over_zones = yget(pod, "topologySpreadConstraints")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .any(|c| {
            ystr(c, "topologyKey") == Some("topology.kubernetes.io/zone")
                && ystr(c, "whenUnsatisfiable") == Some("DoNotSchedule")
        });
    ensure!(
        spread_over_zones,
        "etcd: one member per zone (topologySpreadConstraints, DoNotSchedule)"
    );
    let service = ystr(etcd, "spec.serviceName").context("etcd serviceName")?;
    let headless = find_object(objects, "Service", service)?;
    ensure!(
        ystr(headless, "spec.clusterIP") == Some("None")
            && yget(headless, "spec.publishNotReadyAddresses").and_then(Yaml::as_bool) == Some(true),
        "etcd: the headless Service {service} must publish not-ready addresses (peers find each other before quorum)"
    );
    let env: BTreeMap<String, String> = etcd_env(pod)?;
    check_etcd_env("kubernetes/etcd.yaml", env.keys())?;
    for (key, want) in [
        ("ETCD_AUTO_COMPACTION_MODE", None),
        ("ETCD_AUTO_COMPACTION_RETENTION", None),
        ("ETCD_QUOTA_BACKEND_BYTES", None),
        ("ETCD_CLIENT_CERT_AUTH", Some("true")),
        ("ETCD_PEER_CLIENT_CERT_AUTH", Some("true")),
    ] {
        let got = env
            .get(key)
            .with_context(|| format!("etcd: {key} is not set"))?;
        if let Some(want) = want {
            ensure!(got == want, "etcd: {key}={want} expected, found {got}");
        }
    }
    // The proxies list exactly the members, over TLS.
    let members: BTreeSet<String> = (0..3)
        .map(|i| format!("https://{name}-{i}.{service}.{namespace}.svc:2379"))
        .collect();
    let listed: BTreeSet<String> = endpoints.iter().map(|e| e.to_string()).collect();
    ensure!(
        listed == members,
        "[coordination] etcd {listed:?} must list the StatefulSet's members {members:?}"
    );
    for (key, value) in env.iter().filter(|(k, _)| k.ends_with("_URLS")) {
        ensure!(
            !key.contains("CLIENT") || key.contains("METRICS") || value.starts_with("https://"),
            "etcd: {key} must be https:// (the proxies' endpoints are)"
        );
    }
    // The client certificate files come from a mounted Secret.
    let proxy_pod = yget(proxy, "spec.template.spec").context("proxy pod spec")?;
    let mounts = yget(proxy_pod, "containers")
        .and_then(Yaml::as_sequence)
        .and_then(|c| c.first())
        .and_then(|c| yget(c, "volumeMounts"))
        .and_then(Yaml::as_sequence)
        .context("proxy volumeMounts")?;
    for key in ["ca_file", "cert_file", "key_file"] {
        let file = coordination
            .get(key)
            .and_then(toml::Value::as_str)
            .with_context(|| {
                format!(
                    "[coordination] {key}: the etcd of etcd.yaml requires TLS client certificates"
                )
            })?;
        let mount = mounts
            .iter()
            .find(|m| ystr(m, "mountPath").is_some_and(|p| Path::new(file).starts_with(p)))
            .with_context(|| {
                format!("[coordination] {key} {file} is on no volume of the proxy pod")
            })?;
        let volume = ystr(mount, "name").unwrap_or_default();
        let secret = yget(proxy_pod, "volumes")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
            .find(|v| ystr(v, "name") == Some(volume))
            .and_then(|v| ystr(v, "secret.secretName"));
        ensure!(
            secret.is_some_and(|s| secrets.contains(&s)),
            "[coordination] {key} must come from a Secret volume, not {volume}"
        );
    }
    Ok(())
}

fn selects_pods(objects: &[(PathBuf, Yaml)], kind: &str, labels: &Yaml) -> bool {
    objects.iter().any(|(_, o)| {
        ystr(o, "kind") == Some(kind) && yget(o, "spec.selector.matchLabels") == Some(labels)
    })
}

/// The `ETCD_*` environment of the etcd container of a pod spec (etcd reads every flag so).
fn etcd_env(pod: &Yaml) -> Result<BTreeMap<String, String>> {
    let container = yget(pod, "containers")
        .and_then(Yaml::as_sequence)
        .and_then(|c| c.first())
        .context("etcd container")?;
    Ok(yget(container, "env")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| Some((ystr(e, "name")?.to_owned(), ystr(e, "value")?.to_owned())))
        .filter(|(k, _)| k.starts_with("ETCD_"))
        .collect())
}

/// The flags `etcd --help` lists, when etcd is installed (`apt-get install etcd-server`).
fn etcd_flags() -> Option<BTreeSet<String>> {
    let out = Command::new("etcd").arg("--help").output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let flags: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    (!flags.is_empty()).then_some(flags)
}

/// Every `ETCD_X_Y` variable names a real etcd flag `--x-y` (checked when etcd is installed).
fn check_etcd_env<'a>(place: &str, names: impl IntoIterator<Item = &'a String>) -> Result<()> {
    let Some(flags) = etcd_flags() else {
        eprintln!(
            "etcd not installed: the ETCD_* names in {place} are not checked against `etcd --help`"
        );
        return Ok(());
    };
    for name in names {
        let flag = name
            .strip_prefix("ETCD_")
            .with_context(|| format!("{place}: {name} is not an ETCD_ variable"))?
            .to_ascii_lowercase()
            .replace('_', "-");
        ensure!(
            flags.contains(&flag),
            "{place}: {name} is no etcd flag (--{flag} is not in `etcd --help`)"
        );
    }
    Ok(())
}

/// The config files embedded in Kubernetes objects (`gsb.toml` keys of ConfigMaps and Secrets).
fn embedded_configs() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (_, o) in k8s_objects()? {
        let name = ystr(&o, "metadata.name").unwrap_or_default().to_owned();
        for field in ["data", "stringData"] {
            if let Some(text) = yget(&o, field)
                .and_then(|d| d.get("gsb.toml"))
                .and_then(Yaml::as_str)
            {
                out.push((name.clone(), text.to_owned()));
            }
        }
    }
    Ok(out)
}

#[test]
fn containerfile_is_multi_stage_and_ships_only_gsb() -> Result<()> {
    let text = read(&deploy("Containerfile"))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    ensure!(
        froms.len() >= 2,
        "a multi-stage build needs two FROM lines, found {froms:?}"
    );
    let builder = froms[0]
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[0].eq_ignore_ascii_case("as"))
        .map(|w| w[1].to_owned())
        .context("the first stage must be named (FROM ... AS builder)")?;
    ensure!(
        froms[0].contains("rust"),
        "the first stage builds with a Rust image: {}",
        froms[0]
    );
    ensure!(
        froms
            .last()
            .is_some_and(|f| f.contains("debian") && f.contains("slim")),
        "the runtime is slim Debian"
    );
    ensure!(
        text.contains("cargo build --release") && text.contains("-p gsb"),
        "the builder runs `cargo build --release -p gsb`"
    );
    let copies_from_builder: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(&format!("COPY --from={builder}")))
        .collect();
    ensure!(
        copies_from_builder.len() == 1,
        "the runtime copies exactly one thing from the builder: {copies_from_builder:?}"
    );
    ensure!(
        copies_from_builder[0].ends_with("/usr/local/bin/gsb"),
        "and that is the gsb binary: {}",
        copies_from_builder[0]
    );
    ensure!(
        lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/gsb"]"#),
        "ENTRYPOINT must be [\"/usr/local/bin/gsb\"]"
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .context("no USER: the image would run as root")?;
    ensure!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user} is root"
    );

    // The builder copies every workspace member, so a new crate cannot be forgotten.
    let workspace: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))?)?;
    let members = workspace["workspace"]["members"]
        .as_array()
        .context("workspace.members")?;
    for member in members {
        let member = member.as_str().context("member name")?;
        ensure!(
            lines
                .iter()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().nth(1) == Some(member)),
            "the Containerfile does not COPY workspace member {member}"
        );
    }
    Ok(())
}

#[test]
fn dashboard_queries_only_exported_metrics() -> Result<()> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy("grafana/gsb.json"))?).context("grafana/gsb.json")?;
    ensure!(
        dashboard["title"].is_string() && dashboard["panels"].is_array(),
        "not a Grafana dashboard"
    );

    fn walk(
        v: &serde_json::Value,
        place: &str,
        used: &mut BTreeMap<String, String>,
        exprs: &mut usize,
    ) {
        match v {
            serde_json::Value::Object(map) => {
                let here = map
                    .get("title")
                    .and_then(|t| t.as_str())
                    .unwrap_or(place)
                    .to_owned();
                for (k, child) in map {
                    if let (true, Some(expr)) = (k == "expr" || k == "definition", child.as_str()) {
                        *exprs += 1;
                        for name in metrics_in(expr) {
                            used.entry(name).or_insert_with(|| here.clone());
                        }
                    }
                    walk(child, &here, used, exprs);
                }
            }
            serde_json::Value::Array(items) => {
                items.iter().for_each(|i| walk(i, place, used, exprs))
            }
            _ => {}
        }
    }
    let mut used = BTreeMap::new();
    let mut exprs = 0;
    walk(&dashboard, "dashboard", &mut used, &mut exprs);
    ensure!(exprs >= 15, "only {exprs} queries in the dashboard");
    let families = check_metrics("grafana/gsb.json", &used, &exported_metrics()?)?;

    // The panels the issue asks for each have their metric.
    for needed in [
        "gsb_active_site",
        "gsb_site_state",
        "gsb_component_up",
        "gsb_requests_total",
        "gsb_request_duration_seconds",
        "gsb_failovers_total",
        "gsb_replication_lag_seconds",
        "gsb_replication_pending",
        "gsb_replication_conflicts_total",
        "gsb_config_copy_last_success_timestamp_seconds",
    ] {
        ensure!(
            families.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }

    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let id = panel["id"].as_u64().context("panel without id")?;
        ensure!(ids.insert(id), "panel id {id} used twice");
    }
    Ok(())
}

/// Every rule of a Prometheus rule file: (group, rule).
fn rules_of(groups: &Yaml) -> Result<Vec<(String, Yaml)>> {
    let mut out = Vec::new();
    for g in groups.as_sequence().context("groups is a list")? {
        let name = ystr(g, "name").context("group without name")?.to_owned();
        for r in yget(g, "rules")
            .and_then(Yaml::as_sequence)
            .context("group without rules")?
        {
            out.push((name.clone(), r.clone()));
        }
    }
    Ok(out)
}

#[test]
fn alerts_are_complete_and_use_only_exported_metrics() -> Result<()> {
    let file = &yaml_docs(&deploy("prometheus/alerts.yml"))?[0];
    let rules = rules_of(yget(file, "groups").context("alerts.yml: groups")?)?;
    let mut used = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (group, rule) in &rules {
        let alert = ystr(rule, "alert")
            .with_context(|| format!("group {group}: a rule without `alert`"))?;
        ensure!(
            names.insert(alert.to_owned()),
            "alert {alert} defined twice"
        );
        let expr = ystr(rule, "expr").with_context(|| format!("{alert}: no expr"))?;
        ensure!(
            ystr(rule, "labels.severity").is_some(),
            "{alert}: no severity label"
        );
        for key in ["summary", "runbook"] {
            let text = ystr(rule, &format!("annotations.{key}")).unwrap_or_default();
            ensure!(
                text.len() > 20,
                "{alert}: annotation {key} missing or too short"
            );
        }
        // The annotations may query metrics too (e.g. which components are down).
        let annotations =
            serde_yaml_ng::to_string(yget(rule, "annotations").context("annotations")?)?;
        for name in metrics_in(expr).into_iter().chain(metrics_in(&annotations)) {
            used.entry(name).or_insert_with(|| alert.to_owned());
        }
    }
    check_metrics("prometheus/alerts.yml", &used, &exported_metrics()?)?;

    // What an SRE pages on, per the issue: every case has a rule on the right metric.
    let mut metric_of = BTreeMap::new();
    for (_, rule) in &rules {
        for name in metrics_in(ystr(rule, "expr").unwrap_or_default()) {
            metric_of
                .entry(name)
                .or_insert_with(Vec::new)
                .push(ystr(rule, "alert").unwrap_or_default().to_owned());
        }
    }
    for (case, metric) in [
        ("failed over", "gsb_active_site"),
        ("primary degraded", "gsb_degraded_alert"),
        ("both sites down", "gsb_site_state"),
        ("replication lag", "gsb_replication_lag_seconds"),
        ("replication backlog", "gsb_replication_pending"),
        ("conflicts rising", "gsb_replication_conflicts_total"),
        (
            "config copy older than 26h",
            "gsb_config_copy_last_success_timestamp_seconds",
        ),
        ("verify mismatch", "gsb_verify_equal"),
        ("no active replicator", "gsb_replicator_active"),
        ("a proxy lost etcd", "gsb_coordination_up"),
        ("no decider in the fleet", "gsb_fleet_decider"),
        ("a proxy cut off from a site", "gsb_fleet_dissent"),
        ("a proxy unready", "gsb_proxy_ready"),
        ("stale fleet members", "gsb_fleet_members"),
        ("fenced decision writes", "gsb_fleet_fenced_writes_total"),
        (
            "proxies on different decisions",
            "gsb_fleet_decision_revision",
        ),
    ] {
        ensure!(
            metric_of.contains_key(metric),
            "no alert for {case:?} (on {metric})"
        );
    }
    let stale = rules
        .iter()
        .find(|(_, r)| {
            ystr(r, "expr")
                .unwrap_or_default()
                .contains("gsb_config_copy_last_success_timestamp_seconds")
        })
        .map(|(_, r)| ystr(r, "expr").unwrap_or_default().to_owned())
        .unwrap_or_default();
    // The operator's copy of the rules is the same rules.
    let objects = k8s_objects()?;
    let operator_rules = find_object(&objects, "PrometheusRule", "gsb")?;
    ensure!(
        yget(operator_rules, "spec.groups") == yget(file, "groups"),
        "kubernetes/prometheusrule.yaml differs from prometheus/alerts.yml: \
         sh deploy/kubernetes/gen-prometheusrule.sh > deploy/kubernetes/prometheusrule.yaml"
    );
    ensure!(
        stale.contains("26 * 3600") || stale.contains("93600"),
        "the config copy alert must fire past 26h: {stale}"
    );
    Ok(())
}

/// `promtool check rules` and the rule unit tests in `alerts_test.yml`, when promtool is installed
/// (`apt-get install prometheus`); without it the parsing test above is the check.
#[test]
fn alerts_pass_promtool_when_installed() -> Result<()> {
    let Ok(version) = Command::new("promtool").arg("--version").output() else {
        eprintln!("promtool not installed: skipping `promtool check rules` (alerts are still parsed by the other test)");
        return Ok(());
    };
    ensure!(version.status.success(), "promtool --version failed");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(deploy("prometheus"))
            .output()?;
        ensure!(
            out.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A systemd unit as `key -> values` (keys may repeat).
fn unit(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(path)?.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{}: not key=value: {line}", path.display()))?;
        out.entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    Ok(out)
}

fn one<'a>(u: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    u.get(key)
        .and_then(|v| v.last())
        .map(String::as_str)
        .unwrap_or_default()
}

#[test]
fn systemd_units_are_hardened() -> Result<()> {
    for (name, subcommand) in [
        ("gsb-proxy.service", "proxy"),
        ("gsb-replicator.service", "replicator"),
    ] {
        let u = unit(&deploy(&format!("systemd/{name}")))?;
        let user = one(&u, "User");
        ensure!(
            !user.is_empty() && user != "root",
            "{name}: runs as a dedicated user, not {user:?}"
        );
        for (key, want) in [
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
        ] {
            ensure!(
                one(&u, key) == want,
                "{name}: {key}={want} expected, found {:?}",
                one(&u, key)
            );
        }
        ensure!(
            u.contains_key("CapabilityBoundingSet"),
            "{name}: no CapabilityBoundingSet"
        );
        let exec = one(&u, "ExecStart");
        ensure!(
            exec.starts_with("/usr/local/bin/gsb ")
                && exec.contains(&format!(" {subcommand} --config ")),
            "{name}: ExecStart must run `gsb {subcommand} --config`: {exec}"
        );
    }

    let proxy = unit(&deploy("systemd/gsb-proxy.service"))?;
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        ensure!(
            one(&proxy, key) == "CAP_NET_BIND_SERVICE",
            "gsb-proxy: {key}=CAP_NET_BIND_SERVICE (to bind :443)"
        );
    }
    ensure!(
        one(&proxy, "ExecReload") == "/bin/kill -HUP $MAINPID",
        "gsb-proxy: reload is SIGHUP"
    );

    // The fleet's etcd member: hardened the same way, runs Debian's etcd, configured by an
    // environment file whose variables are real etcd flags.
    let etcd = unit(&deploy("systemd/gsb-etcd.service"))?;
    let user = one(&etcd, "User");
    ensure!(
        !user.is_empty() && user != "root",
        "gsb-etcd: runs as a dedicated user, not {user:?}"
    );
    for (key, want) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("Type", "notify"),
        ("ExecStart", "/usr/bin/etcd"),
        ("CapabilityBoundingSet", ""),
    ] {
        ensure!(
            etcd.contains_key(key) && one(&etcd, key) == want,
            "gsb-etcd: {key}={want} expected, found {:?}",
            one(&etcd, key)
        );
    }
    let env_file = one(&etcd, "EnvironmentFile");
    ensure!(
        env_file == "/etc/default/gsb-etcd",
        "gsb-etcd: EnvironmentFile=/etc/default/gsb-etcd (installed from systemd/gsb-etcd.env), found {env_file:?}"
    );
    let env = unit(&deploy("systemd/gsb-etcd.env"))?;
    let data_dir = one(&env, "ETCD_DATA_DIR");
    ensure!(
        etcd.get("ReadWritePaths")
            .into_iter()
            .flatten()
            .flat_map(|v| v.split_whitespace())
            .any(|dir| Path::new(data_dir).starts_with(dir)),
        "gsb-etcd: ReadWritePaths does not cover ETCD_DATA_DIR {data_dir}"
    );
    for (key, want) in [
        ("ETCD_AUTO_COMPACTION_MODE", "revision"),
        ("ETCD_CLIENT_CERT_AUTH", "true"),
        ("ETCD_PEER_CLIENT_CERT_AUTH", "true"),
    ] {
        ensure!(
            one(&env, key) == want,
            "gsb-etcd.env: {key}={want} expected, found {:?}",
            one(&env, key)
        );
    }
    ensure!(
        !one(&env, "ETCD_QUOTA_BACKEND_BYTES").is_empty()
            && !one(&env, "ETCD_AUTO_COMPACTION_RETENTION").is_empty(),
        "gsb-etcd.env: set the space quota and the compaction retention"
    );
    let members = one(&env, "ETCD_INITIAL_CLUSTER").split(',').count();
    ensure!(
        members == 3,
        "gsb-etcd.env: 3 members in ETCD_INITIAL_CLUSTER, found {members}"
    );
    check_etcd_env("systemd/gsb-etcd.env", env.keys())?;

    // The state file the example config names must be writable under ProtectSystem=strict.
    let example: toml::Table = toml::from_str(&read(&deploy("gsb.example.toml"))?)?;
    let state_file = example["failover"]["state_file"]
        .as_str()
        .context("example failover.state_file")?;
    let writable = proxy.get("ReadWritePaths").cloned().unwrap_or_default();
    ensure!(
        writable
            .iter()
            .flat_map(|v| v.split_whitespace())
            .any(|dir| Path::new(state_file).starts_with(dir)),
        "gsb-proxy: ReadWritePaths {writable:?} does not cover the state file {state_file}"
    );
    Ok(())
}

/// The fields of `struct name` in a source file: its `field: Type` lines.
fn struct_fields(file: &str, name: &str) -> Result<Vec<String>> {
    let text = read(&root().join(file))?;
    let start = text
        .find(&format!("struct {name} {{"))
        .with_context(|| format!("{file} has no struct {name}: update this test's map"))?;
    let body = &text[start..start + text[start..].find("\n}").context("struct end")?];
    Ok(body
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && !l.starts_with('#'))
        .filter_map(|l| {
            let (field, _) = l.trim_start_matches("pub ").split_once(':')?;
            let field = field.trim();
            field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then(|| field.to_owned())
        })
        .collect())
}

/// Every config key the proxy and the replicator read, per TOML table, from their config structs
/// (the proxy's typed structs; the replicator's raw `[replicator]` struct).
fn config_keys() -> Result<Vec<(&'static str, Vec<String>)>> {
    let structs = [
        ("proxy/src/config.rs", "ListenerConfig", "proxy"),
        ("proxy/src/config.rs", "TlsConfig", "proxy.tls"),
        ("proxy/src/config.rs", "AdminConfig", "admin"),
        ("proxy/src/config.rs", "SiteConfig", "sites.primary"),
        ("proxy/src/config.rs", "SiteConfig", "sites.backup"),
        ("proxy/src/config.rs", "HealthConfig", "health"),
        (
            "proxy/src/config.rs",
            "ComponentConfig",
            "health.components",
        ),
        ("proxy/src/config.rs", "FailoverConfig", "failover"),
        ("proxy/src/config.rs", "MaintenanceConfig", "maintenance"),
        ("fleet/src/config.rs", "CoordinationConfig", "coordination"),
        ("replicator/src/config.rs", "Raw", "replicator"),
    ];
    structs
        .into_iter()
        .map(|(file, name, table)| Ok((table, struct_fields(file, name)?)))
        .collect()
}

/// The table at a dotted path; arrays of tables are merged (a component sets `path` or `tcp`).
fn keys_at(root: &toml::Table, dotted: &str) -> BTreeSet<String> {
    let mut current = vec![toml::Value::Table(root.clone())];
    for step in dotted.split('.') {
        current = current
            .iter()
            .filter_map(|v| v.get(step))
            .flat_map(|v| match v {
                toml::Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            })
            .collect();
    }
    current
        .iter()
        .filter_map(toml::Value::as_table)
        .flat_map(|t| t.keys().cloned())
        .collect()
}

/// Keys still accepted (with a warning) so an older file loads, no longer shown in the example.
const LEGACY_KEYS: &[&str] = &["replicator.tombstone_retention"];

#[test]
fn example_config_sets_every_key() -> Result<()> {
    let text = read(&deploy("gsb.example.toml"))?;
    let example: toml::Table = toml::from_str(&text).context("gsb.example.toml is not TOML")?;
    let mut missing = Vec::new();
    for (table, fields) in config_keys()? {
        ensure!(
            !fields.is_empty(),
            "no fields found for [{table}]: update config_keys()"
        );
        let present = keys_at(&example, table);
        missing.extend(
            fields
                .iter()
                .filter(|f| !present.contains(*f))
                .map(|f| format!("{table}.{f}"))
                .filter(|k| !LEGACY_KEYS.contains(&k.as_str())),
        );
    }
    ensure!(
        missing.is_empty(),
        "gsb.example.toml does not show these keys: {missing:?}"
    );

    // The deployment the issue describes: TLS on, admin on loopback, failback gated on replication.
    ensure!(keys_at(&example, "proxy").contains("tls"), "TLS must be on");
    let admin = example["admin"]["listen"].as_str().unwrap_or_default();
    ensure!(
        admin.starts_with("127.0.0.1:") || admin.starts_with("[::1]:"),
        "admin must listen on loopback, not {admin}"
    );
    let gate = example["failover"]["replicator_status"]
        .as_str()
        .unwrap_or_default();
    let replicator_listen = example["replicator"]["metrics_listen"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        gate.contains(replicator_listen) && gate.ends_with("/status"),
        "failover.replicator_status {gate:?} must read the replicator's /status on {replicator_listen}"
    );
    Ok(())
}

fn check_config(name: &str, text: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir
        .path()
        .join(format!("{}.toml", name.trim_end_matches(".toml")));
    std::fs::write(&path, text)?;
    let out = Command::new(gsb_tests::gsb_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!(
            "gsb check-config rejects {name} ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The real binary accepts the example and the configs embedded in the Kubernetes manifests.
#[test]
fn gsb_check_config_accepts_the_examples() -> Result<()> {
    let mut failures = Vec::new();
    let mut configs = vec![(
        "gsb.example.toml".to_owned(),
        read(&deploy("gsb.example.toml"))?,
    )];
    configs.extend(embedded_configs()?);
    ensure!(
        configs.len() >= 3,
        "expected the example plus the proxy and replicator configs in kubernetes/"
    );
    for (name, text) in &configs {
        if let Err(e) = check_config(name, text) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Runs the real `gsb` with `args` plus `--help`: clap exits 0 only if every flag and subcommand
/// before it exists, so the command lines in the units and manifests match the CLI.
fn cli_accepts(place: &str, args: &[String]) -> Result<()> {
    let out = Command::new(gsb_tests::gsb_bin())
        .args(args)
        .arg("--help")
        .output()?;
    ensure!(
        out.status.success(),
        "{place}: `gsb {}` is not a valid command line:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn deployed_command_lines_match_the_cli() -> Result<()> {
    let mut checked = 0;
    for name in ["gsb-proxy.service", "gsb-replicator.service"] {
        let u = unit(&deploy(&format!("systemd/{name}")))?;
        for key in ["ExecStart", "ExecStartPre"] {
            for line in u.get(key).into_iter().flatten() {
                let mut words = line.split_whitespace().map(str::to_owned);
                ensure!(
                    words.next().as_deref() == Some("/usr/local/bin/gsb"),
                    "{name}: {key} runs {line}"
                );
                cli_accepts(&format!("{name} {key}"), &words.collect::<Vec<_>>())?;
                checked += 1;
            }
        }
    }
    for (path, o) in k8s_objects()? {
        let mut containers = Vec::new();
        for spec in ["spec.template.spec", "spec.jobTemplate.spec.template.spec"] {
            if let Some(list) = yget(&o, &format!("{spec}.containers")).and_then(Yaml::as_sequence)
            {
                containers.extend(list.iter());
            }
        }
        // Only gsb's own containers (the etcd StatefulSet runs etcd's image).
        for c in containers.into_iter().filter(|c| {
            ystr(c, "image")
                .is_some_and(|i| i.rsplit('/').next().is_some_and(|n| n.starts_with("gsb:")))
        }) {
            let args: Vec<String> = yget(c, "args")
                .and_then(Yaml::as_sequence)
                .context("a gsb container without args")?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            cli_accepts(&path.display().to_string(), &args)?;
            checked += 1;
        }
    }
    ensure!(checked >= 6, "only {checked} command lines found");
    Ok(())
}

/// The README is the 3 a.m. page: a row for every alert, and none of the single-proxy advice that
/// is wrong for a fleet.
#[test]
fn readme_covers_every_alert_and_the_fleet() -> Result<()> {
    let readme = read(&deploy("README.md"))?;
    let file = &yaml_docs(&deploy("prometheus/alerts.yml"))?[0];
    let rules = rules_of(yget(file, "groups").context("alerts.yml: groups")?)?;
    let missing: Vec<String> = rules
        .iter()
        .filter_map(|(_, r)| ystr(r, "alert"))
        .filter(|a| !readme.contains(&format!("| {a} |")))
        .map(str::to_owned)
        .collect();
    ensure!(
        missing.is_empty(),
        "deploy/README.md has no row `| <alert> |` in its alert table for {missing:?}"
    );
    for wrong in ["costs no data", "for p in $(kubectl", "repeat for each"] {
        ensure!(
            !readme.contains(wrong),
            "deploy/README.md still says {wrong:?}: in a fleet one command to any proxy moves all, and proxies deciding alone lose writes"
        );
    }
    for needed in [
        "[coordination]",
        "on_loss",
        "etcdctl snapshot save",
        "auto-compaction",
        "/healthz",
    ] {
        ensure!(
            readme.contains(needed),
            "deploy/README.md does not mention {needed:?}"
        );
    }
    Ok(())
}
