use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use super::body::{FollowResponse, PendingOutcome};
use super::state::Permit;
use super::{Breaker, BreakerError, Stripe};
use crate::BoxError;
use crate::classify::{Classify, FailureClass, Outcome, Verdict};

/// A call's permit until its outcome is recorded; dropped unrecorded, it is given back.
pub(super) struct Guard {
    stripe: Arc<Stripe>,
    permit: Permit,
    start_ms: u64,
    recorded: bool,
}

impl Guard {
    #[inline]
    pub(super) fn breaker(&self) -> &Breaker {
        &self.stripe.0
    }

    /// When the call started, in the breaker clock's milliseconds.
    pub(super) fn start_ms(&self) -> u64 {
        self.start_ms
    }

    /// Records `outcome`, judging slowness by the time from the start to `end_ms`.
    pub(super) fn record_at(mut self, end_ms: u64, outcome: Outcome) {
        self.recorded = true;
        self.breaker()
            .record_timed(self.permit, self.start_ms, Some(end_ms), outcome);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.recorded {
            // Dropped before completion: the call was cancelled; give a probe slot back.
            self.breaker().release(self.permit);
        }
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker): records the outcome.
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: Option<F>,
        guard: Option<Guard>,
        rejected: Option<BreakerError>,
        classifier: Option<C>,
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(super) fn called(
        inner: F,
        stripe: Arc<Stripe>,
        permit: Permit,
        start_ms: u64,
        classifier: C,
    ) -> Self {
        Self {
            inner: Some(inner),
            guard: Some(Guard {
                stripe,
                permit,
                start_ms,
                recorded: false,
            }),
            rejected: None,
            classifier: Some(classifier),
        }
    }

    /// Records the call as a failure of its endpoint now, unless its outcome is already known
    /// (an UNKNOWN-class failure, judged slow by its duration so far). For a caller about to
    /// drop this future because the call's deadline passed: a provider that never answers must
    /// count against its breaker like one that fails, where a dropped call otherwise counts as
    /// cancelled (nothing recorded). The future is then done with the breaker: polling or
    /// dropping it records nothing more.
    pub fn fail_unfinished(self: Pin<&mut Self>) {
        if let Some(mut guard) = self.project().guard.take() {
            guard.recorded = true;
            guard.breaker().record(
                guard.permit,
                guard.start_ms,
                Outcome::Failure(FailureClass::Unknown),
            );
        }
    }

    pub(super) fn rejected(err: BreakerError) -> Self {
        Self {
            inner: None,
            guard: None,
            rejected: Some(err),
            classifier: None,
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T>,
    T: FollowResponse,
{
    type Output = Result<T::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = this.rejected.take().unwrap_or_else(BreakerError::not_ready);
            return Poll::Ready(Err(err.into()));
        };
        let result: Result<T, BoxError> = ready!(inner.poll(cx)).map_err(Into::into);
        let (Some(mut guard), Some(classifier)) = (this.guard.take(), this.classifier.as_ref())
        else {
            return Poll::Ready(result.map(T::settled));
        };
        let verdict = match &result {
            Ok(res) => classifier.classify_head(res),
            Err(err) => Verdict::Now(classifier.classify_error(err.as_ref())),
        };
        Poll::Ready(match (verdict, result) {
            // A response the head decided: recorded once its body is done with (read to the
            // end, failed, or dropped), so that a provider stalling in the body can count.
            (Verdict::Now(outcome), Ok(res)) => {
                let head_ms = guard.breaker().clock().now_ms();
                Ok(res.follow(PendingOutcome::known(guard, head_ms, outcome)))
            }
            (Verdict::Now(outcome), Err(error)) => {
                guard.recorded = true;
                guard
                    .breaker()
                    .record(guard.permit, guard.start_ms, outcome);
                Err(error)
            }
            (Verdict::AtEnd(at_end), result) => {
                let head_ms = guard.breaker().clock().now_ms();
                result.map(|res| res.follow(PendingOutcome::new(guard, head_ms, at_end)))
            }
        })
    }
}
