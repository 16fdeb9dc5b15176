//! Payload codecs (JSON with serde, protobuf with prost) and typed publishing / handling.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use crate::consumer::Handler;
use crate::error::{BoxError, HandlerError, PublishError};
use crate::headers::{self, Headers};
use crate::message::{OutgoingMessage, Receipt, Received};
use crate::publisher::Publisher;

/// Turns values into payloads and back.
pub trait Codec: Send + Sync + 'static {
    /// The value type.
    type Value: Send + 'static;
    /// The media type written to the `content-type` header.
    fn content_type(&self) -> &'static str;
    /// Encodes a value.
    ///
    /// # Errors
    /// When the value cannot be encoded.
    fn encode(&self, value: &Self::Value) -> Result<Vec<u8>, BoxError>;
    /// Decodes a payload.
    ///
    /// # Errors
    /// When the payload is not a valid encoding (the message is then dead-lettered).
    fn decode(&self, payload: &[u8]) -> Result<Self::Value, BoxError>;
}

/// JSON via serde (`application/json`).
pub struct Json<T>(PhantomData<fn() -> T>);

/// Protobuf via prost (`application/x-protobuf`).
pub struct Protobuf<T>(PhantomData<fn() -> T>);

macro_rules! marker_impls {
    ($name:ident) => {
        impl<T> $name<T> {
            /// The codec.
            pub fn new() -> Self {
                Self(PhantomData)
            }
        }
        impl<T> Default for $name<T> {
            fn default() -> Self {
                Self::new()
            }
        }
        impl<T> Clone for $name<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $name<T> {}
        impl<T> fmt::Debug for $name<T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "<"))?;
                f.write_str(std::any::type_name::<T>())?;
                f.write_str(">")
            }
        }
    };
}
marker_impls!(Json);
marker_impls!(Protobuf);

impl<T> Codec for Json<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    type Value = T;

    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode(&self, value: &T) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(value)?)
    }

    fn decode(&self, payload: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

impl<T> Codec for Protobuf<T>
where
    T: prost::Message + Default + Send + 'static,
{
    type Value = T;

    fn content_type(&self) -> &'static str {
        "application/x-protobuf"
    }

    fn encode(&self, value: &T) -> Result<Vec<u8>, BoxError> {
        Ok(value.encode_to_vec())
    }

    fn decode(&self, payload: &[u8]) -> Result<T, BoxError> {
        Ok(T::decode(payload)?)
    }
}

/// A payload that could not be decoded: the message is dead-lettered at once.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {content_type} payload: {source}")]
pub struct DecodeError {
    content_type: &'static str,
    #[source]
    source: BoxError,
}

/// A publisher of values of one type to one destination.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use keel_messaging::{Json, Publisher, TypedPublisher};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Paid { amount_minor: i64 }
///
/// let publisher = Publisher::connect("kafka://127.0.0.1:9092").await?;
/// let paid = TypedPublisher::new(publisher, "payments", Json::<Paid>::new());
/// paid.publish(Some(b"acct-1"), &Paid { amount_minor: 1250 }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TypedPublisher<C> {
    publisher: Publisher,
    destination: String,
    codec: C,
}

/// Why a typed publish failed.
#[derive(Debug, thiserror::Error)]
pub enum TypedPublishError {
    /// The value could not be encoded (nothing was sent).
    #[error("cannot encode the message: {0}")]
    Encode(#[source] BoxError),
    /// The broker did not confirm it; the encoded message is handed back.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl<C: Codec> TypedPublisher<C> {
    /// Values encoded with `codec`, published to `destination`.
    pub fn new(publisher: Publisher, destination: impl Into<String>, codec: C) -> Self {
        Self {
            publisher,
            destination: destination.into(),
            codec,
        }
    }

    /// Encodes `value` and publishes it, waiting for the broker's confirmation.
    ///
    /// # Errors
    /// [`TypedPublishError`]: encoding failed, or the publish was not confirmed.
    pub async fn publish(
        &self,
        key: Option<&[u8]>,
        value: &C::Value,
    ) -> Result<Receipt, TypedPublishError> {
        let message = self.message(key, value, Headers::new())?;
        Ok(self.publisher.send(message).await?)
    }

    /// The encoded message, with its `content-type` header, ready for [`Publisher::send`] or
    /// [`Publisher::send_batch`].
    ///
    /// # Errors
    /// When the value cannot be encoded.
    pub fn message(
        &self,
        key: Option<&[u8]>,
        value: &C::Value,
        mut headers: Headers,
    ) -> Result<OutgoingMessage, TypedPublishError> {
        let payload = self
            .codec
            .encode(value)
            .map_err(TypedPublishError::Encode)?;
        headers.insert(headers::CONTENT_TYPE, self.codec.content_type());
        Ok(OutgoingMessage {
            destination: self.destination.clone(),
            key: key.map(<[u8]>::to_vec),
            payload,
            headers,
        })
    }

    /// The underlying publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }
}

/// A handler of decoded values: see [`typed`].
pub struct Typed<C, F> {
    codec: C,
    handler: F,
}

impl<C: fmt::Debug, F> fmt::Debug for Typed<C, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

/// Wraps `handler(value, message)` into a [`Handler`] that decodes each payload with `codec`
/// first. A payload that does not decode (or whose `content-type` names another codec) is
/// dead-lettered at once with the decode error as its reason.
pub fn typed<C, F, Fut>(codec: C, handler: F) -> Typed<C, F>
where
    C: Codec,
    F: Fn(C::Value, Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    Typed { codec, handler }
}

impl<C, F, Fut> Handler for Typed<C, F>
where
    C: Codec,
    F: Fn(C::Value, Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(&self, message: Received) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let content_type = self.codec.content_type();
        let decoded = match message.headers.get_str(headers::CONTENT_TYPE) {
            Some(ct) if !ct.eq_ignore_ascii_case(content_type) => Err(DecodeError {
                content_type,
                source: format!("content-type is {ct}").into(),
            }),
            _ => self
                .codec
                .decode(&message.payload)
                .map_err(|source| DecodeError {
                    content_type,
                    source,
                }),
        };
        let fut = decoded.map(|value| (self.handler)(value, message));
        async move {
            match fut {
                Ok(fut) => fut.await,
                Err(e) => Err(HandlerError::permanent(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Paid {
        #[prost(int64, tag = "1")]
        amount: i64,
    }

    #[test]
    fn codecs_round_trip_and_reject_garbage() {
        let json = Json::<serde_json::Value>::new();
        let v = serde_json::json!({"seq": 1});
        assert_eq!(json.decode(&json.encode(&v).unwrap()).unwrap(), v);
        assert!(json.decode(b"{not json").is_err());
        let pb = Protobuf::<Paid>::new();
        let p = Paid { amount: 42 };
        assert_eq!(pb.decode(&pb.encode(&p).unwrap()).unwrap(), p);
        assert!(pb.decode(&[0xff, 0xff, 0xff]).is_err());
    }

    fn msg(payload: &[u8], ct: Option<&str>) -> Received {
        let mut headers = Headers::new();
        if let Some(ct) = ct {
            headers.insert(headers::CONTENT_TYPE, ct);
        }
        Received {
            destination: "d".into(),
            key: None,
            payload: bytes::Bytes::copy_from_slice(payload),
            headers,
            partition: None,
            offset: None,
            redelivered: false,
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn typed_handler_decodes_or_fails_permanently() {
        let h = typed(Json::<serde_json::Value>::new(), |v, _m| async move {
            if v["seq"] == 1 {
                Ok(())
            } else {
                Err(HandlerError::retry("not one"))
            }
        });
        assert!(
            h.handle(msg(br#"{"seq":1}"#, Some("application/json")))
                .await
                .is_ok()
        );
        assert!(
            h.handle(msg(br#"{"seq":2}"#, None))
                .await
                .unwrap_err()
                .is_retryable()
        );
        let poison = h.handle(msg(b"\x00garbage", None)).await.unwrap_err();
        assert!(!poison.is_retryable());
        assert!(poison.to_string().contains("cannot decode"), "{poison}");
        let wrong = h
            .handle(msg(br#"{"seq":1}"#, Some("text/plain")))
            .await
            .unwrap_err();
        assert!(!wrong.is_retryable());
    }
}
