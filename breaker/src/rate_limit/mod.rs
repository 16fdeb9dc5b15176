//! Rate limit: a token bucket shared by every clone of the service.
//!
//! The bucket holds up to `burst` tokens and refills one every `period / rate`. It is kept as a
//! single atomic "theoretical arrival time" (the generic cell rate algorithm, equivalent to a
//! token bucket), so taking a token is one clock read and one compare-and-swap, with no lock and
//! no background refill task. The token is taken in `poll_ready`; with a `max_wait` a call may
//! reserve a token that becomes available within that wait and sleep until then, otherwise it
//! fails with [`RateLimited`].

mod error;
mod future;
mod layer;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower_service::Service;

pub use error::RateLimited;
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;

use crate::BoxError;

/// A lock-free token bucket.
pub struct TokenBucket {
    epoch: Instant,
    /// Nanoseconds between tokens.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run (burst − 1 intervals).
    tolerance: u64,
    /// Theoretical arrival time of the next conforming call, ns since `epoch`.
    tat: AtomicU64,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("interval_ns", &self.interval)
            .field("burst", &(self.tolerance / self.interval.max(1) + 1))
            .finish()
    }
}

/// An invalid token bucket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate limit: rate, period and burst must be positive")]
pub struct InvalidRate;

impl TokenBucket {
    /// `rate` calls per `period`, with bursts of up to `burst` calls (full at start).
    ///
    /// # Errors
    /// [`InvalidRate`] if any argument is zero.
    pub fn new(rate: u32, period: Duration, burst: u32) -> Result<Self, InvalidRate> {
        if rate == 0 || burst == 0 || period.is_zero() {
            return Err(InvalidRate);
        }
        let interval = u64::try_from(period.as_nanos() / u128::from(rate))
            .unwrap_or(u64::MAX)
            .max(1);
        Ok(Self {
            epoch: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            tat: AtomicU64::new(0),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.epoch)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }

    /// Takes a token now, or reserves one available within `max_wait` and returns how long to
    /// wait for it; `None` when neither is possible (nothing is taken then).
    pub fn try_take(&self, max_wait: Duration) -> Option<Duration> {
        self.reserve(max_wait).map(|(wait, _)| wait)
    }

    /// [`try_take`](Self::try_take), also returning the bucket's state after this token (what
    /// [`give_back`](Self::give_back) needs).
    fn reserve(&self, max_wait: Duration) -> Option<(Duration, u64)> {
        let now = self.now_ns();
        let max_wait = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let start = tat.max(now);
            // The call conforms if start − now ≤ tolerance; beyond that it must wait.
            let wait = (start - now).saturating_sub(self.tolerance);
            if wait > max_wait {
                return None;
            }
            let next = start.saturating_add(self.interval);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some((Duration::from_nanos(wait), next)),
                Err(actual) => tat = actual,
            }
        }
    }
}

impl TokenBucket {
    /// Returns a token reserved by [`reserve`](Self::reserve) (which left the bucket at
    /// `after`) and never used, unless a later reservation was made meanwhile (its place in
    /// line stays taken then).
    fn give_back(&self, after: u64) {
        let _ = self.tat.compare_exchange(
            after,
            after.saturating_sub(self.interval),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// A rate-limited service; see the [module docs](self).
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
    max_wait: Duration,
    state: ReadyState,
    /// The bucket's state after the token this service holds or waits for (`Waiting`, `Token`).
    reserved: u64,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Drop for RateLimit<S> {
    /// A token reserved and never used goes back: a caller that gives up waiting (its own
    /// timeout) does not push every later caller's wait further out. Kept, such tokens moved
    /// the bucket ahead by one interval each, until under sustained overload every token was
    /// reserved by callers already gone and useful throughput fell to nothing.
    fn drop(&mut self) {
        if matches!(self.state, ReadyState::Waiting | ReadyState::Token) {
            self.bucket.give_back(self.reserved);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadyState {
    Empty,
    Waiting,
    Token,
    Denied,
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("bucket", &self.bucket)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), Arc::clone(&self.bucket), self.max_wait)
    }
}

impl<S> RateLimit<S> {
    /// Wraps `inner`, taking tokens from `bucket`.
    pub fn new(inner: S, bucket: Arc<TokenBucket>, max_wait: Duration) -> Self {
        Self {
            inner,
            bucket,
            max_wait,
            state: ReadyState::Empty,
            reserved: 0,
            timer: None,
        }
    }
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.state == ReadyState::Empty {
            match self.bucket.reserve(self.max_wait) {
                None => {
                    self.state = ReadyState::Denied;
                    return Poll::Ready(Ok(()));
                }
                Some((wait, after)) if wait.is_zero() => {
                    self.reserved = after;
                    self.state = ReadyState::Token;
                }
                Some((wait, after)) => {
                    self.reserved = after;
                    let at = Instant::now() + wait;
                    match &mut self.timer {
                        Some(t) => t.as_mut().reset(at),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    self.state = ReadyState::Waiting;
                }
            }
        }
        if self.state == ReadyState::Waiting {
            if let Some(timer) = &mut self.timer
                && timer.as_mut().poll(cx).is_pending()
            {
                return Poll::Pending;
            }
            self.state = ReadyState::Token;
        }
        if self.state == ReadyState::Denied {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = std::mem::replace(&mut self.state, ReadyState::Empty);
        match state {
            ReadyState::Token => ResponseFuture::new(self.inner.call(req)),
            _ => ResponseFuture::rejected(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_refills_at_rate() {
        let bucket = TokenBucket::new(10, Duration::from_secs(1), 3).unwrap();
        for i in 0..3 {
            assert_eq!(
                bucket.try_take(Duration::ZERO),
                Some(Duration::ZERO),
                "burst {i}"
            );
        }
        assert_eq!(bucket.try_take(Duration::ZERO), None, "burst exhausted");
        // With a wait allowed, the next token is 100 ms away.
        assert_eq!(
            bucket.try_take(Duration::from_secs(1)),
            Some(Duration::from_millis(100))
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(bucket.try_take(Duration::ZERO), Some(Duration::ZERO));
        assert_eq!(bucket.try_take(Duration::ZERO), None);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(bucket.try_take(Duration::ZERO), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn service_refuses_beyond_rate_and_waits_within_max_wait() {
        use tower::ServiceExt;
        let svc = tower::service_fn(|()| async { Ok::<_, BoxError>("ok") });
        let bucket = TokenBucket::new(1, Duration::from_secs(1), 1).unwrap();
        let mut svc = RateLimitLayer::new(bucket).layer_on(svc);
        assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "ok");
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.downcast_ref::<RateLimited>().is_some());

        let svc = tower::service_fn(|()| async { Ok::<_, BoxError>("ok") });
        let bucket = TokenBucket::new(1, Duration::from_secs(1), 1).unwrap();
        let mut svc = RateLimitLayer::new(bucket)
            .max_wait(Duration::from_secs(2))
            .layer_on(svc);
        let start = Instant::now();
        svc.ready().await.unwrap().call(()).await.unwrap();
        svc.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "second call waited for its token"
        );
    }

    /// Callers that give up waiting for their token (their own 100 ms timeout, under a 5 s
    /// `max_wait`) hand it back: the next caller is served after the rate's interval. Kept,
    /// the five abandoned tokens pushed it past `max_wait`, so it was refused.
    #[tokio::test(start_paused = true)]
    async fn abandoned_waits_give_their_tokens_back() {
        use tower::ServiceExt;
        let svc = tower::service_fn(|()| async { Ok::<_, BoxError>("ok") });
        let bucket = TokenBucket::new(1, Duration::from_secs(1), 1).unwrap();
        let limit = RateLimitLayer::new(bucket)
            .max_wait(Duration::from_secs(5))
            .layer_on(svc);
        let mut first = limit.clone();
        assert_eq!(first.ready().await.unwrap().call(()).await.unwrap(), "ok");
        for _ in 0..5 {
            let mut gives_up = limit.clone();
            let waited = tokio::time::timeout(Duration::from_millis(100), gives_up.ready()).await;
            assert!(waited.is_err(), "no token within 100 ms");
        }
        let mut next = limit.clone();
        let start = Instant::now();
        assert_eq!(next.ready().await.unwrap().call(()).await.unwrap(), "ok");
        assert!(
            start.elapsed() <= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    trait LayerOn {
        fn layer_on<S>(&self, s: S) -> RateLimit<S>;
    }
    impl LayerOn for RateLimitLayer {
        fn layer_on<S>(&self, s: S) -> RateLimit<S> {
            tower_layer::Layer::layer(self, s)
        }
    }
}
