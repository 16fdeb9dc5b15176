use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::BoxError;
use crate::deadline::Deadline;

pin_project! {
    /// The request body the retry layer sends: either a buffered body (replayable) or the
    /// caller's streaming body (sent once, never replayed).
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
        deadline: Option<Instant>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // Trailers boxed: rare on requests, and this body is moved with every request.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        Stream { prefix: Option<Bytes>, error: Option<BoxError>, #[pin] rest: B },
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full { data, .. } => f
                .debug_struct("ReplayBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream { .. } => f.write_str("ReplayBody::Stream"),
        }
    }
}

impl<B> ReplayBody<B> {
    /// A body of `data` (and optional trailers).
    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::buffered(data, trailers.map(Box::new))
    }

    pub(crate) fn buffered(data: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
            deadline: None,
        }
    }

    /// The caller's body, sent as it is (never replayed).
    pub(crate) fn once(body: B) -> Self {
        Self::stream(None, None, body)
    }

    fn stream(prefix: Option<Bytes>, error: Option<BoxError>, rest: B) -> Self {
        Self {
            kind: Kind::Stream {
                prefix: prefix.filter(|p| !p.is_empty()),
                error,
                rest,
            },
            deadline: None,
        }
    }

    /// This attempt's body, telling the services below the call's deadline.
    pub(crate) fn with_deadline(mut self, deadline: Option<Deadline>) -> Self {
        self.deadline = deadline.map(|d| d.0);
        self
    }

    /// The call's [`Deadline`], if it has one: the services below the retry layer (a
    /// balancer, say) learn from it whether a call they see dropped was given up because its
    /// deadline passed — a provider that never answers must count against its endpoint.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether this body would be replayed on a retry (it was buffered whole).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Full { .. })
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            KindProj::Stream {
                prefix,
                error,
                rest,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                rest.poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream {
                prefix,
                error,
                rest,
            } => prefix.is_none() && error.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { prefix, rest, .. } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
        }
    }
}

/// The outcome of trying to buffer a request body.
pub(crate) enum Collected {
    /// The whole body, within the cap.
    Whole {
        data: Bytes,
        trailers: Option<Box<HeaderMap>>,
    },
    /// Too large, failed, or not immediately available: send once, as what was read so far
    /// (`prefix`, then `error` if reading failed) followed by the rest of the body.
    Partial {
        prefix: Option<Bytes>,
        error: Option<BoxError>,
    },
}

impl Collected {
    /// The body to send: buffered, or the rest of `body` after what was read.
    pub(crate) fn into_body<B>(self, body: B) -> ReplayBody<B> {
        match self {
            Collected::Whole { data, trailers } => ReplayBody::buffered(data, trailers),
            Collected::Partial { prefix, error } => ReplayBody::stream(prefix, error, body),
        }
    }
}

/// Buffers `body` if it is complete *without waiting* and at most `cap` bytes. A body that is
/// still being produced (it returns `Pending`) is a stream and is sent as is, never replayed;
/// this is what keeps client-streaming calls from being buffered or replayed, while a unary
/// gRPC request (encoded in one go) or an in-memory REST body is buffered.
///
/// The body is read in place: after [`Collected::Partial`] it holds the rest of the stream.
pub(crate) fn collect<B>(body: &mut B, cap: usize) -> Collected
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Collected::Whole {
            data: Bytes::new(),
            trailers: None,
        };
    }
    if body.size_hint().lower() > cap as u64 {
        return Collected::Partial {
            prefix: None,
            error: None,
        };
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let joined = |first: Option<Bytes>, more: Option<BytesMut>| match more {
        Some(m) => Some(m.freeze()),
        None => first,
    };
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let len = first.as_ref().map_or(0, Bytes::len)
                        + more.as_ref().map_or(0, BytesMut::len)
                        + data.len();
                    if let Some(m) = more.as_mut() {
                        m.extend_from_slice(&data);
                    } else if let Some(f) = first.take() {
                        let mut m = BytesMut::with_capacity(len);
                        m.extend_from_slice(&f);
                        m.extend_from_slice(&data);
                        more = Some(m);
                    } else {
                        first = Some(data);
                    }
                    if len > cap {
                        return Collected::Partial {
                            prefix: joined(first, more),
                            error: None,
                        };
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok().map(Box::new);
                    return Collected::Whole {
                        data: joined(first, more).unwrap_or_default(),
                        trailers,
                    };
                }
            },
            Poll::Ready(Some(Err(err))) => {
                return Collected::Partial {
                    prefix: joined(first, more),
                    error: Some(err.into()),
                };
            }
            Poll::Ready(None) => {
                return Collected::Whole {
                    data: joined(first, more).unwrap_or_default(),
                    trailers: None,
                };
            }
            Poll::Pending => {
                return Collected::Partial {
                    prefix: joined(first, more),
                    error: None,
                };
            }
        }
    }
}
