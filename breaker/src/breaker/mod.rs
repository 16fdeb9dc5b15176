//! Circuit breaker with resilience4j semantics.
//!
//! A breaker watches the outcomes of calls to one downstream (an endpoint, or a whole service)
//! in a sliding window, and *opens* when the failure rate or the slow-call rate reaches its
//! threshold: further calls are refused for a wait (fixed, or growing after each consecutive
//! re-opening), after which exactly `permitted_number_of_calls_in_half_open_state` probe calls
//! decide whether it closes again or re-opens. See [`BreakerConfig`] for the resilience4j
//! mapping.
//!
//! Two ways to refuse a call, chosen on the layer:
//!
//! * [`Mode::Gate`] (per endpoint): an open breaker makes `poll_ready` return `Pending`, so a
//!   power-of-two-choices balancer routes around the endpoint (outlier ejection, as linkerd's
//!   gate does). The task is woken when probing may start or a probe slot frees up.
//! * [`Mode::FailFast`] (per service): `poll_ready` is ready and the call fails at once with a
//!   [`BreakerError`].
//!
//! Outcomes are classified by a [`crate::classify::Classify`] implementation. Over
//! HTTP the guarded service returns `http::Response<`[`ResponseBody`]`<B>>`, and the outcome is
//! recorded once that body is done with: when the outcome is only known at the end of the body
//! (a gRPC status in the trailers after the messages), as the trailers pass through; when the
//! head decided it (an HTTP status), at the end of the body or when it is dropped — or as a
//! failure when the provider stalls in the body past the call's deadline (see [`ResponseBody`]
//! for the end-of-body rules). No allocation either way.
//!
//! Why this is cheap when closed: see the notes on the state word and windows in the source
//! (`state.rs`): no lock, no allocation, and with a coarse [`Clock`](crate::clock::Clock) no
//! clock read beyond one atomic load.

mod body;
mod config;
mod error;
mod future;
mod layer;
mod state;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::time::Sleep;
use tower_service::Service;

pub use body::{FollowResponse, PendingOutcome, ResponseBody};
pub use config::{BreakerConfig, SlidingWindowType};
pub use error::{BreakerError, ConfigError};
pub use future::ResponseFuture;
pub use layer::{Admission, CircuitBreakerLayer};
pub use state::{Breaker, BreakerMetrics, State, StateWatch};

use crate::BoxError;
use crate::classify::{Classify, DefaultClassifier};
use state::{Denied, Permit};

/// How an open breaker refuses calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Fail the call at once with a [`BreakerError`] (service-level use).
    #[default]
    FailFast,
    /// Report not-ready from `poll_ready` (per-endpoint use behind a balancer).
    Gate,
}

/// A handle on a [`Breaker`] that an in-flight call holds until its outcome is recorded.
/// 128-byte aligned: each stripe's reference count has a cache line of its own.
#[repr(align(128))]
pub(super) struct Stripe(Breaker);

/// Per-thread handles on one breaker. An in-flight call clones the `Arc` of its thread's stripe
/// rather than the breaker's, so that calls on different cores do not bounce one reference
/// count (two contended atomic writes per call) between them.
#[derive(Clone)]
pub(super) struct Stripes(Arc<[Arc<Stripe>]>);

impl fmt::Debug for Stripes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stripes").field(&self.0.len()).finish()
    }
}

impl Stripes {
    pub(super) fn new(breaker: &Breaker) -> Self {
        static COUNT: OnceLock<usize> = OnceLock::new();
        // A power of two (picked by masking), one per CPU up to 16.
        let n = *COUNT.get_or_init(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .next_power_of_two()
                .min(16)
        });
        Self((0..n).map(|_| Arc::new(Stripe(breaker.clone()))).collect())
    }

    /// This thread's stripe.
    #[inline]
    fn pick(&self) -> Arc<Stripe> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        let mut i = INDEX.with(Cell::get);
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) & (usize::MAX >> 1);
            INDEX.with(|c| c.set(i));
        }
        let stripes = &self.0;
        Arc::clone(&stripes[i & (stripes.len() - 1)])
    }
}

/// A service guarded by a [`Breaker`].
pub struct CircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    breaker: Breaker,
    stripes: Stripes,
    classifier: C,
    mode: Mode,
    permit: Option<Permit>,
    denied: Option<BreakerError>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            stripes: self.stripes.clone(),
            classifier: self.classifier.clone(),
            mode: self.mode,
            permit: None,
            denied: None,
            timer: None,
        }
    }
}

impl<S, C> Drop for CircuitBreaker<S, C> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker.release(permit);
        }
    }
}

impl<S> CircuitBreaker<S> {
    /// Guards `inner` with `breaker`, failing fast, with the default classifier.
    pub fn new(inner: S, breaker: Breaker) -> Self {
        Self::with_classifier(inner, breaker, DefaultClassifier, Mode::FailFast)
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// Guards `inner` with `breaker`, classifying outcomes with `classifier`.
    pub fn with_classifier(inner: S, breaker: Breaker, classifier: C, mode: Mode) -> Self {
        let stripes = Stripes::new(&breaker);
        Self::with_stripes(inner, breaker, stripes, classifier, mode)
    }

    pub(super) fn with_stripes(
        inner: S,
        breaker: Breaker,
        stripes: Stripes,
        classifier: C,
        mode: Mode,
    ) -> Self {
        Self {
            inner,
            breaker,
            stripes,
            classifier,
            mode,
            permit: None,
            denied: None,
            timer: None,
        }
    }

    /// The breaker's shared state.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Ok(permit) = self.breaker.try_acquire() {
                self.permit = Some(permit);
                self.timer = None;
                return Poll::Ready(());
            }
            self.breaker.register(cx.waker());
            // Re-check after registering so a concurrent transition cannot be missed.
            let denied = match self.breaker.try_acquire() {
                Ok(permit) => {
                    self.permit = Some(permit);
                    self.timer = None;
                    return Poll::Ready(());
                }
                Err(denied) => denied,
            };
            self.breaker.count_rejected();
            // Open: probing may start at `until_ms`. Half-open with every probe taken: a
            // released or completed probe wakes us (registered above), and so does the timer if
            // the half-open period can time out.
            let until_ms = match denied {
                Denied::Open { until_ms } => until_ms,
                Denied::HalfOpenFull {
                    until_ms: Some(until_ms),
                } => until_ms,
                Denied::HalfOpenFull { until_ms: None } => return Poll::Pending,
            };
            let at = self.breaker.instant_at(until_ms);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The wait is over: loop to take the transition (the timer fires at or after the
            // millisecond the breaker waits for, so the next attempt sees it due).
        }
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: FollowResponse,
    C: Classify<S::Response> + Clone,
{
    type Response = <S::Response as FollowResponse>::Output;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() && self.denied.is_none() {
            match self.mode {
                Mode::Gate => {
                    if self.poll_gate(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Mode::FailFast => match self.breaker.try_acquire() {
                    Ok(permit) => self.permit = Some(permit),
                    Err(denied) => {
                        self.breaker.count_rejected();
                        self.denied = Some(match denied {
                            Denied::Open { .. } => BreakerError::open(),
                            Denied::HalfOpenFull { .. } => BreakerError::half_open_full(),
                        });
                        return Poll::Ready(Ok(()));
                    }
                },
            }
        }
        if self.denied.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(err) = self.denied.take() {
            return ResponseFuture::rejected(err);
        }
        let Some(permit) = self.permit.take() else {
            return ResponseFuture::rejected(BreakerError::not_ready());
        };
        call_permitted(
            &self.breaker,
            &self.stripes,
            &self.classifier,
            permit,
            &mut self.inner,
            req,
        )
    }
}

/// Calls `inner` with `permit` taken from `breaker`: the future records the outcome (through
/// this thread's stripe), timed from now.
fn call_permitted<S, C, Req>(
    breaker: &Breaker,
    stripes: &Stripes,
    classifier: &C,
    permit: Permit,
    inner: &mut S,
    req: Req,
) -> ResponseFuture<S::Future, C>
where
    S: Service<Req>,
    C: Clone,
{
    let start_ms = breaker.clock().now_ms();
    let fut = inner.call(req);
    ResponseFuture::called(fut, stripes.pick(), permit, start_ms, classifier.clone())
}

#[cfg(test)]
mod tests;
