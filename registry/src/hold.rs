//! The mass-removal hold.
//!
//! A ZooKeeper incident (a mass session expiry on the server side, an operator deleting the
//! wrong node, a half-restored snapshot) can make most instances of a service vanish at once
//! even though the processes are healthy. Applying that blindly empties every client's balancer
//! at the worst moment. So a change that would remove more than a threshold (default: half) of
//! the published instances is *held*: additions and updates go through, the removals wait for a
//! window, and when the window ends they are applied only if they are still true.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_core::ServiceInstance;

use tokio::time::Instant;

use crate::watch::Instances;

/// The longest wait Keel's timers take (100 years): a configured window beyond it, such as
/// `Duration::MAX`, is treated as this long instead of overflowing the clock.
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `now + wait`, with `wait` capped at [`FAR_FUTURE`] (never a panic on overflow).
pub(crate) fn deadline_after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(FAR_FUTURE)).unwrap_or(now)
}

/// When a removal is "mass", and how long it is held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MassRemovalPolicy {
    threshold: f64,
    hold: Duration,
    min_instances: usize,
}

impl Default for MassRemovalPolicy {
    /// More than 50 % of at least 2 instances, held for 5 s.
    fn default() -> Self {
        Self {
            threshold: 0.5,
            hold: Duration::from_secs(5),
            min_instances: 2,
        }
    }
}

impl MassRemovalPolicy {
    /// Hold removals of more than `threshold` (0 < threshold ≤ 1) of the instances.
    pub fn with_threshold(mut self, threshold: f64) -> Self {
        self.threshold = threshold;
        self
    }

    /// How long a mass removal is held before it is re-checked and applied (zero disables the
    /// hold). A hold longer than 100 years (for example `Duration::MAX`, "until it heals") is
    /// capped at 100 years instead of overflowing the clock.
    pub fn with_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// Services with fewer published instances than this are never held (default 2: losing the
    /// only instance of a service is not a mass event).
    pub fn with_min_instances(mut self, min: usize) -> Self {
        self.min_instances = min;
        self
    }

    /// The hold window.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(format!(
                "mass-removal threshold {} is not in (0, 1]",
                self.threshold
            ));
        }
        Ok(())
    }

    fn is_mass(&self, removed: usize, published: usize) -> bool {
        !self.hold.is_zero()
            && published >= self.min_instances
            && removed > 0
            && removed as f64 > self.threshold * published as f64
    }
}

/// What a service's subscribers see, derived from what ZooKeeper says.
#[derive(Debug)]
pub(crate) struct HeldView {
    policy: MassRemovalPolicy,
    published: Instances,
    /// The published ids that are not in the truth (removals being held).
    held: BTreeSet<String>,
    held_until: Option<Instant>,
}

/// The outcome of [`HeldView::apply`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The truth was applied as is.
    AsIs,
    /// A mass removal started being held.
    HoldStarted,
    /// A mass removal is still being held.
    StillHeld,
}

impl HeldView {
    pub(crate) fn new(policy: MassRemovalPolicy) -> Self {
        Self {
            policy,
            published: Instances::new(),
            held: BTreeSet::new(),
            held_until: None,
        }
    }

    /// What subscribers should see now.
    pub(crate) fn published(&self) -> &Instances {
        &self.published
    }

    /// When a held removal must be re-checked.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.held_until
    }

    /// Folds the latest truth (UP instances only) into the published view at `now`.
    #[cfg(test)]
    pub(crate) fn apply(&mut self, truth: &Instances, now: Instant) -> Applied {
        let ids: BTreeSet<String> = self.published.keys().chain(truth.keys()).cloned().collect();
        self.apply_changes(|id| truth.get(id), &ids, now).0
    }

    /// Folds the latest truth into the published view at `now`, given the only ids whose truth
    /// may have changed since the last call and a lookup of the truth (UP instances only).
    /// Also returns the ids whose published value changed (possibly with duplicates).
    pub(crate) fn apply_changes<'t>(
        &mut self,
        truth: impl Fn(&str) -> Option<&'t ServiceInstance>,
        ids: &BTreeSet<String>,
        now: Instant,
    ) -> (Applied, Vec<String>) {
        let before = self.published.len();
        let mut changed = Vec::new();
        for id in ids {
            match truth(id) {
                Some(instance) => {
                    self.held.remove(id);
                    if self.published.get(id) != Some(instance) {
                        self.published.insert(id.clone(), instance.clone());
                        changed.push(id.clone());
                    }
                }
                None => {
                    if self.published.contains_key(id) {
                        self.held.insert(id.clone());
                    }
                }
            }
        }
        // `held` is now every published id missing from the truth: the removals.
        let expired = self.held_until.is_some_and(|t| now >= t);
        if expired || !self.policy.is_mass(self.held.len(), before) {
            self.held_until = None;
            for id in std::mem::take(&mut self.held) {
                self.published.remove(&id);
                changed.push(id);
            }
            return (Applied::AsIs, changed);
        }
        if self.held_until.is_some() {
            (Applied::StillHeld, changed)
        } else {
            self.held_until = Some(deadline_after(now, self.policy.hold));
            (Applied::HoldStarted, changed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{Endpoint, ServiceInstance};

    fn view(ids: &[&str]) -> Instances {
        ids.iter()
            .map(|id| {
                let i = ServiceInstance::new("s", *id, Endpoint::new("h", 1));
                (id.to_string(), i)
            })
            .collect()
    }

    fn ids(v: &HeldView) -> Vec<&str> {
        v.published().keys().map(String::as_str).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn mass_removal_is_held_then_applied_if_still_true() {
        let mut v = HeldView::new(MassRemovalPolicy::default());
        assert_eq!(
            v.apply(&view(&["a", "b", "c", "d"]), Instant::now()),
            Applied::AsIs
        );
        // 3 of 4 vanish, one is added: the addition goes through, the removals are held.
        let truth = view(&["a", "e"]);
        assert_eq!(v.apply(&truth, Instant::now()), Applied::HoldStarted);
        assert_eq!(ids(&v), ["a", "b", "c", "d", "e"]);
        let deadline = v.deadline().unwrap();
        assert_eq!(deadline, Instant::now() + Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(v.apply(&truth, Instant::now()), Applied::StillHeld);
        assert_eq!(v.deadline(), Some(deadline), "the window does not restart");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(v.apply(&truth, Instant::now()), Applied::AsIs);
        assert_eq!(ids(&v), ["a", "e"]);
        assert_eq!(v.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn held_removal_that_heals_is_never_applied() {
        let mut v = HeldView::new(MassRemovalPolicy::default());
        v.apply(&view(&["a", "b", "c"]), Instant::now());
        assert_eq!(v.apply(&view(&[]), Instant::now()), Applied::HoldStarted);
        assert_eq!(ids(&v), ["a", "b", "c"]);
        tokio::time::advance(Duration::from_secs(2)).await;
        // They come back (a ZooKeeper glitch): nothing was ever removed, the hold ends.
        assert_eq!(
            v.apply(&view(&["a", "b", "c"]), Instant::now()),
            Applied::AsIs
        );
        assert_eq!(v.deadline(), None);
        assert_eq!(ids(&v), ["a", "b", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn small_removals_and_small_services_apply_at_once() {
        let mut v = HeldView::new(MassRemovalPolicy::default());
        v.apply(&view(&["a", "b", "c", "d"]), Instant::now());
        // Exactly half is not "more than half".
        assert_eq!(v.apply(&view(&["a", "b"]), Instant::now()), Applied::AsIs);
        let mut single = HeldView::new(MassRemovalPolicy::default());
        single.apply(&view(&["a"]), Instant::now());
        assert_eq!(single.apply(&view(&[]), Instant::now()), Applied::AsIs);
        let mut off = HeldView::new(MassRemovalPolicy::default().with_hold(Duration::ZERO));
        off.apply(&view(&["a", "b", "c"]), Instant::now());
        assert_eq!(off.apply(&view(&[]), Instant::now()), Applied::AsIs);
    }

    #[tokio::test(start_paused = true)]
    async fn hold_of_duration_max_holds_without_overflowing_the_clock() {
        let policy = MassRemovalPolicy::default().with_hold(Duration::MAX);
        let mut v = HeldView::new(policy);
        v.apply(&view(&["a", "b", "c"]), Instant::now());
        let start = Instant::now();
        assert_eq!(v.apply(&view(&["a"]), start), Applied::HoldStarted);
        assert_eq!(v.deadline(), Some(start + FAR_FUTURE));
        tokio::time::advance(Duration::from_secs(365 * 24 * 60 * 60)).await;
        assert_eq!(v.apply(&view(&["a"]), Instant::now()), Applied::StillHeld);
        assert_eq!(ids(&v), ["a", "b", "c"]);
        // A debounce window takes its deadline the same way.
        let now = Instant::now();
        assert_eq!(deadline_after(now, Duration::MAX), now + FAR_FUTURE);
        assert_eq!(
            deadline_after(now, Duration::from_millis(5)),
            now + Duration::from_millis(5)
        );
    }

    #[test]
    fn threshold_is_validated() {
        assert!(MassRemovalPolicy::default().validate().is_ok());
        assert!(
            MassRemovalPolicy::default()
                .with_threshold(0.0)
                .validate()
                .is_err()
        );
        assert!(
            MassRemovalPolicy::default()
                .with_threshold(1.5)
                .validate()
                .is_err()
        );
        assert!(
            MassRemovalPolicy::default()
                .with_threshold(f64::NAN)
                .validate()
                .is_err()
        );
    }
}
