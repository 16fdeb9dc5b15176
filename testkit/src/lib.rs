//! Test support for Keel's own tests, examples and benchmarks (not published).
//!
//! - [`echo`]: the `keel.echo.v1.Echo` gRPC service compiled from `proto/echo.proto` with
//!   `protox` (no system `protoc`), and an [`echo::EchoProvider`] that serves it on loopback.
//! - [`unique`]: names that isolate a test (ZooKeeper roots, topics, queues).
//! - [`eventually`]: poll a condition with a deadline, never a bare sleep.
//! - [`silent_server`]: a provider that accepts connections and never answers.
//! - [`services`]: addresses of the live services and a handle on `scripts/services`.
//! - [`smoke`]: one check per live service, shared by the smoke tests and `keel-smoke`.
//! - [`zk`]: unique ZooKeeper test roots that delete themselves.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use keel_testkit::echo::{EchoProvider, EchoRequest, echo_client::EchoClient};
//!
//! let provider = EchoProvider::start("p-1").await?;
//! let mut client = EchoClient::connect(format!("http://{}", provider.addr())).await?;
//! let reply = client
//!     .echo(EchoRequest { message: "hi".into(), payload: Vec::new().into() })
//!     .await?
//!     .into_inner();
//! assert_eq!((reply.message.as_str(), reply.server_id.as_str()), ("hi", "p-1"));
//! provider.stop().await;
//! # Ok(())
//! # }
//! ```

pub mod echo;
pub mod services;
pub mod smoke;
pub mod tls;
pub mod zk;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// A name unique to this call: `prefix-` followed by 12 hex digits of a random UUID.
///
/// Tests use it for everything they create on a shared service (ZooKeeper root, topic, queue,
/// consumer group) so they can run in parallel and clean up only what is theirs.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// The error returned by [`eventually`] when the condition never held.
#[derive(Debug, thiserror::Error)]
#[error("condition {what:?} did not hold within {timeout:?} ({attempts} attempts)")]
pub struct NotYet {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub timeout: Duration,
    /// How many times the condition was evaluated.
    pub attempts: u32,
}

/// Polls `condition` every 20 ms until it returns `Some`, or fails after `timeout`.
///
/// This is how Keel's tests wait: on a condition with a deadline, never a bare sleep.
///
/// # Errors
/// [`NotYet`] naming `what` when the deadline passes first.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> Result<T, NotYet>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NotYet {
                what: what.to_owned(),
                timeout,
                attempts,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A provider that accepts connections on loopback, reads whatever comes and never answers
/// (not even an HTTP/2 PING): a stuck process. Its address, and the task to abort at the end.
///
/// # Errors
/// The listener cannot be bound.
pub async fn silent_server() -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            held.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }));
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_keep_the_prefix() {
        let (a, b) = (unique("t"), unique("t"));
        assert_ne!(a, b);
        assert!(a.starts_with("t-") && a.len() == 14, "{a}");
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_returns_the_value_or_times_out() {
        let mut n = 0;
        let v = eventually("n reaches 3", Duration::from_secs(1), || {
            n += 1;
            let n = n;
            async move { (n >= 3).then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let err = eventually("never", Duration::from_millis(100), || async { None::<()> })
            .await
            .unwrap_err();
        assert!(err.attempts >= 5, "{err}");
    }
}
