//! Deadlines that travel downstream and shrink as time is spent.
//!
//! A [`Deadline`] in the request's extensions is the instant by which the whole call must be
//! done (a server puts the incoming one there with [`Deadline::from_headers`]). The
//! [`DeadlineService`] takes the sooner of that and its own timeout, fails at once with
//! [`DeadlineExceeded`] (nothing sent) if it has passed, and otherwise writes the *remaining*
//! time into the request for the next hop and fails the call when the deadline passes, also
//! while the response body is still being read (its [`ResponseBody`] then ends with
//! [`DeadlineExceeded`]):
//!
//! * gRPC: `grpc-timeout`, in the gRPC wire format (at most 8 digits and a unit, e.g. `799m`
//!   for 799 ms, `950u` below a millisecond; rounded down).
//! * REST: `x-keel-deadline`, the remaining time as a decimal integer of **milliseconds**,
//!   rounded down (e.g. `x-keel-deadline: 799`). A relative value needs no clock agreement
//!   between hosts.
//!
//! The retry layer re-stamps whichever header is present before each attempt, so a retry
//! carries the time actually left, and it never sleeps past the deadline.

mod body;
mod error;
mod future;
mod layer;

use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;
use tower_service::Service;

pub use body::ResponseBody;
pub use error::DeadlineExceeded;
pub use future::ResponseFuture;
pub use layer::DeadlineLayer;

use crate::BoxError;

/// The gRPC deadline header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// Keel's REST deadline header (remaining milliseconds).
pub const KEEL_DEADLINE: HeaderName = HeaderName::from_static("x-keel-deadline");

/// The instant by which a call must complete (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(pub Instant);

/// The longest time ahead a deadline is set: a longer timeout (`Duration::MAX`, a common way to
/// say "none") means this, instead of overflowing the clock.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + timeout`, with `timeout` capped at [`MAX_TIMEOUT`].
fn after(now: Instant, timeout: Duration) -> Instant {
    now + timeout.min(MAX_TIMEOUT)
}

impl Deadline {
    /// `timeout` from now (at most [`MAX_TIMEOUT`]).
    pub fn after(timeout: Duration) -> Self {
        Self(after(Instant::now(), timeout))
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Reads an incoming deadline from `grpc-timeout` or `x-keel-deadline`, relative to now.
    /// Malformed values are ignored.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let now = Instant::now();
        if let Some(d) = headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
        {
            return Some(Self(after(now, d)));
        }
        headers
            .get(KEEL_DEADLINE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|ms| Self(after(now, Duration::from_millis(ms))))
    }
}

/// Which header carries the deadline downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `grpc-timeout` when the request's `content-type` starts with `application/grpc`, else
    /// `x-keel-deadline`.
    #[default]
    Auto,
    /// Always `grpc-timeout`.
    Grpc,
    /// Always `x-keel-deadline`.
    Rest,
}

/// Formats a gRPC `TimeoutValue`: at most 8 digits and a unit, rounded down.
pub fn format_grpc_timeout(remaining: Duration) -> String {
    let mut buf = [0u8; 24];
    let len = write_grpc_timeout(&mut buf, remaining);
    String::from_utf8(buf[..len].to_vec()).unwrap_or_default()
}

/// Parses a gRPC `TimeoutValue` (`799m`, `1S`, `100u`, …).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes the time left until `deadline` into `headers`, in the header that `protocol` (or, for
/// [`Protocol::Auto`], the content type) selects.
pub fn stamp(headers: &mut HeaderMap, deadline: Deadline, protocol: Protocol) {
    let remaining = deadline.remaining();
    let grpc = match protocol {
        Protocol::Grpc => true,
        Protocol::Rest => false,
        Protocol::Auto => {
            headers.contains_key(GRPC_TIMEOUT)
                || headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|ct| ct.starts_with("application/grpc"))
        }
    };
    // Formatted on the stack: the header value is the call's only allocation here.
    let mut buf = [0u8; 24];
    let (name, len) = if grpc {
        (GRPC_TIMEOUT, write_grpc_timeout(&mut buf, remaining))
    } else {
        let ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        (KEEL_DEADLINE, write_u64(&mut buf, ms))
    };
    // Changes from call to call: sent never-indexed over HTTP/2 (the retry layer does not
    // keep it, it stamps each retry afresh).
    if let Some(value) = keel_core::header::per_call_value(&buf[..len]) {
        headers.insert(name, value);
    }
}

/// Re-stamps the deadline headers `headers` carries (`grpc-timeout`, `x-keel-deadline`) with
/// the time left until `deadline`, for a request that waited after it was stamped (for its
/// connection to be dialled, say): a propagated deadline must never overstate the time left.
///
/// # Errors
/// [`DeadlineExceeded`] (expired before sending) when no time is left: send nothing.
pub fn restamp(headers: &mut HeaderMap, deadline: Deadline) -> Result<(), DeadlineExceeded> {
    if deadline.remaining().is_zero() {
        return Err(DeadlineExceeded::before_send());
    }
    for (name, protocol) in [
        (GRPC_TIMEOUT, Protocol::Grpc),
        (KEEL_DEADLINE, Protocol::Rest),
    ] {
        if headers.contains_key(&name) {
            stamp(headers, deadline, protocol);
        }
    }
    Ok(())
}

/// Writes `n` in decimal at the start of `buf` (20 bytes suffice for any `u64`); returns the
/// length.
fn write_u64(buf: &mut [u8; 24], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    buf[..len].copy_from_slice(&digits[i..]);
    len
}

/// [`format_grpc_timeout`] into `buf` (at most 9 bytes); returns the length.
fn write_grpc_timeout(buf: &mut [u8; 24], remaining: Duration) -> usize {
    const MAX: u128 = 99_999_999;
    let ms = remaining.as_millis();
    let (value, unit) = if ms == 0 {
        let us = remaining.as_micros();
        if us == 0 {
            (remaining.as_nanos(), b'n')
        } else {
            (us, b'u')
        }
    } else if ms <= MAX {
        (ms, b'm')
    } else {
        let secs = remaining.as_secs();
        if u128::from(secs) <= MAX {
            (u128::from(secs), b'S')
        } else {
            (u128::from((secs / 60).min(99_999_999)), b'M')
        }
    };
    // Every branch is at most 8 digits (nanoseconds and microseconds below 1 ms are < 10^6).
    let len = write_u64(buf, u64::try_from(value).unwrap_or(99_999_999));
    buf[len] = unit;
    len + 1
}

/// The protocol whose deadline header `name` is ([`stamp`] writes `grpc-timeout` for
/// [`Protocol::Grpc`] and `x-keel-deadline` for [`Protocol::Rest`]); `None` for other headers.
pub(crate) fn stamped_by(name: &HeaderName) -> Option<Protocol> {
    if *name == GRPC_TIMEOUT {
        Some(Protocol::Grpc)
    } else if *name == KEEL_DEADLINE {
        Some(Protocol::Rest)
    } else {
        None
    }
}

/// Enforces and propagates a call deadline; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    timeout: Option<Duration>,
    protocol: Protocol,
}

impl<S> DeadlineService<S> {
    /// Wraps `inner` with a `timeout` per call.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout: Some(timeout),
            protocol: Protocol::Auto,
        }
    }
}

impl<S, B, ResB> Service<http::Request<B>> for DeadlineService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let now = Instant::now();
        let own = self.timeout.map(|t| Deadline(after(now, t)));
        let incoming = req.extensions().get::<Deadline>().copied();
        let deadline = match (own, incoming) {
            (Some(a), Some(b)) => a.min(b),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => return ResponseFuture::new(self.inner.call(req), None),
        };
        if deadline.0 <= now {
            return ResponseFuture::expired();
        }
        req.extensions_mut().insert(deadline);
        stamp(req.headers_mut(), deadline, self.protocol);
        ResponseFuture::new(self.inner.call(req), Some(deadline.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_format_round_trips() {
        assert_eq!(format_grpc_timeout(Duration::from_millis(799)), "799m");
        assert_eq!(format_grpc_timeout(Duration::from_micros(799_900)), "799m");
        assert_eq!(format_grpc_timeout(Duration::from_micros(950)), "950u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(format_grpc_timeout(Duration::from_nanos(7)), "7n");
        assert_eq!(format_grpc_timeout(Duration::ZERO), "0n");
        assert_eq!(format_grpc_timeout(Duration::from_millis(5000)), "5000m");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(100_000_000 * 60)),
            "99999999M"
        );
        assert_eq!(parse_grpc_timeout("799m"), Some(Duration::from_millis(799)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "max 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("1\u{e9}"), None, "not ASCII: no panic");
    }

    /// `Duration::MAX` — a common way to say "no timeout" — is a deadline far ahead, not an
    /// overflow of the clock (a panic on every call).
    #[tokio::test]
    async fn the_longest_timeout_is_far_ahead() {
        let far = Deadline::after(Duration::MAX);
        assert!(far.remaining() > Duration::from_secs(99 * 365 * 24 * 3600));
        let mut headers = HeaderMap::new();
        stamp(&mut headers, far, Protocol::Grpc);
        stamp(&mut headers, far, Protocol::Rest);
        let back = Deadline::from_headers(&headers).unwrap();
        assert!(back.remaining() > Duration::from_secs(99 * 365 * 24 * 3600));

        let svc = tower::ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::MAX))
            .service(tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(()))
            }));
        let response = tower::ServiceExt::oneshot(svc, http::Request::new(())).await;
        assert!(response.is_ok());
    }

    #[test]
    fn stamped_deadline_is_never_indexed() {
        let mut headers = HeaderMap::new();
        stamp(
            &mut headers,
            Deadline::after(Duration::from_secs(5)),
            Protocol::Grpc,
        );
        let value = &headers[GRPC_TIMEOUT];
        let left = value.to_str().ok().and_then(parse_grpc_timeout);
        assert!(
            left.is_some_and(|d| d <= Duration::from_secs(5)),
            "{value:?}"
        );
        assert!(value.is_sensitive());
    }

    #[tokio::test(start_paused = true)]
    async fn restamp_says_the_time_left_now_in_the_headers_present() {
        let deadline = Deadline::after(Duration::from_millis(800));
        let mut grpc = HeaderMap::new();
        stamp(&mut grpc, deadline, Protocol::Grpc);
        let mut rest = HeaderMap::new();
        stamp(&mut rest, deadline, Protocol::Rest);
        let mut neither = HeaderMap::new();
        tokio::time::advance(Duration::from_millis(700)).await;
        restamp(&mut grpc, deadline).unwrap();
        restamp(&mut rest, deadline).unwrap();
        restamp(&mut neither, deadline).unwrap();
        assert_eq!(grpc[GRPC_TIMEOUT].to_str().unwrap(), "100m");
        assert!(!grpc.contains_key(KEEL_DEADLINE));
        assert_eq!(rest[KEEL_DEADLINE].to_str().unwrap(), "100");
        assert!(!rest.contains_key(GRPC_TIMEOUT));
        assert!(neither.is_empty());
        tokio::time::advance(Duration::from_millis(100)).await;
        let err = restamp(&mut grpc, deadline).unwrap_err();
        assert!(err.is_expired_before_send());
    }
}
