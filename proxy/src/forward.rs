//! Forwarding one client request to the active site: header rewriting, the pooled upstream
//! client, retry on the other site, passive health, metrics, redirect mode and upgrades.
//!
//! The request path reads the route snapshot (no lock) and awaits nothing but the client and the
//! site.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{Histogram, IntCounter, IntCounterVec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::body::{AccessLog, ProxyBody, ReqBody, ReturnableBody};
use crate::config::{Config, Mode};
use crate::detect;
use crate::drain::{Drain, Tokens};
use crate::error::{Error, ProxyError, RetryType};
use crate::h1::RawPool;
use crate::metrics::ProxyMetrics;
use crate::passive::PassiveHealth;
use crate::pool::{H1Pool, PoolError};
use crate::retry::RetryBudget;
use crate::route::{Router, Site};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1); `Proxy-*` are removed too.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// Whether a header named `name` (any case) describes one hop: [`HOP_BY_HOP`] or `Proxy-*`.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the request path knows about the client connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// `http` or `https`: the listener the request came in on (for `X-Forwarded-Proto`).
    pub proto: &'static str,
    /// The client's IP as a header value, formatted once per connection rather than once per
    /// request (cloning it only bumps a reference count).
    peer_ip: HeaderValue,
    /// The worker serving the connection: its requests use that worker's upstream pools.
    worker: usize,
}

impl ConnInfo {
    /// The connection from `peer` accepted on the `proto` (`http` or `https`) listener of
    /// worker `worker`.
    pub fn new(peer: SocketAddr, proto: &'static str, worker: usize) -> ConnInfo {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            proto,
            peer_ip,
            worker,
        }
    }
}

/// Where one site is reached.
#[derive(Clone, Debug)]
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the site URL without the trailing `/` (usually empty).
    base_path: String,
    /// `public_url` (or `url`) without the trailing `/`, for redirect mode.
    redirect_base: String,
}

impl Target {
    fn parse(key: &str, url: &str, public: Option<&str>) -> Result<Target, Error> {
        let uri: Uri = url
            .parse()
            .map_err(|_| Error::Client(format!("{key}.url: not a URL: {url:?}")))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(Error::Client(format!(
                "{key}.url: expected http:// or https://, got {url:?}"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| Error::Client(format!("{key}.url: no host in {url:?}")))?;
        Ok(Target {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            redirect_base: public.unwrap_or(url).trim_end_matches('/').to_owned(),
        })
    }

    fn uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.path(pq)?)
            .build()
            .map_err(|_| ProxyError::BadRequest("path cannot be forwarded"))
    }

    /// The origin-form URI (`/path?query`) sent on a connection of its own.
    fn origin_uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        Ok(Uri::from(self.path(pq)?))
    }

    fn path(&self, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, ProxyError> {
        Ok(match (self.base_path.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let rest = pq.map_or("/", |p| p.as_str());
                format!("{}{rest}", self.base_path)
                    .parse()
                    .map_err(|_| ProxyError::BadRequest("path cannot be forwarded"))?
            }
        })
    }
}

/// A pooled client to one site: plain TCP for `http://`, rustls for `https://`.
type UpstreamClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// What the pooled clients are built with; bound at start (a change needs a restart).
#[derive(Clone, Copy, Debug)]
struct ClientOptions {
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// `proxy.workers`: every worker gets pools of its own, so a request never waits on a
    /// connection driven by another thread.
    workers: usize,
}

/// The pooled connections of one site (per worker).
#[derive(Clone, Debug)]
struct SiteClients {
    /// What the clients were built for: a reload that changes none of it (url, ca_file, the
    /// file's content) keeps them and their warm connections.
    built_for: crate::config::TrustKey,
    kind: Upstream,
}

/// How a site is spoken to.
// One value per site and worker, built at start and on reload and read in place: the size of
// the TLS variant costs nothing on the request path, a box would cost a pointer chase.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Upstream {
    /// `http://`: HTTP/1.1 connections driven on the worker's thread (see `pool.rs`); upgrades
    /// go over the same pool. Beside it, the plain TCP connections of the fast path (`h1.rs`).
    Plain(Arc<H1Pool>, Arc<RawPool>),
    /// `https://`: hyper-util's pooled client over rustls.
    Tls {
        /// Ordinary requests; ALPN offers h2 and http/1.1.
        main: UpstreamClient,
        /// Upgrade requests (WebSocket): HTTP/1.1 only, since an HTTP/1.1 `Upgrade` cannot
        /// ride an h2 connection.
        upgrade: UpstreamClient,
    },
}

impl SiteClients {
    fn build(
        key: &str,
        site: &crate::config::SiteConfig,
        built_for: crate::config::TrustKey,
        opts: ClientOptions,
    ) -> Result<SiteClients, Error> {
        let kind = if site.url.starts_with("https://") {
            let tls = site.client_tls(key)?;
            Upstream::Tls {
                main: upstream_client(opts, tls.clone(), true),
                upgrade: upstream_client(opts, tls, false),
            }
        } else {
            let target = Target::parse(key, &site.url, None)?;
            Upstream::Plain(
                Arc::new(H1Pool::new(
                    &target.authority,
                    opts.connect_timeout,
                    opts.idle_timeout,
                    MAX_IDLE_PER_SITE,
                )),
                Arc::new(RawPool::new(
                    &target.authority,
                    opts.connect_timeout,
                    opts.idle_timeout,
                    MAX_IDLE_PER_SITE,
                )),
            )
        };
        Ok(SiteClients { built_for, kind })
    }
}

/// Upstream connections kept per site and worker.
const MAX_IDLE_PER_SITE: usize = 256;

/// One pooled client; `h2` offers h2 besides http/1.1 in the TLS handshake (the pool speaks
/// whichever the site picks; plain `http://` stays HTTP/1.1).
fn upstream_client(opts: ClientOptions, tls: rustls::ClientConfig, h2: bool) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(opts.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(30)));
    // The TLS layer decides the scheme; the TCP connector must let https URIs through.
    connector.enforce_http(false);
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let https = if h2 {
        builder.enable_http2().wrap_connector(connector)
    } else {
        builder.wrap_connector(connector)
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(opts.idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(MAX_IDLE_PER_SITE)
        .http1_max_buf_size(crate::pool::MAX_READ_BUF)
        .build(https)
}

/// `settings` once per worker (the copies share the clients).
fn per_worker(settings: Settings, workers: usize) -> Box<[ArcSwap<Settings>]> {
    let mut copies: Vec<ArcSwap<Settings>> = (1..workers.max(1))
        .map(|_| ArcSwap::from_pointee(settings.clone()))
        .collect();
    copies.push(ArcSwap::from_pointee(settings));
    copies.into_boxed_slice()
}

/// `gsb_requests_total{site,code}` children, each resolved on the first answer with its code:
/// the label lookup (hash of the label values under the vector's lock) is then paid once per
/// site and code instead of once per request. A label set still appears only once used.
#[derive(Debug)]
struct RequestCounters {
    vec: IntCounterVec,
    /// Per site, indexed by `code - 100` (codes 100..=999, what `StatusCode` allows).
    by_code: [Box<[OnceLock<IntCounter>]>; 2],
}

impl RequestCounters {
    fn new(vec: &IntCounterVec) -> RequestCounters {
        let slots = || (100..1000).map(|_| OnceLock::new()).collect();
        RequestCounters {
            vec: vec.clone(),
            by_code: [slots(), slots()],
        }
    }

    fn get(&self, site: Site, status: StatusCode) -> &IntCounter {
        let i = usize::from(status.as_u16()).saturating_sub(100);
        self.by_code[site.index()][i].get_or_init(|| {
            self.vec
                .with_label_values(&[site.as_str(), status.as_str()])
        })
    }
}

/// Everything the request path needs, shared by all connections.
#[derive(Debug)]
pub struct Forwarder {
    /// The pooled clients' build options (for clients rebuilt on reload).
    client_opts: ClientOptions,
    router: Arc<Router>,
    passive: Arc<PassiveHealth>,
    metrics: ProxyMetrics,
    /// `gsb_request_duration_seconds{site}` resolved once per site (no label lookup per request).
    durations: [Histogram; 2],
    /// `gsb_requests_total{site,code}` resolved once per site and code on first use.
    requests: RequestCounters,
    budget: RetryBudget,
    drain: Arc<Drain>,
    /// What a config reload may change; read once per request (no lock). One copy per
    /// worker: a request takes a reference on its worker's copy, so the reference count it
    /// bumps is not shared between the workers' cores.
    settings: Box<[ArcSwap<Settings>]>,
    /// Upgraded tunnels are tracked here so shutdown waits for them (bounded).
    tracker: TaskTracker,
    /// Cancelled when the shutdown grace period ends: tunnels still open are closed.
    hard_stop: CancellationToken,
}

/// The forwarder's reloadable settings (SIGHUP swaps them whole).
#[derive(Clone, Debug)]
pub struct Settings {
    targets: [Target; 2],
    /// Per site, one per worker; rebuilt on reload only when the site's `url` or `ca_file`
    /// changed.
    clients: [Vec<SiteClients>; 2],
    mode: Mode,
    upstream_timeout: Duration,
    request_log: bool,
    /// Proxy mode, no request log, both sites `http://`: the fast path (`h1.rs`) may serve.
    fast: bool,
}

impl Settings {
    /// The settings of `config`; fails on a site URL the forwarder cannot use or a `ca_file`
    /// that cannot be read. Clients of `previous` are reused for sites whose `url`,
    /// `ca_file` and CA content did not change.
    fn build(
        config: &Config,
        opts: ClientOptions,
        previous: Option<&Settings>,
    ) -> Result<Settings, Error> {
        let (p, s) = (&config.proxy, &config.sites);
        let clients = |i: usize, key: &str, site: &crate::config::SiteConfig| {
            let trust = site.trust_key();
            match previous.map(|prev| &prev.clients[i]) {
                Some(c) if c.first().is_some_and(|c| c.built_for == trust) => Ok(c.clone()),
                _ => (0..opts.workers)
                    .map(|_| SiteClients::build(key, site, trust.clone(), opts))
                    .collect::<Result<Vec<_>, _>>(),
            }
        };
        let plain = |c: &Vec<SiteClients>| c.iter().all(|c| matches!(c.kind, Upstream::Plain(..)));
        let clients = [
            clients(0, "sites.primary", &s.primary)?,
            clients(1, "sites.backup", &s.backup)?,
        ];
        Ok(Settings {
            fast: p.mode == Mode::Proxy && !p.request_log && clients.iter().all(plain),
            clients,
            targets: [
                Target::parse(
                    "sites.primary",
                    &s.primary.url,
                    s.primary.public_url.as_deref(),
                )?,
                Target::parse(
                    "sites.backup",
                    &s.backup.url,
                    s.backup.public_url.as_deref(),
                )?,
            ],
            mode: p.mode,
            upstream_timeout: p.upstream_timeout,
            request_log: p.request_log,
        })
    }

    /// Whether the fast path may serve requests under these settings.
    pub(crate) fn fast_path(&self) -> bool {
        self.fast
    }

    /// The path prefix of `site`'s URL (usually empty).
    pub(crate) fn base_path(&self, site: Site) -> &str {
        &self.targets[site.index()].base_path
    }

    /// Worker `worker`'s fast-path connections to `site` (`None` for an `https://` site).
    pub(crate) fn raw_pool(&self, site: Site, worker: usize) -> Option<&RawPool> {
        match &self.clients[site.index()].get(worker)?.kind {
            Upstream::Plain(_, raw) => Some(raw),
            Upstream::Tls { .. } => None,
        }
    }

    /// `proxy.upstream_timeout`.
    pub(crate) fn upstream_timeout(&self) -> Duration {
        self.upstream_timeout
    }
}

/// What one attempt on one site needs, besides the body.
struct Outgoing {
    /// The route generation's tokens for the client connection's worker (see `drain.rs`).
    tokens: Arc<Tokens>,
    method: Method,
    pq: Option<PathAndQuery>,
    headers: HeaderMap,
    /// An `Upgrade` request: sent on the HTTP/1.1-only client.
    upgrade: bool,
    /// The client connection's worker (whose pools are used).
    worker: usize,
}

impl Forwarder {
    /// Builds the forwarder and its pooled upstream client.
    pub fn new(
        config: &Config,
        router: Arc<Router>,
        passive: Arc<PassiveHealth>,
        metrics: ProxyMetrics,
        drain: Arc<Drain>,
        tracker: TaskTracker,
        hard_stop: CancellationToken,
    ) -> Result<Forwarder, Error> {
        let p = &config.proxy;
        let client_opts = ClientOptions {
            connect_timeout: p.connect_timeout,
            idle_timeout: p.idle_timeout,
            workers: p.workers(),
        };
        let built = Settings::build(config, client_opts, None)?;
        let settings = per_worker(built, client_opts.workers);
        let durations =
            Site::ALL.map(|site| metrics.request_duration.with_label_values(&[site.as_str()]));
        let requests = RequestCounters::new(&metrics.requests);
        Ok(Forwarder {
            client_opts,
            router,
            passive,
            metrics,
            durations,
            requests,
            budget: RetryBudget::new(p.retry_budget),
            drain,
            settings,
            tracker,
            hard_stop,
        })
    }

    /// Builds the settings of a reloaded `config` without applying them (see
    /// [`Forwarder::reconfigure`]); sites whose `url`, `ca_file` and CA content did not change keep their
    /// pooled connections.
    pub fn prepare(&self, config: &Config) -> Result<Settings, Error> {
        Settings::build(config, self.client_opts, Some(&self.settings[0].load()))
    }

    /// Swaps in reloaded settings: requests starting from now use them; requests already
    /// running keep the ones they started with.
    pub fn reconfigure(&self, settings: Settings) {
        for slot in &self.settings[1..] {
            slot.store(Arc::new(settings.clone()));
        }
        self.settings[0].store(Arc::new(settings));
    }

    /// Closes worker `worker`'s site connections idle past the idle timeout (`all`: every
    /// idle one, at shutdown); called from the worker's own thread.
    pub fn sweep_idle(&self, worker: usize, all: bool) {
        let Some(settings) = self.settings.get(worker) else {
            return;
        };
        for clients in &settings.load().clients {
            if let Some(SiteClients {
                kind: Upstream::Plain(pool, raw),
                ..
            }) = clients.get(worker)
            {
                pool.sweep(all);
                raw.sweep(all);
            }
        }
    }

    /// Answers one client request.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let started = tokio::time::Instant::now();
        // A copy of the snapshot, and the worker's own copy of the settings: no reference
        // count shared between workers is touched per request.
        let route = self.router.current();
        let settings = self.settings[conn.worker % self.settings.len()].load_full();
        // Taken before the request is consumed, only when the request log is on.
        let log = settings.request_log.then(|| AccessLog {
            client: conn.peer,
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.to_string()),
            version: req.version(),
            status: 0,
            site: route.active,
            retried: false,
            started,
            bytes: 0,
        });
        let with_log = |resp: Response<ProxyBody>, site: Site| match log {
            Some(mut log) => {
                log.status = resp.status().as_u16();
                log.site = site;
                log.retried = site != route.active;
                resp.map(|b| b.with_access_log(Box::new(log)))
            }
            None => resp,
        };
        if detect::is_detect_path(req.uri().path()) {
            return with_log(detect::answer(req.method(), route.active), route.active);
        }
        if settings.mode == Mode::Redirect {
            return with_log(self.redirect(&req, route.active, &settings), route.active);
        }
        let (site, resp) = match self.forward(req, conn, &route, &settings).await {
            Ok(ok) => ok,
            Err(e) => {
                let site = e.site().unwrap_or(route.active);
                tracing::warn!(site = site.as_str(), kind = e.kind(), error = %e, "request failed");
                (site, e.into_response())
            }
        };
        self.count_request(site, resp.status(), started);
        with_log(resp, site)
    }

    fn redirect(
        &self,
        req: &Request<Incoming>,
        active: Site,
        settings: &Settings,
    ) -> Response<ProxyBody> {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("{}{pq}", settings.targets[active.index()].redirect_base);
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        match HeaderValue::try_from(location) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Err(_) => return ProxyError::BadRequest("path cannot be redirected").into_response(),
        }
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        self.requests
            .get(active, StatusCode::TEMPORARY_REDIRECT)
            .inc();
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        route: &crate::route::RouteSnapshot,
        settings: &Settings,
    ) -> Result<(Site, Response<ProxyBody>), ProxyError> {
        self.budget.deposit();
        let tokens = self.drain.tokens(conn.worker);
        // An upgrade (WebSocket...) keeps its Upgrade/Connection headers and is tunnelled.
        let upgrade = upgrade_protocol(&req);
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let conn_worker = conn.worker;
        let mut headers = parts.headers;
        let host = parts.uri.authority().map(|a| a.as_str().to_owned());
        prepare_request_headers(&mut headers, conn, host.as_deref(), upgrade.as_ref())?;
        let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let (mut body, mut returned) = if body.is_end_stream() {
            (Some(ReqBody::Empty), None)
        } else {
            let (b, rx) = ReturnableBody::new(body);
            (Some(ReqBody::Stream(b)), Some(rx))
        };
        let has_body = returned.is_some();
        let mut out = Outgoing {
            tokens,
            method: parts.method,
            pq: parts.uri.path_and_query().cloned(),
            headers,
            upgrade: upgrade.is_some(),
            worker: conn_worker,
        };

        let first = route.active;
        let other = first.other();
        // Headers are cloned for a second attempt only when one could happen.
        // A connect failure is retried whatever the budget: the first site did no work, so
        // the retry moves the request instead of adding load (this keeps a failover's first
        // moments, before the route moves, free of 502s). Other retries need the budget.
        let may_retry = route.usable[other.index()];
        let first_headers = if may_retry {
            out.headers.clone()
        } else {
            std::mem::take(&mut out.headers)
        };
        // Only a request that is safe to send twice may leave a site that went down while it
        // waited for the answer.
        let moved = idempotent && !has_body && upgrade.is_none() && may_retry;
        let result = self
            .attempt(
                settings,
                first,
                &out,
                first_headers,
                body.take().unwrap_or(ReqBody::Empty),
                moved,
            )
            .await;
        let (site, resp) = match result {
            Ok(resp) => (first, resp),
            Err(err) => {
                self.count_error(&err);
                let safe = match err.retry() {
                    RetryType::Always => true,
                    RetryType::IfIdempotent => idempotent && !has_body,
                    RetryType::Never => false,
                };
                // The client's body comes back only if the failed attempt never read it.
                let retry_body = match returned.take() {
                    None => Some(ReqBody::Empty),
                    Some(mut rx) => rx
                        .try_recv()
                        .ok()
                        .map(|b| ReqBody::Stream(ReturnableBody::new(b).0)),
                };
                let retry_body = retry_body.filter(|_| safe && may_retry);
                match retry_body {
                    // A connect failure or a move off a down site adds no load to a working
                    // site: no budget needed. Other retries need it.
                    Some(b)
                        if err.retry() == RetryType::Always
                            || matches!(err, ProxyError::Moved { .. })
                            || self.budget.try_withdraw() =>
                    {
                        tracing::info!(
                            from = first.as_str(),
                            to = other.as_str(),
                            kind = err.kind(),
                            "retrying on the other site"
                        );
                        self.metrics
                            .retries
                            .with_label_values(&[first.as_str(), other.as_str()])
                            .inc();
                        let headers = std::mem::take(&mut out.headers);
                        match self.attempt(settings, other, &out, headers, b, false).await {
                            Ok(resp) => (other, resp),
                            Err(err2) => {
                                self.count_error(&err2);
                                return Err(ProxyError::NoSite(Box::new(err2)));
                            }
                        }
                    }
                    _ if route.none_available
                        || (err.retry() == RetryType::Always && !route.usable[other.index()]) =>
                    {
                        return Err(ProxyError::NoSite(Box::new(err)))
                    }
                    _ => return Err(err),
                }
            }
        };
        self.passive.report_status(site, resp.status().as_u16());
        Ok((
            site,
            self.finish_response(
                resp,
                site,
                client_upgrade,
                upgrade.is_some(),
                &out.tokens.drain,
                settings.upstream_timeout,
            ),
        ))
    }

    /// One exchange with `site`, up to the response headers.
    async fn attempt(
        &self,
        settings: &Settings,
        site: Site,
        out: &Outgoing,
        headers: HeaderMap,
        body: ReqBody,
        moved: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let target = &settings.targets[site.index()];
        let upstream = &settings.clients[site.index()][out.worker].kind;
        let uri = match upstream {
            Upstream::Plain(..) => target.origin_uri(out.pq.as_ref())?,
            Upstream::Tls { .. } => target.uri(out.pq.as_ref())?,
        };
        let mut req = Request::new(body);
        *req.method_mut() = out.method.clone();
        *req.uri_mut() = uri;
        // Sites are spoken to in HTTP/1.1 whatever the client used.
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        let send = async {
            match upstream {
                Upstream::Plain(pool, _) => pool.send(req).await,
                Upstream::Tls { main, upgrade } => {
                    let client = if out.upgrade { upgrade } else { main };
                    client.request(req).await.map_err(|e| match e.is_connect() {
                        true => PoolError::Connect(Box::new(e)),
                        false => PoolError::Request(Box::new(e)),
                    })
                }
            }
        };
        let exchange = tokio::time::timeout(settings.upstream_timeout, send);
        // A request still waiting for its answer when the old site's drain ends is cut too.
        let result = tokio::select! {
            // The exchange first: an answer that is ready wins, and the tokens' waiter lists
            // are only joined by a request that has to wait.
            biased;
            r = exchange => r,
            _ = out.tokens.drain.cancelled() => return Err(ProxyError::Drained { site }),
            _ = out.tokens.moved.cancelled(), if moved => return Err(ProxyError::Moved { site }),
        };
        match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(PoolError::Connect(source))) => {
                self.passive.report_connect_failure(site);
                Err(ProxyError::Connect { site, source })
            }
            Ok(Err(PoolError::Request(source))) => Err(ProxyError::Upstream { site, source }),
            Err(_) => Err(ProxyError::Timeout {
                site,
                timeout: settings.upstream_timeout,
            }),
        }
    }

    /// Worker `worker`'s copy of the settings (for the fast path).
    pub(crate) fn worker_settings(&self, worker: usize) -> Arc<Settings> {
        self.settings[worker % self.settings.len()].load_full()
    }

    /// The route snapshot a request starting now follows.
    pub(crate) fn route(&self) -> crate::route::RouteSnapshot {
        self.router.current()
    }

    /// The current route generation's tokens for worker `worker`.
    pub(crate) fn drain_tokens(&self, worker: usize) -> Arc<Tokens> {
        self.drain.tokens(worker)
    }

    /// A request counts toward the retry budget.
    pub(crate) fn budget_deposit(&self) {
        self.budget.deposit();
    }

    /// Takes a retry from the budget, if there is one.
    pub(crate) fn budget_withdraw(&self) -> bool {
        self.budget.try_withdraw()
    }

    /// `gsb_retries_total{from,to}`.
    pub(crate) fn count_retry(&self, from: Site, to: Site) {
        self.metrics
            .retries
            .with_label_values(&[from.as_str(), to.as_str()])
            .inc();
    }

    /// `gsb_request_duration_seconds{site}` and `gsb_requests_total{site,code}` for an answer
    /// whose head is ready (the hyper path's `handle` and the fast path).
    pub(crate) fn count_request(
        &self,
        site: Site,
        status: StatusCode,
        started: tokio::time::Instant,
    ) {
        self.durations[site.index()].observe(started.elapsed().as_secs_f64());
        self.requests.get(site, status).inc();
    }

    /// Passive health: `site` answered `status`.
    pub(crate) fn passive_status(&self, site: Site, status: u16) {
        self.passive.report_status(site, status);
    }

    /// Passive health: no connection to `site` could be opened.
    pub(crate) fn passive_connect_failure(&self, site: Site) {
        self.passive.report_connect_failure(site);
    }

    pub(crate) fn count_error(&self, err: &ProxyError) {
        if let Some(site) = err.site() {
            self.metrics
                .upstream_errors
                .with_label_values(&[site.as_str(), err.kind()])
                .inc();
        }
    }

    fn finish_response(
        &self,
        mut resp: Response<Incoming>,
        site: Site,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        is_upgrade: bool,
        drain: &CancellationToken,
        pause: Duration,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS && is_upgrade {
            let upgrade = resp.headers().get(header::UPGRADE).cloned();
            strip_hop_by_hop(resp.headers_mut());
            if let (Some(proto), Some(client_up)) = (upgrade, client_upgrade) {
                let h = resp.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                h.insert(header::UPGRADE, proto);
                let upstream_up = hyper::upgrade::on(&mut resp);
                self.spawn_tunnel(site, client_up, upstream_up, drain.clone());
            }
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ProxyBody::empty());
        }
        strip_hop_by_hop(resp.headers_mut());
        resp.map(|b| ProxyBody::upstream(b, Some(drain), pause))
    }

    fn spawn_tunnel(
        &self,
        site: Site,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
        drain: CancellationToken,
    ) {
        let hard_stop = self.hard_stop.clone();
        let span = tracing::info_span!("tunnel", site = site.as_str());
        self.tracker.spawn(
            async move {
                let (client, upstream) = match tokio::try_join!(client, upstream) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade did not complete");
                        return;
                    }
                };
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
                        Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
                        Err(e) => tracing::debug!(error = %e, "tunnel closed with an error"),
                    },
                    _ = drain.cancelled() => tracing::info!("tunnel closed: drain timeout passed"),
                    _ = hard_stop.cancelled() => tracing::info!("tunnel closed: shutting down"),
                }
            }
            .instrument(span),
        );
    }
}

/// The protocol a client asks to upgrade to (HTTP/1.1 `Connection: upgrade` + `Upgrade: x`).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let proto = req.headers().get(header::UPGRADE)?;
    connection_has(req.headers(), "upgrade").then(|| proto.clone())
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: the fixed list, the ones `Connection` names, and `Proxy-*`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(name);
        }
    }
}

/// Rewrites client headers for the site: hop-by-hop removed, `Host` kept (from the HTTP/2
/// `:authority` when there is no `Host`), `X-Forwarded-For` appended, `-Proto` and `-Host` set.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    conn: ConnInfo,
    authority: Option<&str>,
    upgrade: Option<&HeaderValue>,
) -> Result<(), ProxyError> {
    strip_hop_by_hop(headers);
    if let Some(proto) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    if !headers.contains_key(header::HOST) {
        if let Some(a) = authority {
            let v = HeaderValue::from_str(a)
                .map_err(|_| ProxyError::BadRequest("invalid :authority"))?;
            headers.insert(header::HOST, v);
        }
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(&X_FORWARDED_HOST, host);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(conn.proto));
    let v = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let ip = conn.peer_ip.to_str().unwrap_or_default();
            HeaderValue::try_from(format!("{prev}, {ip}"))
                .map_err(|_| ProxyError::BadRequest("invalid X-Forwarded-For"))?
        }
        // The common case (first proxy in the chain): no formatting, no allocation.
        _ => conn.peer_ip,
    };
    headers.insert(&X_FORWARDED_FOR, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> ConnInfo {
        ConnInfo::new("10.1.2.3:5555".parse().expect("addr"), "https", 0)
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("x"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::HOST, HeaderValue::from_static("meet.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        prepare_request_headers(&mut h, conn(), None, None).expect("ok");
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(h[header::HOST], "meet.example");
        assert_eq!(h["x-forwarded-host"], "meet.example");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
    }

    #[test]
    fn h2_authority_becomes_host_and_upgrade_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let ws = HeaderValue::from_static("websocket");
        prepare_request_headers(&mut h, conn(), Some("meet.example:8443"), Some(&ws)).expect("ok");
        assert_eq!(h[header::HOST], "meet.example:8443");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
    }

    #[test]
    fn upgrade_needs_connection_token() {
        let req = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .expect("req");
        assert!(upgrade_protocol(&req).is_none());
        let req = Request::builder()
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .body(())
            .expect("req");
        assert_eq!(upgrade_protocol(&req).expect("upgrade"), "websocket");
    }

    #[test]
    fn target_uris() {
        let t = Target::parse("sites.primary", "http://127.0.0.1:8001/", None).expect("target");
        let pq = PathAndQuery::from_static("/a/b?c=1");
        assert_eq!(
            t.uri(Some(&pq)).expect("uri").to_string(),
            "http://127.0.0.1:8001/a/b?c=1"
        );
        let t = Target::parse(
            "sites.primary",
            "http://10.0.0.1/meet/",
            Some("https://b.example/"),
        )
        .expect("target");
        assert_eq!(
            t.uri(Some(&pq)).expect("uri").to_string(),
            "http://10.0.0.1/meet/a/b?c=1"
        );
        assert_eq!(t.redirect_base, "https://b.example");
        let t = Target::parse("sites.backup", "https://meet.example:8443/", None).expect("https");
        assert_eq!(
            t.uri(Some(&pq)).expect("uri").to_string(),
            "https://meet.example:8443/a/b?c=1"
        );
        assert!(Target::parse("sites.backup", "ftp://10.0.0.1", None).is_err());
    }
}
