//! Watches one service and prints, on start and on every change, one JSON line with its UP
//! instances sorted by id:
//!
//! ```text
//! {"service":"account","instances":[{"id":"…","address":"127.0.0.1","port":50051,"status":"UP","metadata":{"zone":"sh-a"}}]}
//! ```
//!
//! ```text
//! cargo run -p keel-registry --example watch -- --zk 127.0.0.1:2181 --dialect spring --service account
//! ```
//!
//! With `--dialect dubbo`, `--interface` (default: the service name) is the Java interface
//! watched. Logs go to stderr; exits on SIGINT / SIGTERM.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use futures::{FutureExt, StreamExt};
use keel_core::ServiceInstance;
use keel_registry::{Change, Registry, ZkConfig, ZkRegistry};

mod common;

use common::{DialectArg, Target, wait_for_shutdown};

/// Print a service's instances on start and on every change.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    target: Target,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = tokio::select! {
        r = run(args) => r,
        r = wait_for_shutdown() => r.map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("watch: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let target = &args.target;
    let watched = match target.dialect {
        DialectArg::Spring => target.service.clone(),
        DialectArg::Dubbo => target.interface(),
    };
    let registry =
        ZkRegistry::connect(ZkConfig::new(&target.zk).with_dialect(target.dialect())).await?;
    let mut changes = registry.watch(&watched)?;
    let mut instances: BTreeMap<String, ServiceInstance> = BTreeMap::new();
    while let Some(change) = changes.next().await {
        apply(&mut instances, change);
        // Print once per burst of changes that are already available.
        while let Some(Some(change)) = changes.next().now_or_never() {
            apply(&mut instances, change);
        }
        print_line(&target.service, &instances)?;
    }
    Err("the registry stopped".into())
}

fn apply(instances: &mut BTreeMap<String, ServiceInstance>, change: Change) {
    match change {
        Change::Reset(all) => {
            *instances = all.into_iter().map(|i| (i.id.clone(), i)).collect();
        }
        Change::Add(i) | Change::Update(i) => {
            instances.insert(i.id.clone(), i);
        }
        Change::Remove(i) => {
            instances.remove(&i.id);
        }
    }
}

/// One line of output; field order is the documented one.
#[derive(serde::Serialize)]
struct Line<'a> {
    service: &'a str,
    instances: Vec<InstanceLine<'a>>,
}

#[derive(serde::Serialize)]
struct InstanceLine<'a> {
    id: &'a str,
    address: &'a str,
    port: u16,
    status: &'static str,
    metadata: &'a BTreeMap<String, String>,
}

fn print_line(
    service: &str,
    instances: &BTreeMap<String, ServiceInstance>,
) -> Result<(), Box<dyn std::error::Error>> {
    let line = Line {
        service,
        instances: instances
            .values()
            .map(|i| InstanceLine {
                id: &i.id,
                address: &i.endpoint.host,
                port: i.endpoint.port,
                status: i.status.as_str(),
                metadata: &i.metadata,
            })
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &line)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}
