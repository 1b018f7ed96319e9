//! The benchmark's upstream: a lean hyper 1.x server run as its own process (`bench upstream`),
//! so its CPU is not charged to the load generator or the proxy under test.
//!
//! Routes: `/small` (100 B, Content-Length), `/large` (1 MiB streamed in 64 KiB chunks, chunked),
//! `/health/<anything>` (200 `ok`); every answer carries `X-Upstream: <name>`.

use std::convert::Infallible;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use gsb_tests::Proc;

/// Size of the small body.
pub const SMALL: usize = 100;
/// Size of the large body.
pub const LARGE: usize = 1 << 20;
/// Chunk size of the streamed large body.
const CHUNK: usize = 64 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// Serves on an ephemeral loopback port until killed; prints `LISTEN <port>` once bound.
pub fn serve(name: &str) -> anyhow::Result<()> {
    // One worker thread: the same budget as each proxy under test.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name = name.to_owned();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("LISTEN {}", listener.local_addr()?.port());
        let small = Bytes::from(vec![b's'; SMALL]);
        let chunk = Bytes::from(vec![b'l'; CHUNK]);
        let name = hyper::header::HeaderValue::from_str(&name)?;
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => r?,
                () = stop.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let (small, chunk, name) = (small.clone(), chunk.clone(), name.clone());
            tracker.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (small, chunk, name) = (small.clone(), chunk.clone(), name.clone());
                    async move {
                        // Drain a request body (POST in the failover run) before answering.
                        let path = req.uri().path().to_owned();
                        let _ = req.into_body().collect().await;
                        let body: Body = if path == "/large" {
                            let frames = (0..LARGE / CHUNK)
                                .map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone())));
                            BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
                        } else if path.starts_with("/health/") {
                            Full::new(Bytes::from_static(b"ok")).boxed()
                        } else {
                            Full::new(small).boxed()
                        };
                        let mut resp = Response::new(body);
                        resp.headers_mut().insert("x-upstream", name);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        Ok(())
    })
}

/// A running upstream process.
pub struct UpstreamProc {
    /// The child; killed on drop.
    pub proc: Proc,
    /// Its loopback port.
    pub port: u16,
}

impl UpstreamProc {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Starts `bench upstream <name>` (this same executable) and waits for its port.
pub fn spawn(name: &str) -> anyhow::Result<UpstreamProc> {
    let exe = std::env::current_exe()?;
    let proc = Proc::spawn(
        &format!("upstream-{name}"),
        Command::new(exe).args(["upstream", name]),
    );
    let port = wait_line(&proc, "LISTEN ", Duration::from_secs(10))?
        .trim()
        .parse()
        .context("upstream port")?;
    Ok(UpstreamProc { proc, port })
}

/// Waits until the process printed a line starting with `prefix`; returns the rest of it.
pub fn wait_line(proc: &Proc, prefix: &str, deadline: Duration) -> anyhow::Result<String> {
    let end = std::time::Instant::now() + deadline;
    loop {
        if let Some(l) = proc.output().lines().find(|l| l.starts_with(prefix)) {
            return Ok(l[prefix.len()..].to_owned());
        }
        if std::time::Instant::now() > end {
            bail!("no `{prefix}` line within {deadline:?}: {}", proc.tail(20));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
