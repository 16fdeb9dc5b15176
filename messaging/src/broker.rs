//! Which broker a URL names.

use crate::error::Error;

/// A broker, parsed from a URL: `kafka://host:port[,host:port…]` or
/// `amqp://user:pass@host:port/vhost` (also `amqps://`).
///
/// ```
/// use keel_messaging::Broker;
///
/// let kafka: Broker = "kafka://127.0.0.1:9092".parse().unwrap();
/// assert_eq!(kafka, Broker::Kafka { bootstrap: "127.0.0.1:9092".into() });
/// assert!(matches!("amqp://guest:guest@127.0.0.1:5672/%2f".parse(), Ok(Broker::Amqp { .. })));
/// assert!("http://x".parse::<Broker>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// A Kafka cluster, by its bootstrap servers.
    Kafka {
        /// Comma-separated `host:port` list.
        bootstrap: String,
    },
    /// A RabbitMQ broker.
    Amqp {
        /// The AMQP URL, as lapin takes it.
        url: String,
    },
}

impl std::str::FromStr for Broker {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(rest) = s.strip_prefix("kafka://") {
            let bootstrap = rest.trim_end_matches('/');
            if bootstrap.is_empty() {
                return Err(Error::new(
                    format!("broker URL {s:?}"),
                    "no bootstrap servers",
                ));
            }
            Ok(Broker::Kafka {
                bootstrap: bootstrap.to_owned(),
            })
        } else if s.starts_with("amqp://") || s.starts_with("amqps://") {
            Ok(Broker::Amqp { url: s.to_owned() })
        } else {
            Err(Error::new(
                format!("broker URL {s:?}"),
                "expected kafka://host:port or amqp://…",
            ))
        }
    }
}

/// The Kafka replication factor that asks for the broker's default when Keel creates a topic
/// (CreateTopics with -1: KIP-464, Kafka 2.4 and later). The default for
/// [`crate::PublisherBuilder::kafka_replication_factor`] and
/// [`crate::ConsumerBuilder::kafka_replication_factor`].
pub const KAFKA_BROKER_DEFAULT_REPLICATION: i32 = -1;

/// Checks a configured Kafka replication factor: the broker's default (-1) or at least 1.
pub(crate) fn check_replication(factor: i32) -> Result<(), Error> {
    if factor == KAFKA_BROKER_DEFAULT_REPLICATION || factor >= 1 {
        Ok(())
    } else {
        Err(Error::new(
            "Kafka replication factor",
            format!(
                "{factor}: expected {KAFKA_BROKER_DEFAULT_REPLICATION} (the broker's default) or at least 1"
            ),
        ))
    }
}

impl Broker {
    pub(crate) fn not_built(&self, feature: &str) -> Error {
        Error::new(
            format!("broker {self:?}"),
            format!("keel-messaging was built without the `{feature}` feature"),
        )
    }
}
