//! `demo`: runs the payments system under failure and checks the books.
//!
//! Starts 3 `account` instances, `payment` and `ledger` (binaries next to this one, configured
//! from `examples/config/*.toml` plus per-run `KEEL_*` overrides), opens accounts, drives
//! payments over Keel's REST client (some sent twice with the same idempotency key) while one
//! `account` instance is killed with SIGKILL and another restarted gracefully, waits for the
//! ledger to catch up, compares the ledger's totals with the balances, prints a summary and one
//! JSON line, and stops everything it started. Exit status 0 only with no failed payment and
//! matching totals.
//!
//! `demo [--payments N] [--concurrency C] [--accounts A] [--root /services] [--zk HOSTS]`

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keel::client::{GrpcChannel, RestClient};
use keel::registry::{Registry, ZkConfig, ZkRegistry};
use keel_examples::proto::account_client::AccountClient;
use keel_examples::proto::{BalancesRequest, OpenRequest};
use keel_examples::{PaymentRequest, Totals};
use rand::Rng;
use tokio::process::{Child, Command};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const INITIAL: i64 = 1_000_000;
const WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone)]
struct Args {
    payments: usize,
    concurrency: usize,
    accounts: usize,
    root: String,
    zk: String,
}

fn args() -> Result<Args, BoxError> {
    let mut a = Args {
        payments: 2000,
        concurrency: 16,
        accounts: 50,
        root: "/services".to_owned(),
        zk: "127.0.0.1:2181".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--payments" => a.payments = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--accounts" => a.accounts = value()?.parse()?,
            "--root" => a.root = value()?,
            "--zk" => a.zk = value()?,
            "-h" | "--help" => {
                println!(
                    "demo [--payments N] [--concurrency C] [--accounts A] [--root /services] [--zk HOSTS]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if a.accounts < 2 || a.concurrency == 0 {
        return Err("need --accounts >= 2 and --concurrency >= 1".into());
    }
    Ok(a)
}

/// The processes the demo started; all are stopped on every exit path.
struct Fleet {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    children: Vec<(String, Child)>,
    started: usize,
}

impl Fleet {
    fn spawn(&mut self, service: &str) -> Result<usize, BoxError> {
        self.started += 1;
        let name = format!("{service}-{}", self.started);
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log")))?;
        let config = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(format!("{service}.toml"));
        let child = Command::new(self.bin_dir.join(service))
            .env("KEEL_CONFIG", config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin_dir.join(service).display()))?;
        self.children.push((name, child));
        Ok(self.children.len() - 1)
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.children.get(i).and_then(|(_, c)| c.id())
    }

    /// SIGTERM and wait (the graceful path); SIGKILL after 30 s. An exit other than 0 is an
    /// error: a graceful shutdown must succeed.
    async fn terminate(&mut self, i: usize) -> Result<(), BoxError> {
        if let Some(pid) = self.pid(i) {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        if let Some((name, child)) = self.children.get_mut(i) {
            match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => {
                    return Err(format!("{name} exited with {status} after SIGTERM").into());
                }
                Ok(Err(e)) => return Err(format!("waiting for {name}: {e}").into()),
                Err(_) => {
                    let _ = child.kill().await;
                    return Err(format!("{name} did not stop within 30 s of SIGTERM").into());
                }
            }
        }
        Ok(())
    }

    async fn stop_all(&mut self) -> Result<(), BoxError> {
        let mut first = Ok(());
        for i in 0..self.children.len() {
            let running = matches!(self.children[i].1.try_wait(), Ok(None));
            if running && let Err(e) = self.terminate(i).await {
                eprintln!("demo: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

async fn wait_registered(
    registry: &ZkRegistry,
    service: &str,
    n: usize,
) -> Result<Vec<keel::core::ServiceInstance>, BoxError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let instances = registry.snapshot(service).await?;
        if instances.len() >= n {
            return Ok(instances);
        }
        if Instant::now() > deadline {
            return Err(
                format!("{service}: {} of {n} instances registered", instances.len()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sums the counters named in `names` over the `/metrics` of `instances`.
async fn scrape(instances: &[keel::core::ServiceInstance], names: &[&str]) -> u64 {
    let mut total = 0;
    for i in instances {
        let Some(port) = i.metadata.get("admin_port") else {
            continue;
        };
        let Ok(client) = RestClient::builder("admin")
            .max_attempts(1)
            .base_url(&format!("http://{}:{port}", i.endpoint.host))
        else {
            continue;
        };
        let Ok(res) = client.request(http::Method::GET, "/metrics").send().await else {
            continue;
        };
        for line in String::from_utf8_lossy(res.body()).lines() {
            for name in names {
                if let Some(v) = line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
                    total += v.trim().parse::<f64>().unwrap_or(0.0) as u64;
                }
            }
        }
    }
    total
}

/// The summary's rows, in the order they are added.
#[derive(Default)]
struct Table(Vec<(&'static str, String)>);

impl Table {
    fn insert(&mut self, name: &'static str, value: String) {
        self.0.push((name, value));
    }
}

#[derive(Default)]
struct Outcome {
    succeeded: AtomicU64,
    declined: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    duplicates_sent: AtomicU64,
    duplicates_replayed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// How long a payment is retried (with its key) before the demo counts it as failed: a client
/// that got no final answer must retry with the same key, or the money moved by a first attempt
/// would have no event.
const PAYMENT_DEADLINE: Duration = Duration::from_secs(60);

/// Sends one payment, retrying with the same key while the answer is not final. `Some(replayed)`
/// once it succeeded.
async fn pay(client: &RestClient, req: &PaymentRequest, outcome: &Outcome) -> Option<bool> {
    let deadline = Instant::now() + PAYMENT_DEADLINE;
    let mut last = String::new();
    let mut backoff = Duration::from_millis(50);
    for attempt in 0.. {
        if attempt > 0 {
            if Instant::now() + backoff > deadline {
                break;
            }
            outcome.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        let res = client
            .request(http::Method::POST, "/payments")
            .idempotency_key(req.idempotency_key.clone())
            .json(req)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match res {
            Ok(r) => return Some(r.headers().contains_key("idempotent-replayed")),
            Err(e) if e.status() == Some(http::StatusCode::UNPROCESSABLE_ENTITY) => {
                outcome.declined.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => last = e.to_string(),
        }
    }
    outcome
        .errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(last);
    outcome.failed.fetch_add(1, Ordering::Relaxed);
    None
}

#[tokio::main]
async fn main() {
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(2);
        }
    }
}

async fn run() -> Result<bool, BoxError> {
    let args = args()?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let bin_dir = std::env::current_exe()?
        .parent()
        .ok_or("no directory for the demo binary")?
        .to_path_buf();
    let log_dir = bin_dir.join("keel-demo").join(&run_id);
    std::fs::create_dir_all(&log_dir)?;
    let topic = format!("payments-{run_id}");
    let prefix = format!("keel-demo-{run_id}");
    let env = vec![
        ("KEEL_REGISTRY__ZOOKEEPER".to_owned(), args.zk.clone()),
        ("KEEL_REGISTRY__ROOT".to_owned(), args.root.clone()),
        (
            "KEEL_MESSAGING__PAYMENTS__DESTINATION".to_owned(),
            topic.clone(),
        ),
        (
            "KEEL_MESSAGING__PAYMENTS__GROUP".to_owned(),
            format!("ledger-{run_id}"),
        ),
        (
            "KEEL_MESSAGING__NOTIFICATIONS__DESTINATION".to_owned(),
            format!("notifications-{run_id}"),
        ),
        ("KEEL_APP__PREFIX".to_owned(), prefix.clone()),
    ];
    println!("demo {run_id}: logs in {}", log_dir.display());

    // The topic exists before anyone publishes or subscribes (a busy broker may time out a
    // first attempt: retry for up to two minutes).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let kafka = keel::messaging::Publisher::connect("kafka://127.0.0.1:9092").await?;
            kafka.declare(&topic, 4).await?;
            kafka.close().await
        };
        match attempt.await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("demo: creating topic {topic}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }

    let mut fleet = Fleet {
        bin_dir,
        log_dir,
        env,
        children: Vec::new(),
        started: 0,
    };
    let result = drive(&args, &mut fleet, &prefix).await;
    let stopped = fleet.stop_all().await;
    if let Ok(balances) =
        keel_examples::balances::Balances::connect("redis://127.0.0.1:6379", &prefix).await
    {
        let _ = balances.delete_all().await;
    }
    let ok = result?;
    stopped?;
    Ok(ok)
}

async fn drive(args: &Args, fleet: &mut Fleet, prefix: &str) -> Result<bool, BoxError> {
    let registry = ZkRegistry::connect(ZkConfig::new(args.zk.clone()).with_dialect(
        keel::registry::Dialect::Spring(
            keel::registry::dialect::SpringOptions::default().with_root(args.root.clone()),
        ),
    ))
    .await?;
    let accounts: Vec<usize> = (0..3)
        .map(|_| fleet.spawn("account"))
        .collect::<Result<_, _>>()?;
    fleet.spawn("payment")?;
    fleet.spawn("ledger")?;
    println!("started 3 account instances, payment and ledger; waiting for registration");
    wait_registered(&registry, "account", 3).await?;
    wait_registered(&registry, "payment", 1).await?;
    wait_registered(&registry, "ledger", 1).await?;

    let channel = GrpcChannel::builder("account")
        .connect(&registry, WAIT)
        .await?;
    let mut account = AccountClient::new(channel);
    let names: Vec<String> = (0..args.accounts).map(|i| format!("acct-{i:03}")).collect();
    for name in &names {
        account
            .open(OpenRequest {
                account: name.clone(),
                balance: INITIAL,
            })
            .await?;
    }
    let payment = RestClient::builder("payment")
        .max_attempts(3)
        .connect(&registry, WAIT)
        .await?;
    let ledger = RestClient::builder("ledger")
        .connect(&registry, WAIT)
        .await?;
    println!(
        "{} accounts opened with {INITIAL} each; driving {} payments ({} at a time)",
        names.len(),
        args.payments,
        args.concurrency
    );

    let outcome = Arc::new(Outcome::default());
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let run_id = prefix.trim_start_matches("keel-demo-").to_owned();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (payment, outcome, next, latencies, names, run_id) = (
            payment.clone(),
            Arc::clone(&outcome),
            Arc::clone(&next),
            Arc::clone(&latencies),
            names.clone(),
            run_id.clone(),
        );
        let total = args.payments;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let req = {
                    let mut rng = rand::rng();
                    let from = rng.random_range(0..names.len());
                    let mut to = rng.random_range(0..names.len() - 1);
                    if to >= from {
                        to += 1;
                    }
                    PaymentRequest {
                        from: names[from].clone(),
                        to: names[to].clone(),
                        amount: rng.random_range(1..=500),
                        idempotency_key: format!("{run_id}-{i}"),
                    }
                };
                let t = Instant::now();
                let done = pay(&payment, &req, &outcome).await;
                let micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = latencies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(micros);
                if done.is_some() {
                    outcome.succeeded.fetch_add(1, Ordering::Relaxed);
                }
                // Every 20th payment is sent again with its key, as a client that lost the
                // answer would: it must not pay twice.
                if done.is_some() && i % 20 == 0 {
                    outcome.duplicates_sent.fetch_add(1, Ordering::Relaxed);
                    if pay(&payment, &req, &outcome).await == Some(true) {
                        outcome.duplicates_replayed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Chaos, at a quarter and at half of the payments.
    let wait_for = |fraction: f64| {
        let next = Arc::clone(&next);
        let target = (args.payments as f64 * fraction) as usize;
        async move {
            while next.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(0.25).await;
    if let Some((name, child)) = fleet.children.get_mut(accounts[0]) {
        println!("chaos: SIGKILL {name}");
        child.kill().await?;
    }
    wait_for(0.5).await;
    println!("chaos: graceful restart of account-2 (SIGTERM, then a new instance)");
    fleet.terminate(accounts[1]).await?;
    fleet.spawn("account")?;
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed();
    let succeeded = outcome.succeeded.load(Ordering::Relaxed);
    let failed = outcome.failed.load(Ordering::Relaxed);

    // The ledger catches up with every completed payment.
    let deadline = Instant::now() + Duration::from_secs(120);
    let totals: Totals = loop {
        let t: Totals = ledger.get("/totals").await?;
        if t.payments >= succeeded || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let balances = account
        .balances(BalancesRequest {
            accounts: Vec::new(),
        })
        .await?
        .into_inner()
        .balances;
    let mut mismatches = Vec::new();
    for name in &names {
        let expected = INITIAL + totals.net.get(name).copied().unwrap_or(0);
        let actual = balances.get(name).copied().unwrap_or(i64::MIN);
        if expected != actual {
            mismatches.push(format!(
                "{name}: ledger says {expected}, account has {actual}"
            ));
        }
    }
    let sum: i64 = names.iter().filter_map(|n| balances.get(n)).sum();
    let totals_match = mismatches.is_empty()
        && sum == INITIAL * names.len() as i64
        && totals.payments == succeeded;

    let live: Vec<keel::core::ServiceInstance> = [
        registry.snapshot("payment").await?,
        registry.snapshot("account").await?,
    ]
    .concat();
    let duplicates_prevented = scrape(
        &live,
        &[
            "keel_idempotency_replayed_total",
            "keel_account_already_applied_total",
        ],
    )
    .await;

    let h = latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0;
    let mut table = Table::default();
    table.insert("payments attempted", args.payments.to_string());
    table.insert("succeeded", succeeded.to_string());
    table.insert(
        "declined (insufficient funds)",
        outcome.declined.load(Ordering::Relaxed).to_string(),
    );
    table.insert("failed", failed.to_string());
    table.insert(
        "client retries (same key)",
        outcome.retried.load(Ordering::Relaxed).to_string(),
    );
    table.insert(
        "duplicates sent / answered from store",
        format!(
            "{} / {}",
            outcome.duplicates_sent.load(Ordering::Relaxed),
            outcome.duplicates_replayed.load(Ordering::Relaxed)
        ),
    );
    table.insert(
        "duplicates prevented (all services)",
        duplicates_prevented.to_string(),
    );
    table.insert(
        "latency p50 / p99 (ms)",
        format!("{} / {}", ms(0.5), ms(0.99)),
    );
    table.insert(
        "throughput (payments/s)",
        format!("{:.0}", args.payments as f64 / elapsed.as_secs_f64()),
    );
    table.insert("ledger events consumed", totals.events.to_string());
    table.insert("ledger distinct payments", totals.payments.to_string());
    table.insert("totals match balances", totals_match.to_string());
    println!();
    for (k, v) in &table.0 {
        println!("  {k:<40} {v}");
    }
    for m in mismatches.iter().take(5) {
        println!("  mismatch: {m}");
    }
    for e in outcome
        .errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .take(5)
    {
        println!("  failure: {e}");
    }
    let summary = serde_json::json!({
        "attempted": args.payments,
        "succeeded": succeeded,
        "failed": failed,
        "duplicates_prevented": duplicates_prevented,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "ledger_events": totals.events,
        "totals_match": totals_match,
    });
    println!("{summary}");
    Ok(failed == 0 && totals_match)
}
