use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{RateLimit, TokenBucket};

/// Applies one shared [`TokenBucket`] to every service it wraps.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    bucket: Arc<TokenBucket>,
    max_wait: Duration,
}

impl RateLimitLayer {
    /// Refuses calls beyond `bucket`'s rate at once.
    pub fn new(bucket: TokenBucket) -> Self {
        Self {
            bucket: Arc::new(bucket),
            max_wait: Duration::ZERO,
        }
    }

    /// Waits up to `max_wait` for a token instead of refusing at once.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.bucket), self.max_wait)
    }
}
