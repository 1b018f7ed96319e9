//! A replication-protocol connection (`replication=database`): the walsender's simple-query
//! commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `START_REPLICATION`) and the
//! CopyBoth stream of `XLogData` / keepalive messages, with standby status updates.
//!
//! tokio-postgres has no CopyBoth; the messages are framed with `postgres-protocol` (already
//! under tokio-postgres), so authentication (trust, cleartext, MD5, SCRAM-SHA-256) is the same
//! code tokio-postgres uses.

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{self, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::db::Link;
use crate::Error;

/// The connection's byte stream: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub(crate) const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// One message of the replication stream.
#[derive(Debug)]
pub(crate) enum StreamMsg {
    /// WAL data: one pgoutput message starting at `start`.
    XLogData {
        /// WAL position of the message's start.
        start: u64,
        /// The pgoutput message.
        data: bytes::Bytes,
    },
    /// The server's keepalive: its WAL end, and whether it wants an answer now.
    Keepalive {
        /// The server's current WAL end.
        wal_end: u64,
        /// True when the server asks for a status update at once.
        reply: bool,
    },
}

/// One framed backend message.
enum Frame {
    /// CopyBothResponse: the stream has started.
    CopyBoth,
    /// CopyData's payload.
    Copy(bytes::Bytes),
    /// Anything else, parsed by postgres-protocol.
    Other(Message),
}

/// Asks the server for TLS (SSLRequest) and runs the handshake, the certificate verified
/// against `tls`'s roots for `host`.
async fn start_tls(
    site: &'static str,
    mut stream: TcpStream,
    host: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let err = |what: String| Error::Replication { site, what };
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|e| err(format!("asking for TLS: {e}")))?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| err(format!("asking for TLS: {e}")))?;
    if answer[0] != b'S' {
        return Err(err(
            "the server does not accept TLS (asked for by replicator.ca_file or sslmode=require): turn on ssl in its postgresql.conf".into(),
        ));
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| err(format!("{host} is not a TLS server name: {e}")))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, stream)
        .await
        .map_err(|e| err(format!("TLS handshake with {host}: {e}")))
}

/// A replication connection to one site.
pub(crate) struct ReplConn {
    stream: Box<dyn Io>,
    buf: BytesMut,
    site: &'static str,
}

impl ReplConn {
    /// Connects with `replication=database` over `link` (TCP hosts only; TLS when the link
    /// has it, negotiated with an SSLRequest as libpq does).
    pub(crate) async fn connect(link: &Link) -> Result<ReplConn, Error> {
        let site = link.site.as_str();
        let cfg: tokio_postgres::Config = link
            .dsn
            .parse()
            .map_err(|e| Error::db(site, "parsing the connection string", e))?;
        let host = cfg
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .unwrap_or_else(|| "localhost".into());
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| Error::Replication {
                site,
                what: format!("connecting to {host}:{port}: {e}"),
            })?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = match &link.tls {
            None => Box::new(stream),
            Some(tls) => Box::new(start_tls(site, stream, &host, tls.clone()).await?),
        };
        let mut c = ReplConn {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            site,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", user.as_str()),
                ("database", dbname.as_str()),
                ("replication", "database"),
                ("application_name", "gsb-replicator"),
                // Row values as text the same way on both sites.
                ("TimeZone", "UTC"),
                ("DateStyle", "ISO"),
            ],
            &mut out,
        )
        .map_err(|e| c.proto(format!("startup message: {e}")))?;
        c.send(&out).await?;
        let password = cfg.get_password().map(<[u8]>::to_vec);
        let mut scram: Option<ScramSha256> = None;
        loop {
            match c.read_msg().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = c.need_password(&password)?;
                    let mut out = BytesMut::new();
                    frontend::password_message(&pw, &mut out)
                        .map_err(|e| c.proto(e.to_string()))?;
                    c.send(&out).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = c.need_password(&password)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        &pw,
                        body.salt(),
                    );
                    let mut out = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| c.proto(e.to_string()))?;
                    c.send(&out).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let pw = c.need_password(&password)?;
                    let mut mechs = body.mechanisms();
                    let mut ok = false;
                    while let Some(m) = fallible_next(&mut mechs).map_err(|e| c.proto(e))? {
                        ok |= m == "SCRAM-SHA-256";
                    }
                    if !ok {
                        return Err(c.proto("the server offers no SCRAM-SHA-256".into()));
                    }
                    let s = ScramSha256::new(&pw, ChannelBinding::unsupported());
                    let mut out = BytesMut::new();
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .map_err(|e| c.proto(e.to_string()))?;
                    c.send(&out).await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| c.proto("SASL continue before start".into()))?;
                    s.update(body.data())
                        .map_err(|e| c.proto(format!("SCRAM: {e}")))?;
                    let mut out = BytesMut::new();
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| c.proto(e.to_string()))?;
                    c.send(&out).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| c.proto("SASL final before start".into()))?;
                    s.finish(body.data())
                        .map_err(|e| c.proto(format!("SCRAM: {e}")))?;
                }
                Message::ReadyForQuery(_) => return Ok(c),
                Message::ErrorResponse(body) => return Err(c.server_error(body)),
                _ => {} // parameter status, backend key data, notices
            }
        }
    }

    fn need_password(&self, pw: &Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
        pw.clone().ok_or_else(|| Error::Replication {
            site: self.site,
            what: "the server asks for a password and the dsn has none (add password=...)".into(),
        })
    }

    fn proto(&self, what: String) -> Error {
        Error::Replication {
            site: self.site,
            what: format!("replication protocol: {what}"),
        }
    }

    fn server_error(&self, body: backend::ErrorResponseBody) -> Error {
        let mut code = String::new();
        let mut msg = String::new();
        let mut fields = body.fields();
        while let Ok(Some(f)) = fallible_next_field(&mut fields) {
            match f.0 {
                b'C' => code = f.1,
                b'M' => msg = f.1,
                _ => {}
            }
        }
        Error::Replication {
            site: self.site,
            what: format!("server error {code}: {msg}"),
        }
    }

    async fn send(&mut self, b: &[u8]) -> Result<(), Error> {
        self.stream
            .write_all(b)
            .await
            .map_err(|e| Error::Replication {
                site: self.site,
                what: format!("writing to the replication connection: {e}"),
            })
    }

    /// Reads one whole backend message (CopyBothResponse and CopyData framed here:
    /// postgres-protocol's parser knows no CopyBoth).
    async fn read_frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            self.buf.reserve(64 * 1024);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| Error::Replication {
                    site: self.site,
                    what: format!("reading the replication connection: {e}"),
                })?;
            if n == 0 {
                return Err(Error::Replication {
                    site: self.site,
                    what: "the server closed the replication connection".into(),
                });
            }
        }
    }

    /// The next whole backend message in what was already read, if there is one.
    fn buffered_frame(&mut self) -> Result<Option<Frame>, Error> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(self.proto(format!("bad message length {len}")));
        }
        let total = 1 + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let tag = self.buf[0];
        let mut frame = self.buf.split_to(total);
        match tag {
            b'W' => Ok(Some(Frame::CopyBoth)),
            b'd' => {
                frame.advance(5);
                Ok(Some(Frame::Copy(frame.freeze())))
            }
            _ => match Message::parse(&mut frame) {
                Ok(Some(m)) => Ok(Some(Frame::Other(m))),
                Ok(None) => Err(self.proto("truncated message".into())),
                Err(e) => Err(self.proto(format!("bad message: {e}"))),
            },
        }
    }

    /// Reads one message outside the copy stream.
    async fn read_msg(&mut self) -> Result<Message, Error> {
        match self.read_frame().await? {
            Frame::Other(m) => Ok(m),
            Frame::CopyBoth | Frame::Copy(_) => Err(self.proto("unexpected copy message".into())),
        }
    }

    /// Runs a walsender command; returns its rows as text (NULL = None).
    pub(crate) async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, Error> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.proto(e.to_string()))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            match self.read_msg().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) =
                        fallible_next_range(&mut ranges).map_err(|e| self.proto(e))?
                    {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => err = Some(self.server_error(body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// `START_REPLICATION SLOT slot LOGICAL lsn (options)`: enters the CopyBoth stream.
    pub(crate) async fn start_replication(
        &mut self,
        slot: &str,
        lsn: u64,
        options: &[(&str, &str)],
    ) -> Result<(), Error> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("\"{k}\" '{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {} ({opts})",
            fmt_lsn(lsn)
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| self.proto(e.to_string()))?;
        self.send(&out).await?;
        loop {
            match self.read_frame().await? {
                Frame::CopyBoth => return Ok(()),
                Frame::Other(Message::ErrorResponse(body)) => return Err(self.server_error(body)),
                _ => {}
            }
        }
    }

    /// The next stream message; `None` when the server ended the stream (CopyDone).
    pub(crate) async fn recv(&mut self) -> Result<Option<StreamMsg>, Error> {
        loop {
            match self.read_frame().await? {
                Frame::Copy(d) => {
                    if let Some(m) = self.copy_msg(d)? {
                        return Ok(Some(m));
                    }
                }
                Frame::Other(Message::CopyDone) => return Ok(None),
                Frame::Other(Message::ErrorResponse(body)) => return Err(self.server_error(body)),
                _ => {}
            }
        }
    }

    /// The next stream message if the whole of it was already read (no read, no wait: what
    /// one read brought is handled at once, not one wake-up per message); anything but a
    /// stream message is left for [`Self::recv`].
    pub(crate) fn recv_buffered(&mut self) -> Result<Option<StreamMsg>, Error> {
        while self.buf.first() == Some(&b'd') {
            match self.buffered_frame()? {
                Some(Frame::Copy(d)) => {
                    if let Some(m) = self.copy_msg(d)? {
                        return Ok(Some(m));
                    }
                }
                Some(_) => return Err(self.proto("CopyData framed as another message".into())),
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The stream message a CopyData carries (none in an empty one).
    fn copy_msg(&self, mut d: bytes::Bytes) -> Result<Option<StreamMsg>, Error> {
        if d.is_empty() {
            return Ok(None);
        }
        match d.get_u8() {
            b'w' if d.len() >= 24 => {
                let start = d.get_u64();
                let _wal_end = d.get_u64();
                let _send_time = d.get_i64();
                Ok(Some(StreamMsg::XLogData { start, data: d }))
            }
            b'k' if d.len() >= 17 => {
                let wal_end = d.get_u64();
                let _send_time = d.get_i64();
                let reply = d.get_u8() == 1;
                Ok(Some(StreamMsg::Keepalive { wal_end, reply }))
            }
            t => Err(self.proto(format!("unexpected CopyData kind {t:#x}"))),
        }
    }

    /// Standby status update: everything up to `flushed` is safe on the target (the slot may
    /// release it); `received` is how far we have read.
    pub(crate) async fn send_status(&mut self, received: u64, flushed: u64) -> Result<(), Error> {
        let now_us = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_US;
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(received);
        body.put_u64(flushed);
        body.put_u64(flushed);
        body.put_i64(now_us);
        body.put_u8(0);
        let mut out = BytesMut::with_capacity(40);
        out.put_u8(b'd');
        out.put_i32(4 + body.len() as i32);
        out.extend_from_slice(&body);
        self.send(&out).await
    }
}

/// `0/16B3748` form of an LSN.
pub(crate) fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses the `0/16B3748` form of an LSN.
pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

// postgres-protocol's iterators are `fallible_iterator`s; these take one step without adding
// that crate as a dependency.
fn fallible_next(it: &mut backend::SaslMechanisms<'_>) -> Result<Option<String>, String> {
    use postgres_protocol::message::backend::SaslMechanisms;
    fn step(it: &mut SaslMechanisms<'_>) -> std::io::Result<Option<String>> {
        fallible_iterator::FallibleIterator::next(it).map(|o| o.map(str::to_owned))
    }
    step(it).map_err(|e| e.to_string())
}

fn fallible_next_field(it: &mut backend::ErrorFields<'_>) -> std::io::Result<Option<(u8, String)>> {
    fallible_iterator::FallibleIterator::next(it).map(|o| {
        o.map(|f| {
            (
                f.type_(),
                String::from_utf8_lossy(f.value_bytes()).into_owned(),
            )
        })
    })
}

fn fallible_next_range(
    it: &mut backend::DataRowRanges<'_>,
) -> Result<Option<Option<std::ops::Range<usize>>>, String> {
    fallible_iterator::FallibleIterator::next(it).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(body: &[u8]) -> Vec<u8> {
        let mut f = vec![b'd'];
        f.put_i32(4 + body.len() as i32);
        f.extend_from_slice(body);
        f
    }

    fn xlog(start: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![b'w'];
        b.put_u64(start);
        b.put_u64(start);
        b.put_i64(0);
        b.extend_from_slice(payload);
        copy_data(&b)
    }

    /// What one read brought is handed out message by message without another read; a
    /// message not whole yet, and anything but stream data, wait for `recv`.
    #[tokio::test]
    async fn buffered_stream_messages_are_handed_out_without_a_read() {
        let (ours, mut server) = tokio::io::duplex(1 << 16);
        let mut c = ReplConn {
            stream: Box::new(ours),
            buf: BytesMut::new(),
            site: "primary",
        };
        let mut wire = xlog(1, b"B");
        wire.extend(copy_data(b""));
        wire.extend(xlog(2, b"I"));
        let mut keepalive = vec![b'k'];
        keepalive.put_u64(9);
        keepalive.put_i64(0);
        keepalive.put_u8(1);
        wire.extend(copy_data(&keepalive));
        wire.extend([b'c', 0, 0, 0, 4]); // CopyDone
        let cut = xlog(3, b"C");
        wire.extend(&cut[..cut.len() - 1]);
        server.write_all(&wire).await.unwrap();
        assert!(matches!(
            c.recv().await.unwrap(),
            Some(StreamMsg::XLogData { start: 1, .. })
        ));
        // The rest arrived with the same read: no read, no wait.
        assert!(matches!(
            c.recv_buffered().unwrap(),
            Some(StreamMsg::XLogData { start: 2, .. })
        ));
        assert!(matches!(
            c.recv_buffered().unwrap(),
            Some(StreamMsg::Keepalive {
                wal_end: 9,
                reply: true
            })
        ));
        assert!(
            c.recv_buffered().unwrap().is_none(),
            "CopyDone is left for recv"
        );
        assert!(c.recv().await.unwrap().is_none(), "the stream ended");
        assert!(
            c.recv_buffered().unwrap().is_none(),
            "a message not whole yet"
        );
        server.write_all(&cut[cut.len() - 1..]).await.unwrap();
        assert!(matches!(
            c.recv().await.unwrap(),
            Some(StreamMsg::XLogData { start: 3, .. })
        ));
    }

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(fmt_lsn(0x1_0000_00FF), "1/FF");
        assert_eq!(parse_lsn("nope"), None);
    }
}
