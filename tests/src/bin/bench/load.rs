//! Load generators: `wrk` for saturation, an open-loop fixed-rate client (wrk2-style: latency
//! counted from the intended send time, so a stall is not hidden by coordinated omission), and
//! idle keep-alive connections.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

/// Figures of one `wrk` run.
#[derive(Debug, Clone, Copy)]
pub struct WrkResult {
    /// Completed requests per second.
    pub rps: f64,
    /// Completed requests.
    pub requests: u64,
    /// Latency percentiles in microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Socket errors plus non-2xx/3xx answers.
    pub errors: u64,
}

/// Prints the figures wrk's summary omits (p99.9) in one parseable line.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// Runs `wrk -t1 -c<conns> -d<secs>` against `url` and parses its figures.
pub fn wrk(url: &str, conns: u32, secs: u32) -> anyhow::Result<WrkResult> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("bench.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
        ])
        .arg("-s")
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .with_context(|| {
            format!(
                "wrk printed no figures: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = line
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    if f.len() != 6 {
        bail!("unexpected wrk line {line:?}");
    }
    Ok(WrkResult {
        rps: f[0] / (f[1] / 1e6),
        requests: f[0] as u64,
        errors: f[2] as u64,
        p50_us: f[3],
        p99_us: f[4],
        p999_us: f[5],
    })
}

/// One request of an open-loop run.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was due, since the run's start.
    pub due: Duration,
    /// When its answer was complete (or it failed), since the run's start.
    pub done: Duration,
    /// HTTP status, or None on a transport error / timeout.
    pub status: Option<u16>,
    /// The `X-Upstream` header of the answer (which site served it).
    pub upstream: Option<String>,
}

impl Record {
    /// A 2xx answer with its body read completely.
    pub fn ok(&self) -> bool {
        matches!(self.status, Some(s) if (200..300).contains(&s))
    }
}

/// Sends `rate` requests per second for `dur` to `url` (`post` sends a small POST), each due at
/// its own instant whatever happened to the previous ones; `timeout` bounds each request.
/// Returns the records and the run's start instant.
pub async fn open_loop(
    url: &str,
    post: bool,
    rate: f64,
    dur: Duration,
    timeout: Duration,
) -> (Vec<Record>, Instant) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let n = (rate * dur.as_secs_f64()) as u64;
    let records = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let tracker = TaskTracker::new();
    let start = Instant::now();
    let tstart = tokio::time::Instant::from_std(start);
    let uri: hyper::Uri = url.parse().expect("bench URL");
    for i in 0..n {
        let due = Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(tstart + due).await;
        let (client, records, uri) = (client.clone(), records.clone(), uri.clone());
        tracker.spawn(async move {
            let req = hyper::Request::builder()
                .method(if post { "POST" } else { "GET" })
                .uri(uri)
                .body(Full::new(if post {
                    Bytes::from_static(b"{\"write\":true}")
                } else {
                    Bytes::new()
                }))
                .expect("request");
            let fut = async {
                let resp = client.request(req).await.ok()?;
                let status = resp.status().as_u16();
                let up = resp
                    .headers()
                    .get("x-upstream")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // Read the whole body: a response counts once it is complete.
                resp.into_body().collect().await.ok()?;
                Some((status, up))
            };
            let res = tokio::time::timeout(timeout, fut).await.ok().flatten();
            let rec = Record {
                due,
                done: start.elapsed(),
                status: res.as_ref().map(|r| r.0),
                upstream: res.and_then(|r| r.1),
            };
            records.lock().expect("records lock").push(rec);
        });
    }
    tracker.close();
    tracker.wait().await;
    let mut v = std::mem::take(&mut *records.lock().expect("records lock"));
    v.sort_by_key(|r| r.due);
    (v, start)
}

/// Latency percentiles (µs) of the successful records: (p50, p99, p99.9, failures).
pub fn percentiles(records: &[Record]) -> (f64, f64, f64, u64) {
    let mut h =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut failed = 0;
    for r in records {
        if r.ok() {
            let us = r.done.saturating_sub(r.due).as_micros().max(1) as u64;
            let _ = h.record(us.min(60_000_000));
        } else {
            failed += 1;
        }
    }
    (
        h.value_at_quantile(0.50) as f64,
        h.value_at_quantile(0.99) as f64,
        h.value_at_quantile(0.999) as f64,
        failed,
    )
}

/// Opens `n` keep-alive connections to `addr`, sends one `GET path` on each and reads the
/// answer, then keeps them open (idle) until the returned vector is dropped.
pub async fn idle_connections(addr: &str, path: &str, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    // Batches keep the listen backlog from overflowing.
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut set = tokio::task::JoinSet::new();
        for _ in chunk {
            let (addr, path) = (addr.to_owned(), path.to_owned());
            set.spawn(async move { one_request(&addr, &path).await });
        }
        while let Some(r) = set.join_next().await {
            conns.push(r??);
        }
    }
    Ok(conns)
}

async fn one_request(addr: &str, path: &str) -> anyhow::Result<TcpStream> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp))
            .await
            .context("read timeout")??;
        if n == 0 {
            bail!("connection closed before the answer was complete");
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(s);
            }
        }
    }
}
