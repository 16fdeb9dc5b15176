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

/// Whether a request may be replayed after an UNKNOWN outcome: it is marked [`Idempotent`], or
/// it carries a non-empty `idempotency-key` header, which the server de-duplicates on (call
/// [`stamp_idempotency_key`] first to turn an [`IdempotencyKey`] extension into that header).
///
/// An [`IdempotencyKey`] that never became a header (not a valid header value, e.g. with a line
/// break) does not count: the server would get no key, and a replay could execute twice.
pub fn is_replay_safe(headers: &HeaderMap, extensions: &Extensions) -> bool {
    extensions.get::<Idempotent>().is_some()
        || headers
            .get(IDEMPOTENCY_KEY_HEADER)
            .is_some_and(|key| !key.is_empty())
}

/// Copies an [`IdempotencyKey`] extension into the `idempotency-key` header unless the header is
/// already set. A key that is not a valid header value is left out (and does not make the
/// request replay-safe: see [`is_replay_safe`]).
pub fn stamp_idempotency_key(headers: &mut HeaderMap, extensions: &Extensions) {
    if let Some(IdempotencyKey(key)) = extensions.get::<IdempotencyKey>()
        && !headers.contains_key(IDEMPOTENCY_KEY_HEADER)
        && let Ok(value) = HeaderValue::from_str(key)
    {
        headers.insert(IDEMPOTENCY_KEY_HEADER, value);
    }
}
