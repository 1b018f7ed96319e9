//! Connections to the site databases, their driver task tied to the connection's lifetime.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::Error;

/// Which site a database belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The primary site (wins HLC ties).
    Primary,
    /// The backup site.
    Backup,
}

impl Site {
    /// `primary` or `backup`, as recorded in `gsb.site` and in change origins.
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Primary => "primary",
            Site::Backup => "backup",
        }
    }
}

/// A client whose connection task is aborted when it is dropped (never detached).
pub(crate) struct Conn {
    /// The client.
    pub client: Client,
    /// Woken on every `NOTIFY` received by this connection.
    pub notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How one site's database is reached: its connection string and, for an encrypted link,
/// the TLS client settings (server certificate verified, host name checked).
#[derive(Clone)]
pub(crate) struct Link {
    pub site: Site,
    pub dsn: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl crate::Config {
    /// The link to `site`'s database: TLS when `ca_file` is set (verified against it) or
    /// the connection string says `sslmode=require` (verified against the system's roots);
    /// the TLS settings are read once per config.
    pub(crate) fn link(&self, site: Site) -> Result<Link, Error> {
        let dsn = match site {
            Site::Primary => &self.primary_dsn,
            Site::Backup => &self.backup_dsn,
        };
        let require = dsn
            .parse::<tokio_postgres::Config>()
            .is_ok_and(|c| c.get_ssl_mode() == tokio_postgres::config::SslMode::Require);
        let tls = if self.ca_file.is_some() || require {
            Some(match self.tls.get() {
                Some(c) => c.clone(),
                None => {
                    let c = gsb_health::tls::client_config(self.ca_file.as_deref())
                        .map_err(|e| Error::Protocol(format!("replicator.ca_file: {e}")))?;
                    self.tls.get_or_init(|| Arc::new(c)).clone()
                }
            })
        } else {
            None
        };
        Ok(Link {
            site,
            dsn: dsn.clone(),
            tls,
        })
    }
}

/// Connects over `link`, session time zone UTC so row JSON is the same on both sites.
pub(crate) async fn connect(link: &Link) -> Result<Conn, Error> {
    let site = link.site;
    let connect_err = |source| Error::Connect {
        site: site.as_str(),
        source,
    };
    let mut cfg: tokio_postgres::Config = link
        .dsn
        .parse()
        .map_err(|e| Error::db(site.as_str(), "parsing the connection string", e))?;
    let notify = Arc::new(Notify::new());
    let (client, task) = match &link.tls {
        None => {
            let (client, conn) = cfg.connect(NoTls).await.map_err(connect_err)?;
            (client, drive(site, conn, notify.clone()))
        }
        Some(tls) => {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, conn) = cfg.connect(make).await.map_err(connect_err)?;
            (client, drive(site, conn, notify.clone()))
        }
    };
    let c = Conn {
        client,
        notify,
        task,
    };
    c.batch_execute("SET TIME ZONE 'UTC'; SET DateStyle = 'ISO'")
        .await
        .map_err(|e| Error::db(site.as_str(), "setting the session time zone", e))?;
    Ok(c)
}

/// Spawns the connection's driver: wakes `notify` on every NOTIFY, ends with the connection.
fn drive<S, T>(
    site: Site,
    mut conn: tokio_postgres::Connection<S, T>,
    notify: Arc<Notify>,
) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(site = site.as_str(), error = %e, "database connection closed");
                    break;
                }
            }
        }
    })
}
