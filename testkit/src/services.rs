//! The live services on loopback, as `scripts/services` runs them.

use std::path::PathBuf;
use std::process::Output;

/// ZooKeeper connect string (standalone, or the first member of the ensemble).
pub const ZOOKEEPER: &str = "127.0.0.1:2181";
/// ZooKeeper connect string naming every member of the ensemble (`scripts/services up --ensemble`).
pub const ZOOKEEPER_ENSEMBLE: &str = "127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183";
/// Kafka-protocol bootstrap server (tansu).
pub const KAFKA: &str = "127.0.0.1:9092";
/// RabbitMQ AMQP URL.
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A failed `scripts/services` invocation.
#[derive(Debug, thiserror::Error)]
#[error("scripts/services {args} failed ({status}): {stderr}")]
pub struct ScriptError {
    args: String,
    status: String,
    stderr: String,
}

/// The path of `scripts/services` in this checkout.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("services")
}

/// Runs `scripts/services ARGS…` (e.g. `["restart", "kafka"]`) and waits for it.
///
/// # Errors
/// When the script cannot be run or exits non-zero (its stderr, with the failing service's log
/// tail, is in the error).
pub async fn run(args: &[&str]) -> Result<Output, ScriptError> {
    let joined = args.join(" ");
    let output = tokio::process::Command::new(script())
        .args(args)
        .output()
        .await
        .map_err(|e| ScriptError {
            args: joined.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ScriptError {
            args: joined,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
