//! Service instances and endpoints.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an instance can be reached: a host (name or IP literal) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or IP address literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// An endpoint at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The reason a string is not a `host:port` endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {input:?}: {reason}")]
pub struct ParseEndpointError {
    input: String,
    reason: &'static str,
}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;

    /// Parses `host:port` or `[v6]:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseEndpointError {
            input: s.to_owned(),
            reason,
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, rest) = rest.split_once(']').ok_or_else(|| err("unclosed '['"))?;
            let port = rest
                .strip_prefix(':')
                .ok_or_else(|| err("missing ':port'"))?;
            (host, port)
        } else {
            s.rsplit_once(':').ok_or_else(|| err("missing ':port'"))?
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| err("port is not a number in 0..=65535"))?;
        Ok(Endpoint::new(host, port))
    }
}

/// Whether an instance takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceStatus {
    /// Serving; balancers may route to it.
    #[default]
    Up,
    /// Registered but deliberately taken out of rotation.
    OutOfService,
    /// Registered but failing its own checks.
    Down,
}

impl InstanceStatus {
    /// The status as Spring Cloud writes it in `instance_status` (`UP`, `OUT_OF_SERVICE`, `DOWN`).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Up => "UP",
            InstanceStatus::OutOfService => "OUT_OF_SERVICE",
            InstanceStatus::Down => "DOWN",
        }
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One running copy of a service, as a registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// Logical service name (`account`), or the interface for Dubbo.
    pub service: String,
    /// Unique id of this instance within the service.
    pub id: String,
    /// Where to reach it.
    pub endpoint: Endpoint,
    /// Whether the endpoint speaks TLS.
    pub tls: bool,
    /// Serving status.
    pub status: InstanceStatus,
    /// Free-form metadata (`zone`, `weight`, `version`…), sorted by key.
    pub metadata: BTreeMap<String, String>,
}

impl ServiceInstance {
    /// An UP, plain-text instance with no metadata.
    pub fn new(service: impl Into<String>, id: impl Into<String>, endpoint: Endpoint) -> Self {
        Self {
            service: service.into(),
            id: id.into(),
            endpoint,
            tls: false,
            status: InstanceStatus::Up,
            metadata: BTreeMap::new(),
        }
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the status.
    pub fn with_status(mut self, status: InstanceStatus) -> Self {
        self.status = status;
        self
    }

    /// Marks the endpoint as TLS.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_v4_and_v6() {
        let e: Endpoint = "10.0.0.5:50051".parse().unwrap();
        assert_eq!(e, Endpoint::new("10.0.0.5", 50051));
        assert_eq!(e.to_string(), "10.0.0.5:50051");
        let e: Endpoint = "[::1]:8080".parse().unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.to_string(), "[::1]:8080");
    }

    #[test]
    fn endpoint_rejects_garbage() {
        for bad in ["", "host", ":80", "host:99999", "host:x", "[::1", "[::1]80"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn status_serializes_like_spring() {
        assert_eq!(
            serde_json::to_string(&InstanceStatus::OutOfService).unwrap(),
            "\"OUT_OF_SERVICE\""
        );
    }
}
