//! Keel's benchmark harness: programs under `src/bin/` run by `scripts/bench NAME` that measure
//! Keel side by side with the raw library underneath, in one process and one run, and report a
//! ratio or a delta (see `BENCHMARKS.md` in the design notes).
//!
//! This library holds what every such program shares:
//!
//! - [`interleave`]: runs arm A and arm B alternately (A B A B …) after a warm-up and reduces
//!   the per-pair ratios to a median and a spread, so machine noise hits both arms alike;
//! - [`Report`] / [`Row`]: the summary table printed at the end and the JSON written to
//!   `target/keel-bench/NAME.json`;
//! - [`allocs`]: allocation counting through [`stats_alloc`] — a benchmark binary installs
//!   `#[global_allocator] static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;` and
//!   measures with [`allocs::count`].
//!
//! ```
//! use keel_benches::{interleave, Report, Row};
//!
//! // Two "arms" doing the same work: the ratio is ~1.
//! let work = || (0..10_000u64).map(std::hint::black_box).sum::<u64>() as f64;
//! let cmp = interleave(5, 1, |_| work(), |_| work());
//! assert_eq!(cmp.ratios.len(), 5);
//!
//! let mut report = Report::new("example");
//! report.push(Row::ratio("X1", "same work twice", "ratio", &cmp, 0.5, 0.9));
//! assert!(report.results[0].value > 0.0);
//! ```

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use stats_alloc;

/// The outcome of an interleaved A/B comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Arm A's measurement in each round (e.g. req/s of the raw library).
    pub a: Vec<f64>,
    /// Arm B's measurement in each round (e.g. req/s through Keel).
    pub b: Vec<f64>,
    /// `b / a` per round.
    pub ratios: Vec<f64>,
}

impl Comparison {
    /// Median of the per-round ratios `b / a`.
    pub fn median_ratio(&self) -> f64 {
        median(&self.ratios)
    }

    /// Median of arm A.
    pub fn median_a(&self) -> f64 {
        median(&self.a)
    }

    /// Median of arm B.
    pub fn median_b(&self) -> f64 {
        median(&self.b)
    }

    /// Spread of the ratios: half the distance between the 25th and 75th percentiles.
    pub fn spread(&self) -> f64 {
        spread(&self.ratios)
    }

    /// Median of the per-round differences `b - a`.
    pub fn median_delta(&self) -> f64 {
        let deltas: Vec<f64> = self.a.iter().zip(&self.b).map(|(a, b)| b - a).collect();
        median(&deltas)
    }

    /// Spread of the per-round differences `b - a`.
    pub fn delta_spread(&self) -> f64 {
        let deltas: Vec<f64> = self.a.iter().zip(&self.b).map(|(a, b)| b - a).collect();
        spread(&deltas)
    }
}

/// Runs `warmup` unrecorded pairs, then `rounds` recorded pairs of `a(round)` and `b(round)`,
/// alternating which arm goes first so neither always runs on a warmer machine.
pub fn interleave(
    rounds: usize,
    warmup: usize,
    mut a: impl FnMut(usize) -> f64,
    mut b: impl FnMut(usize) -> f64,
) -> Comparison {
    for i in 0..warmup {
        a(i);
        b(i);
    }
    let mut out = Comparison {
        a: Vec::with_capacity(rounds),
        b: Vec::with_capacity(rounds),
        ratios: Vec::with_capacity(rounds),
    };
    for i in 0..rounds {
        let (x, y) = if i % 2 == 0 {
            let x = a(i);
            (x, b(i))
        } else {
            let y = b(i);
            (a(i), y)
        };
        out.a.push(x);
        out.b.push(y);
        out.ratios.push(if x == 0.0 { f64::NAN } else { y / x });
    }
    out
}

/// Median of `values` (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Half the inter-quartile range of `values`.
pub fn spread(values: &[f64]) -> f64 {
    (percentile(values, 0.75) - percentile(values, 0.25)) / 2.0
}

/// The `p` quantile (0 ≤ p ≤ 1) of `values`, linearly interpolated; NaNs are ignored (NaN for none).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = p * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// One line of a benchmark report, in the JSON shape of `BENCHMARKS.md`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Benchmark id with its variant suffix (`A1-c64`).
    pub id: String,
    /// What was measured.
    pub what: String,
    /// Unit of `value` (`ratio`, `ns_added`, `allocs`, `ms`…).
    pub unit: String,
    /// The figure the bar and goal apply to.
    pub value: f64,
    /// The raw arm's median.
    pub raw: f64,
    /// Keel's median.
    pub keel: f64,
    /// The bar it must meet.
    pub bar: f64,
    /// The goal.
    pub goal: f64,
    /// Whether `value` meets the bar.
    pub holds: bool,
    /// Spread of `value` across rounds.
    pub spread: f64,
    /// True when the spread is wider than the effect being measured.
    pub inconclusive: bool,
}

impl Row {
    /// A "higher is better" ratio row (`keel / raw`, e.g. throughput): holds when ≥ `bar`.
    pub fn ratio(id: &str, what: &str, unit: &str, cmp: &Comparison, bar: f64, goal: f64) -> Self {
        let value = cmp.median_ratio();
        let spread = cmp.spread();
        Row {
            id: id.to_owned(),
            what: what.to_owned(),
            unit: unit.to_owned(),
            value,
            raw: cmp.median_a(),
            keel: cmp.median_b(),
            bar,
            goal,
            holds: value >= bar,
            spread,
            inconclusive: spread > (1.0 - value).abs() && value < bar,
        }
    }

    /// A "lower is better" delta row (`keel - raw`, e.g. ns added): holds when ≤ `bar`.
    pub fn delta(id: &str, what: &str, unit: &str, cmp: &Comparison, bar: f64, goal: f64) -> Self {
        let value = cmp.median_delta();
        let spread = cmp.delta_spread();
        Row {
            id: id.to_owned(),
            what: what.to_owned(),
            unit: unit.to_owned(),
            value,
            raw: cmp.median_a(),
            keel: cmp.median_b(),
            bar,
            goal,
            holds: value <= bar,
            spread,
            inconclusive: spread > value.abs() && value > bar,
        }
    }

    /// A single "lower is better" measurement without a raw arm (e.g. a time to eject).
    pub fn absolute(id: &str, what: &str, unit: &str, value: f64, bar: f64, goal: f64) -> Self {
        Row {
            id: id.to_owned(),
            what: what.to_owned(),
            unit: unit.to_owned(),
            value,
            raw: f64::NAN,
            keel: value,
            bar,
            goal,
            holds: value <= bar,
            spread: 0.0,
            inconclusive: false,
        }
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// A benchmark's report: printed as a table and written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Benchmark name (`breaker`, `client`, `registry`, `messaging`).
    pub name: String,
    /// Where it ran.
    pub machine: Machine,
    /// When it started (RFC 3339).
    pub started: String,
    /// One row per id and variant, in insertion order.
    pub results: Vec<Row>,
}

impl Report {
    /// An empty report named `name`, started now.
    pub fn new(name: &str) -> Self {
        Report {
            name: name.to_owned(),
            machine: Machine::this(),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            results: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn push(&mut self, row: Row) {
        self.results.push(row);
    }

    /// The table, one line per row.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<10} {:<58} {:>12} {:>12} {:>12} {:>10} {:>8} {:>8}  holds\n",
            "id", "what", "raw", "keel", "value", "unit", "bar", "spread"
        );
        for r in &self.results {
            out.push_str(&format!(
                "{:<10} {:<58} {:>12.2} {:>12.2} {:>12.3} {:>10} {:>8} {:>8.3}  {}{}\n",
                r.id,
                truncate(&r.what, 58),
                r.raw,
                r.keel,
                r.value,
                r.unit,
                r.bar,
                r.spread,
                if r.holds { "yes" } else { "NO" },
                if r.inconclusive {
                    " (inconclusive)"
                } else {
                    ""
                },
            ));
        }
        out
    }

    /// Prints the table and writes `target/keel-bench/NAME.json` (under `CARGO_TARGET_DIR` when
    /// set); returns the path written.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn finish(&self) -> std::io::Result<PathBuf> {
        print!("{}", self.table());
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("keel-bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.name));
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&path, json)?;
        println!("wrote {}", path.display());
        Ok(path)
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Allocation counting for benchmark binaries that install
/// `stats_alloc::INSTRUMENTED_SYSTEM` as their global allocator.
pub mod allocs {
    use stats_alloc::{Region, StatsAlloc};
    use std::alloc::System;

    /// Allocations and bytes allocated while running `f` `n` times, divided by `n`.
    pub fn count(
        allocator: &'static StatsAlloc<System>,
        n: u64,
        mut f: impl FnMut(),
    ) -> (f64, f64) {
        let region = Region::new(allocator);
        for _ in 0..n {
            f();
        }
        let stats = region.change();
        (
            stats.allocations as f64 / n as f64,
            stats.bytes_allocated as f64 / n as f64,
        )
    }
}

/// Seconds since the Unix epoch (for seeding and logs).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(spread(&[1.0, 2.0, 3.0, 4.0, 5.0]), 1.0);
    }

    #[test]
    fn interleave_alternates_and_ratios() {
        let mut order = Vec::new();
        let order_cell = std::cell::RefCell::new(&mut order);
        let cmp = interleave(
            4,
            0,
            |_| {
                order_cell.borrow_mut().push('a');
                2.0
            },
            |_| {
                order_cell.borrow_mut().push('b');
                1.0
            },
        );
        assert_eq!(cmp.median_ratio(), 0.5);
        assert_eq!(order.iter().collect::<String>(), "abbaabba");
    }

    #[test]
    fn rows_hold_by_direction() {
        let cmp = Comparison {
            a: vec![100.0; 5],
            b: vec![97.0; 5],
            ratios: vec![0.97; 5],
        };
        assert!(Row::ratio("A1", "x", "ratio", &cmp, 0.95, 0.98).holds);
        assert!(!Row::delta("B1", "x", "ns", &cmp, -5.0, -10.0).holds);
    }
}
