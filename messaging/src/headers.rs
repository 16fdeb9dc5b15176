//! Message headers and the names Keel gives its envelope fields.

use opentelemetry::propagation::{Extractor, Injector};

/// Header carrying the message id (a UUID unless the caller set one). On RabbitMQ it travels as
/// the native `message_id` property instead, and consumers see it under this name.
pub const MESSAGE_ID: &str = "keel-message-id";
/// Header carrying the idempotency key consumers de-duplicate on. Sent only when the producer
/// set a key of its own: otherwise the key is the message id.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header carrying the payload's media type (e.g. `application/json`). On RabbitMQ it travels
/// as the native `content_type` property instead, and consumers see it under this name.
pub const CONTENT_TYPE: &str = "content-type";
/// Header carrying the message key on RabbitMQ (where the routing key names the queue).
pub const KEY: &str = "keel-key";
/// Dead letters: the destination the message was consumed from.
pub const DLQ_ORIGINAL_DESTINATION: &str = "keel-dlq-original-destination";
/// Dead letters: how many times the handler was tried.
pub const DLQ_ATTEMPTS: &str = "keel-dlq-attempts";
/// Dead letters: why the message was dead-lettered (the handler's or the codec's error text).
pub const DLQ_ERROR: &str = "keel-dlq-error";
/// The most bytes a dead letter's [`DLQ_ERROR`] holds. A longer reason (a handler's error can
/// be any size) is cut at a character boundary and ends with a note of its full length: a dead
/// letter must stay within the broker's frame / message size, or it can never be sent.
pub const DLQ_ERROR_MAX_BYTES: usize = 4096;
/// Dead letters: the consumer group that gave up on it.
pub const DLQ_GROUP: &str = "keel-dlq-group";
/// Dead letters (Kafka): the original partition.
pub const DLQ_ORIGINAL_PARTITION: &str = "keel-dlq-original-partition";
/// Dead letters (Kafka): the original offset.
pub const DLQ_ORIGINAL_OFFSET: &str = "keel-dlq-original-offset";

/// An ordered list of message headers: names are strings, values are bytes.
///
/// Names are compared case-insensitively (W3C trace context and HTTP habits); [`Headers::insert`]
/// replaces an existing value, [`Headers::append`] keeps it. `Headers` implements the
/// OpenTelemetry [`Injector`] / [`Extractor`] traits so trace context can be carried in it.
///
/// ```
/// use keel_messaging::Headers;
///
/// let mut headers = Headers::new();
/// headers.insert("tenant", "acme");
/// headers.insert("Tenant", "bank");
/// assert_eq!(headers.get_str("TENANT"), Some("bank"));
/// assert_eq!(headers.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, Vec<u8>)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing any value it had.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> &mut Self {
        let name = name.into();
        let value = value.into();
        match self
            .entries
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name, value)),
        }
        self
    }

    /// Builder form of [`Headers::insert`].
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.insert(name, value);
        self
    }

    /// Adds `name: value` even if `name` is already present.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.entries.push((name.into(), value.into()));
        self
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name`, if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) {
        self.entries.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// The headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (n, v) in iter {
            headers.append(n, v);
        }
        headers
    }
}

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        self.insert(key, value);
    }
}

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        self.get_str(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// `error` as a dead letter's [`DLQ_ERROR`]: unchanged up to [`DLQ_ERROR_MAX_BYTES`], else cut
/// to fit with a note of how long it was.
#[cfg_attr(not(any(feature = "kafka", feature = "amqp")), allow(dead_code))]
pub(crate) fn dead_letter_error(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= DLQ_ERROR_MAX_BYTES {
        return std::borrow::Cow::Borrowed(error);
    }
    let note = format!("… [truncated: {} bytes]", error.len());
    let mut keep = DLQ_ERROR_MAX_BYTES.saturating_sub(note.len());
    while !error.is_char_boundary(keep) {
        keep -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{note}", &error[..keep]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_dead_letter_error_is_cut_at_a_character_boundary() {
        assert_eq!(dead_letter_error("short"), "short");
        let exact = "e".repeat(DLQ_ERROR_MAX_BYTES);
        assert_eq!(dead_letter_error(&exact), exact.as_str());
        for long in ["x".repeat(200_000), "é".repeat(100_000), "€".repeat(70_000)] {
            let cut = dead_letter_error(&long);
            assert!(cut.len() <= DLQ_ERROR_MAX_BYTES, "{}", cut.len());
            assert!(cut.len() > DLQ_ERROR_MAX_BYTES - 64, "{}", cut.len());
            let note = format!("… [truncated: {} bytes]", long.len());
            assert!(cut.ends_with(&note), "{cut:?}");
            assert!(long.starts_with(cut.trim_end_matches(&note)));
        }
    }

    #[test]
    fn insert_replaces_case_insensitively_and_append_keeps() {
        let mut h = Headers::new();
        h.insert("a", "1").insert("A", "2").append("a", "3");
        assert_eq!(h.get_str("a"), Some("2"));
        assert_eq!(h.len(), 2);
        h.remove("A");
        assert!(h.is_empty());
    }

    #[test]
    fn extractor_sees_what_injector_set() {
        let mut h = Headers::new();
        Injector::set(&mut h, "traceparent", "00-abc".to_owned());
        assert_eq!(Extractor::get(&h, "TRACEPARENT"), Some("00-abc"));
        assert_eq!(Extractor::keys(&h), vec!["traceparent"]);
    }
}
