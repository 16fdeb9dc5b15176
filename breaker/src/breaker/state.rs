//! The breaker's state machine and sliding windows.
//!
//! Closed-state fast path: one atomic load of the state word in `poll_ready`, and on completion
//! one `fetch_add` on the ring index, one `swap` of a ring slot and (only when the slot's
//! contribution changes) one `fetch_add` on a packed counter word — no lock, no allocation.
//! When the count window is full of successes, recording one more success changes nothing (the
//! window, read oldest to newest, is the same N successes), so it is only a load of the counter
//! word: a healthy breaker's hot path writes no shared cache line at all.
//! Everything else (tripping, half-open probes, the open timer) is rare and takes a mutex.
//!
//! Layout: what every call reads (the state word) and what calls write (ring index, counter
//! word, metrics) sit on separate cache lines ([`Padded`]), and so does the `Arc`'s reference
//! count, so that two cores recording at once do not invalidate each other's reads.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use tokio::sync::watch;

use super::ConfigError;
use super::config::{BreakerConfig, SlidingWindowType};
use crate::classify::Outcome;
use crate::clock::{Clock, Padded};

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow; outcomes are recorded in the sliding window.
    Closed,
    /// Calls are refused until the open wait has passed.
    Open,
    /// A fixed number of probe calls decide between closed and open.
    HalfOpen,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

fn word(generation: u64, state: u64) -> u64 {
    (generation << 2) | state
}

fn state_of(word: u64) -> State {
    match word & 3 {
        CLOSED => State::Closed,
        OPEN => State::Open,
        _ => State::HalfOpen,
    }
}

/// Counters for metrics; read them with [`Breaker::metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BreakerMetrics {
    /// Current state.
    pub state: Option<State>,
    /// Transitions into open.
    pub opened: u64,
    /// Transitions into half-open.
    pub half_opened: u64,
    /// Transitions into closed.
    pub closed: u64,
    /// Calls refused (fail-fast) or found not ready (gate) because of the breaker.
    pub rejected: u64,
    /// Calls currently in the closed-state window.
    pub window_calls: u64,
    /// Failure rate of the window, percent (0 below the minimum number of calls).
    pub failure_rate: f32,
    /// Slow-call rate of the window, percent (0 below the minimum number of calls).
    pub slow_call_rate: f32,
}

// ---------------------------------------------------------------------------------------------
// Count window: a ring of outcome slots plus a packed counter word (total | failed | slow), each
// field 21 bits with a bias of 2^20 so that transient negative values (concurrent updates applied
// out of order) never borrow from the neighbouring field. Every slot swap is paired with the
// exact delta of what it replaced, so the counters never drift.

const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const BIAS: u64 = 1 << 20;
const BIASED_ZERO: u64 = BIAS | (BIAS << FIELD_BITS) | (BIAS << (2 * FIELD_BITS));

const SLOT_EMPTY: u8 = 0;
const SLOT_PRESENT: u8 = 1;
const SLOT_FAILED: u8 = 2;
const SLOT_SLOW: u8 = 4;

fn contribution(slot: u8) -> u64 {
    if slot & SLOT_PRESENT == 0 {
        return 0;
    }
    1 + (u64::from(slot & SLOT_FAILED != 0) << FIELD_BITS)
        + (u64::from(slot & SLOT_SLOW != 0) << (2 * FIELD_BITS))
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    total: u64,
    failed: u64,
    slow: u64,
}

fn decode(packed: u64, max: u64) -> Tally {
    let field = |shift: u32| {
        let v = (packed >> shift) & FIELD_MASK;
        v.saturating_sub(BIAS).min(max)
    };
    Tally {
        total: field(0),
        failed: field(FIELD_BITS),
        slow: field(2 * FIELD_BITS),
    }
}

struct CountWindow {
    slots: Box<[AtomicU8]>,
    next: AtomicUsize,
    counters: AtomicU64,
}

impl CountWindow {
    fn new(size: usize) -> Self {
        Self {
            slots: (0..size).map(|_| AtomicU8::new(SLOT_EMPTY)).collect(),
            next: AtomicUsize::new(0),
            counters: AtomicU64::new(BIASED_ZERO),
        }
    }

    #[inline]
    fn record(&self, failed: bool, slow: bool) -> Tally {
        if !failed && !slow {
            // A full window of successes plus one success is the same window: skip the ring
            // (no shared write). Racing a concurrent failure, this success is ordered before it.
            let t = self.tally();
            if t.total == self.slots.len() as u64 && t.failed == 0 && t.slow == 0 {
                return t;
            }
        }
        let value =
            SLOT_PRESENT | if failed { SLOT_FAILED } else { 0 } | if slow { SLOT_SLOW } else { 0 };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let old = self.slots[i].swap(value, Ordering::AcqRel);
        let packed = if old == value {
            self.counters.load(Ordering::Acquire)
        } else {
            let delta = contribution(value).wrapping_sub(contribution(old));
            self.counters
                .fetch_add(delta, Ordering::AcqRel)
                .wrapping_add(delta)
        };
        decode(packed, self.slots.len() as u64)
    }

    fn tally(&self) -> Tally {
        decode(
            self.counters.load(Ordering::Acquire),
            self.slots.len() as u64,
        )
    }

    fn reset(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(SLOT_EMPTY, Ordering::AcqRel);
            let delta = 0u64.wrapping_sub(contribution(old));
            self.counters.fetch_add(delta, Ordering::AcqRel);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time window: one packed word per second-bucket: tag (22 bits: second + 1, 0 = empty) | total |
// failed | slow (14 bits each, saturating). Updated with a CAS loop, so a bucket rolls over to a
// new second atomically with its first count.

const TAG_BITS: u32 = 22;
const TAG_MOD: u64 = (1 << TAG_BITS) - 1;
const COUNT_BITS: u32 = 14;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

fn tag_for(second: u64) -> u64 {
    second % TAG_MOD + 1
}

struct TimeWindow {
    buckets: Box<[AtomicU64]>,
}

impl TimeWindow {
    fn new(seconds: usize) -> Self {
        Self {
            buckets: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn unpack(bucket: u64) -> (u64, Tally) {
        (
            bucket >> (3 * COUNT_BITS),
            Tally {
                total: bucket & COUNT_MAX,
                failed: (bucket >> COUNT_BITS) & COUNT_MAX,
                slow: (bucket >> (2 * COUNT_BITS)) & COUNT_MAX,
            },
        )
    }

    fn pack(tag: u64, t: Tally) -> u64 {
        (tag << (3 * COUNT_BITS))
            | (t.slow << (2 * COUNT_BITS))
            | (t.failed << COUNT_BITS)
            | t.total
    }

    /// Records a call; returns whether the bucket now holds any failed or slow call.
    #[inline]
    fn record(&self, now_ms: u64, failed: bool, slow: bool) -> bool {
        let second = now_ms / 1000;
        let tag = tag_for(second);
        let bucket = &self.buckets[(second % self.buckets.len() as u64) as usize];
        let mut current = bucket.load(Ordering::Acquire);
        loop {
            let (old_tag, mut t) = Self::unpack(current);
            if old_tag != tag {
                t = Tally::default();
            }
            if t.total < COUNT_MAX {
                t.total += 1;
                t.failed += u64::from(failed);
                t.slow += u64::from(slow);
            }
            let new = Self::pack(tag, t);
            match bucket.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return t.failed > 0 || t.slow > 0,
                Err(actual) => current = actual,
            }
        }
    }

    fn tally(&self, now_ms: u64) -> Tally {
        let now_tag = tag_for(now_ms / 1000);
        let n = self.buckets.len() as u64;
        let mut sum = Tally::default();
        for bucket in self.buckets.iter() {
            let (tag, t) = Self::unpack(bucket.load(Ordering::Acquire));
            if tag == 0 {
                continue;
            }
            let age = (now_tag + TAG_MOD - tag) % TAG_MOD;
            if age < n {
                sum.total += t.total;
                sum.failed += t.failed;
                sum.slow += t.slow;
            }
        }
        sum
    }

    fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Release);
        }
    }
}

enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

// ---------------------------------------------------------------------------------------------

/// A probe or closed-state ticket, taken in `poll_ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    Closed { generation: u64 },
    HalfOpen { generation: u64 },
}

/// Why no permit was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// Open; probing may start at this clock millisecond.
    Open { until_ms: u64 },
    /// Half-open with every probe in flight; re-opens at this clock millisecond if the probes
    /// have not completed by then (`maxWaitDurationInHalfOpenState`).
    HalfOpenFull { until_ms: Option<u64> },
}

struct Slow {
    consecutive_opens: u32,
    probes_available: u32,
    probes_done: u32,
    probes_failed: u32,
    probes_slow: u32,
    wakers: Vec<Waker>,
}

// 128-byte aligned so that the `Arc`'s reference counts (written whenever a `Breaker` is cloned or
// dropped) do not share a cache line with the state word every call reads.
#[repr(align(128))]
struct Shared {
    config: BreakerConfig,
    clock: Clock,
    min_calls: u64,
    slow_ms: u64,
    /// `maxWaitDurationInHalfOpenState` in milliseconds; 0 = no limit.
    max_half_open_ms: u64,
    state: AtomicU64,
    open_until_ms: AtomicU64,
    /// When the current half-open period times out (valid while half-open and the limit is set).
    half_open_until_ms: AtomicU64,
    /// On lines of its own: the ring index and counter word are written by calls.
    window: Padded<Window>,
    slow: Mutex<Slow>,
    tx: watch::Sender<State>,
    counts: Padded<Counts>,
}

/// Transition and rejection counters (written off the closed-state path).
#[derive(Default)]
struct Counts {
    opened: AtomicU64,
    half_opened: AtomicU64,
    closed: AtomicU64,
    rejected: AtomicU64,
}

/// A circuit breaker's state, shared by every service it guards; cheap to clone.
///
/// Build one per endpoint for outlier ejection, or one per downstream service for fail-fast.
/// Observe it with [`subscribe`](Self::subscribe) (a watch channel of [`State`]) and
/// [`metrics`](Self::metrics).
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("config", &self.shared.config)
            .finish()
    }
}

impl Breaker {
    /// A breaker with the default [`Clock`].
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration is out of range.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, Clock::default())
    }

    /// A breaker reading time from `clock` (e.g. a coarse clock).
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration is out of range.
    pub fn with_clock(config: BreakerConfig, clock: Clock) -> Result<Self, ConfigError> {
        config.validate()?;
        let size = config.sliding_window_size as usize;
        let (window, min_calls) = match config.sliding_window_type {
            SlidingWindowType::CountBased => (
                Window::Count(CountWindow::new(size)),
                config
                    .minimum_number_of_calls
                    .min(config.sliding_window_size),
            ),
            SlidingWindowType::TimeBased => (
                Window::Time(TimeWindow::new(size)),
                config.minimum_number_of_calls,
            ),
        };
        let slow_ms =
            u64::try_from(config.slow_call_duration_threshold.as_millis()).unwrap_or(u64::MAX);
        let max_half_open_ms = match config.max_wait_duration_in_half_open_state {
            d if d.is_zero() => 0,
            // At least 1 ms, so that a sub-millisecond limit is not mistaken for "no limit".
            d => u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
        };
        let (tx, _) = watch::channel(State::Closed);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                clock,
                min_calls: u64::from(min_calls),
                slow_ms,
                max_half_open_ms,
                state: AtomicU64::new(word(0, CLOSED)),
                open_until_ms: AtomicU64::new(0),
                half_open_until_ms: AtomicU64::new(0),
                window: Padded(window),
                slow: Mutex::new(Slow {
                    consecutive_opens: 0,
                    probes_available: 0,
                    probes_done: 0,
                    probes_failed: 0,
                    probes_slow: 0,
                    wakers: Vec::new(),
                }),
                tx,
                counts: Padded::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// The current state, after applying any timed transition that is due (open → half-open
    /// with automatic transition enabled, half-open → open after
    /// `maxWaitDurationInHalfOpenState`).
    pub fn state(&self) -> State {
        let current = self.shared.state.load(Ordering::Acquire);
        if current & 3 != CLOSED
            && self
                .timed_transition_ms(current)
                .is_some_and(|at| self.shared.clock.precise_ms() >= at)
        {
            let mut slow = self.lock();
            self.apply_due(&mut slow, true);
        }
        state_of(self.shared.state.load(Ordering::Acquire))
    }

    /// A receiver that sees every state change (the latest state, as a watch channel does).
    ///
    /// A bare receiver does not make time pass: a timed transition is published when something
    /// observes or uses the breaker after it is due (a call, a gate-mode `poll_ready`,
    /// [`state`](Self::state), [`metrics`](Self::metrics), a [`StateWatch`]). To be told of
    /// timed transitions with no traffic, use [`watch`](Self::watch).
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.shared.tx.subscribe()
    }

    /// A [`StateWatch`]: like [`subscribe`](Self::subscribe), but waiting on it also makes the
    /// breaker's timed transitions happen on time, with no traffic and no background task.
    pub fn watch(&self) -> StateWatch {
        StateWatch {
            breaker: self.clone(),
            rx: self.subscribe(),
        }
    }

    /// When the next timed transition from the state word `current` is due (clock
    /// milliseconds), if one is scheduled and observers should see it without a call attempt.
    fn timed_transition_ms(&self, current: u64) -> Option<u64> {
        let s = &self.shared;
        match current & 3 {
            OPEN if s.config.automatic_transition_from_open_to_half_open_enabled => {
                Some(s.open_until_ms.load(Ordering::Acquire))
            }
            HALF_OPEN if s.max_half_open_ms > 0 => {
                Some(s.half_open_until_ms.load(Ordering::Acquire))
            }
            _ => None,
        }
    }

    /// The instant of the next timed transition observers will see (see
    /// [`timed_transition_ms`](Self::timed_transition_ms)).
    pub(crate) fn next_transition(&self) -> Option<tokio::time::Instant> {
        let current = self.shared.state.load(Ordering::Acquire);
        self.timed_transition_ms(current)
            .map(|ms| self.shared.clock.instant_at(ms))
    }

    /// Applies the timed transitions that are due. `observer`: the open → half-open one only
    /// when automatic transition is enabled (a call attempt applies it regardless).
    fn apply_due(&self, slow: &mut Slow, observer: bool) {
        let s = &self.shared;
        loop {
            let current = s.state.load(Ordering::Acquire);
            let generation = current >> 2;
            let now = s.clock.precise_ms();
            match current & 3 {
                OPEN if (!observer
                    || s.config.automatic_transition_from_open_to_half_open_enabled)
                    && now >= s.open_until_ms.load(Ordering::Acquire) =>
                {
                    self.to_half_open(slow, generation);
                }
                HALF_OPEN
                    if s.max_half_open_ms > 0
                        && now >= s.half_open_until_ms.load(Ordering::Acquire) =>
                {
                    tracing::info!(
                        max_wait_ms = s.max_half_open_ms,
                        "circuit breaker half-open too long"
                    );
                    self.to_open(slow, generation);
                }
                _ => return,
            }
        }
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> BreakerMetrics {
        let s = &self.shared;
        let state = self.state();
        let t = self.tally();
        let rate = |n: u64| {
            if t.total >= s.min_calls && t.total > 0 {
                (n as f64 * 100.0 / t.total as f64) as f32
            } else {
                0.0
            }
        };
        BreakerMetrics {
            state: Some(state),
            opened: s.counts.opened.load(Ordering::Relaxed),
            half_opened: s.counts.half_opened.load(Ordering::Relaxed),
            closed: s.counts.closed.load(Ordering::Relaxed),
            rejected: s.counts.rejected.load(Ordering::Relaxed),
            window_calls: t.total,
            failure_rate: rate(t.failed),
            slow_call_rate: rate(t.slow),
        }
    }

    /// The clock this breaker reads.
    pub(crate) fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    fn tally(&self) -> Tally {
        match &self.shared.window.0 {
            Window::Count(w) => w.tally(),
            Window::Time(w) => w.tally(self.shared.clock.now_ms()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slow> {
        self.shared
            .slow
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a permit for one call, or says why not.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Result<Permit, Denied> {
        let current = self.shared.state.load(Ordering::Acquire);
        if current & 3 == CLOSED {
            return Ok(Permit::Closed {
                generation: current >> 2,
            });
        }
        self.try_acquire_slow()
    }

    #[cold]
    fn try_acquire_slow(&self) -> Result<Permit, Denied> {
        let s = &self.shared;
        // Open and still waiting: refuse without taking the lock.
        let current = s.state.load(Ordering::Acquire);
        if current & 3 == OPEN {
            let until_ms = s.open_until_ms.load(Ordering::Acquire);
            if s.clock.precise_ms() < until_ms && s.state.load(Ordering::Acquire) == current {
                return Err(Denied::Open { until_ms });
            }
        }
        let mut slow = self.lock();
        // A call attempt: open → half-open once the wait is over, whatever the automatic
        // transition setting; a timed-out half-open re-opens.
        self.apply_due(&mut slow, false);
        let current = s.state.load(Ordering::Acquire);
        let generation = current >> 2;
        match current & 3 {
            CLOSED => Ok(Permit::Closed { generation }),
            OPEN => Err(Denied::Open {
                until_ms: s.open_until_ms.load(Ordering::Acquire),
            }),
            _ => {
                if slow.probes_available == 0 {
                    return Err(Denied::HalfOpenFull {
                        until_ms: (s.max_half_open_ms > 0)
                            .then(|| s.half_open_until_ms.load(Ordering::Acquire)),
                    });
                }
                slow.probes_available -= 1;
                Ok(Permit::HalfOpen { generation })
            }
        }
    }

    /// Counts a refused call.
    pub(crate) fn count_rejected(&self) {
        self.shared.counts.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Registers a task to wake on the next state change or released probe.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut slow = self.lock();
        if !slow.wakers.iter().any(|w| w.will_wake(waker)) {
            slow.wakers.push(waker.clone());
        }
    }

    /// Gives back a permit that was not used for a call (or whose call was cancelled).
    pub(crate) fn release(&self, permit: Permit) {
        if let Permit::HalfOpen { generation } = permit {
            let mut slow = self.lock();
            if self.shared.state.load(Ordering::Acquire) == word(generation, HALF_OPEN) {
                slow.probes_available += 1;
                wake_all(&mut slow);
            }
        }
    }

    /// Records the outcome of a call that started at `start_ms` (clock milliseconds).
    #[inline]
    pub(crate) fn record(&self, permit: Permit, start_ms: u64, outcome: Outcome) {
        self.record_timed(permit, start_ms, None, outcome);
    }

    /// Records an outcome; the call is slow if it took longer than the threshold from
    /// `start_ms` to `end_ms` (default: now).
    #[inline]
    pub(crate) fn record_timed(
        &self,
        permit: Permit,
        start_ms: u64,
        end_ms: Option<u64>,
        outcome: Outcome,
    ) {
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::Failure(_) => true,
            Outcome::Ignored | Outcome::LocalRejection => {
                self.release(permit);
                return;
            }
        };
        let s = &self.shared;
        let now_ms = s.clock.now_ms();
        let slow = end_ms.unwrap_or(now_ms).saturating_sub(start_ms) > s.slow_ms;
        match permit {
            Permit::Closed { generation } => {
                if s.state.load(Ordering::Acquire) != word(generation, CLOSED) {
                    return;
                }
                let trip = match &s.window.0 {
                    Window::Count(w) => {
                        let t = w.record(failed, slow);
                        (t.failed > 0 || t.slow > 0) && self.exceeds(t)
                    }
                    Window::Time(w) => {
                        w.record(now_ms, failed, slow) && self.exceeds(w.tally(now_ms))
                    }
                };
                if trip {
                    self.trip(generation);
                }
            }
            Permit::HalfOpen { generation } => self.record_probe(generation, failed, slow),
        }
    }

    fn exceeds(&self, t: Tally) -> bool {
        let c = &self.shared.config;
        t.total >= self.shared.min_calls
            && t.total > 0
            && (t.failed as f64 * 100.0 >= f64::from(c.failure_rate_threshold) * t.total as f64
                || t.slow as f64 * 100.0 >= f64::from(c.slow_call_rate_threshold) * t.total as f64)
    }

    #[cold]
    fn trip(&self, generation: u64) {
        let mut slow = self.lock();
        if self.shared.state.load(Ordering::Acquire) == word(generation, CLOSED) {
            self.to_open(&mut slow, generation);
        }
    }

    #[cold]
    fn record_probe(&self, generation: u64, failed: bool, slow_call: bool) {
        let mut slow = self.lock();
        // A probe that completes after the half-open period timed out no longer counts.
        self.apply_due(&mut slow, true);
        if self.shared.state.load(Ordering::Acquire) != word(generation, HALF_OPEN) {
            return;
        }
        slow.probes_done += 1;
        slow.probes_failed += u32::from(failed);
        slow.probes_slow += u32::from(slow_call);
        let permitted = self
            .shared
            .config
            .permitted_number_of_calls_in_half_open_state;
        if slow.probes_done >= permitted {
            let t = Tally {
                total: u64::from(slow.probes_done),
                failed: u64::from(slow.probes_failed),
                slow: u64::from(slow.probes_slow),
            };
            let c = &self.shared.config;
            let bad = t.failed as f64 * 100.0
                >= f64::from(c.failure_rate_threshold) * t.total as f64
                || t.slow as f64 * 100.0 >= f64::from(c.slow_call_rate_threshold) * t.total as f64;
            if bad {
                self.to_open(&mut slow, generation);
            } else {
                self.to_closed(&mut slow, generation);
            }
        }
    }

    fn to_open(&self, slow: &mut Slow, generation: u64) {
        let s = &self.shared;
        slow.consecutive_opens = slow.consecutive_opens.saturating_add(1);
        let wait = s.config.wait_for(slow.consecutive_opens);
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        s.open_until_ms.store(
            s.clock.precise_ms().saturating_add(wait_ms),
            Ordering::Release,
        );
        s.state.store(word(generation + 1, OPEN), Ordering::Release);
        s.counts.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            wait_ms,
            opens = slow.consecutive_opens,
            "circuit breaker opened"
        );
        s.tx.send_replace(State::Open);
        wake_all(slow);
    }

    fn to_half_open(&self, slow: &mut Slow, generation: u64) {
        let s = &self.shared;
        slow.probes_available = s.config.permitted_number_of_calls_in_half_open_state;
        slow.probes_done = 0;
        slow.probes_failed = 0;
        slow.probes_slow = 0;
        if s.max_half_open_ms > 0 {
            s.half_open_until_ms.store(
                s.clock.precise_ms().saturating_add(s.max_half_open_ms),
                Ordering::Release,
            );
        }
        s.state
            .store(word(generation + 1, HALF_OPEN), Ordering::Release);
        s.counts.half_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!("circuit breaker half-open");
        s.tx.send_replace(State::HalfOpen);
        wake_all(slow);
    }

    fn to_closed(&self, slow: &mut Slow, generation: u64) {
        let s = &self.shared;
        match &s.window.0 {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
        slow.consecutive_opens = 0;
        s.state
            .store(word(generation + 1, CLOSED), Ordering::Release);
        s.counts.closed.fetch_add(1, Ordering::Relaxed);
        tracing::info!("circuit breaker closed");
        s.tx.send_replace(State::Closed);
        wake_all(slow);
    }

    /// The instant when the open wait ending at `until_ms` ends.
    pub(crate) fn instant_at(&self, until_ms: u64) -> tokio::time::Instant {
        self.shared.clock.instant_at(until_ms)
    }
}

/// A watch on a [`Breaker`]'s state that also drives its timed transitions while waited on;
/// see [`Breaker::watch`].
///
/// ```no_run
/// # async fn example(breaker: keel_breaker::breaker::Breaker) {
/// let mut watch = breaker.watch();
/// loop {
///     let state = watch.changed().await;
///     println!("breaker is now {state:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct StateWatch {
    breaker: Breaker,
    rx: watch::Receiver<State>,
}

impl StateWatch {
    /// The latest state seen (without marking it seen).
    pub fn current(&self) -> State {
        *self.rx.borrow()
    }

    /// Waits for the next state change and returns the new state. While it waits, a timer is
    /// armed for the next timed transition (open → half-open when automatic transition is
    /// enabled, half-open → open after `maxWaitDurationInHalfOpenState`), which is applied when
    /// it fires.
    pub async fn changed(&mut self) -> State {
        loop {
            // Publishes a transition that is already due.
            self.breaker.state();
            if self.rx.has_changed().unwrap_or(false) {
                return *self.rx.borrow_and_update();
            }
            let next = self.breaker.next_transition();
            let mut changed = std::pin::pin!(self.rx.changed());
            let mut sleep = std::pin::pin!(next.map(tokio::time::sleep_until));
            std::future::poll_fn(|cx| {
                if changed.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
                match sleep.as_mut().as_pin_mut() {
                    Some(sleep) => sleep.poll(cx),
                    None => std::task::Poll::Pending,
                }
            })
            .await;
        }
    }
}

fn wake_all(slow: &mut Slow) {
    for w in slow.wakers.drain(..) {
        w.wake();
    }
}

#[cfg(test)]
impl Breaker {
    /// Recounts the window from its slots (count windows only).
    pub(crate) fn recount(&self) -> (u64, u64, u64) {
        let Window::Count(w) = &self.shared.window.0 else {
            return (0, 0, 0);
        };
        let mut t = (0, 0, 0);
        for slot in w.slots.iter() {
            let v = slot.load(Ordering::Acquire);
            if v & SLOT_PRESENT != 0 {
                t.0 += 1;
                t.1 += u64::from(v & SLOT_FAILED != 0);
                t.2 += u64::from(v & SLOT_SLOW != 0);
            }
        }
        t
    }

    pub(crate) fn tally_for_test(&self) -> (u64, u64, u64) {
        let t = self.tally();
        (t.total, t.failed, t.slow)
    }

    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.shared.state.load(Ordering::Acquire) >> 2 == generation
    }
}
