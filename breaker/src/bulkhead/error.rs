use std::fmt;

/// The bulkhead had no free slot (within its wait, if any); the request was not sent.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BulkheadFull {
    waited: bool,
}

impl BulkheadFull {
    pub(crate) fn new() -> Self {
        Self { waited: false }
    }

    pub(crate) fn after_wait() -> Self {
        Self { waited: true }
    }

    /// Always true: the bulkhead was full.
    pub fn is_full(&self) -> bool {
        true
    }

    /// The call waited for its maximum wait before giving up.
    pub fn is_wait_timeout(&self) -> bool {
        self.waited
    }
}

impl fmt::Debug for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadFull")
            .field("waited", &self.waited)
            .finish()
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.waited {
            "bulkhead is full (waited for a free slot)"
        } else {
            "bulkhead is full"
        })
    }
}

impl std::error::Error for BulkheadFull {}
