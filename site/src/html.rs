//! Server-rendered HTML pages: plain markup, no scripts; every dynamic value escaped.

use std::fmt::Write;

use crate::model::{Meeting, Page, User};
use crate::options::Role;

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
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

fn layout(site_name: &str, role: Role, title: &str, content: &str) -> String {
    let banner_color = match role {
        Role::Primary => "#2e7d32",
        Role::Backup => "#e65100",
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title} - {site}</title></head>\n<body>\n\
         <header><h1><a href=\"/\">{site}</a></h1>\
         <p class=\"role\" style=\"background:{banner_color};color:#fff;padding:4px\">\
         You are on the <strong>{role_title}</strong> site ({role_name}).</p>\
         <nav><a href=\"/\">Meetings</a> | <a href=\"/users\">Users</a></nav></header>\n\
         <main>\n{content}</main>\n</body></html>\n",
        title = escape(title),
        site = escape(site_name),
        role_title = role.title(),
        role_name = role.as_str(),
    )
}

fn user_options(users: &[User]) -> String {
    let mut out = String::new();
    for u in users {
        let _ = write!(
            out,
            "<option value=\"{}\">{} &lt;{}&gt;</option>",
            u.id,
            escape(&u.name),
            escape(&u.email)
        );
    }
    out
}

fn time_or_dash(m: &Meeting) -> String {
    m.start_time
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// `GET /`: the role banner, upcoming meetings and a form to schedule one. `meetings` is
/// `None` when the meetings component is down; the page still renders and says so.
pub(crate) fn index(
    site_name: &str,
    role: Role,
    meetings: Option<&[Meeting]>,
    users: &[User],
) -> String {
    let mut c = String::from("<h2>Upcoming meetings</h2>\n");
    match meetings {
        None => c.push_str("<p class=\"error\">Meetings are unavailable right now.</p>\n"),
        Some([]) => c.push_str("<p>No upcoming meetings.</p>\n"),
        Some(list) => {
            c.push_str(
                "<table><tr><th>Topic</th><th>Start</th><th>Minutes</th><th>Status</th></tr>\n",
            );
            for m in list {
                let _ = writeln!(
                    c,
                    "<tr><td><a href=\"/meetings/{id}\">{topic}</a></td><td>{start}</td>\
                     <td>{dur}</td><td>{status}</td></tr>",
                    id = m.id,
                    topic = escape(&m.topic),
                    start = time_or_dash(m),
                    dur = m.duration_minutes,
                    status = escape(&m.status),
                );
            }
            c.push_str("</table>\n");
        }
    }
    let _ = write!(
        c,
        "<h2>Schedule a meeting</h2>\n\
         <form method=\"post\" action=\"/meetings\">\
         <label>Topic <input name=\"topic\" required maxlength=\"200\"></label> \
         <label>Host <select name=\"host_id\" required>{hosts}</select></label> \
         <label>Start (UTC) <input type=\"datetime-local\" name=\"start_time\"></label> \
         <label>Minutes <input type=\"number\" name=\"duration_minutes\" value=\"60\" min=\"1\" max=\"1440\"></label> \
         <button type=\"submit\">Schedule</button></form>\n\
         <p>No host to choose? <a href=\"/users\">Create a user</a> first.</p>\n",
        hosts = user_options(users),
    );
    layout(site_name, role, "Meetings", &c)
}

/// `GET /meetings/{id}`: details and the start / end / join buttons.
pub(crate) fn meeting(site_name: &str, role: Role, m: &Meeting, users: &[User]) -> String {
    let mut c = format!(
        "<h2>{topic}</h2>\n<dl><dt>Status</dt><dd id=\"status\">{status}</dd>\
         <dt>Start</dt><dd>{start}</dd><dt>Duration</dt><dd>{dur} minutes</dd>\
         <dt>Host</dt><dd>{host}</dd><dt>Id</dt><dd>{id}</dd></dl>\n",
        topic = escape(&m.topic),
        status = escape(&m.status),
        start = time_or_dash(m),
        dur = m.duration_minutes,
        host = m.host_id,
        id = m.id,
    );
    let _ = write!(
        c,
        "<form method=\"post\" action=\"/meetings/{id}/start\"><button>Start</button></form>\n\
         <form method=\"post\" action=\"/meetings/{id}/end\"><button>End</button></form>\n\
         <form method=\"post\" action=\"/meetings/{id}/join\">\
         <select name=\"user_id\" required>{users}</select> <button>Join</button></form>\n",
        id = m.id,
        users = user_options(users),
    );
    layout(site_name, role, &m.topic, &c)
}

/// `GET /users`: the user list and a form to add one.
pub(crate) fn users(site_name: &str, role: Role, users: &[User]) -> String {
    let mut c = String::from("<h2>Users</h2>\n<ul>\n");
    for u in users {
        let _ = writeln!(
            c,
            "<li>{} &lt;{}&gt; <small>{}</small></li>",
            escape(&u.name),
            escape(&u.email),
            u.id
        );
    }
    c.push_str(
        "</ul>\n<h2>Add a user</h2>\n<form method=\"post\" action=\"/users\">\
         <label>Name <input name=\"name\" required maxlength=\"200\"></label> \
         <label>Email <input type=\"email\" name=\"email\" required maxlength=\"254\"></label> \
         <button type=\"submit\">Add</button></form>\n",
    );
    layout(site_name, role, "Users", &c)
}

/// `GET /pages/{path}`: a custom page. The body is shown as text, never as markup, so a page
/// copied from another site cannot inject script.
pub(crate) fn custom_page(site_name: &str, role: Role, p: &Page) -> String {
    let c = format!(
        "<h2>{}</h2>\n<div class=\"page-body\" style=\"white-space:pre-wrap\">{}</div>\n",
        escape(&p.title),
        escape(&p.body)
    );
    layout(site_name, role, &p.title, &c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn index_shows_role_and_escaped_topics() {
        let now = chrono::Utc::now();
        let m = Meeting {
            id: uuid::Uuid::new_v4(),
            host_id: uuid::Uuid::new_v4(),
            topic: "<script>x</script>".into(),
            start_time: None,
            duration_minutes: 30,
            status: "scheduled".into(),
            created_at: now,
            updated_at: now,
        };
        let page = index("Site", Role::Backup, Some(&[m]), &[]);
        assert!(page.contains("<strong>Backup</strong>"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
        let down = index("Site", Role::Primary, None, &[]);
        assert!(down.contains("unavailable"));
    }
}
