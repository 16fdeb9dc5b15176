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

/// Whether a request may be replayed after an UNKNOWN outcome: it is marked [`Idempotent`],
/// carries an [`IdempotencyKey`] or already has an `idempotency-key` header.
pub fn is_replay_safe(headers: &HeaderMap, extensions: &Extensions) -> bool {
    extensions.get::<Idempotent>().is_some()
        || extensions.get::<IdempotencyKey>().is_some()
        || headers.contains_key(IDEMPOTENCY_KEY_HEADER)
}

/// Copies an [`IdempotencyKey`] extension into the `idempotency-key` header unless the header is
/// already set. A key that is not a valid header value is left out (and the request then counts
/// as idempotent only through the extension).
pub fn stamp_idempotency_key(headers: &mut HeaderMap, extensions: &Extensions) {
    if let Some(IdempotencyKey(key)) = extensions.get::<IdempotencyKey>()
        && !headers.contains_key(IDEMPOTENCY_KEY_HEADER)
        && let Ok(value) = HeaderValue::from_str(key)
    {
        headers.insert(IDEMPOTENCY_KEY_HEADER, value);
    }
}
