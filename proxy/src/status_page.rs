//! The admin status page (`GET /`): one self-contained HTML page an SRE can read at 3 a.m.
//! Which site serves and since when and why, each site's components, the replication gate, the
//! timeline, and the commands to copy. No external assets; refreshes itself every 5 s.

use std::fmt::Write;

use crate::control::{SiteView, Status};

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn ago(t: &chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - *t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h {}m ago", s / 3600, (s % 3600) / 60),
        s => format!("{}d ago", s / 86400),
    }
}

fn site_section(out: &mut String, v: &SiteView, active: bool) {
    let verdict = v.verdict.map(|v| v.as_str()).unwrap_or("unknown");
    let _ = write!(
        out,
        "<section class=\"site {verdict}\"><h2>{title}{serving} <span class=\"badge {verdict}\">{verdict}</span></h2>\
         <p class=\"url\">{url}</p>",
        title = esc(v.site.title()),
        serving = if active { " &#9654; serving" } else { "" },
        url = esc(&v.url),
    );
    if v.degraded_alert {
        out.push_str("<p class=\"alert\">DEGRADED: a partial failure. Traffic is NOT moved automatically; fail over by hand if users are affected.</p>");
    }
    if !v.reachable {
        out.push_str("<p class=\"alert\">UNREACHABLE: no probe could connect.</p>");
    }
    out.push_str("<table><tr><th>component</th><th>critical</th><th>state</th><th>since</th><th>last probe</th></tr>");
    for c in &v.components {
        let state = match c.up {
            Some(true) => "up",
            Some(false) => "down",
            None => "unknown",
        };
        let _ = write!(
            out,
            "<tr class=\"{state}\"><td>{}</td><td>{}</td><td>{state}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            if c.critical { "yes" } else { "no" },
            c.since.as_ref().map(|t| format!("{} ({})", time(t), ago(t))).unwrap_or_default(),
            esc(&c.last),
        );
    }
    out.push_str("</table></section>");
}

/// The fleet: who decides, the fleet verdict, every member's votes and whether it follows.
fn fleet_section(
    out: &mut String,
    f: &crate::control::FleetStatus,
    ready: bool,
    why: Option<&str>,
) {
    let verdict = |v: Option<gsb_health::Verdict>| v.map_or("unknown", |v| v.as_str());
    let _ = write!(
        out,
        "<h2>Fleet</h2><p class=\"{cls}\" id=\"fleet\">This proxy: <b>{me}</b> ({region}){decider}. \
         Coordination (etcd): {up}. Decision revision {rev} (this proxy routes on {applied}), \
         decided by {by}. Fleet verdict: primary <b>{p}</b>, backup <b>{b}</b> ({needed} votes needed). \
         Writes fenced here: {fenced}.</p>",
        cls = if f.coordination_up { "note" } else { "alert" },
        me = esc(&f.member),
        region = esc(if f.region.is_empty() { "no region" } else { &f.region }),
        decider = if f.is_decider { ", <b>the decider</b>" } else { "" },
        up = if f.coordination_up {
            "up".to_string()
        } else {
            format!(
                "DOWN ({}): holding the last decided site (on_loss = {}){}",
                esc(f.coordination_error.as_deref().unwrap_or("")),
                f.on_loss,
                if f.deciding_locally { ", DECIDING ALONE" } else { "" }
            )
        },
        rev = f.decision_revision,
        applied = f.applied_revision,
        by = esc(f.decided_by.as_deref().unwrap_or("nobody yet")),
        p = verdict(f.verdict[0]),
        b = verdict(f.verdict[1]),
        needed = f.quorum_needed,
        fenced = f.fenced_writes,
    );
    if !ready {
        let _ = write!(
            out,
            "<p class=\"alert\">NOT READY: {}</p>",
            esc(why.unwrap_or(""))
        );
    }
    for d in &f.dissent {
        let _ = write!(
            out,
            "<p class=\"alert\">Minority view, traffic NOT moved: {}. Its path to that site is broken.</p>",
            esc(d)
        );
    }
    out.push_str("<table id=\"members\"><tr><th>member</th><th>region</th><th>vote</th><th>primary</th><th>backup</th><th>routes on</th><th>ready</th></tr>");
    for m in &f.members {
        let _ = write!(
            out,
            "<tr class=\"{cls}\"><td>{name}{decider}</td><td>{region}</td><td>{fresh} ({age:.1}s)</td><td>{p}</td><td>{b}</td><td>{applied}{lag}</td><td>{ready}</td></tr>",
            cls = if m.fresh && m.follows && m.ready { "up" } else { "down" },
            name = esc(&m.name),
            decider = if m.decider { " (decider)" } else { "" },
            region = esc(&m.region),
            fresh = if m.fresh { "fresh" } else { "STALE" },
            age = m.age_ms as f64 / 1000.0,
            p = verdict(m.primary),
            b = verdict(m.backup),
            applied = m.applied_revision,
            lag = if m.follows { "" } else { " (LAGGING)" },
            ready = if m.ready { "yes".to_string() } else { format!("NO: {}", esc(m.unready_reason.as_deref().unwrap_or(""))) },
        );
    }
    out.push_str("</table>");
}

/// Sends the actions with the pasted token, and refreshes the page every 5 s unless the operator
/// is typing (a refresh would wipe the token field).
const SCRIPT: &str = "<script>\
async function act(path, body) {\
  const token = document.getElementById('token').value.trim();\
  const out = document.getElementById('result');\
  if (!token) { out.textContent = ' paste the admin token first'; return; }\
  const reason = document.getElementById('reason').value.trim();\
  if (reason) body.reason = reason;\
  out.textContent = ' sending...';\
  try {\
    const r = await fetch(path, {method: 'POST', headers: {'Authorization': 'Bearer ' + token,\
      'Content-Type': 'application/json'}, body: JSON.stringify(body)});\
    const j = await r.json().catch(() => ({}));\
    out.textContent = r.ok ? ' done: ' + j.active_title + ' serving' : ' refused (' + r.status + '): ' + (j.error || '');\
    if (r.ok) { document.getElementById('token').value = ''; setTimeout(() => location.reload(), 500); }\
  } catch (e) { out.textContent = ' failed: ' + e; }\
}\
setInterval(() => {\
  const typing = document.activeElement && document.activeElement.tagName === 'INPUT';\
  if (!typing && !document.getElementById('token').value) location.reload();\
}, 5000);\
</script>";

/// The replication gate and each direction's backlog and lag, from the replicator's status.
fn replication_section(out: &mut String, r: &crate::control::ReplicationView) {
    let _ = write!(
        out,
        "<h2>Replication</h2><p class=\"{cls}\" id=\"gate\">Failback gate: {gate}{blocked}</p>\
         <p class=\"url\">replicator {url}: {active}</p>",
        cls = if r.failback_blocked { "alert" } else { "note" },
        gate = esc(&r.gate),
        blocked = if r.failback_blocked {
            " &mdash; <b>failback waits</b> until it is confirmed drained (or failback_max_wait)"
        } else {
            ""
        },
        url = esc(&r.url),
        active = match r.replicator_active {
            Some(true) => "active",
            Some(false) => "STANDBY (its counts are not trusted)",
            None => "no answer",
        },
    );
    let Some(dirs) = r.directions.as_object().filter(|d| !d.is_empty()) else {
        return;
    };
    out.push_str(
        "<table><tr><th>direction</th><th>pending rows</th><th>oldest pending</th><th>lag</th><th>last apply</th></tr>",
    );
    let num = |v: &serde_json::Value, suffix: &str| match v {
        serde_json::Value::Number(n) => format!("{n}{suffix}"),
        serde_json::Value::String(s) => esc(s),
        _ => "&ndash;".into(),
    };
    for (name, d) in dirs {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&name.replace("_to_", " \u{2192} ")),
            num(&d["pending_rows"], ""),
            num(&d["oldest_pending_age_seconds"], " s"),
            num(&d["lag_seconds"], " s"),
            num(&d["last_apply"], ""),
        );
    }
    out.push_str("</table>");
}

/// Renders the page for `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::with_capacity(8 * 1024);
    out.push_str(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>gsb: ",
    );
    out.push_str(status.active_title);
    out.push_str(
        " serving</title><style>\
         body{font:16px/1.4 system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#111}\
         .banner{padding:1em 1.5em;border-radius:8px;color:#fff;background:#1a7f37}\
         .banner.backup{background:#b35900}.banner.none{background:#b00020}\
         .banner h1{margin:0;font-size:2.2em}.alert{background:#fff3cd;border:2px solid #b35900;padding:.5em;font-weight:bold}\
         .site{display:inline-block;vertical-align:top;margin:1em 1em 0 0;padding:0 1em 1em;background:#fff;border:1px solid #ccc;border-radius:8px;min-width:28em}\
         .badge{font-size:.7em;padding:.1em .5em;border-radius:4px;color:#fff;background:#777}\
         .badge.healthy{background:#1a7f37}.badge.degraded{background:#b35900}.badge.down{background:#b00020}\
         table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left}\
         tr.down td{color:#b00020;font-weight:bold}.url{color:#555;margin:0}\
         pre{background:#222;color:#eee;padding:.8em;border-radius:6px;overflow-x:auto}\
         .note{color:#333}button.act{font-size:1em;padding:.4em .9em;margin:.4em .3em 0 0;cursor:pointer}\
         button.backup{background:#b35900;color:#fff;border:0;border-radius:4px}button.primary{background:#1a7f37;color:#fff;border:0;border-radius:4px}\
         </style></head><body>",
    );
    let banner_class = if status.none_available {
        "none"
    } else {
        status.active.as_str()
    };
    let _ = write!(
        out,
        "<div class=\"banner {banner_class}\"><h1 id=\"active\">{title} serving</h1>\
         <div>since {since} ({ago}) &mdash; why: {reason}</div>",
        title = esc(status.active_title),
        since = time(&status.since),
        ago = ago(&status.since),
        reason = esc(&status.reason),
    );
    match status.forced {
        "operator" => {
            let _ = write!(
                out,
                "<div><b>FORCED by an operator</b>: {}. Health checks do not move traffic until <code>gsb auto</code> or <code>gsb failback</code>.</div>",
                esc(status.forced_reason.as_deref().unwrap_or(""))
            );
        }
        "manual_failback_pending" => out.push_str(
            "<div><b>Waiting for a manual failback</b> (failback = \"manual\"): run <code>gsb failback</code> when the primary is ready.</div>",
        ),
        _ => {}
    }
    out.push_str("</div>");
    if status.none_available {
        out.push_str("<p class=\"alert\">BOTH SITES DOWN: requests go to the primary and get 503 when it does not answer.</p>");
    }
    if status.maintenance_active {
        out.push_str("<p class=\"alert\">A maintenance window is running: traffic is on the backup until it ends.</p>");
    }
    if let Some(next) = &status.maintenance_next {
        let _ = write!(out, "<p>Next maintenance start/end: {}</p>", time(next));
    }
    for v in &status.sites {
        site_section(&mut out, v, v.site == status.active);
    }
    if let Some(f) = &status.fleet {
        fleet_section(&mut out, f, status.ready, status.unready_reason.as_deref());
    }
    if let Some(r) = &status.replication {
        replication_section(&mut out, r);
    }
    if let Some(c) = &status.config_reload {
        let _ =
            write!(
            out,
            "<p class=\"{cls}\" id=\"reload\">Last config reload {at} ({ago}): {what}{restart}</p>",
            cls = if c.ok && c.needs_restart.is_empty() { "note" } else { "alert" },
            at = time(&c.at),
            ago = ago(&c.at),
            what = if c.ok {
                esc(&c.message)
            } else {
                format!("REFUSED, previous config still running: {}", esc(&c.message))
            },
            restart = if c.needs_restart.is_empty() {
                String::new()
            } else {
                format!(
                    " &mdash; needs a restart to apply: {}",
                    esc(&c.needs_restart.join(", "))
                )
            },
        );
    }
    out.push_str("<h2>Timeline</h2>");
    if status.timeline.is_empty() {
        out.push_str("<p>No moves since this proxy started.</p>");
    } else {
        out.push_str(
            "<table><tr><th>when</th><th>from</th><th>to</th><th>reason</th><th>detail</th></tr>",
        );
        for e in status.timeline.iter().rev() {
            let _ = write!(
                out,
                "<tr><td>{} ({})</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(&e.at),
                ago(&e.at),
                e.from.title(),
                e.to.title(),
                e.reason,
                esc(&e.detail)
            );
        }
        out.push_str("</table>");
    }
    // The token is typed by the operator and sent from the browser; it is never in the page.
    out.push_str(
        "<h2>Actions</h2><form id=\"actions\" onsubmit=\"return false\">\
         <label>Admin token <input id=\"token\" type=\"password\" autocomplete=\"off\" placeholder=\"paste the admin token\"></label> \
         <label>Reason <input id=\"reason\" type=\"text\" placeholder=\"what is broken / fixed\"></label><br>\
         <button type=\"button\" class=\"act backup\" onclick=\"act('/failover',{to:'backup'})\">Fail over to Backup</button> \
         <button type=\"button\" class=\"act primary\" onclick=\"act('/failback',{})\">Fail back to Primary</button> \
         <button type=\"button\" class=\"act\" onclick=\"act('/auto',{})\">Auto (release forced state)</button>\
         <span id=\"result\"></span></form>",
    );
    let _ = write!(
        out,
        "<h2>Commands</h2><p>Token from <code>--token-file</code> or <code>GSB_ADMIN_TOKEN</code>; add <code>--admin URL</code> if not on the default.</p>\
         <pre>gsb status\ngsb failover --to backup --reason \"what is broken\"\ngsb failback --reason \"primary fixed\"\ngsb auto</pre>\
         <p>Failback mode: {}. Route generation {}. <a href=\"/status\">JSON</a> &middot; <a href=\"/metrics\">metrics</a></p>",
        status.failback_mode, status.generation
    );
    out.push_str(SCRIPT);
    out.push_str("</body></html>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_text() {
        assert_eq!(
            esc("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }
}
