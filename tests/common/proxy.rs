//! A TCP proxy between a pool and the real PostgreSQL that can cut every connection,
//! refuse new ones, or stall traffic, and then heal: a network failure on cue, with the
//! real server behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the proxy treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close new connections at once.
    Refuse,
    /// Keep connections open but move no bytes.
    Stall,
}

#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    listener: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let mode = watch::Sender::new(Mode::Pass);
        let cuts = watch::Sender::new(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let (mode, cuts, accepted) = (mode.subscribe(), cuts.clone(), Arc::clone(&accepted));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if *mode.borrow() == Mode::Refuse {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(forward(client, upstream, mode.clone(), cuts.subscribe()));
                }
            })
        };
        FaultProxy {
            addr,
            mode,
            cuts,
            accepted,
            listener: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection now.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Cuts every open connection and closes new ones at once.
    pub fn refuse(&self) {
        self.mode.send_replace(Mode::Refuse);
        self.cut();
    }

    /// Stops all traffic without closing anything.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Back to forwarding.
    pub fn heal(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<u64>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending, or a cut, drops all four halves: both sockets close.
    tokio::select! {
        () = pump(client_read, server_write, mode.clone()) => {}
        () = pump(server_read, client_write, mode) => {}
        _ = cut.changed() => {}
    }
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        // Hold the bytes while stalled; a cut ends the whole connection meanwhile.
        if mode.wait_for(|m| *m != Mode::Stall).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
