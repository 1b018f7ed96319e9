//! Waiting for a condition with a deadline (never a bare sleep-then-assert), and free ports.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

/// How often conditions are re-checked.
const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns true; panics naming `what` if `deadline` passes first.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, what, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `f` until it returns `Some(value)` and returns the value; panics naming `what` on timeout.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (prefer binding port 0 where possible).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn wait_until_returns_when_condition_holds() {
        let n = AtomicU32::new(0);
        wait_until(Duration::from_secs(1), "counter reaches 3", || async {
            n.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await;
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for the impossible")]
    async fn wait_until_panics_naming_what() {
        wait_until(Duration::from_millis(100), "the impossible", || async {
            false
        })
        .await;
    }

    #[test]
    fn free_ports_are_bindable() {
        let p = free_port();
        assert_ne!(p, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("port is free");
    }
}
