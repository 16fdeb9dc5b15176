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

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F },
        Backoff { #[pin] sleep: Sleep },
        Ready,
    }
}

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    pub struct ResponseFuture<S, F, B, C> {
        #[pin]
        state: State<F>,
        service: S,
        template: Option<Template>,
        attempts: u32,
        policy: Arc<RetryPolicy>,
        classifier: C,
        replay_safe: bool,
        deadline: Option<Deadline>,
        _body: std::marker::PhantomData<fn(B)>,
    }
}

impl<S, F, B, C> fmt::Debug for ResponseFuture<S, F, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("replayable", &self.template.is_some())
            .field("replay_safe", &self.replay_safe)
            .finish_non_exhaustive()
    }
}

impl<S, F, B, C> ResponseFuture<S, F, B, C> {
    pub(super) fn new(
        fut: F,
        service: S,
        template: Option<Template>,
        policy: Arc<RetryPolicy>,
        classifier: C,
        replay_safe: bool,
        deadline: Option<Deadline>,
    ) -> Self {
        Self {
            state: State::Called { fut },
            service,
            template,
            attempts: 1,
            policy,
            classifier,
            replay_safe,
            deadline,
            _body: std::marker::PhantomData,
        }
    }
}

impl<S, F, B, C, ResB, E> Future for ResponseFuture<S, F, B, C>
where
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
                    let outcome = match &result {
                        Ok(res) => this.classifier.classify_response(res),
                        Err(err) => this.classifier.classify_error(err.as_ref()),
                    };
                    if this.template.is_none()
                        || *this.attempts >= this.policy.max_attempts
                        || !this.policy.wants_retry(outcome, *this.replay_safe)
                    {
                        return Poll::Ready(result);
                    }
                    let delay = this.policy.backoff_for(*this.attempts);
                    if let Some(deadline) = this.deadline
                        && Instant::now() + delay >= deadline.0
                    {
                        return Poll::Ready(result);
                    }
                    if !this.policy.budget.withdraw() {
                        tracing::debug!(attempts = *this.attempts, "retry budget exhausted");
                        return Poll::Ready(result);
                    }
                    tracing::debug!(
                        attempt = *this.attempts + 1,
                        ?outcome,
                        delay_ms = delay.as_millis() as u64,
                        "retrying"
                    );
                    this.state.set(State::Backoff {
                        sleep: tokio::time::sleep(delay),
                    });
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    ready!(this.service.poll_ready(cx)).map_err(Into::into)?;
                    let Some(template) = this.template.as_ref() else {
                        return Poll::Ready(Err("retry without a request to replay".into()));
                    };
                    let req = template.build(*this.deadline);
                    *this.attempts += 1;
                    let fut = this.service.call(req);
                    this.state.set(State::Called { fut });
                }
            }
        }
    }
}
