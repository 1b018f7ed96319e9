//! `gsb status`, `gsb failover`, `gsb failback`, `gsb auto`: clients of the proxy's admin API.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::AdminArgs;

/// How long one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The bearer token: `--token-file` first, then `GSB_ADMIN_TOKEN`.
fn token(admin: &AdminArgs) -> anyhow::Result<Option<String>> {
    if let Some(path) = &admin.token_file {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(std::env::var("GSB_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(TIMEOUT).build()?)
}

fn endpoint(admin: &AdminArgs, path: &str) -> String {
    format!("{}{}", admin.url.trim_end_matches('/'), path)
}

/// Sends a request and returns the JSON answer, turning transport errors and refusals into
/// messages that say what to do.
async fn call(admin: &AdminArgs, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => bail!(
            "cannot connect to the admin API at {}: is `gsb proxy` running there? (set --admin URL or GSB_ADMIN)",
            admin.url
        ),
        Err(e) if e.is_timeout() => bail!("the admin API at {} did not answer within {TIMEOUT:?}", admin.url),
        Err(e) => bail!("request to the admin API at {} failed: {e}", admin.url),
    };
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let server_msg = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    match status.as_u16() {
        200..=299 => Ok(body),
        401 => bail!(
            "the admin API refused the request (401 unauthorized): pass --token-file FILE or set GSB_ADMIN_TOKEN to the proxy's admin token"
        ),
        403 => bail!("the admin API refused the request (403): {server_msg}"),
        code => bail!("the admin API answered {code}: {server_msg}"),
    }
}

async fn post(admin: &AdminArgs, path: &str, body: Value) -> anyhow::Result<Value> {
    let mut req = client()?.post(endpoint(admin, path)).json(&body);
    if let Some(t) = token(admin)? {
        req = req.bearer_auth(t);
    }
    call(admin, req).await
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

/// A few lines an operator reads first.
fn summary(v: &Value) -> String {
    let mut out = format!(
        "active site: {} (since {}; {})\n",
        s(v, "active_title"),
        s(v, "since"),
        s(v, "reason")
    );
    match s(v, "forced") {
        "operator" => out.push_str(&format!(
            "FORCED by an operator: {} (release with `gsb auto` or `gsb failback`)\n",
            v.get("forced_reason").and_then(Value::as_str).unwrap_or("")
        )),
        "manual_failback_pending" => {
            out.push_str("waiting for a manual failback (`gsb failback`)\n")
        }
        _ => {}
    }
    if v.get("none_available").and_then(Value::as_bool) == Some(true) {
        out.push_str("BOTH SITES DOWN\n");
    }
    for site in v
        .get("sites")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let verdict = site
            .get("verdict")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        out.push_str(&format!(
            "{:<8} {:<9} {}\n",
            s(site, "site"),
            verdict,
            s(site, "evidence")
        ));
    }
    if let Some(r) = v.get("replication").filter(|r| !r.is_null()) {
        let pending = r
            .get("backup_to_primary_pending")
            .map(Value::to_string)
            .unwrap_or_default();
        let blocked = r.get("failback_blocked").and_then(Value::as_bool) == Some(true);
        out.push_str(&format!(
            "replication backup->primary pending: {pending}{}\n",
            if blocked { " (failback waiting)" } else { "" }
        ));
    }
    if let Some(f) = v.get("fleet").filter(|f| !f.is_null()) {
        out.push_str(&fleet_summary(f));
    }
    if v.get("ready").and_then(Value::as_bool) == Some(false) {
        out.push_str(&format!("NOT READY: {}\n", s(v, "unready_reason")));
    }
    let timeline = v
        .get("timeline")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !timeline.is_empty() {
        out.push_str("recent moves:\n");
        for e in timeline.iter().rev().take(5) {
            out.push_str(&format!(
                "  {} {} -> {} {}: {}\n",
                s(e, "at"),
                s(e, "from"),
                s(e, "to"),
                s(e, "reason"),
                s(e, "detail")
            ));
        }
    }
    out
}

/// The fleet lines of `gsb status`: who decides, who follows, who lags, who dissents.
fn fleet_summary(f: &Value) -> String {
    let flag = |k: &str| f.get(k).and_then(Value::as_bool) == Some(true);
    let num = |k: &str| f.get(k).and_then(Value::as_i64).unwrap_or(0);
    let verdict = |i: usize| {
        f.get("verdict")
            .and_then(|v| v.get(i))
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    let mut out = format!(
        "fleet: decider {}, decision revision {}, coordination {}; fleet verdict primary {}, backup {}\n",
        f.get("decider").and_then(Value::as_str).unwrap_or("none"),
        num("decision_revision"),
        if flag("coordination_up") { "up".to_string() } else { format!("DOWN ({})", s(f, "coordination_error")) },
        verdict(0),
        verdict(1),
    );
    for m in f
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let b = |k: &str| m.get(k).and_then(Value::as_bool) == Some(true);
        out.push_str(&format!(
            "  {:<16} {:<10} primary {:<9} backup {:<9} {}{}{}{}\n",
            s(m, "name"),
            s(m, "region"),
            m.get("primary")
                .and_then(Value::as_str)
                .unwrap_or("unknown"),
            m.get("backup").and_then(Value::as_str).unwrap_or("unknown"),
            if b("follows") { "follows" } else { "LAGGING" },
            if b("fresh") { "" } else { ", STALE vote" },
            if b("decider") { ", decider" } else { "" },
            if b("ready") {
                String::new()
            } else {
                format!(", NOT READY: {}", s(m, "unready_reason"))
            },
        ));
    }
    for d in f
        .get("dissent")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "  minority (not moved): {}\n",
            d.as_str().unwrap_or("")
        ));
    }
    out
}

/// Prints the proxy's state.
pub async fn status(admin: &AdminArgs, json: bool) -> anyhow::Result<ExitCode> {
    let v = call(admin, client()?.get(endpoint(admin, "/status"))).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", summary(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// Forces traffic to a site.
pub async fn failover(admin: &AdminArgs, to: &str, reason: &str) -> anyhow::Result<ExitCode> {
    if to != "primary" && to != "backup" {
        bail!("--to must be `primary` or `backup`, got {to:?}");
    }
    let v = post(
        admin,
        "/failover",
        serde_json::json!({ "to": to, "reason": reason }),
    )
    .await?;
    println!(
        "traffic forced to the {to} site; now serving: {}",
        s(&v, "active_title")
    );
    Ok(ExitCode::SUCCESS)
}

/// Moves traffic back to the primary.
pub async fn failback(admin: &AdminArgs, reason: &str) -> anyhow::Result<ExitCode> {
    let v = post(admin, "/failback", serde_json::json!({ "reason": reason })).await?;
    println!("failed back; now serving: {}", s(&v, "active_title"));
    Ok(ExitCode::SUCCESS)
}

/// Releases forced states.
pub async fn auto(admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let v = post(admin, "/auto", serde_json::json!({})).await?;
    println!(
        "forced state released; the health checker decides. Now serving: {}",
        s(&v, "active_title")
    );
    Ok(ExitCode::SUCCESS)
}
