use std::time::Duration;

use tower_layer::Layer;

use super::{DeadlineService, Protocol};

/// Applies a per-call timeout that travels downstream; see [`DeadlineService`].
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    timeout: Option<Duration>,
    protocol: Protocol,
}

impl DeadlineLayer {
    /// Every call gets at most `timeout` (less if the request already carries a sooner
    /// [`Deadline`](super::Deadline)).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            protocol: Protocol::Auto,
        }
    }

    /// No timeout of its own: only an incoming [`Deadline`](super::Deadline) is enforced and
    /// propagated.
    pub fn propagate_only() -> Self {
        Self {
            timeout: None,
            protocol: Protocol::Auto,
        }
    }

    /// Which header carries the deadline.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            timeout: self.timeout,
            protocol: self.protocol,
        }
    }
}
