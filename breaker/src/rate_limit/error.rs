use std::fmt;

/// The rate limit allowed no call now (nor within its maximum wait); the request was not sent.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RateLimited {
    _priv: (),
}

impl RateLimited {
    pub(crate) fn new() -> Self {
        Self { _priv: () }
    }

    /// Always true: the call was refused by the rate limit.
    pub fn is_rate_limited(&self) -> bool {
        true
    }
}

impl fmt::Debug for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RateLimited")
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rate limit exceeded")
    }
}

impl std::error::Error for RateLimited {}
