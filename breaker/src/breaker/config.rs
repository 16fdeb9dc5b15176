use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

/// How calls are grouped for the failure and slow-call rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlidingWindowType {
    /// The last `sliding_window_size` calls (resilience4j `COUNT_BASED`).
    #[default]
    CountBased,
    /// The calls of the last `sliding_window_size` seconds (resilience4j `TIME_BASED`), in
    /// one-second buckets.
    TimeBased,
}

impl Serialize for SlidingWindowType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            SlidingWindowType::CountBased => "COUNT_BASED",
            SlidingWindowType::TimeBased => "TIME_BASED",
        })
    }
}

impl<'de> Deserialize<'de> for SlidingWindowType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "countbased" | "count" => Ok(SlidingWindowType::CountBased),
            "timebased" | "time" => Ok(SlidingWindowType::TimeBased),
            _ => Err(serde::de::Error::custom(format!(
                "unknown sliding window type {s:?}: expected COUNT_BASED or TIME_BASED (count or time)"
            ))),
        }
    }
}

/// Circuit breaker configuration, field by field compatible with resilience4j.
///
/// Deserialises from resilience4j's camelCase names, their kebab-case form (as in Spring Boot's
/// `application.yml`) and snake_case; durations are strings such as `"800ms"` or `"60s"`, or a
/// number of milliseconds.
///
/// | resilience4j | field | Keel default | resilience4j default |
/// |---|---|---|---|
/// | `failureRateThreshold` | [`failure_rate_threshold`](Self::failure_rate_threshold) (percent) | 50 | 50 |
/// | `slowCallRateThreshold` | [`slow_call_rate_threshold`](Self::slow_call_rate_threshold) (percent) | 100 | 100 |
/// | `slowCallDurationThreshold` | [`slow_call_duration_threshold`](Self::slow_call_duration_threshold) | 10s | 60s |
/// | `slidingWindowType` | [`sliding_window_type`](Self::sliding_window_type) (`COUNT_BASED` / `TIME_BASED`) | `COUNT_BASED` | `COUNT_BASED` |
/// | `slidingWindowSize` | [`sliding_window_size`](Self::sliding_window_size) (calls, or seconds) | 20 | 100 |
/// | `minimumNumberOfCalls` | [`minimum_number_of_calls`](Self::minimum_number_of_calls) | 10 | 100 |
/// | `waitDurationInOpenState` | [`wait_duration_in_open_state`](Self::wait_duration_in_open_state) | 5s | 60s |
/// | `permittedNumberOfCallsInHalfOpenState` | [`permitted_number_of_calls_in_half_open_state`](Self::permitted_number_of_calls_in_half_open_state) | 3 | 10 |
/// | `automaticTransitionFromOpenToHalfOpenEnabled` | [`automatic_transition_from_open_to_half_open_enabled`](Self::automatic_transition_from_open_to_half_open_enabled) | true | false |
/// | `enableExponentialBackoff` | [`enable_exponential_backoff`](Self::enable_exponential_backoff) | true | false |
/// | `exponentialBackoffMultiplier` | [`exponential_backoff_multiplier`](Self::exponential_backoff_multiplier) | 2.0 | 2.0 |
/// | `exponentialMaxWaitDurationInOpenState` | [`exponential_max_wait_duration_in_open_state`](Self::exponential_max_wait_duration_in_open_state) | 60s | unbounded |
/// | `maxWaitDurationInHalfOpenState` | [`max_wait_duration_in_half_open_state`](Self::max_wait_duration_in_half_open_state) (0 = no limit) | 0 | 0 |
///
/// The window may also be given in the nested form of Keel's `keel.toml`, instead of
/// `slidingWindowType` and `slidingWindowSize` (giving both forms is an error):
///
/// ```
/// # use keel_breaker::breaker::{BreakerConfig, SlidingWindowType};
/// let config: BreakerConfig = toml::from_str(
///     r#"failure_rate_threshold = 50
///        sliding_window = { kind = "count", size = 20 }"#,
/// )
/// .unwrap();
/// assert_eq!(config.sliding_window_type, SlidingWindowType::CountBased);
/// assert_eq!(config.sliding_window_size, 20);
/// ```
///
/// `kind` is `count` or `time` (also `COUNT_BASED` / `TIME_BASED`); `size` is calls for a count
/// window and seconds for a time window. Either key may be left out (defaults as above).
///
/// Deserialising validates the result (see [`validate`](Self::validate)), so an out-of-range
/// value is reported with the field's name when the configuration is read.
///
/// Keel's defaults suit low-traffic services: a breaker that needs 100 calls before it may trip
/// (resilience4j's default) never trips on a service that handles a few calls a minute.
///
/// Semantics kept from resilience4j: rates are compared with `>=`; a call is slow when it takes
/// longer than the slow-call threshold; in a count window the minimum number of calls is capped
/// at the window size; the half-open verdict is taken once all permitted probes have completed.
///
/// Timed transitions never need a task of their own (Keel spawns none):
///
/// * open → half-open: with `automaticTransitionFromOpenToHalfOpenEnabled` (Keel's default) the
///   breaker is half-open as soon as the wait has passed, for every observer:
///   [`Breaker::state`](super::Breaker::state), [`Breaker::metrics`](super::Breaker::metrics),
///   a [`StateWatch`](super::StateWatch) (which arms a timer while it waits) and a gate-mode
///   `poll_ready` (which arms a timer and wakes the waiting task). Without it, as in
///   resilience4j, the breaker stays open until the next call attempt; a gate-mode `poll_ready`
///   that is waiting is such an attempt, so a balancer still gets the endpoint back.
/// * half-open → open after `maxWaitDurationInHalfOpenState` (when not zero) without the probes
///   having completed: observed the same way (state, metrics, `StateWatch`, `poll_ready`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, rename_all = "camelCase")]
pub struct BreakerConfig {
    /// Failure rate (percent, 0 < x ≤ 100) at or above which the breaker opens.
    #[serde(alias = "failure-rate-threshold", alias = "failure_rate_threshold")]
    pub failure_rate_threshold: f32,
    /// Slow-call rate (percent, 0 < x ≤ 100) at or above which the breaker opens.
    #[serde(alias = "slow-call-rate-threshold", alias = "slow_call_rate_threshold")]
    pub slow_call_rate_threshold: f32,
    /// Calls that take longer than this are slow.
    #[serde(
        alias = "slow-call-duration-threshold",
        alias = "slow_call_duration_threshold",
        with = "crate::duration"
    )]
    pub slow_call_duration_threshold: Duration,
    /// Count- or time-based window.
    #[serde(alias = "sliding-window-type", alias = "sliding_window_type")]
    pub sliding_window_type: SlidingWindowType,
    /// Window size: calls (count-based) or seconds (time-based).
    #[serde(alias = "sliding-window-size", alias = "sliding_window_size")]
    pub sliding_window_size: u32,
    /// Calls needed in the window before any rate is evaluated.
    #[serde(alias = "minimum-number-of-calls", alias = "minimum_number_of_calls")]
    pub minimum_number_of_calls: u32,
    /// Time spent open before probing (the first time, when backoff is enabled).
    #[serde(
        alias = "wait-duration-in-open-state",
        alias = "wait_duration_in_open_state",
        with = "crate::duration"
    )]
    pub wait_duration_in_open_state: Duration,
    /// Exactly this many probe calls are admitted in half-open.
    #[serde(
        alias = "permitted-number-of-calls-in-half-open-state",
        alias = "permitted_number_of_calls_in_half_open_state"
    )]
    pub permitted_number_of_calls_in_half_open_state: u32,
    /// Whether the breaker becomes half-open as soon as the open wait has passed, for every
    /// observer, rather than on the next call attempt; see the type docs.
    #[serde(
        alias = "automatic-transition-from-open-to-half-open-enabled",
        alias = "automatic_transition_from_open_to_half_open_enabled"
    )]
    pub automatic_transition_from_open_to_half_open_enabled: bool,
    /// Grow the open wait after each consecutive re-opening.
    #[serde(
        alias = "enable-exponential-backoff",
        alias = "enable_exponential_backoff"
    )]
    pub enable_exponential_backoff: bool,
    /// Growth factor of the open wait (≥ 1).
    #[serde(
        alias = "exponential-backoff-multiplier",
        alias = "exponential_backoff_multiplier"
    )]
    pub exponential_backoff_multiplier: f64,
    /// Cap of the growing open wait.
    #[serde(
        alias = "exponential-max-wait-duration-in-open-state",
        alias = "exponential_max_wait_duration_in_open_state",
        with = "crate::duration"
    )]
    pub exponential_max_wait_duration_in_open_state: Duration,
    /// Longest time in half-open before the breaker re-opens if its probes have not all
    /// completed; zero waits for the probes however long they take.
    #[serde(
        alias = "max-wait-duration-in-half-open-state",
        alias = "max_wait_duration_in_half_open_state",
        with = "crate::duration"
    )]
    pub max_wait_duration_in_half_open_state: Duration,
}

impl fmt::Debug for BreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerConfig")
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field(
                "slow_call_duration_threshold",
                &self.slow_call_duration_threshold,
            )
            .field("sliding_window_type", &self.sliding_window_type)
            .field("sliding_window_size", &self.sliding_window_size)
            .field("minimum_number_of_calls", &self.minimum_number_of_calls)
            .field(
                "wait_duration_in_open_state",
                &self.wait_duration_in_open_state,
            )
            .field(
                "permitted_number_of_calls_in_half_open_state",
                &self.permitted_number_of_calls_in_half_open_state,
            )
            .field(
                "enable_exponential_backoff",
                &self.enable_exponential_backoff,
            )
            .field(
                "max_wait_duration_in_half_open_state",
                &self.max_wait_duration_in_half_open_state,
            )
            .finish_non_exhaustive()
    }
}

impl Serialize for BreakerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The derived (flat, camelCase) form, from `#[serde(remote = "Self")]`.
        BreakerConfig::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for BreakerConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawBreakerConfig::deserialize(d)?;
        let mut config = raw.config;
        let flat = raw.sliding_window_type.is_some() || raw.sliding_window_size.is_some();
        if let Some(nested) = raw.sliding_window {
            if flat {
                return Err(serde::de::Error::custom(
                    "sliding_window: give either sliding_window = { kind, size } or \
                     slidingWindowType / slidingWindowSize, not both",
                ));
            }
            if let Some(kind) = nested.kind {
                config.sliding_window_type = kind;
            }
            if let Some(size) = nested.size {
                config.sliding_window_size = size;
            }
        }
        if let Some(kind) = raw.sliding_window_type {
            config.sliding_window_type = kind;
        }
        if let Some(size) = raw.sliding_window_size {
            config.sliding_window_size = size;
        }
        config.validate().map_err(serde::de::Error::custom)?;
        Ok(config)
    }
}

/// What [`BreakerConfig`] reads: the flat fields, plus the window in either form.
#[derive(Deserialize)]
struct RawBreakerConfig {
    #[serde(flatten, deserialize_with = "BreakerConfig::deserialize")]
    config: BreakerConfig,
    #[serde(
        default,
        rename = "slidingWindowType",
        alias = "sliding-window-type",
        alias = "sliding_window_type"
    )]
    sliding_window_type: Option<SlidingWindowType>,
    #[serde(
        default,
        rename = "slidingWindowSize",
        alias = "sliding-window-size",
        alias = "sliding_window_size"
    )]
    sliding_window_size: Option<u32>,
    #[serde(
        default,
        rename = "sliding_window",
        alias = "slidingWindow",
        alias = "sliding-window"
    )]
    sliding_window: Option<NestedWindow>,
}

/// `sliding_window = { kind = "count" | "time", size = N }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NestedWindow {
    #[serde(default, deserialize_with = "nested_kind")]
    kind: Option<SlidingWindowType>,
    #[serde(default, deserialize_with = "nested_size")]
    size: Option<u32>,
}

fn nested_kind<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SlidingWindowType>, D::Error> {
    SlidingWindowType::deserialize(d)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format_args!("sliding_window.kind: {e}")))
}

fn nested_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    u32::deserialize(d)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format_args!("sliding_window.size: {e}")))
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration_threshold: Duration::from_secs(10),
            sliding_window_type: SlidingWindowType::CountBased,
            sliding_window_size: 20,
            minimum_number_of_calls: 10,
            wait_duration_in_open_state: Duration::from_secs(5),
            permitted_number_of_calls_in_half_open_state: 3,
            automatic_transition_from_open_to_half_open_enabled: true,
            enable_exponential_backoff: true,
            exponential_backoff_multiplier: 2.0,
            exponential_max_wait_duration_in_open_state: Duration::from_secs(60),
            max_wait_duration_in_half_open_state: Duration::ZERO,
        }
    }
}

/// Largest count window: the packed counters hold 20 bits per field.
pub(crate) const MAX_COUNT_WINDOW: u32 = 500_000;
/// Largest time window, in seconds (one hour).
pub(crate) const MAX_TIME_WINDOW: u32 = 3_600;
/// Largest number of half-open probes.
pub(crate) const MAX_PERMITTED: u32 = 100_000;

impl BreakerConfig {
    /// Checks the ranges resilience4j checks (and the limits of Keel's packed counters).
    ///
    /// # Errors
    /// [`ConfigError`] naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pct = |v: f32| v > 0.0 && v <= 100.0;
        if !pct(self.failure_rate_threshold) {
            return Err(ConfigError(
                "failureRateThreshold must be in (0, 100]".into(),
            ));
        }
        if !pct(self.slow_call_rate_threshold) {
            return Err(ConfigError(
                "slowCallRateThreshold must be in (0, 100]".into(),
            ));
        }
        let max = match self.sliding_window_type {
            SlidingWindowType::CountBased => MAX_COUNT_WINDOW,
            SlidingWindowType::TimeBased => MAX_TIME_WINDOW,
        };
        if self.sliding_window_size == 0 || self.sliding_window_size > max {
            return Err(ConfigError(format!(
                "slidingWindowSize (sliding_window.size) must be in 1..={max} for this window type"
            )));
        }
        if self.minimum_number_of_calls == 0 {
            return Err(ConfigError(
                "minimumNumberOfCalls must be at least 1".into(),
            ));
        }
        if self.permitted_number_of_calls_in_half_open_state == 0
            || self.permitted_number_of_calls_in_half_open_state > MAX_PERMITTED
        {
            return Err(ConfigError(format!(
                "permittedNumberOfCallsInHalfOpenState must be in 1..={MAX_PERMITTED}"
            )));
        }
        if self.slow_call_duration_threshold < Duration::from_millis(1) {
            // Calls are timed in whole milliseconds: under 1 ms (zero too, which may read as
            // "off") every call of a millisecond or more would be slow, and ejected for it.
            return Err(ConfigError(
                "slowCallDurationThreshold must be at least 1ms".into(),
            ));
        }
        if self.wait_duration_in_open_state < Duration::from_millis(1) {
            return Err(ConfigError(
                "waitDurationInOpenState must be at least 1ms".into(),
            ));
        }
        if !(self.exponential_backoff_multiplier >= 1.0
            && self.exponential_backoff_multiplier.is_finite())
        {
            return Err(ConfigError(
                "exponentialBackoffMultiplier must be a finite number >= 1".into(),
            ));
        }
        Ok(())
    }

    /// The wait in open after the `opens`-th consecutive opening (1-based).
    pub(crate) fn wait_for(&self, opens: u32) -> Duration {
        let base = self.wait_duration_in_open_state;
        if !self.enable_exponential_backoff || opens <= 1 {
            return base;
        }
        let cap = self.exponential_max_wait_duration_in_open_state.max(base);
        let factor = self
            .exponential_backoff_multiplier
            .powi(i32::try_from(opens - 1).unwrap_or(i32::MAX));
        let secs = base.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= cap.as_secs_f64() {
            cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}
