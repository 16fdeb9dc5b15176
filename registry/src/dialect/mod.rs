//! The two ZooKeeper layouts Java fleets already use, read and written byte for byte.
//!
//! * [`spring`]: Curator service discovery as Spring Cloud Zookeeper writes it — Keel's native
//!   layout. `/<root>/<service>/<id>`, EPHEMERAL, UTF-8 JSON.
//! * [`dubbo`]: Dubbo interface-level registration. `/<root>/<interface>/providers/<URLEncoder(url)>`,
//!   EPHEMERAL, the node *name* is the data.
//!
//! A [`Dialect`] value picks one of them and carries its options; the encode / decode functions
//! are public so operators' tools and tests can pin the exact bytes.

pub mod dubbo;
pub mod spring;

use std::fmt;

/// Which layout a registry reads and writes, with its options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Curator / Spring Cloud Zookeeper JSON.
    Spring(SpringOptions),
    /// Dubbo interface-level URLs.
    Dubbo(DubboOptions),
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect::Spring(SpringOptions::default())
    }
}

impl Dialect {
    /// The root path this dialect uses (`/services`, `/dubbo`, or as configured).
    pub fn root(&self) -> &str {
        match self {
            Dialect::Spring(o) => &o.root,
            Dialect::Dubbo(o) => &o.root,
        }
    }

    /// The node whose children are the instances of `service` (for Dubbo, `service` is the interface).
    pub fn service_path(&self, service: &str) -> String {
        match self {
            Dialect::Spring(o) => format!("{}/{service}", o.root),
            Dialect::Dubbo(o) => format!("{}/{service}/providers", o.root),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        validate_root(self.root())?;
        if let Dialect::Dubbo(o) = self
            && (o.protocol.is_empty() || !o.protocol.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(format!(
                "dubbo protocol {:?} is not alphanumeric",
                o.protocol
            ));
        }
        Ok(())
    }
}

/// Options of the Curator / Spring Cloud layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpringOptions {
    root: String,
}

impl Default for SpringOptions {
    fn default() -> Self {
        Self {
            root: "/services".to_owned(),
        }
    }
}

impl SpringOptions {
    /// Options with a root other than `/services` (a trailing `/` is dropped).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = normalize_root(root.into());
        self
    }

    /// The root path.
    pub fn root(&self) -> &str {
        &self.root
    }
}

/// Options of the Dubbo interface-level layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DubboOptions {
    root: String,
    protocol: String,
    group: Option<String>,
    version: Option<String>,
}

impl Default for DubboOptions {
    fn default() -> Self {
        Self {
            root: "/dubbo".to_owned(),
            protocol: "tri".to_owned(),
            group: None,
            version: None,
        }
    }
}

impl DubboOptions {
    /// Options with a root other than `/dubbo` (a trailing `/` is dropped).
    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = normalize_root(root.into());
        self
    }

    /// The protocol written in provider URLs and required of discovered ones (default `tri`).
    pub fn with_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = protocol.into();
        self
    }

    /// The consumer's group: providers must carry the same `group` (`*` matches any). Without
    /// one, only providers without a group match — Dubbo's own rule.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The consumer's version: providers must carry the same `version` (`*` matches any).
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The root path.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The protocol.
    pub fn protocol(&self) -> &str {
        &self.protocol
    }
}

/// Why a node could not be read as an instance. The node is skipped; the rest of the snapshot
/// is unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct DecodeError {
    path: String,
    reason: String,
}

impl DecodeError {
    pub(crate) fn new(path: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    /// The node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

fn normalize_root(mut root: String) -> String {
    while root.len() > 1 && root.ends_with('/') {
        root.pop();
    }
    root
}

fn validate_root(root: &str) -> Result<(), String> {
    if !root.starts_with('/') || root.len() < 2 || root.contains("//") || root.ends_with('/') {
        return Err(format!(
            "root {root:?} must be an absolute path such as /services"
        ));
    }
    Ok(())
}

/// A path segment: non-empty, no `/`, not `.` or `..`, no control characters.
pub(crate) fn validate_segment(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value == "." || value == ".." {
        return Err(format!(
            "{what} {value:?} is empty or a relative path segment"
        ));
    }
    if value.contains('/') || value.chars().any(char::is_control) {
        return Err(format!(
            "{what} {value:?} contains '/' or a control character"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_paths() {
        let spring = Dialect::Spring(SpringOptions::default().with_root("/keel-x/"));
        assert_eq!(spring.service_path("account"), "/keel-x/account");
        let dubbo = Dialect::Dubbo(DubboOptions::default());
        assert_eq!(
            dubbo.service_path("com.acme.Account"),
            "/dubbo/com.acme.Account/providers"
        );
        assert!(spring.validate().is_ok());
        let bad = Dialect::Spring(SpringOptions::default().with_root("services"));
        assert!(bad.validate().is_err());
        let bad = Dialect::Dubbo(DubboOptions::default().with_protocol("tri://"));
        assert!(bad.validate().is_err());
    }

    #[test]
    fn segments() {
        assert!(validate_segment("id", "a-1").is_ok());
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            assert!(validate_segment("id", bad).is_err(), "{bad:?}");
        }
    }
}
