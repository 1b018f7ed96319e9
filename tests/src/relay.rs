//! A TCP relay between a proxy and a site that can start dropping traffic: the network fault
//! "this proxy cannot reach the primary" while the site itself is fine for everyone else.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running relay to one target; dropped, it stops.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    dropping: Arc<watch::Sender<bool>>,
    stop: CancellationToken,
}

impl Relay {
    /// Relays `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
        let addr = listener.local_addr().expect("relay addr");
        let (tx, rx) = watch::channel(false);
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, target, rx, stop.clone()));
        Relay {
            addr,
            dropping: Arc::new(tx),
            stop,
        }
    }

    /// `http://127.0.0.1:<port>`, to use as a site URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, nothing gets through (as a black-holed network path): new connections are
    /// accepted and never answered, open ones stall.
    pub fn drop_traffic(&self, dropping: bool) {
        self.dropping.send_replace(dropping);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    dropping: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    loop {
        let (client, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        tokio::spawn(relay(client, target, dropping.clone(), stop.clone()));
    }
}

/// Holds a connection open, reading and discarding, until the relay stops.
async fn swallow(mut client: TcpStream, stop: CancellationToken) {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut dropping: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    if *dropping.borrow() {
        return swallow(client, stop).await;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    let cut = tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
        r = dropping.wait_for(|d| *d) => r.is_ok(),
    };
    if cut {
        drop(upstream);
        swallow(client, stop).await;
    }
}
