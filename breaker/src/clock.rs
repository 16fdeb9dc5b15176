//! Time sources for the layers.
//!
//! Every layer reads time through a [`Clock`] built on [`tokio::time::Instant`], so tests can run
//! with paused time. The default clock reads the time whenever it needs it. A *coarse* clock
//! ([`Clock::coarse`]) instead keeps the current millisecond in an atomic that a
//! [`CoarseClockDriver`] refreshes: reading it costs one relaxed atomic load, which is what the
//! circuit breaker's closed-state fast path needs to stay within a few nanoseconds. The driver is
//! a future the caller runs (for example with `tokio::spawn`): Keel never spawns tasks behind your
//! back.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Aligns its contents to 128 bytes (two 64-byte lines: adjacent-line prefetchers pair them),
/// so that a value written by one core does not share a cache line with other hot data.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A source of milliseconds since a fixed epoch (see the [module docs](self)).
#[derive(Clone)]
pub struct Clock {
    epoch: Instant,
    coarse: Option<Arc<Padded<AtomicU64>>>,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("coarse", &self.coarse.is_some())
            .finish()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::precise()
    }
}

impl Clock {
    /// A clock that reads [`Instant::now`] every time.
    pub fn precise() -> Self {
        Self {
            epoch: Instant::now(),
            coarse: None,
        }
    }

    /// A coarse clock, and the driver that keeps it current by ticking every `resolution`
    /// (at least 1 ms). Run the driver on your runtime; while it is not running the coarse time
    /// stands still (the breaker's open-state timing always reads the precise time, so a stalled
    /// driver never keeps a breaker open).
    pub fn coarse(resolution: Duration) -> (Self, CoarseClockDriver) {
        let now = Arc::new(Padded(AtomicU64::new(0)));
        let clock = Self {
            epoch: Instant::now(),
            coarse: Some(Arc::clone(&now)),
        };
        let driver = CoarseClockDriver {
            clock: clock.clone(),
            now,
            resolution: resolution.max(Duration::from_millis(1)),
        };
        (clock, driver)
    }

    /// Milliseconds since this clock's epoch: the coarse value if this is a coarse clock.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        match &self.coarse {
            Some(now) => now.load(Ordering::Relaxed),
            None => self.precise_ms(),
        }
    }

    /// Milliseconds since this clock's epoch, always read from [`Instant::now`].
    #[inline]
    pub fn precise_ms(&self) -> u64 {
        let ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// Milliseconds from this clock's epoch to `at` (zero before it).
    pub fn ms_of(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` milliseconds after this clock's epoch.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

/// Keeps a coarse [`Clock`] current; run it with `driver.run().await` on a task you own.
pub struct CoarseClockDriver {
    clock: Clock,
    now: Arc<Padded<AtomicU64>>,
    resolution: Duration,
}

impl fmt::Debug for CoarseClockDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoarseClockDriver")
            .field("resolution", &self.resolution)
            .finish()
    }
}

impl CoarseClockDriver {
    /// Stores the precise time into the coarse clock once.
    pub fn tick(&self) {
        self.now.store(self.clock.precise_ms(), Ordering::Relaxed);
    }

    /// Ticks forever, every `resolution`. Returns when every clone of the clock is dropped.
    pub async fn run(self) {
        let mut interval = tokio::time::interval(self.resolution);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.tick();
            if Arc::strong_count(&self.now) <= 2 && self.clock.coarse.is_some() {
                // Only the driver's own two references remain.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn coarse_clock_moves_only_when_ticked() {
        let (clock, driver) = Clock::coarse(Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(
            clock.now_ms(),
            0,
            "coarse time must not move without a tick"
        );
        assert_eq!(clock.precise_ms(), 250);
        driver.tick();
        assert_eq!(clock.now_ms(), 250);
    }

    #[tokio::test(start_paused = true)]
    async fn driver_stops_when_clock_dropped() {
        let (clock, driver) = Clock::coarse(Duration::from_millis(5));
        let task = tokio::spawn(driver.run());
        tokio::time::advance(Duration::from_millis(20)).await;
        tokio::task::yield_now().await;
        assert!(clock.now_ms() >= 15);
        drop(clock);
        tokio::time::advance(Duration::from_millis(20)).await;
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("driver must stop")
            .expect("driver task");
    }
}
