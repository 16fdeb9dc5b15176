//! Kafka record headers read through librdkafka's C API.
//!
//! rdkafka 0.39's `Headers::get` / `iter` turn each header name into a `&str` with
//! `to_str().unwrap()`, so a record whose header name is not UTF-8 — which any producer can
//! write and no broker checks — panics the task reading it. This reads names as bytes instead.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};

use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, Headers as _};
use rdkafka::types::RDKafkaRespErr;

/// One record header as stored: the name's bytes (not necessarily UTF-8; librdkafka keeps names
/// NUL-terminated, so a name is read up to its first NUL byte) and the value (`None`: null).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawHeader<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) value: Option<&'a [u8]>,
}

/// The headers of `headers`, in order, names as bytes.
pub(crate) fn raw_headers(headers: &BorrowedHeaders) -> Vec<RawHeader<'_>> {
    // `BorrowedHeaders` is rdkafka's zero-sized view of a `rd_kafka_headers_t`: a reference to it
    // is the native pointer (rdkafka converts it the same way).
    let native = std::ptr::from_ref(headers).cast::<rd_kafka_headers_t>();
    let count = headers.count();
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `native` points to the live headers `headers` borrows; `idx < count`; the
        // out-pointers are valid for writes.
        let err = unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka stores every header name NUL-terminated, inside the headers
        // object, which lives (unchanged) as long as the `headers` borrow.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = if value.is_null() {
            None
        } else {
            // SAFETY: librdkafka returns the value's pointer and its size in bytes, inside the
            // headers object, which lives (unchanged) as long as the `headers` borrow.
            Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        };
        out.push(RawHeader { name, value });
    }
    out
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders};

    use super::*;

    #[test]
    fn reads_names_and_values_as_stored() {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some("1"),
            })
            .insert(Header {
                key: "b",
                value: None::<&[u8]>,
            });
        let raw = raw_headers(h.as_borrowed());
        assert_eq!(
            raw,
            [
                RawHeader {
                    name: b"a",
                    value: Some(b"1")
                },
                RawHeader {
                    name: b"b",
                    value: None
                }
            ]
        );
    }
}
