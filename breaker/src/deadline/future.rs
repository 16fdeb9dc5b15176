use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::DeadlineExceeded;
use crate::BoxError;

pin_project! {
    /// Response future of [`DeadlineService`](super::DeadlineService).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("expired_before_send", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, sleep: Option<Sleep>) -> Self {
        Self {
            inner: Some(inner),
            sleep,
        }
    }

    pub(super) fn expired() -> Self {
        Self {
            inner: None,
            sleep: None,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(DeadlineExceeded::before_send().into()));
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(DeadlineExceeded::elapsed().into())),
            _ => Poll::Pending,
        }
    }
}
