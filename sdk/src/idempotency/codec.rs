//! The compact binary form of a [`Record`] that a remote store writes (Redis strings are binary
//! safe): `K`, a version byte, a tag, then the fields with big-endian length prefixes.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::record::{Fingerprint, Lease, Record, StoredResponse};

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
                out.extend_from_slice(lease.token());
                out.extend_from_slice(lease.fingerprint().as_bytes());
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
                let fingerprint = Fingerprint::from_bytes(r.array::<32>()?);
                Self::InFlight(Lease::from_parts(token, fingerprint))
            }
            COMPLETED => {
                let fingerprint = Fingerprint::from_bytes(r.array::<32>()?);
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
        if count > MAX_HEADERS {
            return Err(DecodeError("too many headers"));
        }
        // Each header takes at least 8 bytes: do not let a corrupt count reserve memory.
        let mut headers = HeaderMap::try_with_capacity(count.min(self.0.len() / 8))
            .map_err(|_| DecodeError("too many headers"))?;
        for _ in 0..count {
            let name =
                HeaderName::from_bytes(self.bytes()?).map_err(|_| DecodeError("bad header"))?;
            let value =
                HeaderValue::from_bytes(self.bytes()?).map_err(|_| DecodeError("bad header"))?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError("too many headers"))?;
        }
        Ok(headers)
    }
}

/// The most headers (or trailers) a record may hold: far more than any response has, far fewer
/// than a header map can (it panics past its limit when told to reserve more). The layer keeps
/// no response with more.
const MAX_HEADERS: usize = super::MAX_STORED_HEADERS;

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

    /// A record with more headers than a header map holds (30 000 of them, each present) is an
    /// error, not the panic of the map reserving or growing past its limit.
    #[test]
    fn a_record_with_too_many_headers_is_an_error_not_a_panic() {
        let mut record = vec![MAGIC, VERSION, COMPLETED];
        record.extend_from_slice(&[0; 32]);
        record.extend_from_slice(&200u16.to_be_bytes());
        let count = 30_000u32;
        record.extend_from_slice(&count.to_be_bytes());
        for i in 0..count {
            let name = format!("x-{i}");
            record.extend_from_slice(&(name.len() as u32).to_be_bytes());
            record.extend_from_slice(name.as_bytes());
            record.extend_from_slice(&1u32.to_be_bytes());
            record.push(b'v');
        }
        assert!(Record::decode(&record).is_err());
    }
}
