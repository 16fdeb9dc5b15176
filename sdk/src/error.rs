//! The App's error type.

use crate::config::ConfigError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong starting or running an [`App`](crate::App).
///
/// Its `Debug` output is the message and its causes, so `main` returning
/// `Result<(), keel::Error>` (or a boxed error) prints something an operator can act on.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is malformed; the message names the key and its source.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The registry failed (connect, register, deregister).
    #[error("registry: {0}")]
    Registry(#[from] keel_registry::Error),
    /// No ZooKeeper session could be established in time.
    #[error("no ZooKeeper session with {servers} within {timeout:?}")]
    RegistryTimeout {
        /// The connect string.
        servers: String,
        /// How long Keel waited (`registry.connect_timeout`).
        timeout: std::time::Duration,
    },
    /// A client could not be built.
    #[error("client {name}: {source}")]
    Client {
        /// The client's configuration name.
        name: String,
        /// Why.
        source: keel_client::Error,
    },
    /// A messaging publisher or consumer failed.
    #[error("messaging {name}: {source}")]
    Messaging {
        /// The destination's configuration name.
        name: String,
        /// Why.
        source: keel_messaging::Error,
    },
    /// A server failed while serving.
    #[error("{what} server: {source}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// Why.
        source: BoxError,
    },
    /// A readiness check never passed.
    #[error("not ready: {0}")]
    NotReady(String),
    /// [`App::start`](crate::App::start) was stopped by its
    /// [`ShutdownHandle`](crate::ShutdownHandle) before the readiness checks passed (what it
    /// had started is stopped, nothing was registered).
    #[error("stopped before ready")]
    Stopped,
}

impl Error {
    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        Self::Config(ConfigError::new(
            Some(key.to_owned()),
            format!("{}: {}", key, message.into()),
        ))
    }

    /// Whether this is a configuration error.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
