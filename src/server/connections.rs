//! The server's connections ([`serve_connections`]): accepting them, bounding what a client can hold, and closing
//! them at shutdown whatever the clients do.
//!
//! # Invariant: no client holds a connection, or the shutdown, for longer than its bound
//! * At most `max_connections` connections are open; past that, new ones wait in the
//!   kernel's backlog until one closes (nothing is read from them).
//! * A request's head must arrive whole within `header_read_timeout` of its first byte.
//! * A connection with no request in progress on which nothing arrives for `idle_timeout`
//!   is closed.
//! * A request in progress is bounded by the router's request timeout.
//! * At shutdown, no connection is accepted any more, every connection without a request
//!   in progress is closed at once, and those with one are closed once it is answered or
//!   at the drain deadline, whichever comes first.
//!
//! Every close here is a plain TCP close: a client in the middle of a head or of an idle
//! keep-alive has nothing to be answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

/// What a client may hold, and for how long (see the module's invariant). The default is
/// `arbiter-session serve`'s: 10 s for a head, 60 s idle, 1024 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// Most time from a request head's first byte to its last.
    pub header_read_timeout: Duration,
    /// Most time a connection stays open with no request in progress and nothing sent.
    pub idle_timeout: Duration,
    /// Most connections open at once; keep it under the process's file descriptor limit.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

impl ConnectionLimits {
    /// Sets [`Self::header_read_timeout`].
    #[must_use]
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`Self::idle_timeout`].
    #[must_use]
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`Self::max_connections`] (at least one).
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: usize) -> Self {
        self.max_connections = std::cmp::max(max_connections, 1);
        self
    }
}

/// What became of the connections at shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Connections still open at the shutdown signal.
    pub open: usize,
    /// Of those, connections closed at the drain deadline with a request in progress.
    pub cut: usize,
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then accepts no
/// more, closes every connection without a request in progress at once, and the others
/// once answered or `drain_for` after the signal, whichever comes first (see the module's
/// invariant). Returns what it had to close.
///
/// `app` is usually [`Server::router`](super::Server::router); any axum [`Router`] works.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    drain_for: Duration,
) -> Drained {
    let permits = Arc::new(Semaphore::new(std::cmp::max(limits.max_connections, 1)));
    let (closing_tx, closing) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Finished connections are reaped as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener, &permits) => accepted,
        };
        let Some((stream, permit)) = accepted else {
            continue;
        };
        let app = app.clone();
        let closing = closing.clone();
        connections.spawn(async move {
            serve_connection(stream, app, limits, closing).await;
            drop(permit);
        });
    }
    drop(listener);
    let open = connections.len();
    // Ignored only when no connection task is left to hear it.
    let _ = closing_tx.send(true);
    let deadline = Instant::now() + drain_for;
    let mut cut = 0;
    loop {
        tokio::select! {
            next = connections.join_next() => if next.is_none() { break },
            () = tokio::time::sleep_until(deadline) => {
                cut = connections.len();
                connections.shutdown().await;
                break;
            }
        }
    }
    Drained { open, cut }
}

/// The next connection, once a permit is free; `None` after an accept error (logged, and
/// followed by a short pause: running out of file descriptors must not spin).
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let permit = Arc::clone(permits).acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => {
            // Answers are small and written at once; Nagle would only delay them.
            let _ = stream.set_nodelay(true);
            Some((stream, permit))
        }
        Err(err) => {
            tracing::warn!(error = %err, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// One connection, until the client leaves, a limit closes it, or shutdown does.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut closing: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            activity.request_started();
            let activity = Arc::clone(&activity);
            let app = app.clone();
            async move {
                let request: Request = request.map(Body::new);
                let response: Result<Response, std::convert::Infallible> =
                    app.oneshot(request).await;
                activity.request_ended();
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The timeouts are this module's (hyper's header timeout also runs while idle).
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut shutting_down = *closing.borrow();
    loop {
        let now = Instant::now();
        let wake = match activity.verdict(now, &limits, shutting_down) {
            Verdict::Close => return,
            Verdict::CheckAt(at) => at,
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {}
            () = activity.head_began.notified() => {}
            changed = closing.changed(), if !shutting_down => {
                shutting_down = true;
                if changed.is_ok() {
                    // No further request on this connection; one in progress is answered.
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What a connection's watcher decides.
enum Verdict {
    Close,
    CheckAt(Instant),
}

/// What a connection is doing, written by its reads, writes and requests.
#[derive(Debug)]
struct Activity {
    /// When the connection was accepted: every instant below is in milliseconds since.
    opened: Instant,
    in_request: AtomicBool,
    /// The first byte of a head not yet complete (`u64::MAX`: none).
    head_started: AtomicU64,
    /// The last byte read or written, or the end of the last request.
    last_active: AtomicU64,
    /// Woken when a head starts: its deadline may come before the one being waited for.
    head_began: Notify,
}

impl Activity {
    const NO_HEAD: u64 = u64::MAX;

    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_request: AtomicBool::new(false),
            head_started: AtomicU64::new(Self::NO_HEAD),
            last_active: AtomicU64::new(0),
            head_began: Notify::new(),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.opened).as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, millis: u64) -> Instant {
        self.opened + Duration::from_millis(millis)
    }

    fn read(&self) {
        let now = self.millis(Instant::now());
        self.last_active.store(now, Ordering::Relaxed);
        if !self.in_request.load(Ordering::Relaxed) {
            // Only the first byte of a head starts its clock.
            let began = self
                .head_started
                .compare_exchange(Self::NO_HEAD, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
            if began {
                self.head_began.notify_one();
            }
        }
    }

    fn wrote(&self) {
        self.last_active
            .store(self.millis(Instant::now()), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.in_request.store(true, Ordering::Relaxed);
        self.head_started.store(Self::NO_HEAD, Ordering::Relaxed);
    }

    fn request_ended(&self) {
        self.in_request.store(false, Ordering::Relaxed);
        self.wrote();
    }

    /// Whether to close the connection at `now`, else when to look again.
    fn verdict(&self, now: Instant, limits: &ConnectionLimits, shutting_down: bool) -> Verdict {
        if self.in_request.load(Ordering::Relaxed) {
            // The router's timeout bounds the request; look again after the shorter limit.
            return Verdict::CheckAt(
                now + std::cmp::min(limits.header_read_timeout, limits.idle_timeout),
            );
        }
        if shutting_down {
            return Verdict::Close;
        }
        let head_started = self.head_started.load(Ordering::Relaxed);
        let deadline = if head_started == Self::NO_HEAD {
            self.at(self.last_active.load(Ordering::Relaxed)) + limits.idle_timeout
        } else {
            self.at(head_started) + limits.header_read_timeout
        };
        if now >= deadline {
            Verdict::Close
        } else {
            Verdict::CheckAt(deadline)
        }
    }
}

/// A connection's socket, reporting its reads and writes to its [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
