//! Request markings that the layers read from [`http::Extensions`] (so they work the same for
//! tonic's `http::Request` and for REST).
//!
//! * [`Idempotent`]: the call may be executed twice without harm; retry may replay it even when
//!   the first attempt may have executed (outcome UNKNOWN).
//! * [`IdempotencyKey`]: the server de-duplicates on this key. It is sent as the
//!   `idempotency-key` header ([`IDEMPOTENCY_KEY_HEADER`]) and the *same* key goes with every
//!   attempt. A request that already carries the header is treated the same way.

use http::{Extensions, HeaderMap, HeaderName, HeaderValue};

/// The header that carries an [`IdempotencyKey`].
pub const IDEMPOTENCY_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// Marks a request as idempotent (insert it into the request's extensions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Idempotent;

/// A key that lets the server de-duplicate retried attempts (insert it into the request's
/// extensions; it is sent as the `idempotency-key` header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

/// The longest idempotency key a Keel server accepts, in bytes (after trimming).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// An idempotency key that cannot be used: empty, longer than [`MAX_IDEMPOTENCY_KEY_LEN`], or
/// not visible ASCII (a line break, say). A Keel client fails such a call before sending it
/// (`INVALID_ARGUMENT`, HTTP 400): sent without its key, or with one the server refuses, the call
/// could not be de-duplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency key: {reason}")]
pub struct InvalidIdempotencyKey {
    reason: &'static str,
}

impl InvalidIdempotencyKey {
    /// Why the key is not acceptable.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// The one rule for idempotency keys, applied by Keel's clients before sending and by its
/// servers on receipt: visible ASCII (spaces and tabs allowed inside), not empty and at most
/// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes once trimmed. Returns the trimmed key, which the server
/// de-duplicates on.
pub fn check_idempotency_key(key: &[u8]) -> Result<&str, InvalidIdempotencyKey> {
    let invalid = |reason| Err(InvalidIdempotencyKey { reason });
    if !key.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return invalid("the idempotency key must be visible ASCII");
    }
    let key = std::str::from_utf8(key).map(str::trim).unwrap_or_default();
    if key.is_empty() {
        return invalid("the idempotency key is empty");
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return invalid("the idempotency key is longer than 255 bytes");
    }
    Ok(key)
}

/// The `idempotency-key` of a request's `headers`, trimmed, if it has one: exactly one header,
/// whose value passes [`check_idempotency_key`] (Keel's servers refuse anything else).
pub fn idempotency_key_of(headers: &HeaderMap) -> Result<Option<&str>, InvalidIdempotencyKey> {
    let mut keys = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = keys.next() else {
        return Ok(None);
    };
    if keys.next().is_some() {
        return Err(InvalidIdempotencyKey {
            reason: "a request must carry exactly one idempotency-key header",
        });
    }
    check_idempotency_key(value.as_bytes()).map(Some)
}

/// Whether a request may be replayed after an UNKNOWN outcome: it is marked [`Idempotent`], or
/// it carries a non-empty `idempotency-key` header, which the server de-duplicates on (call
/// [`stamp_idempotency_key`] first: it turns an [`IdempotencyKey`] extension into that header
/// and refuses a key that breaks [`check_idempotency_key`]).
pub fn is_replay_safe(headers: &HeaderMap, extensions: &Extensions) -> bool {
    extensions.get::<Idempotent>().is_some()
        || headers
            .get(IDEMPOTENCY_KEY_HEADER)
            .is_some_and(|key| !key.is_empty())
}

/// Copies an [`IdempotencyKey`] extension into the `idempotency-key` header unless the header is
/// already set, and checks the key that will be sent with [`check_idempotency_key`] (and that
/// there is only one): a request whose key the server could not use must not be sent (see
/// [`InvalidIdempotencyKey`]).
pub fn stamp_idempotency_key(
    headers: &mut HeaderMap,
    extensions: &Extensions,
) -> Result<(), InvalidIdempotencyKey> {
    if idempotency_key_of(headers)?.is_some() {
        return Ok(());
    }
    if let Some(IdempotencyKey(key)) = extensions.get::<IdempotencyKey>() {
        check_idempotency_key(key.as_bytes())?;
        let value = HeaderValue::from_str(key).map_err(|_| InvalidIdempotencyKey {
            reason: "the idempotency key must be visible ASCII",
        })?;
        headers.insert(IDEMPOTENCY_KEY_HEADER, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_keys() {
        assert_eq!(check_idempotency_key(b"  pay-42 \t"), Ok("pay-42"));
        assert_eq!(check_idempotency_key(b"a b"), Ok("a b"));
        assert!(check_idempotency_key(&[b'k'; 255]).is_ok());
        for bad in [
            &b""[..],
            b"   ",
            b"line\nbreak",
            "caf\u{e9}".as_bytes(),
            &[b'k'; 256],
        ] {
            assert!(check_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stamping_checks_the_key_that_will_be_sent() {
        let mut extensions = Extensions::new();
        extensions.insert(IdempotencyKey("pay-42".into()));
        let mut headers = HeaderMap::new();
        assert_eq!(stamp_idempotency_key(&mut headers, &extensions), Ok(()));
        assert_eq!(headers[IDEMPOTENCY_KEY_HEADER], "pay-42");
        assert!(is_replay_safe(&headers, &extensions));

        extensions.insert(IdempotencyKey("pay\n42".into()));
        let mut headers = HeaderMap::new();
        let error = stamp_idempotency_key(&mut headers, &extensions).unwrap_err();
        assert_eq!(error.reason(), "the idempotency key must be visible ASCII");
        assert!(headers.is_empty());

        // A header the caller set is checked too, and wins over the extension.
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("own"));
        assert_eq!(stamp_idempotency_key(&mut headers, &extensions), Ok(()));
        assert_eq!(headers[IDEMPOTENCY_KEY_HEADER], "own");
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static(""));
        assert!(stamp_idempotency_key(&mut headers, &Extensions::new()).is_err());
        // Two keys: which one would the server de-duplicate on? A Keel server refuses both.
        let mut headers = HeaderMap::new();
        headers.append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("a"));
        headers.append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("b"));
        assert!(stamp_idempotency_key(&mut headers, &Extensions::new()).is_err());
    }
}
