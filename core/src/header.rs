//! Header values made per request.

use bytes::Bytes;
use http::HeaderValue;

/// The longest value [`shared_bytes`] keeps in one allocation.
const INLINE: usize = 64;

/// `len` bytes inline: the one allocation behind a [`shared_bytes`] or a [`per_call_values`]
/// (`N` is the size class: 16, 32, 64, 96 or 128).
struct Inline<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `parts` one after the other in an [`Inline<N>`] (their total length must be at most `N`).
fn inline<const N: usize>(parts: &[&[u8]]) -> Bytes {
    let mut buf = [0u8; N];
    let mut len = 0;
    for part in parts {
        buf[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    Bytes::from_owner(Inline { buf, len })
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
    sensitive(shared_bytes(bytes))
}

/// `bytes` as a header value marked sensitive; `None` when it is not a valid one.
fn sensitive(bytes: Bytes) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_maybe_shared(bytes).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// [`per_call_value`] for several values made together, e.g. a request id and a
/// `traceparent`: all in one allocation (of up to 128 bytes together; longer ones get one
/// each), which their clones share. `None` when any of them is not a valid header value.
///
/// ```
/// let [id, tp] = keel_core::header::per_call_values([
///     &b"5f1c0a9e23d84b7a9c1e6f0b4d2a8c31"[..],
///     b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
/// ])
/// .unwrap();
/// assert!(id.is_sensitive() && tp.is_sensitive());
/// assert_eq!(tp.len(), 55);
/// ```
pub fn per_call_values<const N: usize>(parts: [&[u8]; N]) -> Option<[HeaderValue; N]> {
    const JOINED: usize = 128;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut invalid = false;
    let mut valid = |value: Option<HeaderValue>| {
        value.unwrap_or_else(|| {
            invalid = true;
            HeaderValue::from_static("")
        })
    };
    let values = if total > JOINED {
        parts.map(|part| valid(per_call_value(part)))
    } else {
        let joined = if total <= 96 {
            inline::<96>(&parts)
        } else {
            inline::<JOINED>(&parts)
        };
        let mut at = 0;
        parts.map(|part| {
            let slice = joined.slice(at..at + part.len());
            at += part.len();
            valid(sensitive(slice))
        })
    };
    (!invalid).then_some(values)
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
    match bytes.len() {
        0..=16 => inline::<16>(&[bytes]),
        17..=32 => inline::<32>(&[bytes]),
        33..=INLINE => inline::<INLINE>(&[bytes]),
        _ => Bytes::copy_from_slice(bytes),
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

    #[test]
    fn every_size_class_keeps_the_bytes() {
        for len in [0, 1, 16, 17, 32, 33, 64, 65, 200] {
            let bytes: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let shared = shared_bytes(&bytes);
            assert_eq!(shared, bytes, "len {len}");
            assert_eq!(shared.clone(), bytes, "len {len}");
        }
        for total in [95, 96, 97, 128, 129] {
            let a = vec![b'x'; total / 2];
            let b = vec![b'y'; total - total / 2];
            let [va, vb] = per_call_values([&a[..], &b[..]]).unwrap();
            assert_eq!(
                (va.as_bytes(), vb.as_bytes()),
                (&a[..], &b[..]),
                "total {total}"
            );
        }
    }

    #[test]
    fn values_made_together_keep_their_bounds() {
        let [a, b, c] = per_call_values([&b"abc"[..], b"", b"0123456789"]).unwrap();
        assert_eq!((a.as_bytes(), b.as_bytes()), (&b"abc"[..], &b""[..]));
        assert_eq!(c, "0123456789");
        assert!(c.is_sensitive());
        let long = "y".repeat(100);
        let [x, y] = per_call_values([long.as_bytes(), long.as_bytes()]).unwrap();
        assert_eq!(x, long.as_str());
        assert_eq!(y, long.as_str());
        assert!(y.is_sensitive());
        assert!(per_call_values([&b"ok"[..], b"bad\nvalue"]).is_none());
    }
}
