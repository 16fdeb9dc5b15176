use std::fmt;

/// A call refused by a circuit breaker (service-level, fail-fast use).
#[derive(Clone, PartialEq, Eq)]
pub struct BreakerError {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    HalfOpenFull,
    NotReady,
}

impl BreakerError {
    pub(crate) fn open() -> Self {
        Self { kind: Kind::Open }
    }
    pub(crate) fn half_open_full() -> Self {
        Self {
            kind: Kind::HalfOpenFull,
        }
    }
    pub(crate) fn not_ready() -> Self {
        Self {
            kind: Kind::NotReady,
        }
    }
    #[cfg(test)]
    pub(crate) fn into_boxed(self) -> crate::BoxError {
        Box::new(self)
    }

    /// The breaker is open.
    pub fn is_open(&self) -> bool {
        self.kind == Kind::Open
    }

    /// The breaker is half-open and every permitted probe is already in flight.
    pub fn is_half_open_full(&self) -> bool {
        self.kind == Kind::HalfOpenFull
    }

    /// `call` was used without a successful `poll_ready` first (a bug in the caller).
    pub fn is_not_ready(&self) -> bool {
        self.kind == Kind::NotReady
    }
}

impl fmt::Debug for BreakerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BreakerError").field(&self.kind).finish()
    }
}

impl fmt::Display for BreakerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Open => "circuit breaker is open",
            Kind::HalfOpenFull => "circuit breaker is half-open and its probes are in flight",
            Kind::NotReady => "circuit breaker called before poll_ready",
        })
    }
}

impl std::error::Error for BreakerError {}

/// An invalid breaker configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid circuit breaker config: {0}")]
pub struct ConfigError(pub(crate) String);
