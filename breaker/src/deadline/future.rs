use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{DeadlineExceeded, ResponseBody};
use crate::BoxError;

pin_project! {
    /// Response future of [`DeadlineService`](super::DeadlineService).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        deadline: Option<Instant>,
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
            .field("expired_before_send", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, deadline: Option<Instant>) -> Self {
        Self {
            inner: Some(inner),
            sleep: deadline.map(tokio::time::sleep_until),
            deadline,
        }
    }

    pub(super) fn expired() -> Self {
        Self {
            inner: None,
            sleep: None,
            deadline: None,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(DeadlineExceeded::before_send().into()));
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            let deadline = *this.deadline;
            return Poll::Ready(match result {
                Ok(response) => Ok(response.map(|body| ResponseBody::new(body, deadline))),
                Err(error) => Err(error.into()),
            });
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(DeadlineExceeded::elapsed().into())),
            _ => Poll::Pending,
        }
    }
}
