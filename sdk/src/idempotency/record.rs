//! What a store keeps per key.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

/// The SHA-256 of what makes two requests with one key "the same request": the query string
/// and the body.
///
/// A repeat of a key whose fingerprint differs is rejected instead of replayed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request with this query string (without `?`) and body.
    pub fn of(query: Option<&str>, body: &[u8]) -> Self {
        let mut hash = Sha256::new();
        let query = query.unwrap_or_default().as_bytes();
        hash.update((query.len() as u64).to_be_bytes());
        hash.update(query);
        hash.update(body);
        Self(hash.finalize().into())
    }

    /// A fingerprint from its 32 bytes (as read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the fingerprint.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex(&self.0[..8]))
    }
}

/// One holder's claim on a key: a random token plus the fingerprint of the request it runs.
///
/// Renewing, completing and releasing compare the stored claim with this one, so an instance
/// never completes or deletes a claim that another instance holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    token: [u8; 16],
    fingerprint: Fingerprint,
}

impl Lease {
    /// A new claim with a random token for a request with `fingerprint`.
    pub fn new(fingerprint: Fingerprint) -> Self {
        Self {
            token: *uuid::Uuid::new_v4().as_bytes(),
            fingerprint,
        }
    }

    /// A claim read back from a store.
    #[cfg(any(feature = "redis", test))]
    pub(crate) const fn from_parts(token: [u8; 16], fingerprint: Fingerprint) -> Self {
        Self { token, fingerprint }
    }

    /// The claim's random token.
    pub const fn token(&self) -> &[u8; 16] {
        &self.token
    }

    /// The fingerprint of the request that holds the claim.
    pub const fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("token", &hex(&self.token))
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// A response as stored for replay: status, headers, the whole body and (for gRPC) trailers.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The response headers (hop-by-hop headers removed).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, if the response had any (gRPC: `grpc-status`, `grpc-message`).
    pub trailers: Option<HeaderMap>,
}

/// A key's state in a store.
#[allow(clippy::large_enum_variant)] // built and moved once per request
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// A request with this lease is executing.
    InFlight(Lease),
    /// The request with this fingerprint executed and answered this.
    Completed {
        fingerprint: Fingerprint,
        response: StoredResponse,
    },
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_separate_query_from_body() {
        assert_eq!(Fingerprint::of(None, b"x"), Fingerprint::of(Some(""), b"x"));
        assert_ne!(
            Fingerprint::of(Some("a"), b"b"),
            Fingerprint::of(Some("ab"), b"")
        );
        assert_ne!(Fingerprint::of(None, b"x"), Fingerprint::of(None, b"y"));
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
