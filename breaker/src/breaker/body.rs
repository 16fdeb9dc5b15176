use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::future::Guard;
use crate::classify::{FailureClass, Outcome};

/// The outcome of a call the breaker is still waiting for: recorded when the response body
/// ends, fails or is dropped (see [`ResponseBody`] for the rules). Compact (it rides in every
/// response body): times are milliseconds after the call's start.
pub struct PendingOutcome {
    // `None` once recorded.
    guard: Option<Guard>,
    /// Classifies the trailers (a gRPC status after the messages), unless `known`.
    at_end: fn(Option<&http::HeaderMap>) -> Outcome,
    /// The response head, after the start (what slowness is judged by).
    head_after: u32,
    /// The call's deadline after the start; `NO_DEADLINE` for none.
    deadline_after: u32,
    /// The outcome the head already decided (an HTTP status), recorded once the body is done
    /// with.
    known: Option<Outcome>,
    /// Whether the body's last poll found nothing ready: the provider owed the next frame.
    waiting: bool,
}

const NO_DEADLINE: u32 = u32::MAX;

impl Drop for PendingOutcome {
    fn drop(&mut self) {
        // Dropped before the end of the body. Waiting for the provider's next frame when the
        // call's deadline had passed: the provider owed it by then, a failure (a provider that
        // sends its head and then stalls is ejected like one that never answers). Else the
        // caller stopped reading (a complete or flowing body it no longer wants, a head it
        // handled late): the head's outcome when it told one; else not counted (the guard
        // gives a half-open probe slot back).
        let Some(guard) = self.guard.take() else {
            return;
        };
        let head_ms = guard.start_ms() + u64::from(self.head_after);
        if self.waiting
            && self.deadline_after != NO_DEADLINE
            && guard.breaker().clock().precise_ms()
                >= guard.start_ms() + u64::from(self.deadline_after)
        {
            guard.record_at(head_ms, Outcome::Failure(FailureClass::Unknown));
        } else if let Some(outcome) = self.known {
            guard.record_at(head_ms, outcome);
        }
    }
}

impl fmt::Debug for PendingOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingOutcome").finish_non_exhaustive()
    }
}

impl PendingOutcome {
    pub(super) fn new(
        guard: Guard,
        head_ms: u64,
        at_end: fn(Option<&http::HeaderMap>) -> Outcome,
    ) -> Self {
        let head_after =
            u32::try_from(head_ms.saturating_sub(guard.start_ms())).unwrap_or(u32::MAX);
        Self {
            guard: Some(guard),
            at_end,
            head_after,
            deadline_after: NO_DEADLINE,
            known: None,
            waiting: false,
        }
    }

    /// An outcome the head decided, recorded once the body is done with.
    pub(super) fn known(guard: Guard, head_ms: u64, outcome: Outcome) -> Self {
        let mut pending = Self::new(guard, head_ms, |_| Outcome::Ignored);
        pending.known = Some(outcome);
        pending
    }

    /// Records the outcome: the one the head decided, or the one the trailers (or their
    /// absence) give.
    pub fn finish(mut self, trailers: Option<&http::HeaderMap>) {
        let outcome = self.known.unwrap_or_else(|| (self.at_end)(trailers));
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if let Some(guard) = self.guard.take() {
            let head_ms = guard.start_ms() + u64::from(self.head_after);
            guard.record_at(head_ms, outcome);
        }
    }

    /// See [`ResponseBody::fail_unfinished_after`].
    fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        if let Some(guard) = &self.guard {
            let at = guard.breaker().clock().ms_of(deadline);
            self.deadline_after = u32::try_from(at.saturating_sub(guard.start_ms()))
                .unwrap_or(NO_DEADLINE - 1)
                .min(NO_DEADLINE - 1);
        }
    }
}

/// Responses a [`CircuitBreaker`](super::CircuitBreaker) hands back, and how it follows one to
/// the end of its body when the outcome is only known there ([`Verdict::AtEnd`]).
///
/// [`Verdict::AtEnd`]: crate::classify::Verdict::AtEnd
pub trait FollowResponse: Sized {
    /// What the guarded service returns.
    type Output;

    /// The response, its outcome already recorded.
    fn settled(self) -> Self::Output;

    /// The response, with `pending` to record when its body ends.
    fn follow(self, pending: PendingOutcome) -> Self::Output;
}

impl<B> FollowResponse for http::Response<B> {
    type Output = http::Response<ResponseBody<B>>;

    #[inline]
    fn settled(self) -> Self::Output {
        self.map(|inner| ResponseBody {
            inner,
            pending: None,
        })
    }

    fn follow(self, pending: PendingOutcome) -> Self::Output {
        self.map(|inner| ResponseBody {
            inner,
            pending: Some(pending),
        })
    }
}

/// A [`tonic::Response`] has no trailers to wait for: a deferred outcome is decided at once,
/// as for a body that ended without trailers.
impl<T> FollowResponse for tonic::Response<T> {
    type Output = Self;

    fn settled(self) -> Self {
        self
    }

    fn follow(self, pending: PendingOutcome) -> Self {
        pending.finish(None);
        self
    }
}

pin_project! {
    /// Response body of a [`CircuitBreaker`](super::CircuitBreaker) over HTTP: the inner body,
    /// frame for frame. The call's outcome is recorded once the body is done with — once:
    ///
    /// * trailers: the outcome the head decided ([`Verdict::Now`]: an HTTP status, a
    ///   trailers-only gRPC status), else classified (for gRPC, by their `grpc-status`);
    /// * end of body without trailers: the head's outcome, else classified with none (for
    ///   gRPC, an UNKNOWN failure);
    /// * a body error: an UNKNOWN failure;
    /// * dropped before the end: the head's outcome (the caller stopped reading), else not
    ///   counted (like a cancelled call, a half-open probe slot is given back) — unless it was
    ///   waiting for the provider's next frame when the call's deadline passed
    ///   ([`fail_unfinished_after`](Self::fail_unfinished_after)): then an UNKNOWN failure,
    ///   for a provider that sends its head and then stalls.
    ///
    /// [`Verdict::Now`]: crate::classify::Verdict::Now
    ///
    /// The slow-call threshold is measured to the response head, not to the end of the body,
    /// so a long stream is not a slow call.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        pending: Option<PendingOutcome>,
    }
}

impl<B: fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl<B> ResponseBody<B> {
    /// Whether the outcome still waits for the end of this body.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The call's deadline: if this body is dropped before its end once `deadline` has passed
    /// (the deadline layer above gave up on it), the pending outcome is an UNKNOWN failure of
    /// the endpoint, not a cancelled call. Nothing changes when no outcome is pending.
    pub fn fail_unfinished_after(&mut self, deadline: Option<tokio::time::Instant>) {
        if let (Some(pending), Some(deadline)) = (&mut self.pending, deadline) {
            pending.set_deadline(deadline);
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body; a pending outcome is settled as if the body were dropped here (the
    /// head's outcome, nothing, or a failure past the deadline: see [`ResponseBody`]).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Poll::Ready(frame) = this.inner.poll_frame(cx) else {
            if let Some(pending) = this.pending.as_mut() {
                pending.waiting = true;
            }
            return Poll::Pending;
        };
        if let Some(pending) = this.pending.as_mut() {
            pending.waiting = false;
        }
        if this.pending.is_some() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref()
                        && let Some(pending) = this.pending.take()
                    {
                        pending.finish(Some(trailers));
                    }
                }
                Some(Err(_)) => {
                    if let Some(mut pending) = this.pending.take() {
                        pending.record(Outcome::Failure(FailureClass::Unknown));
                    }
                }
                None => {
                    if let Some(pending) = this.pending.take() {
                        pending.finish(None);
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // While the outcome is pending, ask to be polled to the end so that it is recorded.
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
