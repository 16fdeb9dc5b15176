//! Handler retries: exponential backoff with full jitter, a cap on attempts, then dead letter.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::consumer::Handler;
use crate::error::HandlerError;
use crate::message::Received;

/// How often and how patiently a failing message is retried before it is dead-lettered.
///
/// Delays grow exponentially from `initial_backoff` up to `max_backoff`, each drawn uniformly
/// from zero to that bound ("full jitter", so consumers that failed together do not retry
/// together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before the message goes to the dead-letter destination (at least 1).
    pub max_attempts: u32,
    /// The first delay bound.
    pub initial_backoff: Duration,
    /// The largest delay bound.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, after attempt `attempt` (from 1) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let bound = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The shortest pause Keel takes between attempts it repeats on its own (dead-letter publishes,
/// reconnects), whatever the configuration says: a zero delay would be a hot loop.
#[cfg_attr(not(any(feature = "kafka", feature = "amqp")), allow(dead_code))]
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// The pause before dead-letter publish attempt `attempt + 1`: the policy's backoff, but never
/// below [`MIN_BACKOFF`] (with `initial_backoff` 0, or a jitter draw near 0, the retry of a
/// publish that cannot succeed would spin).
#[cfg_attr(not(any(feature = "kafka", feature = "amqp")), allow(dead_code))]
pub(crate) fn dead_letter_backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    policy.backoff(attempt).max(MIN_BACKOFF)
}

/// What became of one message.
#[derive(Debug)]
#[cfg_attr(not(any(feature = "kafka", feature = "amqp")), allow(dead_code))]
pub(crate) enum Outcome {
    /// The handler returned `Ok`: acknowledge / commit.
    Handled,
    /// Give up: move to the dead-letter destination with this reason.
    DeadLetter { attempts: u32, error: String },
    /// Stopped (shutdown or partition revoked) before it was handled: leave it unacknowledged so
    /// it is delivered again.
    Abandoned,
}

/// Runs `handler` on `message` under the retry policy, in a span that continues the producer's
/// trace.
#[cfg_attr(not(any(feature = "kafka", feature = "amqp")), allow(dead_code))]
pub(crate) async fn process<H: Handler>(
    handler: &H,
    mut message: Received,
    policy: &RetryPolicy,
    stop: &CancellationToken,
    system: &'static str,
) -> Outcome {
    let parent = message.trace_context();
    let tracer = opentelemetry::global::tracer("keel-messaging");
    let otel_span = tracer
        .span_builder(format!("{} process", message.destination))
        .with_kind(SpanKind::Consumer)
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(otel_span);
    let trace_id = cx.span().span_context().trace_id();
    let span = tracing::info_span!(
        "keel.messaging.process",
        messaging.system = system,
        messaging.destination = %message.destination,
        messaging.message.id = message.message_id().unwrap_or_default(),
        partition = ?message.partition,
        offset = ?message.offset,
        trace_id = %trace_id,
    );
    let max = policy.max_attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        message.attempt = attempt;
        // A panicking handler is a permanent failure of this message (dead-lettered with the
        // panic's message), not the end of the task that runs the partition / lane. The call
        // is inside the future so that a panic before the handler's first await is caught too.
        let attempt_once = async {
            handler
                .handle(message.clone())
                .with_context(cx.clone())
                .instrument(span.clone())
                .await
        };
        let result = AssertUnwindSafe(attempt_once)
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let error = format!("handler panicked: {}", panic_message(panic.as_ref()));
                let _guard = span.enter();
                tracing::error!(%error, attempt, "handler panicked");
                Err(HandlerError::permanent(error))
            });
        match result {
            Ok(()) => return Outcome::Handled,
            Err(error) if !error.is_retryable() || attempt >= max => {
                let _guard = span.enter();
                tracing::warn!(%error, attempt, "message dead-lettered");
                return Outcome::DeadLetter {
                    attempts: attempt,
                    error: error.to_string(),
                };
            }
            Err(error) => {
                let delay = policy.backoff(attempt);
                {
                    let _guard = span.enter();
                    tracing::info!(%error, attempt, ?delay, "handler failed; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Outcome::Abandoned,
                }
            }
        }
    }
}

/// The text a panic was raised with (`panic!` with a message carries a `&str` or a `String`).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_is_a_permanent_failure() {
        let handler = |m: Received| async move {
            if m.payload.as_ref() == b"boom" {
                panic!("no account {}", 42);
            }
            Ok::<(), HandlerError>(())
        };
        let message = |payload: &'static [u8]| Received {
            destination: "t".to_owned(),
            key: None,
            payload: bytes::Bytes::from_static(payload),
            headers: crate::Headers::new(),
            partition: None,
            offset: None,
            redelivered: false,
            attempt: 0,
        };
        let stop = CancellationToken::new();
        let policy = RetryPolicy::default();
        let outcome = process(&handler, message(b"boom"), &policy, &stop, "test").await;
        match outcome {
            Outcome::DeadLetter { attempts, error } => {
                assert_eq!(attempts, 1, "not retried");
                assert_eq!(error, "handler panicked: no account 42");
            }
            other => panic!("{other:?}"),
        }
        let outcome = process(&handler, message(b"fine"), &policy, &stop, "test").await;
        assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
    }

    #[test]
    fn dead_letter_retries_never_spin() {
        let zero = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        };
        for attempt in 1..40 {
            assert_eq!(dead_letter_backoff(&zero, attempt), MIN_BACKOFF);
        }
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let d = dead_letter_backoff(&p, attempt);
            assert!(d >= MIN_BACKOFF && d <= p.max_backoff, "{d:?}");
        }
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        };
        for attempt in 1..40 {
            let bound = Duration::from_millis(10 * (1 << (attempt - 1).min(10))).min(p.max_backoff);
            assert!(p.backoff(attempt) <= bound, "attempt {attempt}");
        }
        // Full jitter: not always the same value.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(5)).collect();
        assert!(draws.len() > 1);
    }
}
