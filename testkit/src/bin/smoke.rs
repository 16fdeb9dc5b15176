//! `keel-smoke`: touches each live service (ZooKeeper, Kafka-protocol broker, RabbitMQ) on
//! loopback and prints what it did. Exits non-zero if any service misbehaved.

use std::process::ExitCode;

use keel_testkit::{services, smoke};

#[tokio::main]
async fn main() -> ExitCode {
    let checks = [
        (
            "zookeeper",
            services::ZOOKEEPER,
            smoke::zookeeper(services::ZOOKEEPER).await,
        ),
        (
            "kafka",
            services::KAFKA,
            smoke::kafka(services::KAFKA).await,
        ),
        (
            "rabbitmq",
            services::AMQP,
            smoke::rabbitmq(services::AMQP).await,
        ),
    ];
    let mut failed = false;
    for (name, addr, result) in checks {
        match result {
            Ok(steps) => {
                println!("{name} ({addr}): ok");
                for step in steps {
                    println!("  - {step}");
                }
            }
            Err(error) => {
                failed = true;
                println!("{name} ({addr}): FAILED: {error}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
