use std::fmt;

/// The call's deadline passed.
#[derive(Clone, PartialEq, Eq)]
pub struct DeadlineExceeded {
    sent: bool,
}

impl DeadlineExceeded {
    /// The deadline passed before the request was sent (say, while a transport waited for a
    /// connection): nothing of it can have executed.
    pub fn before_send() -> Self {
        Self { sent: false }
    }

    pub(crate) fn elapsed() -> Self {
        Self { sent: true }
    }

    /// The deadline had already passed, so the request was never sent.
    pub fn is_expired_before_send(&self) -> bool {
        !self.sent
    }

    /// The deadline passed while the request was in flight (it may have executed).
    pub fn is_elapsed(&self) -> bool {
        self.sent
    }
}

impl fmt::Debug for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineExceeded")
            .field("sent", &self.sent)
            .finish()
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.sent {
            "deadline exceeded"
        } else {
            "deadline exceeded before the request was sent"
        })
    }
}

impl std::error::Error for DeadlineExceeded {}
