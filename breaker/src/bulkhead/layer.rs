use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tower_layer::Layer;

use super::Bulkhead;

/// Limits concurrent calls across every service it wraps (they share the slots).
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    semaphore: Arc<Semaphore>,
    max_wait: Duration,
}

impl BulkheadLayer {
    /// At most `max_concurrent` calls in flight; a call that finds none free fails at once
    /// (resilience4j's default `maxWaitDuration` of 0).
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(max_concurrent)),
            max_wait: Duration::ZERO,
        }
    }

    /// Waits up to `max_wait` for a free slot before failing.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, Arc::clone(&self.semaphore), self.max_wait)
    }
}
