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

/// Connects to `dsn` (site `site`), session time zone UTC so row JSON is the same on both sites.
pub(crate) async fn connect(site: Site, dsn: &str) -> Result<Conn, Error> {
    let (client, mut conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .map_err(|source| Error::Connect {
            site: site.as_str(),
            source,
        })?;
    let notify = Arc::new(Notify::new());
    let n2 = notify.clone();
    let task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => n2.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(site = site.as_str(), error = %e, "database connection closed");
                    break;
                }
            }
        }
    });
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
