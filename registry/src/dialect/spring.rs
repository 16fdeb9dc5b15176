//! Curator service discovery, as Spring Cloud Zookeeper writes it.
//!
//! `/<root>/<service>/<id>` is an EPHEMERAL node whose data is the UTF-8 JSON of a Curator
//! `ServiceInstance` with a Spring `ZookeeperInstance` payload. Field order, names and the
//! `@class` are exactly Spring's, so Java readers accept what Keel writes:
//!
//! ```
//! use keel_core::{Endpoint, ServiceInstance};
//! use keel_registry::dialect::spring;
//!
//! let instance = ServiceInstance::new("account", "a-1", Endpoint::new("10.0.0.5", 50051));
//! let json = spring::encode(&instance, 1_730_000_000_000).unwrap();
//! let back = spring::decode("/services/account/a-1", "account", &json).unwrap();
//! assert_eq!(back, instance);
//! ```
//!
//! Readers treat a missing `instance_status` as `UP`; `sslPort != null` means TLS on that port
//! (Keel writes TLS instances with `port: null` and `sslPort` set).

use std::collections::BTreeMap;

use keel_core::{Endpoint, InstanceStatus, ServiceInstance};
use serde::{Deserialize, Serialize};

use super::DecodeError;

/// The payload class Spring Cloud Zookeeper writes and reads.
pub const SPRING_PAYLOAD_CLASS: &str =
    "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance";

/// The metadata key Spring Cloud uses for the instance status.
pub const STATUS_KEY: &str = "instance_status";

#[derive(Serialize)]
struct InstanceOut<'a> {
    name: &'a str,
    id: &'a str,
    address: &'a str,
    port: Option<u16>,
    #[serde(rename = "sslPort")]
    ssl_port: Option<u16>,
    payload: PayloadOut<'a>,
    #[serde(rename = "registrationTimeUTC")]
    registration_time_utc: u64,
    #[serde(rename = "serviceType")]
    service_type: &'static str,
    #[serde(rename = "uriSpec")]
    uri_spec: UriSpec,
}

#[derive(Serialize)]
struct PayloadOut<'a> {
    #[serde(rename = "@class")]
    class: &'static str,
    id: &'a str,
    name: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct UriSpec {
    parts: [UriPart; 5],
}

#[derive(Serialize)]
struct UriPart {
    value: &'static str,
    variable: bool,
}

const URI_SPEC: UriSpec = UriSpec {
    parts: [
        UriPart {
            value: "scheme",
            variable: true,
        },
        UriPart {
            value: "://",
            variable: false,
        },
        UriPart {
            value: "address",
            variable: true,
        },
        UriPart {
            value: ":",
            variable: false,
        },
        UriPart {
            value: "port",
            variable: true,
        },
    ],
};

/// Encodes `instance` as Spring Cloud Zookeeper's JSON, registered at `registration_time_ms`
/// (milliseconds since the Unix epoch). The status goes into `metadata.instance_status`.
///
/// # Errors
/// A metadata key `instance_status` (it is reserved for the status).
pub fn encode(instance: &ServiceInstance, registration_time_ms: u64) -> Result<Vec<u8>, String> {
    if instance.metadata.contains_key(STATUS_KEY) {
        return Err(format!(
            "metadata key {STATUS_KEY:?} is reserved for the status"
        ));
    }
    let mut metadata: BTreeMap<&str, &str> = instance
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    metadata.insert(STATUS_KEY, instance.status.as_str());
    let (port, ssl_port) = if instance.tls {
        (None, Some(instance.endpoint.port))
    } else {
        (Some(instance.endpoint.port), None)
    };
    let out = InstanceOut {
        name: &instance.service,
        id: &instance.id,
        address: &instance.endpoint.host,
        port,
        ssl_port,
        payload: PayloadOut {
            class: SPRING_PAYLOAD_CLASS,
            id: &instance.service,
            name: &instance.service,
            metadata,
        },
        registration_time_utc: registration_time_ms,
        service_type: "DYNAMIC",
        uri_spec: URI_SPEC,
    };
    serde_json::to_vec(&out).map_err(|e| e.to_string())
}

#[derive(Deserialize)]
struct InstanceIn {
    id: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    #[serde(rename = "sslPort")]
    ssl_port: Option<i64>,
    payload: Option<PayloadIn>,
}

#[derive(Deserialize)]
struct PayloadIn {
    #[serde(rename = "@class")]
    class: Option<String>,
    metadata: Option<BTreeMap<String, serde_json::Value>>,
}

/// The `@class` of a node's payload, if the data is JSON with one (used to refuse registering
/// under a root that holds another framework's instances).
pub fn payload_class(data: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        payload: Option<PayloadIn>,
    }
    serde_json::from_slice::<Probe>(data).ok()?.payload?.class
}

/// Decodes the node at `path` (an instance of `service`) from its `data`.
///
/// The returned instance carries the status found in `metadata.instance_status` (`UP` when
/// missing); that key is not repeated in `metadata`.
///
/// # Errors
/// Data that is not JSON, lacks `id`, `address` or a port, has a port outside 1..=65535, an
/// unknown status, or a payload `@class` other than Spring's (a Dubbo 3 application-level
/// instance, say).
pub fn decode(path: &str, service: &str, data: &[u8]) -> Result<ServiceInstance, DecodeError> {
    let err = |reason: String| DecodeError::new(path, reason);
    let raw: InstanceIn =
        serde_json::from_slice(data).map_err(|e| err(format!("data is not Curator JSON: {e}")))?;
    let id = raw
        .id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("missing \"id\"".into()))?;
    let address = raw
        .address
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("missing \"address\"".into()))?;
    let port_of = |p: i64, field: &str| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err(format!("\"{field}\" {p} is not a port")))
    };
    let (port, tls) = match (raw.ssl_port, raw.port) {
        (Some(ssl), _) => (port_of(ssl, "sslPort")?, true),
        (None, Some(p)) => (port_of(p, "port")?, false),
        (None, None) => return Err(err("missing \"port\" and \"sslPort\"".into())),
    };
    let mut metadata = BTreeMap::new();
    let mut status = InstanceStatus::Up;
    if let Some(payload) = raw.payload {
        if let Some(class) = payload.class
            && class != SPRING_PAYLOAD_CLASS
        {
            return Err(err(format!("foreign payload class {class}")));
        }
        for (key, value) in payload.metadata.unwrap_or_default() {
            let value = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            if key == STATUS_KEY {
                status =
                    parse_status(&value).ok_or_else(|| err(format!("unknown status {value:?}")))?;
            } else {
                metadata.insert(key, value);
            }
        }
    }
    Ok(ServiceInstance {
        service: service.to_owned(),
        id,
        endpoint: Endpoint::new(address, port),
        tls,
        status,
        metadata,
    })
}

fn parse_status(s: &str) -> Option<InstanceStatus> {
    match s {
        "UP" => Some(InstanceStatus::Up),
        "OUT_OF_SERVICE" => Some(InstanceStatus::OutOfService),
        // Spring's other statuses (DOWN, STARTING, UNKNOWN) all mean: do not route here.
        "DOWN" | "STARTING" | "UNKNOWN" => Some(InstanceStatus::Down),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = concat!(
        r#"{"name":"account","id":"0b6c4b56-3f4e-4f0a-9d53-2d5f1c0e8a11","address":"10.0.0.5","port":50051,"sslPort":null,"#,
        r#""payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance","#,
        r#""id":"account","name":"account","metadata":{"instance_status":"UP","zone":"sh-a"}},"#,
        r#""registrationTimeUTC":1730000000000,"serviceType":"DYNAMIC","#,
        r#""uriSpec":{"parts":[{"value":"scheme","variable":true},{"value":"://","variable":false},"#,
        r#"{"value":"address","variable":true},{"value":":","variable":false},"#,
        r#"{"value":"port","variable":true}]}}"#
    );

    fn account() -> ServiceInstance {
        ServiceInstance::new(
            "account",
            "0b6c4b56-3f4e-4f0a-9d53-2d5f1c0e8a11",
            Endpoint::new("10.0.0.5", 50051),
        )
        .with_metadata("zone", "sh-a")
    }

    #[test]
    fn golden_bytes_match_spring_cloud() {
        let bytes = encode(&account(), 1_730_000_000_000).unwrap();
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), GOLDEN);
    }

    #[test]
    fn golden_decodes() {
        let got = decode("/services/account/x", "account", GOLDEN.as_bytes()).unwrap();
        assert_eq!(got, account());
    }

    #[test]
    fn tls_and_status_round_trip() {
        let i = account()
            .with_tls(true)
            .with_status(InstanceStatus::OutOfService);
        let bytes = encode(&i, 1).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""port":null,"sslPort":50051"#), "{text}");
        assert!(
            text.contains(r#""instance_status":"OUT_OF_SERVICE""#),
            "{text}"
        );
        assert_eq!(decode("/p", "account", &bytes).unwrap(), i);
    }

    #[test]
    fn reserved_status_key_is_refused() {
        assert!(encode(&account().with_metadata(STATUS_KEY, "UP"), 1).is_err());
    }

    #[test]
    fn missing_status_is_up_and_payload_is_optional() {
        let plain = br#"{"name":"account","id":"a","address":"h","port":1}"#;
        let got = decode("/p", "account", plain).unwrap();
        assert_eq!(got.status, InstanceStatus::Up);
        assert!(got.metadata.is_empty());
        let no_status = br#"{"id":"a","address":"h","port":1,"payload":{"metadata":{"zone":"z"}}}"#;
        assert_eq!(
            decode("/p", "account", no_status).unwrap().status,
            InstanceStatus::Up
        );
    }

    #[test]
    fn bad_data_is_an_error_naming_the_path() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            b"\xff\xfe",
            b"[1,2]",
            br#"{"address":"h","port":1}"#,
            br#"{"id":"a","port":1}"#,
            br#"{"id":"a","address":"h"}"#,
            br#"{"id":"a","address":"h","port":70000}"#,
            br#"{"id":"a","address":"h","port":-1}"#,
            br#"{"id":"a","address":"h","port":"80"}"#,
            br#"{"id":"a","address":"h","port":1,"payload":{"metadata":{"instance_status":"MAYBE"}}}"#,
            br#"{"id":"a","address":"h","port":1,"payload":{"@class":"org.apache.dubbo.registry.zookeeper.ZookeeperInstance"}}"#,
        ];
        for data in cases {
            let e = decode("/services/account/bad", "account", data).unwrap_err();
            assert_eq!(e.path(), "/services/account/bad");
            assert!(!e.reason().is_empty());
        }
    }

    #[test]
    fn payload_class_probe() {
        assert_eq!(
            payload_class(GOLDEN.as_bytes()).as_deref(),
            Some(SPRING_PAYLOAD_CLASS)
        );
        assert_eq!(payload_class(b"garbage"), None);
    }
}
