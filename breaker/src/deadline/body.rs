use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::DeadlineExceeded;
use crate::BoxError;

pin_project! {
    /// Response body of [`DeadlineService`](super::DeadlineService): the inner body, failing
    /// with [`DeadlineExceeded`] if the call's deadline passes before it ends. A provider that
    /// sends its response head and then hangs cannot hold the caller past the deadline.
    ///
    /// The timer is armed only when the body has to wait: a body that is already there when
    /// read costs no timer.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        deadline: Option<Instant>,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<B> ResponseBody<B> {
    pub(super) fn new(inner: B, deadline: Option<Instant>) -> Self {
        Self {
            inner,
            deadline,
            sleep: None,
        }
    }

    /// The body without the deadline.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep_until(deadline)));
        }
        match this.sleep.as_mut().as_pin_mut().map(|s| s.poll(cx)) {
            Some(Poll::Ready(())) => {
                *this.deadline = None;
                this.sleep.set(None);
                Poll::Ready(Some(Err(DeadlineExceeded::elapsed().into())))
            }
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
