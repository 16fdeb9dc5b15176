//! C1 and C3 of `BENCHMARKS.md`: what Keel's ZooKeeper registry adds on top of a bare
//! `zookeeper-client` watch, measured against the live ZooKeeper of `scripts/services`, in one
//! process and one run.
//!
//! Every session (the writer, the raw arm, Keel's registry) connects to the same server,
//! `127.0.0.1:2181`, so both arms are notified by the same ensemble member. Keel runs with its
//! **default configuration** (`ZkConfig::new`: no debounce, default mass-removal hold), on a
//! unique Spring-dialect root that is deleted at the end. Node data is the crate's own Spring
//! encoder (`dialect::spring::encode`), so Keel decodes real Curator JSON.
//!
//! # C1: change → routing updated, minus a raw watch callback
//! One raw session holds a persistent recursive watch on the service node; a `ZkRegistry` watches
//! the same service through `Registry::watch`; a third session (the writer) creates and deletes
//! EPHEMERAL instance nodes one at a time (the service keeps 4 baseline instances, so no removal
//! is ever a "mass removal"). For each event: `t_raw` = the raw watch callback ran, `t_keel` =
//! Keel's stream yielded the `Add` / `Remove`, both from the instant before the write; the
//! per-event delta is `t_keel - t_raw`. Both arms observe the *same* event concurrently, which
//! pairs them more tightly than A/B interleaving can. After a warm-up, the events are cut into
//! rounds; each row reports the median across rounds of each round's p50 / p99 of the delta,
//! and the spread across rounds. Bar 1 000 µs, goal 200 µs (`BENCHMARKS.md` gives the p99 bar;
//! the p50 rows use the same).
//!
//! Two raw baselines, from the same raw watcher and the same events:
//!
//! * `C1-p50` / `C1-p99` (the letter of `BENCHMARKS.md`): `t_raw` = the bare callback ran. The
//!   callback carries no data, so on an `Add` the delta includes Keel's `get_data` round trip
//!   (nobody can route to an instance without its address), and with it ZooKeeper's read
//!   latency tail: on a loaded 2-core box a read occasionally takes 2–10 ms, and that tail, not
//!   Keel, is what a p99 of this delta measures. On a `Remove` there is no read.
//! * `C1-read-p50` / `C1-read-p99` (like for like): `t_raw` = the moment a hand-written consumer
//!   could route: the callback for a deletion, the callback plus its own `get_data` of the new
//!   node for a creation (what C3's raw arm does). Both arms then read the same node from the
//!   same server at the same moment, so a slow read hits both, and the delta is what Keel adds.
//!
//! The raw watcher therefore issues a `get_data` on every creation (after taking the callback
//! time), concurrently with Keel's own read. The pooled lines printed before the table split
//! the deltas by kind and show both arms' read times.
//!
//! # C3: one change and a full resync with 1 000 and 10 000 instances
//! A service is populated with N instances (multi-ops, batches of 500). Then interleaved rounds,
//! the arm that goes first alternating:
//!
//! * raw arm: a fresh session; timed: add a persistent recursive watch, list the N children and
//!   read all of them (pipelined, as Keel does). Then single changes: the writer creates a node,
//!   the raw watcher's callback reads it (`get_data`) — the least a hand-written consumer must
//!   do before routing — and the node is deleted again.
//! * Keel arm: a fresh `ZkRegistry`; timed: `watch(service)` until the stream yields the
//!   `Reset` with all N instances (watch + list + read + decode + publish — the same path as the
//!   re-arm after a new session). Then the same single changes, timed until the stream yields
//!   the `Add`.
//!
//! `C3-change-*` is a delta: the median (per round, then across rounds) of Keel's write→`Add`
//! time minus the raw write→callback+`get_data` time, in µs. Bar 1 000 µs, goal 200 µs — C1's
//! bar and goal, because a routing update is the same promise whether the service has 4 or
//! 10 000 instances. `C3-resync-*` is a throughput ratio: instances resynced per second by Keel
//! ÷ by the raw arm (= raw time ÷ Keel time). Bar ≥ 0.5 (decoding and publishing may at most
//! double the cost of fetching the data from ZooKeeper), goal ≥ 0.8 (at most 25 % added).
//! `BENCHMARKS.md` sets no bar for C3; these are ours.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::join_all;
use keel::core::{Endpoint, ServiceInstance};
use keel::registry::dialect::{Dialect, SpringOptions, spring};
use keel::registry::zookeeper_client as zk;
use keel::registry::{Change, Registry, Watch, ZkConfig, ZkRegistry};
use keel_benches::{Comparison, Report, Row, median, percentile, spread};
use keel_testkit::services::ZOOKEEPER;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Every session connects here, so both arms hear from the same ensemble member.
const SERVER: &str = ZOOKEEPER;
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any single expected event may take before the benchmark gives up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

const C1_BASELINE: usize = 4;
const C1_WARMUP_EVENTS: usize = 40;
const C1_ROUNDS: usize = 8;
/// Events per round (half creates, half deletes).
const C1_EVENTS: usize = 100;

const C3_SIZES: [(usize, &str); 2] = [(1_000, "1k"), (10_000, "10k")];
const C3_WARMUP: usize = 1;
const C3_ROUNDS: usize = 6;
/// Single changes timed per arm and round.
const C3_CHANGES: usize = 20;
const BATCH: usize = 500;

/// What a watcher saw, and when.
#[derive(Debug)]
enum Seen {
    Created(String, At),
    Deleted(String, At),
    Reset(usize),
}

/// When a watcher heard of an event, and when it could route by it.
#[derive(Debug, Clone, Copy)]
struct At {
    /// The watch callback ran (Keel: the stream yielded the change).
    callback: Instant,
    /// The consumer knows what it needs to route: for a raw creation, after its `get_data`;
    /// otherwise the callback.
    routed: Instant,
}

impl At {
    fn now() -> Self {
        let now = Instant::now();
        Self {
            callback: now,
            routed: now,
        }
    }
}

type Events = mpsc::UnboundedReceiver<Result<Seen, String>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let root = format!("/{}", keel_testkit::unique("keel-bench-registry"));
    let writer = connect().await.map_err(|e| {
        format!("cannot connect to ZooKeeper at {SERVER} (is `scripts/services up` running?): {e}")
    })?;
    create_dir(&writer, &root).await?;
    println!("registry bench: root {root} on {SERVER}; Keel with ZkConfig defaults (no debounce)");

    let mut report = Report::new("registry");
    let outcome = run(&writer, &root, &mut report).await;
    let cleanup = delete_tree(&writer, &root).await;
    outcome?;
    cleanup.map_err(|e| format!("cleanup of {root}: {e}"))?;
    report.finish()?;
    Ok(())
}

async fn run(writer: &zk::Client, root: &str, report: &mut Report) -> Result<()> {
    let dialect = Dialect::Spring(SpringOptions::default().with_root(root));
    let c1 = c1(writer, &dialect).await?;
    for row in c1 {
        report.push(row);
    }
    for (n, label) in C3_SIZES {
        let (change, resync) = c3(writer, &dialect, n, label).await?;
        report.push(change);
        report.push(resync);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// C1

async fn c1(writer: &zk::Client, dialect: &Dialect) -> Result<Vec<Row>> {
    let service = "c1";
    let path = dialect.service_path(service);
    create_dir(writer, &path).await?;
    for i in 0..C1_BASELINE {
        let id = format!("base-{i}");
        create_instance(writer, &path, service, &id).await?;
    }

    // Raw arm: persistent recursive watch; callback time, and for a creation the time after its
    // own read of the node.
    let raw = connect().await?;
    let watcher = raw
        .watch(&path, zk::AddWatchMode::PersistentRecursive)
        .await
        .map_err(|e| format!("raw watch on {path}: {e}"))?;
    let (raw_task, mut raw_rx) = spawn_raw_watcher(raw.clone(), watcher, true);

    // Keel arm.
    let registry = connect_keel(dialect).await?;
    let watch = registry.watch(service)?;
    let (keel_task, mut keel_rx) = spawn_keel_watcher(watch);
    expect_reset(&mut keel_rx, C1_BASELINE).await?;

    let total = C1_WARMUP_EVENTS + C1_ROUNDS * C1_EVENTS;
    let mut samples: Vec<Sample> = Vec::with_capacity(total);
    for e in 0..total {
        let id = format!("e-{}", e / 2);
        let node = format!("{path}/{id}");
        let add = e % 2 == 0;
        let t0 = Instant::now();
        if add {
            writer
                .create(&node, &instance_data(service, &id)?, &ephemeral())
                .await
                .map_err(|err| format!("create {node}: {err}"))?;
        } else {
            writer
                .delete(&node, None)
                .await
                .map_err(|err| format!("delete {node}: {err}"))?;
        }
        let raw = expect(&mut raw_rx, add, &id).await?;
        let keel = expect(&mut keel_rx, add, &id).await?;
        samples.push(Sample {
            add,
            raw_callback: us(raw.callback - t0),
            raw_routed: us(raw.routed - t0),
            keel: us(keel.routed - t0),
        });
    }
    raw_task.abort();
    keel_task.abort();
    drop((raw, registry));

    let measured = &samples[C1_WARMUP_EVENTS..];
    let mut rows = Vec::new();
    for (prefix, raw_label, routed) in [
        ("C1", "raw watch callback", false),
        (
            "C1-read",
            "raw callback (+ its get_data on a creation)",
            true,
        ),
    ] {
        let raw_of = |s: &Sample| if routed { s.raw_routed } else { s.raw_callback };
        for (q_label, q) in [("p50", 0.50), ("p99", 0.99)] {
            let mut raw_q = Vec::new();
            let mut keel_q = Vec::new();
            let mut delta_q = Vec::new();
            for round in measured.chunks(C1_EVENTS) {
                let raw: Vec<f64> = round.iter().map(raw_of).collect();
                let keel: Vec<f64> = round.iter().map(|s| s.keel).collect();
                let delta: Vec<f64> = round.iter().map(|s| s.keel - raw_of(s)).collect();
                raw_q.push(percentile(&raw, q));
                keel_q.push(percentile(&keel, q));
                delta_q.push(percentile(&delta, q));
            }
            let value = median(&delta_q);
            let spread = spread(&delta_q);
            let bar = 1000.0;
            rows.push(Row {
                id: format!("{prefix}-{q_label}"),
                what: format!(
                    "ZK change -> Keel watch stream, minus {raw_label}: {q_label} of per-event \
                     delta, median of {C1_ROUNDS} rounds x {C1_EVENTS} events (raw/keel: \
                     {q_label} latency from the write); default config, no debounce"
                ),
                unit: "us_added".to_owned(),
                value,
                raw: median(&raw_q),
                keel: median(&keel_q),
                bar,
                goal: 200.0,
                holds: value <= bar,
                spread,
                inconclusive: spread > value.abs() && value > bar,
            });
        }
    }
    for (kind, add) in [("add", true), ("remove", false)] {
        let of_kind: Vec<&Sample> = measured.iter().filter(|s| s.add == add).collect();
        let pooled = |f: &dyn Fn(&Sample) -> f64| {
            let v: Vec<f64> = of_kind.iter().map(|s| f(s)).collect();
            format!(
                "p50 {:.0} / p99 {:.0} / max {:.0}",
                percentile(&v, 0.5),
                percentile(&v, 0.99),
                percentile(&v, 1.0)
            )
        };
        println!(
            "C1 {kind:<6}: {} events (pooled, us): keel - raw callback {}; keel - raw routed {}; \
             raw read {}",
            of_kind.len(),
            pooled(&|s| s.keel - s.raw_callback),
            pooled(&|s| s.keel - s.raw_routed),
            pooled(&|s| s.raw_routed - s.raw_callback),
        );
    }
    Ok(rows)
}

/// One C1 event, in µs from the instant before the write.
struct Sample {
    add: bool,
    raw_callback: f64,
    raw_routed: f64,
    keel: f64,
}

// ---------------------------------------------------------------------------------------------
// C3

async fn c3(writer: &zk::Client, dialect: &Dialect, n: usize, label: &str) -> Result<(Row, Row)> {
    let service = format!("c3-{label}");
    let path = dialect.service_path(&service);
    create_dir(writer, &path).await?;
    let populate = Instant::now();
    for start in (0..n).step_by(BATCH) {
        let data: Vec<(String, Vec<u8>)> = (start..(start + BATCH).min(n))
            .map(|k| {
                let id = format!("i-{k:05}");
                instance_data(&service, &id).map(|d| (format!("{path}/{id}"), d))
            })
            .collect::<Result<_>>()?;
        let mut multi = writer.new_multi_writer();
        for (node, bytes) in &data {
            multi.add_create(node, bytes, &ephemeral())?;
        }
        multi
            .commit()
            .await
            .map_err(|e| format!("multi create under {path}: {e}"))?;
    }
    println!(
        "C3 {label}: populated {n} instances in {:.1} s",
        populate.elapsed().as_secs_f64()
    );

    let mut change = Comparison {
        a: Vec::new(),
        b: Vec::new(),
        ratios: Vec::new(),
    };
    let mut resync = change.clone();
    for round in 0..C3_WARMUP + C3_ROUNDS {
        let (raw, keel) = if round % 2 == 0 {
            let raw = c3_raw(writer, &path, &service, n, round).await?;
            (
                raw,
                c3_keel(writer, dialect, &path, &service, n, round).await?,
            )
        } else {
            let keel = c3_keel(writer, dialect, &path, &service, n, round).await?;
            (c3_raw(writer, &path, &service, n, round).await?, keel)
        };
        if round < C3_WARMUP {
            continue;
        }
        // Changes: µs from the write (lower is better), compared as a delta.
        change.a.push(raw.change_us);
        change.b.push(keel.change_us);
        change.ratios.push(keel.change_us / raw.change_us);
        // Resync: instances per second (higher is better), compared as a ratio.
        let (raw_rate, keel_rate) = (n as f64 / raw.resync_s, n as f64 / keel.resync_s);
        resync.a.push(raw_rate);
        resync.b.push(keel_rate);
        resync.ratios.push(keel_rate / raw_rate);
        println!(
            "C3 {label} round {}: resync raw {:.1} ms, keel {:.1} ms; one add raw {:.0} us, keel {:.0} us",
            round - C3_WARMUP + 1,
            raw.resync_s * 1e3,
            keel.resync_s * 1e3,
            raw.change_us,
            keel.change_us
        );
    }
    let change_row = Row::delta(
        &format!("C3-change-{label}"),
        &format!(
            "one Add with {label} instances: write->Keel stream Add minus write->raw callback \
             + get_data, median per round, {C3_ROUNDS} rounds x {C3_CHANGES} adds"
        ),
        "us_added",
        &change,
        1000.0,
        200.0,
    );
    let resync_row = Row::ratio(
        &format!("C3-resync-{label}"),
        &format!(
            "full resync of {label} instances (new watch -> Reset) vs raw watch + list + read \
             all, instances/s / raw (= raw time / Keel time), {C3_ROUNDS} rounds"
        ),
        "ratio",
        &resync,
        0.5,
        0.8,
    );
    Ok((change_row, resync_row))
}

struct ArmResult {
    resync_s: f64,
    change_us: f64,
}

async fn c3_raw(
    writer: &zk::Client,
    path: &str,
    service: &str,
    n: usize,
    round: usize,
) -> Result<ArmResult> {
    let client = connect().await?;
    let t0 = Instant::now();
    let watcher = client
        .watch(path, zk::AddWatchMode::PersistentRecursive)
        .await
        .map_err(|e| format!("raw watch on {path}: {e}"))?;
    let children = client
        .list_children(path)
        .await
        .map_err(|e| format!("raw list {path}: {e}"))?;
    let paths: Vec<String> = children.iter().map(|c| format!("{path}/{c}")).collect();
    let reads = join_all(paths.iter().map(|p| client.get_data(p))).await;
    let mut bytes = 0usize;
    for (p, read) in paths.iter().zip(reads) {
        let (data, _) = read.map_err(|e| format!("raw get_data {p}: {e}"))?;
        bytes += data.len();
    }
    let resync_s = t0.elapsed().as_secs_f64();
    if paths.len() != n || bytes == 0 {
        return Err(format!("raw resync of {path} read {} of {n} nodes", paths.len()).into());
    }
    let (task, mut rx) = spawn_raw_watcher(client.clone(), watcher, true);
    let change_us = changes(writer, path, service, &mut rx, &format!("raw-{round}")).await;
    task.abort();
    drop(client);
    Ok(ArmResult {
        resync_s,
        change_us: change_us?,
    })
}

async fn c3_keel(
    writer: &zk::Client,
    dialect: &Dialect,
    path: &str,
    service: &str,
    n: usize,
    round: usize,
) -> Result<ArmResult> {
    let registry = connect_keel(dialect).await?;
    let t0 = Instant::now();
    let mut watch = registry.watch(service)?;
    match tokio::time::timeout(EVENT_TIMEOUT, watch.next()).await {
        Ok(Some(Change::Reset(all))) if all.len() == n => {}
        Ok(Some(Change::Reset(all))) => {
            return Err(format!("Keel resync of {path}: {} of {n} instances", all.len()).into());
        }
        Ok(other) => return Err(format!("Keel watch of {path}: first item {other:?}").into()),
        Err(_) => {
            return Err(format!("Keel resync of {path}: no Reset in {EVENT_TIMEOUT:?}").into());
        }
    }
    let resync_s = t0.elapsed().as_secs_f64();
    let (task, mut rx) = spawn_keel_watcher(watch);
    let change_us = changes(writer, path, service, &mut rx, &format!("keel-{round}")).await;
    task.abort();
    drop(registry);
    Ok(ArmResult {
        resync_s,
        change_us: change_us?,
    })
}

/// Creates and deletes `C3_CHANGES` nodes one at a time; the median µs from write to the
/// watcher reporting each creation.
async fn changes(
    writer: &zk::Client,
    path: &str,
    service: &str,
    rx: &mut Events,
    prefix: &str,
) -> Result<f64> {
    let mut lat = Vec::with_capacity(C3_CHANGES);
    for k in 0..C3_CHANGES {
        let id = format!("x-{prefix}-{k}");
        let node = format!("{path}/{id}");
        let data = instance_data(service, &id)?;
        let t0 = Instant::now();
        writer
            .create(&node, &data, &ephemeral())
            .await
            .map_err(|e| format!("create {node}: {e}"))?;
        let seen = expect(rx, true, &id).await?;
        lat.push(us(seen.routed - t0));
        writer
            .delete(&node, None)
            .await
            .map_err(|e| format!("delete {node}: {e}"))?;
        expect(rx, false, &id).await?;
    }
    Ok(median(&lat))
}

// ---------------------------------------------------------------------------------------------
// Watchers

fn spawn_raw_watcher(
    client: zk::Client,
    mut watcher: zk::PersistentWatcher,
    read_data: bool,
) -> (JoinHandle<()>, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = watcher.changed().await;
            let mut at = At::now();
            let id = event.path.rsplit('/').next().unwrap_or_default().to_owned();
            let seen = match event.event_type {
                zk::EventType::Session => {
                    if event.session_state.is_terminated() {
                        let _ =
                            tx.send(Err(format!("raw session ended: {:?}", event.session_state)));
                        return;
                    }
                    continue;
                }
                zk::EventType::NodeCreated => {
                    if read_data {
                        if let Err(e) = client.get_data(&event.path).await {
                            let _ = tx.send(Err(format!("raw get_data {}: {e}", event.path)));
                            return;
                        }
                        at.routed = Instant::now();
                    }
                    Seen::Created(id, at)
                }
                zk::EventType::NodeDeleted => Seen::Deleted(id, at),
                zk::EventType::NodeDataChanged | zk::EventType::NodeChildrenChanged => continue,
            };
            if tx.send(Ok(seen)).is_err() {
                return;
            }
        }
    });
    (task, rx)
}

fn spawn_keel_watcher(mut watch: Watch) -> (JoinHandle<()>, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(change) = watch.next().await {
            let at = At::now();
            let seen = match change {
                Change::Add(i) => Seen::Created(i.id, at),
                Change::Remove(i) => Seen::Deleted(i.id, at),
                Change::Reset(all) => Seen::Reset(all.len()),
                Change::Update(_) => continue,
            };
            if tx.send(Ok(seen)).is_err() {
                return;
            }
        }
        let _ = tx.send(Err("Keel watch stream ended".to_owned()));
    });
    (task, rx)
}

/// Waits for the creation (`add`) or deletion of `id`, skipping anything else.
async fn expect(rx: &mut Events, add: bool, id: &str) -> Result<At> {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| format!("no event for {id} (add: {add}) within {EVENT_TIMEOUT:?}"))?;
        match next {
            None => return Err(format!("watcher gone while waiting for {id}").into()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Seen::Created(got, at))) if add && got == id => return Ok(at),
            Some(Ok(Seen::Deleted(got, at))) if !add && got == id => return Ok(at),
            Some(Ok(_)) => {}
        }
    }
}

async fn expect_reset(rx: &mut Events, n: usize) -> Result<()> {
    let next = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .map_err(|_| format!("no Reset with {n} instances within {EVENT_TIMEOUT:?}"))?;
    match next {
        None => Err("Keel watcher gone before its Reset".into()),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Seen::Reset(len))) if len == n => Ok(()),
        Some(Ok(other)) => Err(format!("expected Reset({n}), got {other:?}").into()),
    }
}

// ---------------------------------------------------------------------------------------------
// ZooKeeper helpers

async fn connect() -> Result<zk::Client> {
    Ok(zk::Client::connector()
        .with_session_timeout(SESSION_TIMEOUT)
        .connect(SERVER)
        .await
        .map_err(|e| format!("connect {SERVER}: {e}"))?)
}

async fn connect_keel(dialect: &Dialect) -> Result<ZkRegistry> {
    let config = ZkConfig::new(SERVER)
        .with_session_timeout(SESSION_TIMEOUT)
        .with_dialect(dialect.clone());
    Ok(ZkRegistry::connect(config)
        .await
        .map_err(|e| format!("Keel registry connect {SERVER}: {e}"))?)
}

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

async fn create_dir(client: &zk::Client, path: &str) -> Result<()> {
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client
        .mkdir(path, &options)
        .await
        .map_err(|e| format!("create {path}: {e}").into())
}

async fn create_instance(client: &zk::Client, path: &str, service: &str, id: &str) -> Result<()> {
    let node = format!("{path}/{id}");
    client
        .create(&node, &instance_data(service, id)?, &ephemeral())
        .await
        .map_err(|e| format!("create {node}: {e}"))?;
    Ok(())
}

/// Spring / Curator JSON for instance `id` of `service`, from Keel's own encoder.
fn instance_data(service: &str, id: &str) -> Result<Vec<u8>> {
    let port = 20_000 + (id.bytes().map(u16::from).sum::<u16>() % 40_000);
    let instance = ServiceInstance::new(service, id, Endpoint::new("127.0.0.1", port))
        .with_metadata("zone", "bench-a")
        .with_metadata("version", "1.4.2");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(spring::encode(&instance, now_ms).map_err(|e| format!("encode {id}: {e}"))?)
}

/// Deletes `root` and everything under it (children in multi batches).
async fn delete_tree(client: &zk::Client, root: &str) -> Result<()> {
    // Depth-first, iteratively: collect the tree, then delete deepest paths first.
    let mut levels: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let children = match client.list_children(&path).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(format!("list {path}: {e}").into()),
        };
        for child in children {
            stack.push(format!("{path}/{child}"));
        }
        levels
            .entry(path.matches('/').count())
            .or_default()
            .push(path);
    }
    for (_, paths) in levels.into_iter().rev() {
        for batch in paths.chunks(BATCH) {
            let mut multi = client.new_multi_writer();
            for path in batch {
                multi.add_delete(path, None)?;
            }
            if let Err(e) = multi.commit().await {
                // A node may have vanished with its session meanwhile: fall back to one by one.
                for path in batch {
                    match client.delete(path, None).await {
                        Ok(()) | Err(zk::Error::NoNode) => {}
                        Err(e2) => return Err(format!("delete {path}: {e2} (batch: {e})").into()),
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
