use std::sync::Arc;

use tower_layer::Layer;

use super::{Retry, RetryPolicy};
use crate::classify::DefaultClassifier;

/// Wraps services in [`Retry`] with one shared policy (and so one shared budget).
#[derive(Debug, Clone)]
pub struct RetryLayer<C = DefaultClassifier> {
    policy: Arc<RetryPolicy>,
    classifier: C,
}

impl RetryLayer {
    /// Retries per `policy` with the default classifier.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
            classifier: DefaultClassifier,
        }
    }
}

impl<C> RetryLayer<C> {
    /// Uses `classifier` instead.
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayer<C2> {
        RetryLayer {
            policy: self.policy,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::with_classifier(inner, Arc::clone(&self.policy), self.classifier.clone())
    }
}
