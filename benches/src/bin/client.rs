//! A1, A2, A4, A5, B5, B6 and C2 of `BENCHMARKS.md` for `keel-client`: Keel's `GrpcChannel` and
//! `RestClient` against a raw `tonic::transport::Channel` and a raw `hyper-util` client, on the
//! same loopback server, in the same run, arms interleaved.
//!
//! # Set-up
//! The server is this binary re-executed as a child process (`client serve …`): the echo service
//! of `keel-testkit` (`keel.echo.v1.Echo`, served by tonic over HTTP/2) and an axum JSON echo
//! over HTTP/1.1. The gRPC implementation answers with message, payload and its id but, unlike
//! the testkit's `EchoService`, does not reflect the request metadata back: reflecting it would
//! charge Keel's own headers (`x-request-id`, `grpc-timeout`, `traceparent`) a second time, as
//! reply decoding on the client. With two or more CPUs the client is pinned to CPU 0 and the
//! server to CPU 1 (`taskset`; `KEEL_BENCH_PIN=0` disables it); each side runs a tokio runtime with
//! one worker, and every measurement runs on the client's worker. The client's CPU per request
//! (the sum of its threads' `schedstat` run time, i.e. what `getrusage` would give) is printed
//! beside each throughput. Allocations are counted in the client process only.
//!
//! The Keel arms are what a service gets by default, built from discovery: a `StaticRegistry`
//! with the one server instance (C2: the real ZooKeeper of `scripts/services`, under a unique
//! root deleted at the end), p2c, per-endpoint breaker, budgeted retry (3 attempts), a 5 s
//! timeout propagated as the deadline, request id, and tracing on: Keel's `Telemetry` with its
//! defaults (a `tracing` subscriber at `info` with the OpenTelemetry layer and an SDK tracer
//! provider, also the global one, without exporter) is installed after the `A5-*-bare` rows and
//! the Keel arms are built again then, given that provider as `keel::App` gives it to its
//! clients, so every Keel call makes a recorded client span with OpenTelemetry ids and
//! propagates `traceparent`. The raw arms are plain tonic / hyper-util
//! with the same settings where they overlap (one HTTP/2 connection with `TCP_NODELAY` and
//! default windows; an HTTP/1.1 keep-alive pool with `TCP_NODELAY` that opens a connection per
//! call in flight and reuses idle ones — hyper-util's legacy client for raw, Keel's own pool on
//! hyper for Keel; HTTP/2 keep-alive as Keel's default, 5 min / 20 s while calls are in flight;
//! TCP keep-alive as Keel's default, 30 s (and `TCP_USER_TIMEOUT` where the library can set it);
//! the same 64 B payload; the REST raw arm also decodes the JSON reply). `Setup`
//! records those settings and the run refuses to compare arms whose set-ups differ.
//!
//! # What each id measures (durations per arm and round)
//! * A1-c{1,16,64}: closed loop, c calls in flight, 1 s; req/s Keel ÷ raw. 1 warm-up + 5 pairs.
//! * A2-p50 / A2-p99: open loop at 50 % of the raw arm's A1-c64 capacity, latency from each
//!   call's *intended* send time into an HDR histogram, 1.5 s; Δ µs Keel − raw. 1 + 5 pairs.
//! * A4-c{1,64}: as A1 for REST (`GET /echo`, JSON decoded by both arms), 1 s.
//! * A5-{grpc,rest}-{allocs,bytes}: allocations and bytes per sequential call, Keel − raw,
//!   2 000 calls per round, 1 + 5 pairs; `-bare` rows before tracing is installed.
//! * B5: the whole default gRPC stack in process: server and client in this process on one
//!   worker (so wall time is CPU time), one call at a time, 0.5 s; ns/call Keel − raw.
//! * `-vs-propagating` variants of A1, A2, A4, A5 and B5: the raw arm is tonic sending what Keel
//!   propagates (a per-call `traceparent` and `x-request-id`, never indexed, and the timeout as
//!   `grpc-timeout`), or hyper-util sending the same with the time left as `x-keel-deadline`,
//!   so the row shows Keel's stack without the wire cost of carrying the context, which no
//!   implementation avoids.
//! * B6-n{10,100,10k}: the balancer's per-call pick (snapshot load, p2c choice, breaker
//!   admission — the code the balancer runs, through `keel_client::bench`) while another
//!   thread (on the other CPU) replaces one instance every millisecond; ns/pick, median of 5
//!   rounds of 0.3 s. B6-flat: ns at 10k ÷ ns at 10 (our bar for "flat in N": ≤ 2).
//! * C2: three providers (child processes registered in ZooKeeper by themselves) under 1 000
//!   idempotent req/s; one is killed with SIGKILL; time from the kill to the last call routed to
//!   it (sampled every ms), median of 3 trials; C2-failed counts failed calls in all trials.
//!
//! A full run takes about two minutes. For profiling one arm alone:
//! `target/release/client profile keel-grpc 20000 [--tracing] [--c64]` (arms: `raw-grpc`,
//! `raw-grpc-propagating`, `keel-grpc`, `raw-rest`, `raw-rest-propagating`, `keel-rest`) prints allocations per call
//! (and, with `--c64`, req/s and client CPU per call at 64 in flight); run it under `heaptrack`
//! to see where the allocations come from, or under `valgrind --tool=callgrind` for
//! instructions per call (repeatable on a noisy box: run N and 3N calls and subtract).
//! `target/release/client b5` runs B5 alone (tracing on) and prints its rows; `client b6`
//! likewise B6.

use std::alloc::System;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keel::client::{GrpcChannel, RestClient};
use keel::core::{Endpoint, ServiceInstance};
use keel::registry::dialect::SpringOptions;
use keel::registry::{Dialect, Registry, StaticRegistry, ZkConfig, ZkRegistry};
use keel_benches::stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use keel_benches::{Comparison, Report, Row, median, percentile};
use keel_testkit::echo::echo_client::EchoClient;
use keel_testkit::echo::echo_server::{Echo, EchoServer};
use keel_testkit::echo::{EchoReply, EchoRequest};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, Command};
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const ROUNDS: usize = 5;
const WARMUP: usize = 1;
const A1_ROUND: Duration = Duration::from_secs(1);
const A2_ROUND: Duration = Duration::from_millis(1500);
const A4_ROUND: Duration = Duration::from_secs(1);
const A5_CALLS: u64 = 2_000;
const B5_ROUND: Duration = Duration::from_millis(500);
const B6_ROUND: Duration = Duration::from_millis(300);
const C2_TRIALS: usize = 3;
const C2_RATE: f64 = 1_000.0;
const PAYLOAD: usize = 64;
const TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("profile") {
        return profile(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("b6") {
        // B6 alone, for quick comparisons; writes no JSON.
        let pinned = pin_enabled() && taskset(&["-a", "-p", "-c", &CLIENT_CPU.to_string()], None);
        let mut report = Report::new("client-b6");
        b6(&mut report, pinned);
        println!("{}", report.table());
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("b5") {
        // B5 alone (tracing on, as in the full run), for quick comparisons; writes no JSON.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            tokio::spawn(async move {
                let telemetry = keel::Telemetry::install(
                    "keel-bench-client",
                    &keel::config::TelemetryConfig::default(),
                )?;
                let mut report = Report::new("client-b5");
                b5(&mut report, &telemetry).await?;
                println!("{}", report.table());
                Ok::<_, BoxError>(())
            })
            .await?
        });
    }
    let pinned = pin_enabled() && taskset(&["-a", "-p", "-c", &CLIENT_CPU.to_string()], None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // Everything runs on the one worker; the main thread only waits.
    rt.block_on(async move { tokio::spawn(run(pinned)).await? })
}

/// `profile ARM [CALLS] [--tracing]` (ARM = raw-grpc, raw-grpc-propagating, keel-grpc,
/// raw-rest, raw-rest-propagating, keel-rest): only sequential calls of one arm, for an allocation profiler
/// (`heaptrack target/release/client profile keel-grpc 20000`).
fn profile(args: &[String]) -> Result<()> {
    let arm = args
        .first()
        .cloned()
        .unwrap_or_else(|| "keel-grpc".to_owned());
    let calls: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let tracing = args.iter().any(|a| a == "--tracing");
    let args = args.to_vec();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tokio::spawn(async move {
            let server = Server::spawn(false, &[]).await?;
            let registry = StaticRegistry::new()
                .with_endpoints("echo", [server.grpc.to_string()])?
                .with_endpoints("echo-rest", [server.rest.to_string()])?;
            let _telemetry = if tracing {
                Some(keel::Telemetry::install(
                    "keel-bench-client",
                    &keel::config::TelemetryConfig::default(),
                )?)
            } else {
                None
            };
            let (allocs, bytes) = match arm.as_str() {
                "raw-grpc" => allocs_per_call(&raw_grpc(server.grpc).await?.0, calls).await,
                "raw-grpc-propagating" => {
                    allocs_per_call(&raw_grpc_propagating(server.grpc).await?.0, calls).await
                }
                "keel-grpc" => {
                    allocs_per_call(
                        &keel_grpc(&registry, server.grpc, _telemetry.as_ref())
                            .await?
                            .0,
                        calls,
                    )
                    .await
                }
                "raw-rest" => allocs_per_call(&raw_rest(server.rest)?.0, calls).await,
                "raw-rest-propagating" => {
                    allocs_per_call(&raw_rest_propagating(server.rest)?.0, calls).await
                }
                "keel-rest" => {
                    allocs_per_call(
                        &keel_rest(&registry, server.rest, _telemetry.as_ref())
                            .await?
                            .0,
                        calls,
                    )
                    .await
                }
                other => return Err(format!("unknown arm {other}").into()),
            };
            println!("{arm}: {allocs:.2} allocs/call, {bytes:.0} bytes/call over {calls} calls");
            if let Some(n) = args
                .iter()
                .position(|a| a == "--c64-calls")
                .and_then(|i| args.get(i + 1))
                .and_then(|n| n.parse::<u64>().ok())
            {
                // A fixed number of calls at 64 in flight (for instruction counts under callgrind,
                // where a timed loop would not be repeatable).
                let done = match arm.as_str() {
                    "raw-grpc" => fixed_load(&raw_grpc(server.grpc).await?.0, 64, n).await,
                    "raw-grpc-propagating" => {
                        fixed_load(&raw_grpc_propagating(server.grpc).await?.0, 64, n).await
                    }
                    "keel-grpc" => {
                        let arm = keel_grpc(&registry, server.grpc, _telemetry.as_ref()).await?;
                        fixed_load(&arm.0, 64, n).await
                    }
                    "raw-rest" => fixed_load(&raw_rest(server.rest)?.0, 64, n).await,
                    "raw-rest-propagating" => {
                        fixed_load(&raw_rest_propagating(server.rest)?.0, 64, n).await
                    }
                    _ => {
                        let arm = keel_rest(&registry, server.rest, _telemetry.as_ref()).await?;
                        fixed_load(&arm.0, 64, n).await
                    }
                };
                println!("{arm} c=64: {done} calls succeeded of {n}");
            }
            if args.iter().any(|a| a == "--c64") {
                let load = match arm.as_str() {
                    "raw-grpc" => {
                        closed_loop(&raw_grpc(server.grpc).await?.0, 64, A1_ROUND * 3).await
                    }
                    "keel-grpc" => {
                        closed_loop(
                            &keel_grpc(&registry, server.grpc, _telemetry.as_ref())
                                .await?
                                .0,
                            64,
                            A1_ROUND * 3,
                        )
                        .await
                    }
                    "raw-grpc-propagating" => {
                        closed_loop(
                            &raw_grpc_propagating(server.grpc).await?.0,
                            64,
                            A1_ROUND * 3,
                        )
                        .await
                    }
                    "raw-rest" => closed_loop(&raw_rest(server.rest)?.0, 64, A1_ROUND * 3).await,
                    "raw-rest-propagating" => {
                        closed_loop(&raw_rest_propagating(server.rest)?.0, 64, A1_ROUND * 3).await
                    }
                    _ => {
                        closed_loop(
                            &keel_rest(&registry, server.rest, _telemetry.as_ref())
                                .await?
                                .0,
                            64,
                            A1_ROUND * 3,
                        )
                        .await
                    }
                };
                println!(
                    "{arm} c=64: {:.0}/s ({} calls), client CPU {:.1} us/call",
                    load.rate, load.calls, load.cpu_us_per_call
                );
            }
            server.stop().await;
            Ok::<_, BoxError>(())
        })
        .await?
    })
}

// ---------------------------------------------------------------------------------------------
// The server (child process)

/// The echo service without metadata reflection (see the module docs).
#[derive(Debug, Clone)]
struct PlainEcho {
    id: String,
}

#[tonic::async_trait]
impl Echo for PlainEcho {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let request = request.into_inner();
        Ok(tonic::Response::new(EchoReply {
            message: request.message,
            payload: request.payload,
            server_id: self.id.clone(),
            metadata: Default::default(),
        }))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reply {
    message: String,
    server_id: String,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

/// `serve [--id ID] [--zk ROOT --service NAME]`: serves gRPC and REST on loopback, prints
/// `READY <grpc addr> <rest addr>`, registers in ZooKeeper when asked, and exits (deregistering)
/// when stdin closes.
fn serve(args: &[String]) -> Result<()> {
    let id = arg(args, "--id").unwrap_or_else(|| "server".to_owned());
    let zk_root = arg(args, "--zk");
    let service = arg(args, "--service").unwrap_or_else(|| "echo".to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let grpc = start_grpc_server(&id).await?;
        let rest = start_rest_server(&id).await?;
        let mut registration = None;
        if let Some(root) = zk_root {
            let registry = zk_registry(&root).await?;
            let instance = ServiceInstance::new(
                &service,
                &id,
                Endpoint::new(grpc.ip().to_string(), grpc.port()),
            );
            registration = Some((registry.register(instance).await?, registry));
        }
        println!("READY {grpc} {rest}");
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        if let Some((registration, _registry)) = registration {
            let _ = registration.deregister().await;
        }
        Ok(())
    })
}

async fn start_grpc_server(id: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = EchoServer::new(PlainEcho { id: id.to_owned() });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}

async fn start_rest_server(id: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reply = Reply {
        message: "x".repeat(PAYLOAD - 32),
        server_id: id.to_owned(),
    };
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(move || {
            let reply = reply.clone();
            async move { axum::Json(reply) }
        }),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn zk_registry(root: &str) -> Result<ZkRegistry> {
    Ok(ZkRegistry::connect(
        ZkConfig::new(keel_testkit::zk::servers())
            .with_session_timeout(Duration::from_secs(6))
            .with_dialect(Dialect::Spring(
                SpringOptions::default().with_root(root.to_owned()),
            )),
    )
    .await
    .map_err(|e| format!("ZooKeeper (is `scripts/services up` running?): {e}"))?)
}

/// A server child process; killed (SIGKILL) when dropped unless [`Server::stop`]ped.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    grpc: SocketAddr,
    rest: SocketAddr,
}

impl Server {
    async fn spawn(pinned: bool, extra: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(SERVER_CPU.to_string()).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.arg("serve")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("server stdout")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .map_err(|_| "server did not start within 20 s")??;
        let mut words = line.split_whitespace();
        if words.next() != Some("READY") {
            return Err(format!("server said {line:?}").into());
        }
        let grpc = words.next().ok_or("no gRPC address")?.parse()?;
        let rest = words.next().ok_or("no REST address")?.parse()?;
        Ok(Self {
            child,
            stdin,
            grpc,
            rest,
        })
    }

    /// SIGKILL, as `kill -9`.
    fn kill9(&mut self) -> Result<()> {
        Ok(self.child.start_kill()?)
    }

    /// Closes stdin (the child deregisters and exits) and waits a little for it.
    async fn stop(mut self) {
        self.stdin = None;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

fn pin_enabled() -> bool {
    std::env::var("KEEL_BENCH_PIN").map_or(true, |v| v != "0")
        && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
}

/// Runs `taskset ARGS <pid or tid>`; whether it worked.
fn taskset(args: &[&str], tid: Option<String>) -> bool {
    let target = tid.unwrap_or_else(|| std::process::id().to_string());
    std::process::Command::new("taskset")
        .args(args)
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The calling thread's id, from `/proc/thread-self`.
fn thread_id() -> Option<String> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str().map(str::to_owned)
}

/// CPU time of this process's live threads, in ns (`/proc/self/task/*/schedstat`).
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Arms

/// One way of making a call; cloned per concurrent caller.
trait Arm: Clone + Send + Sync + 'static {
    fn call(&mut self) -> impl Future<Output = bool> + Send;
}

fn echo_request() -> EchoRequest {
    EchoRequest {
        message: String::new(),
        payload: vec![0x5a; PAYLOAD],
    }
}

#[derive(Clone)]
struct RawGrpc(EchoClient<Channel>);

impl Arm for RawGrpc {
    async fn call(&mut self) -> bool {
        self.0.echo(echo_request()).await.is_ok()
    }
}

/// Raw tonic sending what Keel propagates, the way a careful hand-written client would: a
/// `traceparent` (a new span id per call under one trace) and an `x-request-id`, both formatted
/// per call and marked sensitive (never indexed by HPACK, as Keel sends them), and the 5 s
/// timeout as `grpc-timeout` (`Request::set_timeout`, which tonic's channel also enforces). It
/// separates what carrying the context costs on the wire from what Keel's stack costs.
#[derive(Clone)]
struct RawGrpcPropagating {
    client: EchoClient<Channel>,
    trace: u128,
    calls: u64,
}

impl Arm for RawGrpcPropagating {
    async fn call(&mut self) -> bool {
        self.calls += 1;
        let mut req = tonic::Request::new(echo_request());
        req.set_timeout(TIMEOUT);
        let traceparent = format!("00-{:032x}-{:016x}-01", self.trace, self.calls);
        let request_id = format!("{:016x}{:016x}", self.trace as u64, self.calls);
        for (key, value) in [("traceparent", traceparent), ("x-request-id", request_id)] {
            if let Ok(mut value) = tonic::metadata::MetadataValue::try_from(value) {
                value.set_sensitive(true);
                req.metadata_mut().insert(key, value);
            }
        }
        self.client.echo(req).await.is_ok()
    }
}

#[derive(Clone)]
struct KeelGrpc {
    client: EchoClient<GrpcChannel>,
    idempotent: bool,
}

impl Arm for KeelGrpc {
    async fn call(&mut self) -> bool {
        let mut req = tonic::Request::new(echo_request());
        if self.idempotent {
            req.extensions_mut()
                .insert(keel::breaker::request::Idempotent);
        }
        self.client.echo(req).await.is_ok()
    }
}

#[derive(Clone)]
struct RawRest {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
}

impl RawRest {
    /// Sends `req` and decodes the JSON reply: whether that worked.
    async fn send(&self, req: http::Request<Full<Bytes>>) -> bool {
        let Ok(res) = self.client.request(req).await else {
            return false;
        };
        if !res.status().is_success() {
            return false;
        }
        let Ok(body) = res.into_body().collect().await else {
            return false;
        };
        serde_json::from_slice::<Reply>(&body.to_bytes()).is_ok()
    }
}

impl Arm for RawRest {
    async fn call(&mut self) -> bool {
        let Ok(req) = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
        else {
            return false;
        };
        self.send(req).await
    }
}

/// Raw hyper-util sending what Keel's REST client propagates, as [`RawGrpcPropagating`] does
/// for gRPC: a per-call `traceparent` and `x-request-id` and the time left as
/// `x-keel-deadline` (milliseconds, read from a deadline set before the call), and enforcing
/// that deadline (`tokio::time::timeout_at`, as tonic enforces `set_timeout`).
#[derive(Clone)]
struct RawRestPropagating {
    raw: RawRest,
    trace: u128,
    calls: u64,
}

impl Arm for RawRestPropagating {
    async fn call(&mut self) -> bool {
        self.calls += 1;
        let deadline = Instant::now() + TIMEOUT;
        let traceparent = format!("00-{:032x}-{:016x}-01", self.trace, self.calls);
        let request_id = format!("{:016x}{:016x}", self.trace as u64, self.calls);
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        let Ok(req) = http::Request::get(self.raw.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .header("traceparent", traceparent)
            .header("x-request-id", request_id)
            .header("x-keel-deadline", remaining.to_string())
            .body(Full::new(Bytes::new()))
        else {
            return false;
        };
        tokio::time::timeout_at(deadline.into(), self.raw.send(req))
            .await
            .unwrap_or(false)
    }
}

#[derive(Clone)]
struct KeelRest(RestClient);

impl Arm for KeelRest {
    async fn call(&mut self) -> bool {
        self.0.get::<Reply>("/echo").await.is_ok()
    }
}

/// The settings both arms of a comparison must share.
#[derive(Debug, Clone, PartialEq)]
struct Setup {
    server: SocketAddr,
    protocol: &'static str,
    connections: &'static str,
    tcp_nodelay: bool,
    windows: &'static str,
    payload: usize,
}

fn parity(what: &str, raw: &Setup, keel: &Setup) -> Result<()> {
    if raw == keel {
        Ok(())
    } else {
        Err(
            format!("{what}: refusing to compare unequal set-ups: raw {raw:?}, keel {keel:?}")
                .into(),
        )
    }
}

fn grpc_setup(server: SocketAddr) -> Setup {
    Setup {
        server,
        protocol: "h2c",
        connections: "1 per endpoint",
        tcp_nodelay: true,
        windows: "hyper h2 defaults (tonic sets none); Keel's default keep-alive (5 min / 20 s), \
                  TCP keep-alive 30 s",
        payload: PAYLOAD,
    }
}

fn rest_setup(server: SocketAddr) -> Setup {
    Setup {
        server,
        protocol: "http/1.1",
        connections: "HTTP/1.1 keep-alive pool, one connection per call in flight",
        tcp_nodelay: true,
        windows: "n/a; TCP keep-alive and user timeout 30 s",
        payload: PAYLOAD,
    }
}

async fn raw_grpc(addr: SocketAddr) -> Result<(RawGrpc, Setup)> {
    // Keel's default HTTP/2 keep-alive (`keel_client::KeepAlive::default`), for parity.
    let keep_alive = keel::client::KeepAlive::default();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        // Keel's default TCP keep-alive (its TCP_USER_TIMEOUT, set once per connection, tonic
        // cannot set; neither costs anything per call).
        .tcp_keepalive(Some(keel::client::DEFAULT_TCP_KEEPALIVE))
        .tcp_keepalive_interval(Some(keel::client::DEFAULT_TCP_KEEPALIVE / 3))
        .http2_keep_alive_interval(keep_alive.interval)
        .keep_alive_timeout(keep_alive.timeout)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    Ok((RawGrpc(EchoClient::new(channel)), grpc_setup(addr)))
}

/// A trace id that differs from run to run (never zero).
fn random_trace() -> u128 {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    (u128::from(state.hash_one(1u8)) << 64) | u128::from(state.hash_one(2u8)) | 1
}

async fn raw_grpc_propagating(addr: SocketAddr) -> Result<(RawGrpcPropagating, Setup)> {
    let (RawGrpc(client), setup) = raw_grpc(addr).await?;
    Ok((
        RawGrpcPropagating {
            client,
            trace: random_trace(),
            calls: 0,
        },
        setup,
    ))
}

/// Keel's gRPC arm; with `telemetry`, its client spans go to that provider as in a
/// `keel::App` (without, they go to the global provider, if any).
async fn keel_grpc(
    registry: &dyn Registry,
    addr: SocketAddr,
    telemetry: Option<&keel::Telemetry>,
) -> Result<(KeelGrpc, Setup)> {
    let mut builder = GrpcChannel::builder("echo").timeout(TIMEOUT);
    if let Some(provider) = telemetry.and_then(keel::Telemetry::tracer_provider) {
        builder = builder.tracer_provider(provider);
    }
    let channel = builder.connect(registry, Duration::from_secs(10)).await?;
    Ok((
        KeelGrpc {
            client: EchoClient::new(channel),
            idempotent: false,
        },
        grpc_setup(addr),
    ))
}

fn raw_rest(addr: SocketAddr) -> Result<(RawRest, Setup)> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    // Keel's default TCP keep-alive and user timeout, set once per connection.
    http.set_keepalive(Some(keel::client::DEFAULT_TCP_KEEPALIVE));
    http.set_keepalive_interval(Some(keel::client::DEFAULT_TCP_KEEPALIVE / 3));
    http.set_tcp_user_timeout(Some(keel::client::DEFAULT_TCP_KEEPALIVE));
    let client = Client::builder(TokioExecutor::new()).build(http);
    let uri = format!("http://{addr}/echo").parse()?;
    Ok((RawRest { client, uri }, rest_setup(addr)))
}

fn raw_rest_propagating(addr: SocketAddr) -> Result<(RawRestPropagating, Setup)> {
    let (raw, setup) = raw_rest(addr)?;
    Ok((
        RawRestPropagating {
            raw,
            trace: random_trace(),
            calls: 0,
        },
        setup,
    ))
}

/// Keel's REST arm; `telemetry` as for [`keel_grpc`].
async fn keel_rest(
    registry: &dyn Registry,
    addr: SocketAddr,
    telemetry: Option<&keel::Telemetry>,
) -> Result<(KeelRest, Setup)> {
    let mut builder = RestClient::builder("echo-rest").timeout(TIMEOUT);
    if let Some(provider) = telemetry.and_then(keel::Telemetry::tracer_provider) {
        builder = builder.tracer_provider(provider);
    }
    let client = builder.connect(registry, Duration::from_secs(10)).await?;
    Ok((KeelRest(client), rest_setup(addr)))
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, Default)]
struct Load {
    rate: f64,
    calls: u64,
    cpu_us_per_call: f64,
    errors: u64,
}

/// `c` callers sharing `total` calls (a closed loop of a fixed size); how many succeeded.
async fn fixed_load<A: Arm>(arm: &A, c: usize, total: u64) -> u64 {
    let left = Arc::new(AtomicU64::new(total));
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let mut arm = arm.clone();
            let left = Arc::clone(&left);
            tokio::spawn(async move {
                let mut ok = 0u64;
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    ok += u64::from(arm.call().await);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap_or(0);
    }
    ok
}

/// `c` callers in a closed loop for `dur`.
async fn closed_loop<A: Arm>(arm: &A, c: usize, dur: Duration) -> Load {
    let cpu0 = cpu_ns();
    let t0 = Instant::now();
    let stop = t0 + dur;
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let mut arm = arm.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < stop {
                    if arm.call().await {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.unwrap_or((0, 1));
        ok += o;
        failed += f;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_ns().saturating_sub(cpu0) as f64;
    Load {
        rate: ok as f64 / elapsed,
        calls: ok + failed,
        cpu_us_per_call: cpu / 1e3 / (ok + failed).max(1) as f64,
        errors: failed,
    }
}

#[derive(Debug, Clone, Copy)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

/// An open loop at `rate` calls/s for `dur`: call i is due at `t0 + i / rate` and its latency
/// runs from then, however late the generator or the client got to it.
async fn open_loop<A: Arm>(arm: &A, rate: f64, dur: Duration) -> Latency {
    let Ok(hist) = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) else {
        return Latency {
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            errors: 0,
        };
    };
    let hist = Arc::new(Mutex::new(hist));
    let errors = Arc::new(AtomicU64::new(0));
    let n = (rate * dur.as_secs_f64()) as u64;
    let interval = 1.0 / rate;
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    let mut i = 0u64;
    while i < n {
        let now = Instant::now();
        while i < n {
            let due = t0 + Duration::from_secs_f64(interval * i as f64);
            if due > now {
                break;
            }
            let (mut arm, hist, errors) = (arm.clone(), hist.clone(), errors.clone());
            tasks.spawn(async move {
                let ok = arm.call().await;
                let us = due.elapsed().as_micros() as u64;
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = hist
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(us.max(1));
            });
            i += 1;
        }
        // Reap finished calls so the set does not grow, then let them run.
        while tasks.try_join_next().is_some() {}
        tokio::task::yield_now().await;
    }
    while tasks.join_next().await.is_some() {}
    let h = hist.lock().unwrap_or_else(PoisonError::into_inner);
    Latency {
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Allocations and bytes per call, `n` calls one after another.
async fn allocs_per_call<A: Arm>(arm: &A, n: u64) -> (f64, f64) {
    let mut arm = arm.clone();
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        arm.call().await;
    }
    let stats = region.change();
    (
        stats.allocations as f64 / n as f64,
        stats.bytes_allocated as f64 / n as f64,
    )
}

/// `interleave` for async arms: warm-up, then A B / B A pairs, on this task.
async fn interleave_async<FA, FB, T>(
    rounds: usize,
    warmup: usize,
    mut a: impl FnMut() -> FA,
    mut b: impl FnMut() -> FB,
    measure: impl Fn(&T) -> f64,
) -> (Comparison, Vec<(T, T)>)
where
    FA: Future<Output = T>,
    FB: Future<Output = T>,
{
    for _ in 0..warmup {
        a().await;
        b().await;
    }
    let mut pairs = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let (x, y) = if i % 2 == 0 {
            let x = a().await;
            (x, b().await)
        } else {
            let y = b().await;
            (a().await, y)
        };
        pairs.push((x, y));
    }
    let cmp = comparison(
        pairs.iter().map(|(x, _)| measure(x)).collect(),
        pairs.iter().map(|(_, y)| measure(y)).collect(),
    );
    (cmp, pairs)
}

fn comparison(a: Vec<f64>, b: Vec<f64>) -> Comparison {
    let ratios = a
        .iter()
        .zip(&b)
        .map(|(x, y)| if *x == 0.0 { f64::NAN } else { y / x })
        .collect();
    Comparison { a, b, ratios }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(pinned: bool) -> Result<()> {
    let started = Instant::now();
    let mut report = Report::new("client");
    let server = Server::spawn(pinned, &["--id", "server"]).await?;
    println!(
        "client bench: server pid {} (gRPC {}, REST {}), client pid {}; pinned: {}",
        server.child.id().unwrap_or(0),
        server.grpc,
        server.rest,
        std::process::id(),
        if pinned {
            format!("client CPU {CLIENT_CPU}, server CPU {SERVER_CPU}")
        } else {
            "no".to_owned()
        }
    );

    let registry = StaticRegistry::new()
        .with_endpoints("echo", [server.grpc.to_string()])?
        .with_endpoints("echo-rest", [server.rest.to_string()])?;
    let (raw_g, raw_gs) = raw_grpc(server.grpc).await?;
    let (keel_g, keel_gs) = keel_grpc(&registry, server.grpc, None).await?;
    parity("gRPC", &raw_gs, &keel_gs)?;
    let (raw_r, raw_rs) = raw_rest(server.rest)?;
    let (keel_r, keel_rs) = keel_rest(&registry, server.rest, None).await?;
    parity("REST", &raw_rs, &keel_rs)?;

    // A5 without any tracing subscriber: the stack's own allocations.
    a5(
        &mut report,
        "grpc-bare",
        &raw_g,
        &keel_g,
        "gRPC, no tracing subscriber",
    )
    .await;
    a5(
        &mut report,
        "rest-bare",
        &raw_r,
        &keel_r,
        "REST, no tracing subscriber",
    )
    .await;

    // Tracing on, as a Keel service has it by default.
    let telemetry = keel::Telemetry::install(
        "keel-bench-client",
        &keel::config::TelemetryConfig::default(),
    )?;
    // Keel's clients get the installed tracer provider when they are built, as in an App.
    let (keel_g, _) = keel_grpc(&registry, server.grpc, Some(&telemetry)).await?;
    let (keel_r, _) = keel_rest(&registry, server.rest, Some(&telemetry)).await?;

    a5(&mut report, "grpc", &raw_g, &keel_g, "gRPC, tracing on").await;
    let (raw_gp, raw_gps) = raw_grpc_propagating(server.grpc).await?;
    parity("gRPC, raw propagating", &raw_gps, &keel_gs)?;
    a5(
        &mut report,
        "grpc-vs-propagating",
        &raw_gp,
        &keel_g,
        "gRPC, tracing on, vs raw tonic sending the same traceparent, request id and timeout",
    )
    .await;
    a5(&mut report, "rest", &raw_r, &keel_r, "REST, tracing on").await;
    let (raw_rp, raw_rps) = raw_rest_propagating(server.rest)?;
    parity("REST, raw propagating", &raw_rps, &keel_rs)?;
    a5(
        &mut report,
        "rest-vs-propagating",
        &raw_rp,
        &keel_r,
        "REST, tracing on, vs raw hyper-util sending the same traceparent, request id and deadline",
    )
    .await;

    // A1
    let mut capacity = f64::NAN;
    for c in [1usize, 16, 64] {
        let (cmp, pairs) = closed_pairs(&raw_g, &keel_g, c, A1_ROUND).await;
        if c == 64 {
            capacity = cmp.median_a();
        }
        report.push(throughput_row(
            &format!("A1-c{c}"),
            &format!("gRPC unary req/s, Keel channel / raw tonic, c={c}"),
            &cmp,
            &pairs,
        ));
    }

    // A1 against raw tonic that sends the same context headers (variant rows)
    for c in [1usize, 16, 64] {
        let (cmp, pairs) = closed_pairs(&raw_gp, &keel_g, c, A1_ROUND).await;
        report.push(throughput_row(
            &format!("A1-vs-propagating-c{c}"),
            &format!(
                "gRPC unary req/s, Keel / raw tonic sending the same traceparent, request id and timeout, c={c}"
            ),
            &cmp,
            &pairs,
        ));
    }

    // A2, against bare raw tonic and (variant rows) raw tonic sending the same context
    let rate = (capacity * 0.5).max(100.0);
    a2(&mut report, "A2", &raw_g, &keel_g, rate, "").await;
    a2(
        &mut report,
        "A2-vs-propagating",
        &raw_gp,
        &keel_g,
        rate,
        ", vs raw tonic sending the same traceparent, request id and timeout",
    )
    .await;

    // A4
    for c in [1usize, 64] {
        let (cmp, pairs) = closed_pairs(&raw_r, &keel_r, c, A4_ROUND).await;
        report.push(throughput_row(
            &format!("A4-c{c}"),
            &format!("REST GET+JSON req/s, Keel RestClient / raw hyper-util, c={c}"),
            &cmp,
            &pairs,
        ));
    }
    // A4 against raw hyper-util that sends the same context headers (variant rows)
    for c in [1usize, 64] {
        let (cmp, pairs) = closed_pairs(&raw_rp, &keel_r, c, A4_ROUND).await;
        report.push(throughput_row(
            &format!("A4-vs-propagating-c{c}"),
            &format!(
                "REST GET+JSON req/s, Keel / raw hyper-util sending the same traceparent, request id and deadline, c={c}"
            ),
            &cmp,
            &pairs,
        ));
    }
    drop((raw_g, keel_g, raw_r, raw_rp, keel_r));
    server.stop().await;

    b5(&mut report, &telemetry).await?;
    b6(&mut report, pinned);
    c2(&mut report, pinned).await?;

    telemetry.shutdown();
    println!("client bench: {:.0} s", started.elapsed().as_secs_f64());
    report.finish()?;
    Ok(())
}

/// A2 rows `{prefix}-p50` and `{prefix}-p99`: latency added by `keel` over `raw`, open loop at
/// `rate`, interleaved rounds.
async fn a2<R: Arm, K: Arm>(
    report: &mut Report,
    prefix: &str,
    raw: &R,
    keel: &K,
    rate: f64,
    what: &str,
) {
    let (_, pairs) = interleave_async::<_, _, Latency>(
        ROUNDS,
        WARMUP,
        || open_loop(raw, rate, A2_ROUND),
        || open_loop(keel, rate, A2_ROUND),
        |l| l.p50_us,
    )
    .await;
    let errors: u64 = pairs.iter().map(|(a, b)| a.errors + b.errors).sum();
    let p50 = comparison(
        pairs.iter().map(|p| p.0.p50_us).collect(),
        pairs.iter().map(|p| p.1.p50_us).collect(),
    );
    let p99 = comparison(
        pairs.iter().map(|p| p.0.p99_us).collect(),
        pairs.iter().map(|p| p.1.p99_us).collect(),
    );
    for (suffix, cmp, bar, goal) in [("p50", &p50, 5.0, 2.0), ("p99", &p99, 25.0, 10.0)] {
        report.push(Row::delta(
            &format!("{prefix}-{suffix}"),
            &format!(
                "gRPC latency added, open loop {rate:.0}/s (50% of raw c64), from intended send{what}; {errors} errors"
            ),
            "us_added",
            cmp,
            bar,
            goal,
        ));
    }
}

/// Interleaved closed-loop rounds of `raw` and `keel` with `c` calls in flight: req/s compared.
async fn closed_pairs<R: Arm, K: Arm>(
    raw: &R,
    keel: &K,
    c: usize,
    round: Duration,
) -> (Comparison, Vec<(Load, Load)>) {
    interleave_async::<_, _, Load>(
        ROUNDS,
        WARMUP,
        || closed_loop(raw, c, round),
        || closed_loop(keel, c, round),
        |l| l.rate,
    )
    .await
}

fn throughput_row(id: &str, what: &str, cmp: &Comparison, pairs: &[(Load, Load)]) -> Row {
    let cpu_raw = median(
        &pairs
            .iter()
            .map(|p| p.0.cpu_us_per_call)
            .collect::<Vec<_>>(),
    );
    let cpu_keel = median(
        &pairs
            .iter()
            .map(|p| p.1.cpu_us_per_call)
            .collect::<Vec<_>>(),
    );
    let errors: u64 = pairs.iter().map(|p| p.0.errors + p.1.errors).sum();
    let mut row = Row::ratio(id, what, "ratio", cmp, 0.95, 0.98);
    row.what.push_str(&format!(
        "; client CPU/call raw {cpu_raw:.1} us, keel {cpu_keel:.1} us; {errors} errors"
    ));
    println!(
        "{id}: raw {:.0}/s, keel {:.0}/s, ratio {:.3} ± {:.3}; client CPU/call raw {cpu_raw:.1} us, keel {cpu_keel:.1} us ({:+.1} us); {errors} errors",
        cmp.median_a(),
        cmp.median_b(),
        cmp.median_ratio(),
        cmp.spread(),
        cpu_keel - cpu_raw
    );
    row
}

async fn a5<R: Arm, K: Arm>(report: &mut Report, suffix: &str, raw: &R, keel: &K, what: &str) {
    let (_, pairs) = interleave_async::<_, _, (f64, f64)>(
        ROUNDS,
        WARMUP,
        || allocs_per_call(raw, A5_CALLS),
        || allocs_per_call(keel, A5_CALLS),
        |x| x.0,
    )
    .await;
    let allocs = comparison(
        pairs.iter().map(|p| p.0.0).collect(),
        pairs.iter().map(|p| p.1.0).collect(),
    );
    let bytes = comparison(
        pairs.iter().map(|p| p.0.1).collect(),
        pairs.iter().map(|p| p.1.1).collect(),
    );
    println!(
        "A5-{suffix}: allocs/call raw {:.1}, keel {:.1}; bytes/call raw {:.0}, keel {:.0}",
        allocs.median_a(),
        allocs.median_b(),
        bytes.median_a(),
        bytes.median_b()
    );
    report.push(Row::delta(
        &format!("A5-{suffix}-allocs"),
        &format!("allocations per call added by Keel, {what}"),
        "allocs",
        &allocs,
        2.0,
        0.0,
    ));
    report.push(Row::delta(
        &format!("A5-{suffix}-bytes"),
        &format!("bytes allocated per call added by Keel, {what}"),
        "bytes",
        &bytes,
        256.0,
        0.0,
    ));
}

// ---------------------------------------------------------------------------------------------
// B5: in process

async fn b5(report: &mut Report, telemetry: &keel::Telemetry) -> Result<()> {
    let addr = start_grpc_server("in-process").await?;
    let registry = StaticRegistry::new().with_endpoints("echo", [addr.to_string()])?;
    let (raw, raw_s) = raw_grpc(addr).await?;
    let (keel, keel_s) = keel_grpc(&registry, addr, Some(telemetry)).await?;
    parity("B5", &raw_s, &keel_s)?;
    let row = b5_row(
        &raw,
        &keel,
        "B5",
        "whole default gRPC stack vs raw tonic, server in process, 1 worker, 1 call at a time",
    )
    .await;
    report.push(row);
    let (raw_p, _) = raw_grpc_propagating(addr).await?;
    let row = b5_row(
        &raw_p,
        &keel,
        "B5-vs-propagating",
        "as B5, raw tonic sending the same traceparent, request id and timeout",
    )
    .await;
    report.push(row);
    Ok(())
}

/// One B5 row: ns per sequential call, `keel` − `raw`, interleaved rounds.
async fn b5_row<R: Arm, K: Arm>(raw: &R, keel: &K, id: &str, what: &str) -> Row {
    let (cmp, _) = interleave_async::<_, _, Load>(
        ROUNDS,
        WARMUP,
        || closed_loop(raw, 1, B5_ROUND),
        || closed_loop(keel, 1, B5_ROUND),
        |l: &Load| 1e9 / l.rate,
    )
    .await;
    Row::delta(id, what, "ns_added", &cmp, 1500.0, 500.0)
}

// ---------------------------------------------------------------------------------------------
// B6: balancer pick under churn

fn b6(report: &mut Report, pinned: bool) {
    let mut by_n = BTreeMap::new();
    for (n, label) in [(10usize, "10"), (100, "100"), (10_000, "10k")] {
        let (picker, mut churner) = keel::client::bench::pick_bench(n);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let rounds: Vec<f64> = std::thread::scope(|scope| {
            let (stop2, steps2) = (stop.clone(), steps.clone());
            scope.spawn(move || {
                if pinned {
                    taskset(&["-p", "-c", &SERVER_CPU.to_string()], thread_id());
                }
                let mut next = Instant::now();
                while !stop2.load(Ordering::Relaxed) {
                    churner.step();
                    steps2.fetch_add(1, Ordering::Relaxed);
                    next += Duration::from_millis(1);
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            });
            let mut picker = picker;
            let mut rounds = Vec::new();
            for r in 0..=ROUNDS {
                let t0 = Instant::now();
                let mut picks = 0u64;
                while t0.elapsed() < B6_ROUND {
                    for _ in 0..1000 {
                        std::hint::black_box(picker.pick());
                    }
                    picks += 1000;
                }
                if r > 0 {
                    rounds.push(t0.elapsed().as_nanos() as f64 / picks as f64);
                }
            }
            stop.store(true, Ordering::Relaxed);
            rounds
        });
        let ns = median(&rounds);
        by_n.insert(n, ns);
        let mut row = Row::absolute(
            &format!("B6-n{label}"),
            &format!(
                "p2c pick + breaker admission among {label} endpoints, 1 instance replaced per ms"
            ),
            "ns_per_op",
            ns,
            100.0,
            30.0,
        );
        row.spread = keel_benches::spread(&rounds);
        row.what
            .push_str(&format!(" ({} changes)", steps.load(Ordering::Relaxed)));
        report.push(row);
    }
    let flat =
        by_n.get(&10_000).copied().unwrap_or(f64::NAN) / by_n.get(&10).copied().unwrap_or(f64::NAN);
    report.push(Row::absolute(
        "B6-flat",
        "pick ns with 10k endpoints / with 10 (our bar for flat in N)",
        "ratio",
        flat,
        2.0,
        1.2,
    ));
}

// ---------------------------------------------------------------------------------------------
// C2: kill -9 → ejection

struct Trial {
    last_routed_ms: f64,
    open_ms: f64,
    failed: u64,
    ok: u64,
    after_kill: u64,
}

async fn c2(report: &mut Report, pinned: bool) -> Result<()> {
    let mut root = keel_testkit::zk::TestRoot::new();
    root.path = format!("/{}", keel_testkit::unique("keel-bench-client"));
    let registry = zk_registry(&root.path).await?;
    let mut trials = Vec::new();
    for k in 0..C2_TRIALS {
        let trial = c2_trial(&registry, &root.path, k, pinned).await?;
        println!(
            "C2 trial {}: last call routed to the killed provider {:.1} ms after SIGKILL ({} attempts after it), breaker open at {:.1} ms; {} ok, {} failed",
            k + 1,
            trial.last_routed_ms,
            trial.after_kill,
            trial.open_ms,
            trial.ok,
            trial.failed
        );
        trials.push(trial);
    }
    drop(registry);
    drop(root); // deletes the root and everything under it
    let times: Vec<f64> = trials.iter().map(|t| t.last_routed_ms).collect();
    let mut row = Row::absolute(
        "C2",
        &format!(
            "SIGKILLed provider (of 3, in ZooKeeper) -> no more calls routed to it, {C2_RATE:.0} req/s, median of {C2_TRIALS}"
        ),
        "ms",
        median(&times),
        1000.0,
        100.0,
    );
    row.spread = keel_benches::spread(&times);
    row.what
        .push_str(&format!("; max {:.1} ms", percentile(&times, 1.0)));
    report.push(row);
    let failed: u64 = trials.iter().map(|t| t.failed).sum();
    let ok: u64 = trials.iter().map(|t| t.ok).sum();
    report.push(Row::absolute(
        "C2-failed",
        &format!("failed calls during the {C2_TRIALS} kills (idempotent calls, retry on; {ok} ok)"),
        "calls",
        failed as f64,
        0.0,
        0.0,
    ));
    Ok(())
}

async fn c2_trial(registry: &ZkRegistry, root: &str, k: usize, pinned: bool) -> Result<Trial> {
    let service = format!("echo-c2-{k}");
    let mut providers = Vec::new();
    for i in 0..3 {
        let id = format!("p-{i}");
        providers.push(
            Server::spawn(pinned, &["--id", &id, "--zk", root, "--service", &service]).await?,
        );
    }
    let channel = GrpcChannel::builder(&service)
        .timeout(Duration::from_secs(2))
        .connect(registry, Duration::from_secs(10))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while channel.endpoints().len() < 3 {
        if Instant::now() > deadline {
            return Err(format!("{service}: 3 providers not discovered in 10 s").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arm = KeelGrpc {
        client: EchoClient::new(channel.clone()),
        idempotent: true,
    };
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / C2_RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (mut arm, ok, failed) = (arm.clone(), ok.clone(), failed.clone());
                tasks.spawn(async move {
                    if arm.call().await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = "p-1";
    let calls_of = |id: &str| {
        channel
            .endpoints()
            .into_iter()
            .find(|e| e.id == id)
            .map(|e| (e.calls, e.state))
    };
    let (mut last_calls, _) = calls_of(victim).ok_or("victim not in the balancer")?;
    if last_calls == 0 {
        return Err("the victim got no calls before the kill".into());
    }
    let killed_at = Instant::now();
    providers[1].kill9()?;
    let calls_at_kill = last_calls;
    let mut last_change = killed_at;
    let mut open_at = None;
    // Watch for 1.5 s: less than the default breaker's 2 s before its first half-open probe.
    while killed_at.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if let Some((calls, state)) = calls_of(victim) {
            if calls != last_calls {
                last_calls = calls;
                last_change = Instant::now();
            }
            if open_at.is_none() && state == keel::breaker::breaker::State::Open {
                open_at = Some(Instant::now());
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let ms = |t: Instant| t.duration_since(killed_at).as_secs_f64() * 1e3;
    let trial = Trial {
        last_routed_ms: ms(last_change),
        open_ms: open_at.map_or(f64::NAN, ms),
        failed: failed.load(Ordering::Relaxed),
        ok: ok.load(Ordering::Relaxed),
        after_kill: last_calls - calls_at_kill,
    };
    drop(channel);
    for p in providers {
        p.stop().await;
    }
    Ok(trial)
}
