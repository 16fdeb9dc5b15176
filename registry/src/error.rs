//! The registry's error type.

use std::time::Duration;

/// A boxed error from the layer underneath (the ZooKeeper client, JSON, …).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a registry operation failed. Every variant that concerns a node names its path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The node exists and belongs to another live ZooKeeper session: Keel never deletes it.
    #[error("{path}: node is owned by another live ZooKeeper session {owner:#x}; leaving it alone")]
    Conflict {
        /// The node's path.
        path: String,
        /// The `ephemeralOwner` of the node (0 for a persistent node).
        owner: i64,
    },
    /// The instance is already registered: in the static registry, an instance with this id;
    /// in ZooKeeper, another live [`Registration`](crate::Registration) of the same registry
    /// owns this node (the same service and id for Spring; the same provider URL, so the same
    /// endpoint, parameters and status, for Dubbo). Two handles on one node would alias, and
    /// deregistering either would remove the other; deregister the first before registering the
    /// node again (to change metadata, deregister and register anew).
    #[error("{path}: an instance with this id is already registered")]
    Duplicate {
        /// Where the duplicate lives (`static:<service>/<id>` for the static registry, the
        /// node's path for ZooKeeper).
        path: String,
    },
    /// The root holds instances written by another framework (for example Dubbo 3
    /// application-level discovery under `/services`); mixing them would crash Java readers.
    /// Checked once per root before its first registration, skipping services that are not
    /// readable and bounded in time (see [`ZkRegistry`](crate::ZkRegistry)).
    #[error("refusing to register under {root}: {path} holds foreign payload class {class}")]
    ForeignPayload {
        /// The root Keel was asked to register under.
        root: String,
        /// The node whose payload is foreign.
        path: String,
        /// Its `@class`.
        class: String,
    },
    /// The instance cannot be written in the chosen dialect.
    #[error("{path}: invalid instance: {reason}")]
    InvalidInstance {
        /// The path the instance would have had.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A ZooKeeper operation failed.
    #[error("{path}: zookeeper {op} failed")]
    ZooKeeper {
        /// The operation (`create`, `delete`, …).
        op: &'static str,
        /// The node it concerned.
        path: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// No ZooKeeper session could be established.
    #[error("connecting to zookeeper {servers} failed")]
    Connect {
        /// The connect string.
        servers: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The operation did not complete in time (ZooKeeper unreachable, or the service never loaded).
    #[error("{path}: no answer within {timeout:?}")]
    Timeout {
        /// What was waited for.
        path: String,
        /// How long.
        timeout: Duration,
    },
    /// The configuration is invalid.
    #[error("invalid registry configuration: {0}")]
    Config(String),
    /// The registry's background session task has stopped.
    #[error("the registry has shut down")]
    Closed,
}

impl Error {
    /// The node is owned by another live session, or the instance is already registered
    /// ([`Error::Duplicate`]).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::Duplicate { .. })
    }

    /// ZooKeeper could not be reached or did not answer in time; retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Timeout { .. } | Error::Closed
        ) || matches!(self, Error::ZooKeeper { source, .. } if is_transient(source.as_ref()))
    }

    pub(crate) fn zk(
        op: &'static str,
        path: impl Into<String>,
        source: zookeeper_client::Error,
    ) -> Self {
        Error::ZooKeeper {
            op,
            path: path.into(),
            source: Box::new(source),
        }
    }
}

fn is_transient(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use zookeeper_client::Error as Zk;
    // `zookeeper-client` 0.11 fails the requests in flight when it drops a connection with the
    // error that broke the connection, not `ConnectionLoss`: `Custom` ("no response from
    // connection in …ms", a read or write I/O error). A request never sees `Custom` otherwise.
    matches!(
        source.downcast_ref::<Zk>(),
        Some(
            Zk::ConnectionLoss
                | Zk::SessionExpired
                | Zk::Timeout
                | Zk::NoHosts
                | Zk::ClientClosed
                | Zk::Custom(_)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path() {
        let e = Error::Conflict {
            path: "/services/account/a-1".into(),
            owner: 0x1234,
        };
        assert_eq!(
            e.to_string(),
            "/services/account/a-1: node is owned by another live ZooKeeper session 0x1234; leaving it alone"
        );
        assert!(e.is_conflict());
        let e = Error::zk("create", "/x", zookeeper_client::Error::ConnectionLoss);
        assert!(e.to_string().starts_with("/x: zookeeper create"));
        assert!(e.is_unavailable());
        assert!(!Error::zk("create", "/x", zookeeper_client::Error::NoAuth).is_unavailable());
    }

    /// A server that opens a session, answers the client's first ping, then never answers again.
    fn silent_after_handshake() -> std::net::SocketAddr {
        use std::io::{Read, Write};
        fn read_frame(conn: &mut std::net::TcpStream) -> std::io::Result<()> {
            let mut len = [0u8; 4];
            conn.read_exact(&mut len)?;
            let len = usize::try_from(i32::from_be_bytes(len)).unwrap_or(0);
            conn.read_exact(&mut vec![0u8; len])
        }
        fn write_frame(conn: &mut std::net::TcpStream, body: &[u8]) {
            let len = i32::try_from(body.len()).unwrap();
            conn.write_all(&len.to_be_bytes()).unwrap();
            conn.write_all(body).unwrap();
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            read_frame(&mut conn).unwrap(); // ConnectRequest
            let mut response = Vec::new();
            response.extend(0i32.to_be_bytes()); // protocol version
            response.extend(2000i32.to_be_bytes()); // negotiated session timeout, ms
            response.extend(0x4b45_454ci64.to_be_bytes()); // session id
            response.extend(16i32.to_be_bytes());
            response.extend([0u8; 16]); // password
            response.push(0); // not read-only
            write_frame(&mut conn, &response);
            read_frame(&mut conn).unwrap(); // the first ping
            let mut pong = Vec::new();
            pong.extend((-2i32).to_be_bytes()); // ping xid
            pong.extend(0i64.to_be_bytes()); // zxid
            pong.extend(0i32.to_be_bytes()); // no error
            write_frame(&mut conn, &pong);
            // Silence, until the client gives up on the connection.
            while read_frame(&mut conn).is_ok() {}
        });
        addr
    }

    #[tokio::test]
    async fn a_request_cut_off_by_a_dropped_connection_is_unavailable() {
        let addr = silent_after_handshake();
        let client = zookeeper_client::Client::connector()
            .with_session_timeout(Duration::from_secs(2))
            .connect(&addr.to_string())
            .await
            .unwrap();
        let options =
            zookeeper_client::CreateMode::Ephemeral.with_acls(zookeeper_client::Acls::anyone_all());
        let error =
            tokio::time::timeout(Duration::from_secs(20), client.create("/x", b"", &options))
                .await
                .expect("the client gives up on a silent connection")
                .unwrap_err();
        assert!(
            matches!(error, zookeeper_client::Error::Custom(_)),
            "{error:?}"
        );
        assert!(Error::zk("create", "/x", error).is_unavailable());
    }
}
