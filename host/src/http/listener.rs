//! Accepting connections and what each one holds: an accept error (EMFILE when the process
//! is out of file descriptors, say) is logged and retried after a backoff that grows on
//! [`Policy::ACCEPT`], never at once; an accepted connection ([`Permitted`]) holds one of
//! `[http] max_connections` places for as long as it is open (see [`super::server`]).
//!
//! A connection whose peer takes nothing of what the host writes for `send_timeout` is
//! closed (its writes fail with `TimedOut`): a live-stream client that stopped reading would
//! otherwise hold its connection, and its place, for ever.

use crate::retry::Policy;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Calls `accept` until it succeeds. After an error it waits before the next call, longer
/// after each error in a row (capped by `policy`); an error of the connection being accepted
/// (reset or aborted before we took it) is only that connection's, so it is retried at once.
pub async fn accept_with_backoff<T, F, Fut>(policy: Policy, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut backoff = policy.backoff();
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(
                    "http: cannot accept a connection ({e}); trying again in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// An accepted connection and its place, given back when the connection is dropped.
pub struct Permitted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    send_timeout: Duration,
    /// Since a write has been waiting for the peer: fails the write when it fires.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    send_timeouts: Arc<AtomicU64>,
}

impl Permitted {
    /// `stream`, holding `place`; its writes fail once the peer took nothing for
    /// `send_timeout` (counted in `send_timeouts`).
    pub fn new(
        stream: TcpStream,
        place: OwnedSemaphorePermit,
        send_timeout: Duration,
        send_timeouts: Arc<AtomicU64>,
    ) -> Permitted {
        Permitted {
            stream,
            _permit: place,
            send_timeout,
            stalled: None,
            send_timeouts,
        }
    }

    /// Passes a write's outcome through; while it waits for the peer, fails it once it has
    /// waited `send_timeout`.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stalled.as_mut().poll(cx));
        self.send_timeouts.fetch_add(1, Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took nothing for {timeout:?} ([http] send_timeout_ms)"),
        )))
    }
}

impl AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Permitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.deadline(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.deadline(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.deadline(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The failure the issue saw: EMFILE from every accept. One second of it must cost a
    /// handful of attempts, not a spinning core.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        let attempts = std::cell::Cell::new(0u32);
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            accept_with_backoff(Policy::ACCEPT, || {
                attempts.set(attempts.get() + 1);
                async { Err::<(), _>(io::Error::from_raw_os_error(24)) } // EMFILE
            }),
        )
        .await;
        assert!(result.is_err(), "it never succeeds");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // 10 ms, 20, 40, … capped at 1 s: about 17 attempts in 10 s.
        assert!(
            (10..=25).contains(&attempts.get()),
            "{} attempts in 10 s",
            attempts.get()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_error_is_retried_at_once_and_success_returns() {
        let attempts = std::cell::Cell::new(0u32);
        let started = tokio::time::Instant::now();
        let got = accept_with_backoff(Policy::ACCEPT, || {
            attempts.set(attempts.get() + 1);
            let n = attempts.get();
            async move {
                match n {
                    1 => Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
                    2 => Err(io::Error::from_raw_os_error(24)),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(got, 3);
        assert_eq!(started.elapsed(), Policy::ACCEPT.first);
    }
}
