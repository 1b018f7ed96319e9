//! The request path: routing, fault gates, and one handler per route.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Serialize;
use tokio::sync::Notify;
use tracing::{debug, info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::db::{ActionOutcome, Db};
use crate::error::ApiError;
use crate::faults::{Component, Faults};
use crate::html;
use crate::input::{limit_param, parse_uuid, percent_decode, query_params, read_body, Fields};
use crate::model::MeetingAction;
use crate::options::{Role, SiteOptions};

/// The body type of every response: small, fully buffered.
pub(crate) type Resp = Response<Full<Bytes>>;

/// Upper bound on one request, so a hung database turns into a 503 instead of a stuck client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Health checks answer within this, well inside a prober's timeout.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(1000);
/// Site name shown on pages unless `site_config` has `site_name`.
const DEFAULT_SITE_NAME: &str = "gsb meeting site";

const GET: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::HEAD, Method::POST];
const GET_PUT: &[Method] = &[Method::GET, Method::HEAD, Method::PUT];
const POST: &[Method] = &[Method::POST];

const MAX_NAME: usize = 200;
const MAX_EMAIL: usize = 254;
const MAX_TEXT: usize = 512 * 1024;

/// Whether the tables exist; the schema keeper task installs them and the request path asks
/// it to again when a query finds a table missing.
#[derive(Debug, Default)]
pub(crate) struct SchemaState {
    ready: AtomicBool,
    wake: Notify,
}

impl SchemaState {
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the schema missing and wakes the keeper.
    pub(crate) fn mark_missing(&self) {
        self.ready.store(false, Ordering::Release);
        self.wake.notify_one();
    }

    /// Resolves once someone calls `mark_missing` (a stored permit makes this race-free).
    pub(crate) async fn missing(&self) {
        self.wake.notified().await;
    }
}

/// Everything a request needs; shared by all connections.
pub(crate) struct App {
    pub(crate) role: Role,
    pub(crate) allow_faults: bool,
    pub(crate) db: Db,
    pub(crate) faults: Faults,
    pub(crate) schema: SchemaState,
}

fn allow(method: &Method, allowed: &'static [Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(allowed))
    }
}

fn is_get(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Resp, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(respond(status, "application/json", body))
}

fn html_page(body: String) -> Resp {
    respond(StatusCode::OK, "text/html; charset=utf-8", body)
}

/// 303 after a form post, so a reload does not post again.
fn see_other(location: &str) -> Resp {
    let mut resp = respond(StatusCode::SEE_OTHER, "text/plain", Bytes::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn no_store(mut resp: Resp) -> Resp {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A path segment naming a key (config key, platform), percent-decoded and bounded.
fn key_segment(field: &str, raw: &str) -> Result<String, ApiError> {
    let key = percent_decode(raw, false);
    if key.is_empty() || key.chars().count() > MAX_NAME {
        return Err(ApiError::field(
            field,
            format!("must be 1 to {MAX_NAME} characters"),
        ));
    }
    Ok(key)
}

impl App {
    pub(crate) fn new(opts: &SiteOptions) -> Result<Self, crate::Error> {
        Ok(App {
            role: opts.role,
            allow_faults: opts.allow_faults,
            db: Db::new(&opts.dsn)?,
            faults: Faults::default(),
            schema: SchemaState::default(),
        })
    }

    /// Serves one request; never fails: errors become JSON responses here, in one place.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Resp {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        // Every log line a handler writes carries the request it belongs to.
        let span = info_span!("request", %method, path);
        let routed = tokio::time::timeout(REQUEST_TIMEOUT, self.route(req)).instrument(span);
        let result = match routed.await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Unavailable(format!(
                "request took longer than {REQUEST_TIMEOUT:?}"
            ))),
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                match &e {
                    ApiError::SchemaMissing => self.schema.mark_missing(),
                    ApiError::Internal(msg) => warn!(%method, path, error = %msg, "request failed"),
                    _ => {}
                }
                e.into_response()
            }
        };
        resp.headers_mut()
            .insert("x-gsb-site", HeaderValue::from_static(self.role.as_str()));
        debug!(
            %method,
            path,
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        resp
    }

    fn gate(&self, c: Component) -> Result<(), ApiError> {
        if self.faults.is_broken(c) {
            Err(ApiError::Unavailable(format!(
                "component `{}` is marked broken by the fault switch",
                c.name()
            )))
        } else {
            Ok(())
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let trimmed = path.trim_start_matches('/');
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let segs: Vec<&str> = trimmed.split('/').collect();
        match segs.as_slice() {
            ["detectbackup"] | [.., "detectbackup.php"] => {
                allow(&method, GET)?;
                Ok(no_store(respond(
                    StatusCode::OK,
                    "text/plain",
                    self.role.title(),
                )))
            }
            ["health", component] => {
                allow(&method, GET)?;
                Ok(self.health(component).await)
            }
            ["_faults"] if self.allow_faults => {
                allow(&method, GET_POST)?;
                if !is_get(&method) {
                    self.set_fault(req).await?;
                }
                json(StatusCode::OK, &self.faults.to_json())
            }
            ["api", rest @ ..] => {
                self.gate(Component::Api)?;
                self.api(&method, rest, req).await
            }
            [""] => {
                allow(&method, GET)?;
                self.gate(Component::Web)?;
                self.index_page().await
            }
            ["users"] => {
                allow(&method, GET_POST)?;
                self.gate(Component::Web)?;
                if is_get(&method) {
                    let users = self.db.list_users(200).await?;
                    Ok(html_page(html::users(
                        &self.site_name().await?,
                        self.role,
                        &users,
                    )))
                } else {
                    self.create_user(req).await?;
                    Ok(see_other("/users"))
                }
            }
            ["meetings"] => {
                allow(&method, GET_POST)?;
                self.gate(Component::Web)?;
                self.gate(Component::Meetings)?;
                if is_get(&method) {
                    return Ok(see_other("/"));
                }
                let m = self.create_meeting(req).await?;
                Ok(see_other(&format!("/meetings/{}", m.id)))
            }
            ["meetings", id] => {
                allow(&method, GET)?;
                self.gate(Component::Web)?;
                self.gate(Component::Meetings)?;
                let id = parse_uuid("id", id)?;
                let m = self
                    .db
                    .get_meeting(id)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no meeting {id}")))?;
                let users = self.db.list_users(200).await?;
                Ok(html_page(html::meeting(
                    &self.site_name().await?,
                    self.role,
                    &m,
                    &users,
                )))
            }
            ["meetings", id, action] => {
                allow(&method, POST)?;
                self.gate(Component::Web)?;
                self.gate(Component::Meetings)?;
                let id = parse_uuid("id", id)?;
                let action = MeetingAction::parse(action)
                    .ok_or_else(|| ApiError::NotFound(format!("no route {path}")))?;
                self.meeting_action(id, action, req).await?;
                Ok(see_other(&format!("/meetings/{id}")))
            }
            ["pages", rest @ ..] if !rest.is_empty() => {
                allow(&method, GET)?;
                self.gate(Component::Web)?;
                let page_path = key_segment("path", &rest.join("/"))?;
                let page = self
                    .db
                    .get_page(&page_path)
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no page {page_path}")))?;
                Ok(html_page(html::custom_page(
                    &self.site_name().await?,
                    self.role,
                    &page,
                )))
            }
            _ => Err(ApiError::NotFound(format!("no route {path}"))),
        }
    }

    async fn api(
        &self,
        method: &Method,
        rest: &[&str],
        req: Request<Incoming>,
    ) -> Result<Resp, ApiError> {
        let params = query_params(req.uri().query());
        match rest {
            ["users"] => {
                allow(method, GET_POST)?;
                if is_get(method) {
                    let limit = limit_param(&params, 50, 1000)?;
                    json(StatusCode::OK, &self.db.list_users(limit).await?)
                } else {
                    json(StatusCode::CREATED, &self.create_user(req).await?)
                }
            }
            ["users", id] => {
                allow(method, GET)?;
                let id = parse_uuid("id", id)?;
                match self.db.get_user(id).await? {
                    Some(u) => json(StatusCode::OK, &u),
                    None => Err(ApiError::NotFound(format!("no user {id}"))),
                }
            }
            ["meetings", ..] => {
                self.gate(Component::Meetings)?;
                match rest {
                    ["meetings"] => {
                        allow(method, GET_POST)?;
                        if is_get(method) {
                            let limit = limit_param(&params, 50, 1000)?;
                            let status = params.get("status").map(String::as_str);
                            json(StatusCode::OK, &self.db.list_meetings(status, limit).await?)
                        } else {
                            json(StatusCode::CREATED, &self.create_meeting(req).await?)
                        }
                    }
                    ["meetings", id] => {
                        allow(method, GET)?;
                        let id = parse_uuid("id", id)?;
                        match self.db.get_meeting(id).await? {
                            Some(m) => json(StatusCode::OK, &m),
                            None => Err(ApiError::NotFound(format!("no meeting {id}"))),
                        }
                    }
                    ["meetings", id, action] => {
                        let action = MeetingAction::parse(action).ok_or_else(|| {
                            ApiError::NotFound(format!("no meeting action {action:?}"))
                        })?;
                        allow(method, POST)?;
                        let id = parse_uuid("id", id)?;
                        self.meeting_action(id, action, req).await
                    }
                    _ => Err(ApiError::NotFound("no such meetings route".into())),
                }
            }
            ["config"] => {
                allow(method, GET)?;
                json(StatusCode::OK, &self.db.all_config().await?)
            }
            ["config", key] => {
                allow(method, GET_PUT)?;
                let key = key_segment("key", key)?;
                if is_get(method) {
                    match self.db.get_config(&key).await? {
                        Some(value) => json(
                            StatusCode::OK,
                            &serde_json::json!({ "key": key, "value": value }),
                        ),
                        None => Err(ApiError::NotFound(format!("no config key {key:?}"))),
                    }
                } else {
                    let (parts, body) = read_body(req).await?;
                    let value = Fields::parse(&parts, &body)?.required_text("value", MAX_TEXT)?;
                    self.db.put_config(&key, &value).await?;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "key": key, "value": value }),
                    )
                }
            }
            ["pages"] => {
                allow(method, GET)?;
                json(StatusCode::OK, &self.db.list_pages().await?)
            }
            ["pages", page @ ..] => {
                allow(method, GET_PUT)?;
                let page_path = key_segment("path", &page.join("/"))?;
                if is_get(method) {
                    match self.db.get_page(&page_path).await? {
                        Some(p) => json(StatusCode::OK, &p),
                        None => Err(ApiError::NotFound(format!("no page {page_path:?}"))),
                    }
                } else {
                    let (parts, body) = read_body(req).await?;
                    let fields = Fields::parse(&parts, &body)?;
                    let title = fields.required_str("title", MAX_NAME)?;
                    let body = fields.required_text("body", MAX_TEXT)?;
                    self.db.put_page(&page_path, &title, &body).await?;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "path": page_path, "title": title, "body": body }),
                    )
                }
            }
            ["client_versions"] => {
                allow(method, GET)?;
                json(StatusCode::OK, &self.db.list_client_versions().await?)
            }
            ["client_versions", platform] => {
                allow(method, GET_PUT)?;
                let platform = key_segment("platform", platform)?;
                if is_get(method) {
                    let all = self.db.list_client_versions().await?;
                    match all.into_iter().find(|v| v.platform == platform) {
                        Some(v) => json(StatusCode::OK, &v),
                        None => Err(ApiError::NotFound(format!(
                            "no client version for {platform:?}"
                        ))),
                    }
                } else {
                    let (parts, body) = read_body(req).await?;
                    let fields = Fields::parse(&parts, &body)?;
                    let version = fields.required_str("version", MAX_NAME)?;
                    let url = fields.required_str("download_url", 2048)?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(ApiError::field("download_url", "must be an http(s) URL"));
                    }
                    self.db
                        .put_client_version(&platform, &version, &url)
                        .await?;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({ "platform": platform, "version": version, "download_url": url }),
                    )
                }
            }
            ["usage", "report"] => {
                allow(method, GET)?;
                json(StatusCode::OK, &self.db.usage_report().await?)
            }
            _ => Err(ApiError::NotFound(format!(
                "no API route /api/{}",
                rest.join("/")
            ))),
        }
    }

    /// One health endpoint: 200 `ok`, or 503 with the reason as text.
    async fn health(&self, component: &str) -> Resp {
        let Some(c) = Component::parse(component) else {
            return ApiError::NotFound(format!("no health component {component:?}"))
                .into_response();
        };
        let verdict: Result<(), String> = if self.faults.is_broken(c) {
            Err("marked broken by the fault switch".into())
        } else {
            match c {
                Component::Web => Ok(()),
                Component::Meetings => self
                    .db
                    .probe_meetings(HEALTH_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string()),
                Component::Api => {
                    if self.schema.is_ready() {
                        self.db
                            .check_pool(HEALTH_TIMEOUT)
                            .await
                            .map_err(|e| e.to_string())
                    } else {
                        Err("database schema not installed yet".into())
                    }
                }
                Component::Db => self
                    .db
                    .ping(HEALTH_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string()),
            }
        };
        let resp = match verdict {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ok"),
            Err(reason) => {
                debug!(component = c.name(), %reason, "health check failed");
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{}: {reason}", c.name()),
                )
            }
        };
        no_store(resp)
    }

    async fn set_fault(&self, req: Request<Incoming>) -> Result<(), ApiError> {
        let (parts, body) = read_body(req).await?;
        let fields = Fields::parse(&parts, &body)?;
        let name = fields.required_str("component", 32)?;
        let component = Component::parse(&name)
            .ok_or_else(|| ApiError::field("component", "must be one of web, meetings, api, db"))?;
        let broken = fields.required_bool("broken")?;
        self.faults.set(component, broken);
        warn!(component = component.name(), broken, "fault switch changed");
        Ok(())
    }

    async fn site_name(&self) -> Result<String, ApiError> {
        Ok(self
            .db
            .get_config("site_name")
            .await?
            .unwrap_or_else(|| DEFAULT_SITE_NAME.to_owned()))
    }

    async fn index_page(&self) -> Result<Resp, ApiError> {
        let meetings = if self.faults.is_broken(Component::Meetings) {
            None
        } else {
            Some(self.db.upcoming_meetings(50).await?)
        };
        let users = self.db.list_users(200).await?;
        let name = self.site_name().await?;
        Ok(html_page(html::index(
            &name,
            self.role,
            meetings.as_deref(),
            &users,
        )))
    }

    async fn create_user(&self, req: Request<Incoming>) -> Result<crate::model::User, ApiError> {
        let (parts, body) = read_body(req).await?;
        let fields = Fields::parse(&parts, &body)?;
        let email = fields.required_str("email", MAX_EMAIL)?;
        if !email.contains('@') || email.contains(char::is_whitespace) {
            return Err(ApiError::field(
                "email",
                "must be an address like name@example.com",
            ));
        }
        let name = fields.required_str("name", MAX_NAME)?;
        let user = self.db.create_user(&email, &name).await?;
        info!(user_id = %user.id, site = self.role.as_str(), "user created");
        Ok(user)
    }

    async fn create_meeting(
        &self,
        req: Request<Incoming>,
    ) -> Result<crate::model::Meeting, ApiError> {
        let (parts, body) = read_body(req).await?;
        let fields = Fields::parse(&parts, &body)?;
        // The host is not looked up: it may have been created on the other site and not
        // replicated yet, exactly like the missing foreign key in the schema.
        let host_id = fields.required_uuid("host_id")?;
        let topic = fields.required_str("topic", MAX_NAME)?;
        let start_time = fields.optional_time("start_time")?;
        let duration = fields
            .optional_int("duration_minutes", 1..=1440)?
            .unwrap_or(60);
        let m = self
            .db
            .create_meeting(host_id, &topic, start_time, duration as i32)
            .await?;
        info!(meeting_id = %m.id, site = self.role.as_str(), "meeting scheduled");
        Ok(m)
    }

    async fn meeting_action(
        &self,
        id: Uuid,
        action: MeetingAction,
        req: Request<Incoming>,
    ) -> Result<Resp, ApiError> {
        let user_id = if action == MeetingAction::Join {
            let (parts, body) = read_body(req).await?;
            Some(Fields::parse(&parts, &body)?.required_uuid("user_id")?)
        } else {
            None
        };
        match self
            .db
            .meeting_action(id, action, user_id, self.role.as_str())
            .await?
        {
            None => Err(ApiError::NotFound(format!("no meeting {id}"))),
            Some(ActionOutcome::Illegal(status)) => Err(ApiError::Conflict {
                message: format!("cannot {} a meeting that is {status}", action.as_str()),
                status,
            }),
            Some(ActionOutcome::Done(meeting, usage)) => {
                info!(meeting_id = %id, action = action.as_str(), status = %meeting.status, site = self.role.as_str(), "meeting updated");
                let mut body = serde_json::to_value(&meeting)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                if let Some(u) = usage {
                    body["usage"] =
                        serde_json::to_value(&u).map_err(|e| ApiError::Internal(e.to_string()))?;
                }
                json(StatusCode::OK, &body)
            }
        }
    }
}
