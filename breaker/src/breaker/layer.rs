use tower_layer::Layer;

use super::{Breaker, CircuitBreaker, Mode, Stripes};
use crate::classify::DefaultClassifier;

/// Wraps services in a [`CircuitBreaker`] sharing one [`Breaker`].
///
/// For per-endpoint breakers build one layer (and one [`Breaker`]) per endpoint.
#[derive(Debug, Clone)]
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
