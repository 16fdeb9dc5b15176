//! Header values made per request.

use bytes::Bytes;
use http::HeaderValue;

/// The longest value [`shared_bytes`] keeps in one allocation.
const INLINE: usize = 64;

/// `len` bytes inline: the one allocation behind a [`shared_bytes`].
struct Inline {
    buf: [u8; INLINE],
    len: usize,
}

impl AsRef<[u8]> for Inline {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A header value made for one request (a request id, a `traceparent`, a timeout), marked
/// sensitive so that HTTP/2 sends it "never indexed": a value that is new on every request
/// would only churn the HPACK tables of both ends.
///
/// A value of up to 64 bytes is one allocation that clones share: a retry layer that keeps a
/// copy of the request's headers clones it without allocating (a value made by
/// [`HeaderValue::from_bytes`] allocates again on its first clone). `None` when `bytes` is not a
/// valid header value.
///
/// ```
/// let value = keel_core::header::per_call_value(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
///     .unwrap();
/// assert!(value.is_sensitive());
/// assert_eq!(value.len(), 55);
/// assert_eq!(value.clone(), value);
/// ```
pub fn per_call_value(bytes: &[u8]) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_maybe_shared(shared_bytes(bytes)).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A copy of `bytes` that clones share: one allocation for up to 64 bytes, where
/// [`Bytes::copy_from_slice`] allocates again on its first clone. For per-request values that
/// a retry layer's copy of the request clones (header values, the request path).
///
/// ```
/// let path = keel_core::header::shared_bytes(b"/accounts/7");
/// assert_eq!(path.clone(), &b"/accounts/7"[..]);
/// ```
pub fn shared_bytes(bytes: &[u8]) -> Bytes {
    if bytes.len() <= INLINE {
        let mut buf = [0u8; INLINE];
        buf[..bytes.len()].copy_from_slice(bytes);
        Bytes::from_owner(Inline {
            buf,
            len: bytes.len(),
        })
    } else {
        Bytes::copy_from_slice(bytes)
    }
}

/// Writes `bytes` as lowercase hex into the start of `out` (which must hold twice as many
/// bytes; the rest is left alone), without the formatting machinery: for ids formatted on every
/// request.
///
/// ```
/// let mut out = [0u8; 4];
/// keel_core::header::hex_into(&mut out, &[0x0a, 0xf7]);
/// assert_eq!(&out, b"0af7");
/// ```
pub fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_values_and_invalid_bytes() {
        let short = per_call_value(b"abc").unwrap();
        assert_eq!(short, "abc");
        assert!(short.is_sensitive());
        let long = "x".repeat(100);
        let value = per_call_value(long.as_bytes()).unwrap();
        assert_eq!(value, long.as_str());
        assert!(value.is_sensitive());
        assert!(per_call_value(b"bad\nvalue").is_none());
    }
}
