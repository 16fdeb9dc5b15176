use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;

use super::BulkheadFull;
use crate::BoxError;

pin_project! {
    /// Response future of [`Bulkhead`](super::Bulkhead): holds the slot until the response.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<OwnedSemaphorePermit>,
        rejected: Option<BulkheadFull>,
    }
}

impl<F> ResponseFuture<F> {
    /// The wrapped future, unless the call was refused before reaching it.
    pub fn get_ref(&self) -> Option<&F> {
        self.inner.as_ref()
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner: Some(inner),
            permit: Some(permit),
            rejected: None,
        }
    }

    pub(super) fn unlimited(inner: F) -> Self {
        Self {
            inner: Some(inner),
            permit: None,
            rejected: None,
        }
    }

    pub(super) fn rejected(err: BulkheadFull) -> Self {
        Self {
            inner: None,
            permit: None,
            rejected: Some(err),
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
            let err = this.rejected.take().unwrap_or_default();
            return Poll::Ready(Err(err.into()));
        };
        let result = ready!(inner.poll(cx));
        this.permit.take();
        Poll::Ready(result.map_err(Into::into))
    }
}
