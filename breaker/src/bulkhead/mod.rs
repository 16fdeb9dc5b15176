//! Bulkhead: a cap on concurrent calls to one downstream, so a slow dependency cannot take every
//! task and connection with it.
//!
//! The slot is reserved in `poll_ready` (as `tower::limit::ConcurrencyLimit` does) and held by the
//! response future. Unlike `ConcurrencyLimit`, a full bulkhead does not queue without bound: it
//! waits at most `max_wait` (zero by default) and then fails the call with [`BulkheadFull`], a
//! local rejection that the retry layer may retry and that maps to `RESOURCE_EXHAUSTED`.

mod error;
mod future;
mod layer;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;
use tower_service::Service;

pub use error::BulkheadFull;
pub use future::ResponseFuture;
pub use layer::BulkheadLayer;

use crate::BoxError;

/// A service with a concurrency cap; see the [module docs](self).
pub struct Bulkhead<S> {
    inner: S,
    /// `None`: unbounded (a pass-through, no semaphore touched per call).
    semaphore: Option<PollSemaphore>,
    max_wait: Duration,
    permit: Option<OwnedSemaphorePermit>,
    denied: Option<BulkheadFull>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S: fmt::Debug> fmt::Debug for Bulkhead<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("inner", &self.inner)
            .field(
                "available",
                &self
                    .semaphore
                    .as_ref()
                    .map(PollSemaphore::available_permits),
            )
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        match &self.semaphore {
            Some(semaphore) => {
                Self::new(self.inner.clone(), semaphore.clone_inner(), self.max_wait)
            }
            None => Self::unbounded(self.inner.clone()),
        }
    }
}

impl<S> Bulkhead<S> {
    /// Wraps `inner`, sharing `semaphore`'s slots.
    pub fn new(inner: S, semaphore: Arc<Semaphore>, max_wait: Duration) -> Self {
        Self {
            inner,
            semaphore: Some(PollSemaphore::new(semaphore)),
            max_wait,
            permit: None,
            denied: None,
            timer: None,
        }
    }

    /// Wraps `inner` without a cap: calls pass straight through (no semaphore, no permit), so a
    /// stack can keep one type whether or not a bulkhead is configured.
    pub fn unbounded(inner: S) -> Self {
        Self {
            inner,
            semaphore: None,
            max_wait: Duration::ZERO,
            permit: None,
            denied: None,
            timer: None,
        }
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let Some(semaphore) = self.semaphore.as_mut() else {
            return self.inner.poll_ready(cx).map_err(Into::into);
        };
        if self.permit.is_none() && self.denied.is_none() {
            if self.max_wait.is_zero() {
                match semaphore.clone_inner().try_acquire_owned() {
                    Ok(permit) => self.permit = Some(permit),
                    Err(_) => {
                        self.denied = Some(BulkheadFull::new());
                        return Poll::Ready(Ok(()));
                    }
                }
            } else {
                match semaphore.poll_acquire(cx) {
                    Poll::Ready(Some(permit)) => {
                        self.permit = Some(permit);
                        self.timer = None;
                    }
                    Poll::Ready(None) => {
                        self.denied = Some(BulkheadFull::new());
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => {
                        let wait = self.max_wait;
                        let timer = self
                            .timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                        if timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        self.timer = None;
                        // Leave the semaphore's queue: a stale waiter would otherwise take the
                        // next free slot and sit on it.
                        *semaphore = PollSemaphore::new(semaphore.clone_inner());
                        self.denied = Some(BulkheadFull::after_wait());
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
        if self.denied.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.semaphore.is_none() {
            return ResponseFuture::unlimited(self.inner.call(req));
        }
        if let Some(err) = self.denied.take() {
            return ResponseFuture::rejected(err);
        }
        match self.permit.take() {
            Some(permit) => ResponseFuture::new(self.inner.call(req), permit),
            None => ResponseFuture::rejected(BulkheadFull::new()),
        }
    }
}
