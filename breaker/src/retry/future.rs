use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{ReplayBody, RetryPolicy, Template};
use crate::BoxError;
use crate::classify::Classify;
use crate::deadline::Deadline;

/// At most this much of a failed attempt's response body is read (and discarded) while the
/// retry waits, so that its connection stays usable (see [`drain`]).
const DRAIN_LIMIT: usize = 64 * 1024;

/// What the drain counts for a frame smaller than this (so at most 1 024 frames are read).
const FRAME_COST: usize = DRAIN_LIMIT / 1024;

/// A retry is sent only with at least this much of the deadline left. Timers fire on whole
/// milliseconds (a backoff is rounded up), so a retry planned for the deadline's last
/// millisecond went out with nothing left (`grpc-timeout: 0n`) in the same tick as the
/// deadline itself: the caller got an unknown outcome instead of the refusal it had, and the
/// endpoint picked for the retry was charged a failure.
const MIN_LEFT: std::time::Duration = std::time::Duration::from_millis(1);

/// What a timer may fire after its time (it is rounded up to the next millisecond): a retry is
/// planned only if, fired that late, it still has [`MIN_LEFT`].
const TICK: std::time::Duration = std::time::Duration::from_millis(1);

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        Called { #[pin] fut: F },
        // Boxed: only a retry sleeps, and the timer is large. `drain` is the failed attempt's
        // response body while it is read to its end.
        Backoff { sleep: Pin<Box<Sleep>>, drain: Option<Pin<Box<R>>>, left: usize },
        Ready,
        // Refused before any attempt (see `ResponseFuture::refused`).
        Refused { error: Option<BoxError> },
    }
}

/// What a call that may be retried keeps between attempts.
pub(super) struct Retrying<S, C> {
    pub(super) service: S,
    pub(super) policy: Arc<RetryPolicy>,
    pub(super) classifier: C,
    pub(super) template: Template,
    pub(super) attempts: u32,
    pub(super) replay_safe: bool,
    pub(super) deadline: Option<Deadline>,
    /// Set when a retry was wanted (and allowed by attempts and deadline) but the budget had
    /// nothing left.
    pub(super) budget_refused: bool,
    /// Set once an attempt ended with an UNKNOWN outcome (it may have executed): a call that
    /// then runs out of time before its next attempt did not stay unsent.
    pub(super) maybe_executed: bool,
}

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    ///
    /// `R` is the response body type.
    pub struct ResponseFuture<S, F, B, C, R> {
        #[pin]
        state: State<F, R>,
        // `None` when the call cannot be retried (one attempt allowed, or a streaming body).
        retry: Option<Retrying<S, C>>,
        _body: std::marker::PhantomData<fn(B)>,
    }
}

impl<S, F, B, C, R> fmt::Debug for ResponseFuture<S, F, B, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ResponseFuture");
        d.field("replayable", &self.retry.is_some());
        if let Some(retry) = &self.retry {
            d.field("attempts", &retry.attempts)
                .field("replay_safe", &retry.replay_safe);
        }
        d.finish_non_exhaustive()
    }
}

impl<S, F, B, C, R> ResponseFuture<S, F, B, C, R> {
    /// A call that is never retried.
    #[inline]
    pub(super) fn once(fut: F) -> Self {
        Self {
            state: State::Called { fut },
            retry: None,
            _body: std::marker::PhantomData,
        }
    }

    /// A call refused before its first attempt: it fails with `error`, nothing is sent.
    #[cold]
    pub(super) fn refused(error: BoxError) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            retry: None,
            _body: std::marker::PhantomData,
        }
    }

    /// A call that may be retried.
    #[inline]
    pub(super) fn retrying(fut: F, retry: Retrying<S, C>) -> Self {
        Self {
            state: State::Called { fut },
            retry: Some(retry),
            _body: std::marker::PhantomData,
        }
    }
}

impl<S, F, B, C, R> ResponseFuture<S, F, B, C, R> {
    /// Whether the call ended with a failure that would have been retried but for an empty
    /// retry budget (read once the future has completed).
    pub fn budget_refused(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.budget_refused)
    }

    /// How many attempts the call made so far.
    pub fn attempts(&self) -> u32 {
        self.retry.as_ref().map_or(1, |r| r.attempts)
    }
}

impl<S, C> Retrying<S, C> {
    /// The backoff before the next attempt, if the call is to be retried after `outcome`.
    #[cold]
    fn next_delay(&mut self, outcome: crate::classify::Outcome) -> Option<std::time::Duration> {
        if self.attempts >= self.policy.max_attempts
            || !self.policy.wants_retry(outcome, self.replay_safe)
        {
            return None;
        }
        let delay = self.policy.backoff_for(self.attempts);
        if let Some(deadline) = self.deadline
            && Instant::now()
                .checked_add(delay.saturating_add(TICK).saturating_add(MIN_LEFT))
                .is_none_or(|at| at > deadline.0)
        {
            return None;
        }
        if !self.policy.budget.withdraw() {
            tracing::debug!(attempts = self.attempts, "retry budget exhausted");
            self.budget_refused = true;
            return None;
        }
        if outcome.retry_class() == Some(crate::classify::FailureClass::Unknown) {
            self.maybe_executed = true;
        }
        tracing::debug!(
            attempt = self.attempts + 1,
            ?outcome,
            delay_ms = delay.as_millis() as u64,
            "retrying"
        );
        Some(delay)
    }
}

/// Reads `body` to its end, discarding it, while `left` bytes allow: `Ready` when it is done with
/// (ended, failed or over the limit) and may be dropped.
///
/// A failed attempt's response (a 503 or 429, say) is usually small and already received with
/// its head. Dropped unread, it takes its connection with it: hyper closes an HTTP/1.1
/// connection whose response was not read to its end, so every retried refusal would cost the
/// provider a new connection (and a TLS handshake), under overload of all times. Read to its
/// end, the connection goes back to the pool.
fn drain<R>(mut body: Pin<&mut R>, cx: &mut Context<'_>, left: &mut usize) -> Poll<()>
where
    R: http_body::Body,
{
    use bytes::Buf;
    loop {
        if body.is_end_stream() {
            return Poll::Ready(());
        }
        match ready!(body.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => {
                // Every frame costs something, empty ones too: a body of endless empty frames
                // is also given up.
                let size = frame.data_ref().map_or(0, Buf::remaining).max(FRAME_COST);
                match left.checked_sub(size) {
                    Some(rest) => *left = rest,
                    None => return Poll::Ready(()),
                }
            }
            Some(Err(_)) | None => return Poll::Ready(()),
        }
    }
}

impl<S, F, B, C, ResB, E> Future for ResponseFuture<S, F, B, C, ResB>
where
    ResB: http_body::Body,
    S: Service<http::Request<ReplayBody<B>>, Response = http::Response<ResB>, Future = F>,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<http::Response<ResB>, E>>,
    E: Into<BoxError>,
    C: Classify<http::Response<ResB>>,
{
    type Output = Result<http::Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(result);
                    };
                    let outcome = match &result {
                        Ok(res) => retry.classifier.classify_response(res),
                        Err(err) => retry.classifier.classify_error(err.as_ref()),
                    };
                    if outcome.retry_class().is_none() {
                        return Poll::Ready(result);
                    }
                    let Some(delay) = retry.next_delay(outcome) else {
                        return Poll::Ready(result);
                    };
                    this.state.set(State::Backoff {
                        sleep: Box::pin(tokio::time::sleep(delay)),
                        drain: result.ok().map(|response| Box::pin(response.into_body())),
                        left: DRAIN_LIMIT,
                    });
                }
                StateProj::Backoff { sleep, drain, left } => {
                    if let Some(body) = drain
                        && self::drain(body.as_mut(), cx, left).is_ready()
                    {
                        *drain = None;
                    }
                    // A body not done with when the backoff ends is dropped (its connection
                    // closes), rather than delaying the retry.
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Refused { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into());
                    return Poll::Ready(Err(error));
                }
                StateProj::Ready => {
                    let Some(retry) = this.retry.as_mut() else {
                        return Poll::Ready(Err("retry without a request to replay".into()));
                    };
                    if retry.deadline.is_some_and(|d| d.remaining() < MIN_LEFT) {
                        // Polled late, past the backoff: too late to send this attempt. The
                        // call was sent before if an earlier attempt may have executed.
                        use crate::deadline::DeadlineExceeded;
                        let late = if retry.maybe_executed {
                            DeadlineExceeded::elapsed()
                        } else {
                            DeadlineExceeded::before_send()
                        };
                        return Poll::Ready(Err(late.into()));
                    }
                    ready!(retry.service.poll_ready(cx)).map_err(Into::into)?;
                    let req = retry
                        .template
                        .build(retry.policy.attempt_extensions, retry.deadline);
                    retry.attempts += 1;
                    let fut = retry.service.call(req);
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}
