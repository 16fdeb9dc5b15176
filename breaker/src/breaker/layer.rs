use std::fmt;

use tower_layer::Layer;
use tower_service::Service;

use super::state::Permit;
use super::{Breaker, CircuitBreaker, Mode, ResponseFuture, Stripes};
use crate::BoxError;
use crate::classify::DefaultClassifier;

/// Wraps services in a [`CircuitBreaker`] sharing one [`Breaker`].
///
/// For per-endpoint breakers build one layer (and one [`Breaker`]) per endpoint.
#[derive(Debug, Clone)]
// Laid out as declared: the breaker handle, all that admission reads, comes first (a balancer
// keeps it on the cache line it reads of each candidate).
#[repr(C)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    breaker: Breaker,
    stripes: Stripes,
    classifier: C,
    mode: Mode,
}

impl CircuitBreakerLayer {
    /// A fail-fast layer with the default classifier.
    pub fn new(breaker: Breaker) -> Self {
        Self {
            stripes: Stripes::new(&breaker),
            breaker,
            classifier: DefaultClassifier,
            mode: Mode::FailFast,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Sets how an open breaker refuses calls.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Uses `classifier` instead.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            stripes: self.stripes,
            classifier,
            mode: self.mode,
        }
    }

    /// The shared breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// A permit for one call if the breaker admits one now, taken without building a
    /// [`CircuitBreaker`] service: no reference count is touched (a service clones the
    /// breaker's and its stripes'), only the breaker's state is read. The fast path of a
    /// balancer that keeps one layer per endpoint; when this returns `None`, build the service
    /// and poll it ready to wait for the breaker (and to count the refusal).
    ///
    /// ```
    /// use keel_breaker::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
    ///
    /// let layer = CircuitBreakerLayer::new(Breaker::new(BreakerConfig::default())?);
    /// let admission = layer.try_admit().expect("a closed breaker admits");
    /// let mut inner = tower::service_fn(|_: ()| async {
    ///     Ok::<_, std::io::Error>(http::Response::new(()))
    /// });
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// # rt.block_on(async {
    /// let response = admission.call(&mut inner, ()).await?; // a 200: a success,
    /// assert_eq!(response.status(), 200);
    /// drop(response); // recorded once its body is done with
    /// # Ok::<_, keel_breaker::BoxError>(()) })?;
    /// # Ok::<_, keel_breaker::BoxError>(())
    /// ```
    #[inline]
    pub fn try_admit(&self) -> Option<Admission<'_, C>> {
        self.breaker.try_acquire().ok().map(|permit| Admission {
            layer: self,
            permit: Some(permit),
        })
    }
}

/// One call admitted by a [`CircuitBreakerLayer`]'s breaker ([`CircuitBreakerLayer::try_admit`]):
/// [`call`](Admission::call) it, or drop it to give the permit back unused.
pub struct Admission<'a, C = DefaultClassifier> {
    layer: &'a CircuitBreakerLayer<C>,
    permit: Option<Permit>,
}

impl<C> fmt::Debug for Admission<'_, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("breaker", &self.layer.breaker)
            .finish_non_exhaustive()
    }
}

impl<C: Clone> Admission<'_, C> {
    /// Calls `inner` (which must be ready, as for any `Service::call`) and returns the future
    /// that records the call's outcome with the breaker — the same future a
    /// [`CircuitBreaker`] service returns.
    pub fn call<S, Req>(mut self, inner: &mut S, req: Req) -> ResponseFuture<S::Future, C>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
    {
        let Some(permit) = self.permit.take() else {
            // Unreachable: the permit is only taken here, by value.
            return ResponseFuture::rejected(super::BreakerError::not_ready());
        };
        let layer = self.layer;
        super::call_permitted(
            &layer.breaker,
            &layer.stripes,
            &layer.classifier,
            permit,
            inner,
            req,
        )
    }
}

impl<C> Drop for Admission<'_, C> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.layer.breaker.release(permit);
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::with_stripes(
            inner,
            self.breaker.clone(),
            self.stripes.clone(),
            self.classifier.clone(),
            self.mode,
        )
    }
}
