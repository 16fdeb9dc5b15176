use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::clock::Clock;

/// A retry budget with tower's semantics: when a retry is allowed, the retries of the last `ttl`
/// (whole seconds, this one included) do not exceed `retry_ratio` × the requests of that window
/// plus `min_per_sec` × `ttl`.
///
/// Every request deposits; every retry withdraws `1 / retry_ratio` deposits' worth (rounded so
/// the effective ratio never exceeds `retry_ratio`); a reserve of `min_per_sec` × `ttl` retries
/// lets low-traffic services retry at all. The window advances in one-second slots; expired slots
/// give back what they held. Deposits and withdrawals are lock-free (atomics only); moving the
/// window on, once a second, takes a lock.
///
/// A deposit (every request) writes one atomic: the current second's slot. The balance (reserve
/// plus the slots) is summed only on a withdrawal (a retry, which is rare), and a withdrawal takes
/// its share from the current slot with a compare-and-swap, so concurrent withdrawals cannot
/// overdraw the balance they read.
///
/// Why a budget rather than just a cap on attempts: with "3 attempts" every caller triples the
/// load on a struggling dependency exactly when it can least take it; a budget bounds the extra
/// load to a fixed fraction of the normal load.
pub struct RetryBudget {
    clock: Clock,
    /// Net deposits (deposits minus withdrawals) of each second of the window, by second modulo
    /// the window's length.
    slots: Box<[AtomicI64]>,
    last_second: AtomicU64,
    /// Held while the window moves on (see [`advance_slow`](Self::advance_slow)).
    advancing: Mutex<()>,
    /// Called the moment a new second is published (tests: what a withdrawal sees then).
    #[cfg(test)]
    published: std::sync::OnceLock<PublishedHook>,
    reserve: i64,
    deposit: i64,
    withdraw: i64,
}

/// See `RetryBudget::published`.
#[cfg(test)]
type PublishedHook = Box<dyn Fn(&RetryBudget) + Send + Sync>;

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl_secs", &self.slots.len())
            .field("balance", &self.balance())
            .finish_non_exhaustive()
    }
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries a second, 20 % of requests.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl RetryBudget {
    /// A budget over `ttl` (1 s to 60 s, rounded to whole seconds), with a floor of
    /// `min_per_sec` retries per second and `retry_ratio` (0 to 1000) retries per request.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        Self::with_clock(ttl, min_per_sec, retry_ratio, Clock::default())
    }

    /// As [`new`](Self::new), reading time from `clock` (with a coarse clock a deposit is one
    /// atomic add and no clock read).
    pub fn with_clock(ttl: Duration, min_per_sec: u32, retry_ratio: f32, clock: Clock) -> Self {
        let ttl_secs = ttl.as_secs().clamp(1, 60);
        // NaN counts as 0 (the floor alone): it used to allow every retry.
        let ratio = if retry_ratio.is_nan() {
            0.0
        } else {
            f64::from(retry_ratio).clamp(0.0, 1000.0)
        };
        let (deposit, withdraw) = if ratio <= 0.0 {
            (0, 1)
        } else {
            // Round the cost of a retry up so that deposit / withdraw <= ratio.
            (1000, (1000.0 / ratio).ceil() as i64)
        };
        let reserve = i64::from(min_per_sec)
            .saturating_mul(ttl_secs as i64)
            .saturating_mul(withdraw);
        Self {
            clock,
            slots: (0..ttl_secs).map(|_| AtomicI64::new(0)).collect(),
            last_second: AtomicU64::new(0),
            advancing: Mutex::new(()),
            #[cfg(test)]
            published: std::sync::OnceLock::new(),
            reserve,
            deposit,
            withdraw,
        }
    }

    /// Moves the window to the current second (clearing the slots of the seconds that left it);
    /// returns the current second's slot.
    #[inline]
    fn advance(&self) -> usize {
        let now = self.clock.now_ms() / 1000;
        let n = self.slots.len() as u64;
        if now > self.last_second.load(Ordering::Acquire) {
            self.advance_slow(now);
        }
        (now % n) as usize
    }

    /// Moves the window on to `now`: one thread at a time, and the new second is published only
    /// once the slots leaving the window are cleared. Published first (as it was), a withdrawal
    /// in between summed the expired seconds' deposits as if still in the window, and what it
    /// took from the current slot was then erased by the clearing: retries beyond the budget,
    /// uncounted.
    #[cold]
    fn advance_slow(&self, now: u64) {
        let _moving = self
            .advancing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let last = self.last_second.load(Ordering::Acquire);
        if now <= last {
            return; // moved on by another thread meanwhile
        }
        let n = self.slots.len() as u64;
        // Slots for seconds (last, now] are reused: what they held leaves the window.
        for second in last + 1..=now.min(last + n) {
            self.slots[(second % n) as usize].store(0, Ordering::Release);
        }
        self.last_second.store(now, Ordering::Release);
        #[cfg(test)]
        if let Some(published) = self.published.get() {
            published(self);
        }
    }

    /// The reserve plus the net deposits of the window, leaving out slot `skip` (if in range).
    fn balance_without(&self, skip: usize) -> i64 {
        self.slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != skip)
            .fold(self.reserve, |sum, (_, slot)| {
                sum.saturating_add(slot.load(Ordering::Acquire))
            })
    }

    /// The reserve plus the net deposits of the window.
    fn balance(&self) -> i64 {
        self.balance_without(usize::MAX)
    }

    /// Records a request.
    #[inline]
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let slot = self.advance();
        self.slots[slot].fetch_add(self.deposit, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        let index = self.advance();
        let slot = &self.slots[index];
        let mut current = slot.load(Ordering::Acquire);
        loop {
            // Only the current slot is written by deposits and withdrawals, so the swap below
            // fails if anything that decides this withdrawal changed meanwhile (a slot cleared
            // in between is the window moving on: the retry counts as made just before).
            let balance = self.balance_without(index).saturating_add(current);
            if balance < self.withdraw {
                return false;
            }
            match slot.compare_exchange_weak(
                current,
                current - self.withdraw,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test(start_paused = true)]
    async fn floor_then_ratio() {
        let budget = RetryBudget::new(Duration::from_secs(1), 2, 0.5);
        assert!(budget.withdraw() && budget.withdraw(), "floor of 2");
        assert!(!budget.withdraw(), "floor spent, no requests yet");
        budget.deposit();
        assert!(!budget.withdraw(), "one request buys half a retry");
        budget.deposit();
        assert!(budget.withdraw(), "two requests buy one retry");
        assert!(!budget.withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            budget.withdraw() && budget.withdraw(),
            "the window slid: floor is back"
        );
        assert!(!budget.withdraw());
    }

    /// A ratio that is not a number (a templating bug in a config) is no ratio: the floor alone.
    /// It allowed every retry.
    #[tokio::test(start_paused = true)]
    async fn a_nan_ratio_allows_the_floor_only() {
        let budget = RetryBudget::new(Duration::from_secs(1), 1, f32::NAN);
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(budget.withdraw(), "floor of 1");
        assert!(!budget.withdraw(), "requests buy nothing");
    }

    /// A withdrawal the moment the window moves on (run from inside the move, through a test
    /// hook) sees the expired second's deposits gone. With the new second published before the
    /// slots were cleared, it drew on them (5 retries here, with a floor of 0 and no request in
    /// the window), and the clearing then erased what it took.
    #[tokio::test(start_paused = true)]
    async fn a_withdrawal_as_the_window_moves_sees_only_the_window() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicU32;
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.5);
        for _ in 0..10 {
            budget.deposit(); // second 0: ten requests, five retries' worth
        }
        let during = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&during);
        let hook: PublishedHook = Box::new(move |b: &RetryBudget| {
            for _ in 0..5 {
                counted.fetch_add(u32::from(b.withdraw()), Ordering::Relaxed);
            }
        });
        assert!(budget.published.set(hook).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            !budget.withdraw(),
            "second 1: nothing in the window, no floor"
        );
        assert_eq!(
            during.load(Ordering::Relaxed),
            0,
            "retries drawn on expired deposits"
        );
    }

    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        // No deposits (ratio 0): exactly the reserve of 5 × 10 retries can be taken, whatever
        // the interleaving of the threads.
        let budget = RetryBudget::new(Duration::from_secs(10), 5, 0.0);
        let taken: u32 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| (0..1000).map(|_| u32::from(budget.withdraw())).sum::<u32>())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 50);
    }

    // One step of a random run: wait some milliseconds, then a request that fails and wants
    // a number of retries.
    fn steps() -> impl Strategy<Value = Vec<(u64, u8)>> {
        proptest::collection::vec((0u64..700, 0u8..4), 1..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn retries_never_exceed_budget(
            steps in steps(),
            ttl in 1u64..5,
            floor in 0u32..4,
            ratio in prop_oneof![Just(0.0f32), Just(0.1f32), 0.05f32..1.0],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let budget = RetryBudget::new(Duration::from_secs(ttl), floor, ratio);
                let start = tokio::time::Instant::now();
                // (second, requests, retries) per elapsed second.
                let mut per_second: Vec<(u64, u64)> = Vec::new();
                for (wait_ms, wants) in steps {
                    tokio::time::advance(Duration::from_millis(wait_ms)).await;
                    let second = start.elapsed().as_secs() as usize;
                    if per_second.len() <= second {
                        per_second.resize(second + 1, (0, 0));
                    }
                    budget.deposit();
                    per_second[second].0 += 1;
                    for _ in 0..wants {
                        if budget.withdraw() {
                            per_second[second].1 += 1;
                        }
                    }
                }
                // Every window of `ttl` seconds that ends with a retry respects
                // ratio × requests + floor × ttl.
                for end in 0..per_second.len() {
                    if per_second[end].1 == 0 {
                        continue;
                    }
                    let from = end.saturating_sub(ttl as usize - 1);
                    let (reqs, retries) = per_second[from..=end]
                        .iter()
                        .fold((0, 0), |(a, b), (r, t)| (a + r, b + t));
                    let allowed = f64::from(ratio) * reqs as f64 + f64::from(floor) * ttl as f64;
                    prop_assert!(
                        retries as f64 <= allowed + 1e-9,
                        "window ending at {end}s: {retries} retries > {allowed}"
                    );
                }
                Ok(())
            })?;
        }
    }
}
