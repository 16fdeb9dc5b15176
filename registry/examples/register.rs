//! Registers one instance in ZooKeeper, holds it until SIGINT / SIGTERM, deregisters, exits 0.
//!
//! ```text
//! cargo run -p keel-registry --example register -- --zk 127.0.0.1:2181 --dialect spring \
//!     --service account --address 127.0.0.1:50051 --metadata zone=sh-a
//! ```
//!
//! Prints one JSON line once registered (`{"id":ID,"registered":PATH,"session":"0x…"}`) and one
//! once deregistered (`{"deregistered":PATH}`); logs go to stderr. With `--dialect dubbo`,
//! `--interface` (default: the service name) is the Java interface and the service name becomes
//! the `application` parameter.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keel_core::{Endpoint, ServiceInstance};
use keel_registry::{Registry, ZkConfig, ZkRegistry};

mod common;

use common::{DialectArg, Target, wait_for_shutdown};

/// Register one instance until SIGINT / SIGTERM.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    target: Target,
    /// Where the instance listens.
    #[arg(long)]
    address: Endpoint,
    /// Metadata entry, repeatable.
    #[arg(long = "metadata", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Instance id (spring only; default: a random UUID).
    #[arg(long)]
    id: Option<String>,
    /// Session timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("register: {error}");
            let mut source = std::error::Error::source(&*error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let target = &args.target;
    let instance = match target.dialect {
        DialectArg::Spring => {
            let id = args
                .id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            ServiceInstance::new(&target.service, id, args.address.clone())
        }
        DialectArg::Dubbo => ServiceInstance::new(
            target.interface(),
            args.address.to_string(),
            args.address.clone(),
        )
        .with_metadata("application", &target.service),
    };
    let instance = args
        .metadata
        .iter()
        .fold(instance, |i, (k, v)| i.with_metadata(k, v));

    let config = ZkConfig::new(&target.zk)
        .with_dialect(target.dialect())
        .with_session_timeout(Duration::from_millis(args.session_timeout_ms));
    let registry = ZkRegistry::connect(config).await?;
    let registration = registry.register(instance).await?;
    let path = registration.path().to_owned();
    println!(
        "{}",
        serde_json::json!({
            "registered": path,
            "id": registration.instance().id,
            "session": format!("{:#x}", registry.session_id()),
        })
    );

    wait_for_shutdown().await?;

    registration.deregister().await?;
    println!("{}", serde_json::json!({ "deregistered": path }));
    Ok(())
}
