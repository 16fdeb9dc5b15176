//! What a store keeps per key, and the compact binary form a remote store writes.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
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

/// A stored record that cannot be read back (another format, or truncated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable idempotency record: {0}")]
pub(crate) struct DecodeError(&'static str);

const MAGIC: u8 = b'K';
const VERSION: u8 = 1;
const IN_FLIGHT: u8 = 1;
const COMPLETED: u8 = 2;

impl Record {
    /// The binary form: `K`, version 1, a tag, then the fields with big-endian length prefixes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Self::InFlight(lease) => {
                let mut out = Vec::with_capacity(3 + 16 + 32);
                out.extend_from_slice(&[MAGIC, VERSION, IN_FLIGHT]);
                out.extend_from_slice(&lease.token);
                out.extend_from_slice(lease.fingerprint.as_bytes());
                out
            }
            Self::Completed {
                fingerprint,
                response,
            } => {
                let mut out = Vec::with_capacity(64 + response.body.len());
                out.extend_from_slice(&[MAGIC, VERSION, COMPLETED]);
                out.extend_from_slice(fingerprint.as_bytes());
                out.extend_from_slice(&response.status.as_u16().to_be_bytes());
                put_headers(&mut out, &response.headers);
                put_bytes(&mut out, &response.body);
                match &response.trailers {
                    None => out.push(0),
                    Some(trailers) => {
                        out.push(1);
                        put_headers(&mut out, trailers);
                    }
                }
                out
            }
        }
    }

    /// Reads back what [`encode`](Self::encode) wrote.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(2)? != [MAGIC, VERSION] {
            return Err(DecodeError("unknown format or version"));
        }
        let record = match r.u8()? {
            IN_FLIGHT => {
                let token = r.array::<16>()?;
                let fingerprint = Fingerprint(r.array::<32>()?);
                Self::InFlight(Lease { token, fingerprint })
            }
            COMPLETED => {
                let fingerprint = Fingerprint(r.array::<32>()?);
                let status = StatusCode::from_u16(u16::from_be_bytes(r.array::<2>()?))
                    .map_err(|_| DecodeError("bad status"))?;
                let headers = r.headers()?;
                let body = Bytes::copy_from_slice(r.bytes()?);
                let trailers = match r.u8()? {
                    0 => None,
                    1 => Some(r.headers()?),
                    _ => return Err(DecodeError("bad trailers flag")),
                };
                Self::Completed {
                    fingerprint,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                        trailers,
                    },
                }
            }
            _ => return Err(DecodeError("unknown record kind")),
        };
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(record)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths above u32::MAX cannot occur: the layer never buffers that much.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    let count = u32::try_from(headers.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in headers.iter().take(count as usize) {
        put_bytes(out, name.as_str().as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?
            .try_into()
            .map_err(|_| DecodeError("truncated"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_be_bytes(self.array::<4>()?) as usize;
        self.take(len)
    }

    fn headers(&mut self) -> Result<HeaderMap, DecodeError> {
        let count = u32::from_be_bytes(self.array::<4>()?) as usize;
        // Each header takes at least 8 bytes: do not let a corrupt count reserve memory.
        let mut headers = HeaderMap::with_capacity(count.min(self.0.len() / 8));
        for _ in 0..count {
            let name =
                HeaderName::from_bytes(self.bytes()?).map_err(|_| DecodeError("bad header"))?;
            let value =
                HeaderValue::from_bytes(self.bytes()?).map_err(|_| DecodeError("bad header"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
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

    fn completed(trailers: Option<HeaderMap>) -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Record::Completed {
            fingerprint: Fingerprint::of(Some("a=1"), b"body"),
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers,
                body: Bytes::from_static(b"\x00\x01binary\xff"),
                trailers,
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        for record in [
            Record::InFlight(Lease::new(Fingerprint::of(None, b""))),
            completed(None),
            completed(Some(trailers)),
            completed(Some(HeaderMap::new())),
        ] {
            let bytes = record.encode();
            assert_eq!(Record::decode(&bytes), Ok(record));
        }
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let bytes = completed(None).encode();
        for n in 0..bytes.len() {
            assert!(Record::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        assert!(Record::decode(b"IN_PROGRESS").is_err());
        let mut huge_count = vec![MAGIC, VERSION, COMPLETED];
        huge_count.extend_from_slice(&[0; 32]);
        huge_count.extend_from_slice(&200u16.to_be_bytes());
        huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Record::decode(&huge_count).is_err());
    }

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
