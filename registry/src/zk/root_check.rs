//! The bounded scan behind the start-up foreign-payload check of a Spring root.
//!
//! Before the first registration under a Spring root, the session task looks at one instance
//! of each service there and refuses the root if one carries another framework's payload class
//! (Dubbo 3 application-level discovery and Spring Cloud crash on each other's classes). The
//! scan must not itself stop the service from starting, so:
//!
//! * a service we may not read (`NoAuth`, a Java service's restrictive ACL) or that vanished
//!   (`NoNode`) is skipped, and the skipped ones are reported in one warning;
//! * the services are read [`CONCURRENCY`] at a time, the registering service first;
//! * the scan stops at a time budget and the registration goes ahead with a warning that says
//!   how much was checked, instead of timing the registration out (in a large estate a complete
//!   sequential scan outlasts the request timeout, and a restarted process would start over:
//!   a crash loop).

use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, stream};
use tokio::time::Instant;

use crate::hold::deadline_after;

/// How many services the check reads at once.
pub(crate) const CONCURRENCY: usize = 32;

/// What one service of the root turned out to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// No instance, or an instance of our own payload class (or none).
    Clean,
    /// The service (its children or its first instance) is not readable with our credentials.
    Unreadable(String),
    /// An instance at this path carries this foreign payload class.
    Foreign { path: String, class: String },
}

/// The result of a scan that found no foreign payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Scanned {
    /// Services looked at (readable or not).
    pub(crate) checked: usize,
    /// Services in the root.
    pub(crate) total: usize,
    /// The paths that could not be read.
    pub(crate) unreadable: Vec<String>,
}

impl Scanned {
    /// Whether every service was looked at within the budget.
    pub(crate) fn complete(&self) -> bool {
        self.checked == self.total
    }
}

/// Puts `first` (the service being registered) at the front of `services`, if it is there.
pub(crate) fn first_things_first(mut services: Vec<String>, first: &str) -> Vec<String> {
    if let Some(i) = services.iter().position(|s| s == first) {
        let own = services.remove(i);
        services.insert(0, own);
    }
    services
}

/// Probes `services` in order, at most `concurrency` at a time, until `budget` has elapsed.
///
/// Returns the first foreign payload found as `Ok(Err((path, class)))`, the first probe error
/// as `Err`, and otherwise what was checked (possibly not everything: see
/// [`Scanned::complete`]).
pub(crate) async fn scan<E, F, Fut>(
    services: Vec<String>,
    concurrency: usize,
    budget: Duration,
    probe: F,
) -> Result<Result<Scanned, (String, String)>, E>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Probe, E>>,
{
    let deadline = deadline_after(Instant::now(), budget);
    let mut scanned = Scanned {
        total: services.len(),
        ..Scanned::default()
    };
    let mut probes = stream::iter(services)
        .map(probe)
        .buffer_unordered(concurrency.max(1));
    loop {
        match tokio::time::timeout_at(deadline, probes.next()).await {
            // Out of time: what was checked is the answer.
            Err(_) | Ok(None) => return Ok(Ok(scanned)),
            Ok(Some(Err(error))) => return Err(error),
            Ok(Some(Ok(probe))) => {
                scanned.checked += 1;
                match probe {
                    Probe::Clean => {}
                    Probe::Unreadable(path) => scanned.unreadable.push(path),
                    Probe::Foreign { path, class } => return Ok(Err((path, class))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("svc-{i}")).collect()
    }

    #[test]
    fn the_registering_service_goes_first() {
        let ordered = first_things_first(names(4), "svc-2");
        assert_eq!(ordered, ["svc-2", "svc-0", "svc-1", "svc-3"]);
        assert_eq!(first_things_first(names(2), "other"), ["svc-0", "svc-1"]);
    }

    /// 5,000 services at 10 ms a read: sequentially 50 s, far beyond any request timeout.
    /// Concurrently it is done in ~1.6 s; with a 1 s budget it stops, incomplete, at 1 s.
    #[tokio::test(start_paused = true)]
    async fn a_large_root_is_scanned_concurrently_and_within_the_budget() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let probe = |_: String| {
            let (in_flight, most) = (in_flight.clone(), most.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, ()>(Probe::Clean)
            }
        };
        let start = Instant::now();
        let done = scan(names(5_000), CONCURRENCY, Duration::from_secs(15), probe)
            .await
            .unwrap()
            .unwrap();
        assert!(done.complete(), "{done:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(most.load(Ordering::SeqCst), CONCURRENCY);

        let start = Instant::now();
        let partial = scan(names(5_000), CONCURRENCY, Duration::from_secs(1), probe)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(!partial.complete());
        assert!(
            partial.checked > 0 && partial.checked < 5_000,
            "{partial:?}"
        );
        assert_eq!(partial.total, 5_000);
    }

    #[tokio::test(start_paused = true)]
    async fn unreadable_services_are_skipped_and_a_foreign_one_stops_the_scan() {
        let probe = |name: String| async move {
            Ok::<_, ()>(match name.as_str() {
                "svc-1" | "svc-3" => Probe::Unreadable(format!("/r/{name}")),
                "svc-5" => Probe::Foreign {
                    path: format!("/r/{name}/x"),
                    class: "Other".into(),
                },
                _ => Probe::Clean,
            })
        };
        let clean = scan(names(5), 2, Duration::from_secs(1), probe)
            .await
            .unwrap()
            .unwrap();
        assert!(clean.complete());
        let mut unreadable = clean.unreadable;
        unreadable.sort();
        assert_eq!(unreadable, ["/r/svc-1", "/r/svc-3"]);
        let foreign = scan(names(8), 2, Duration::from_secs(1), probe)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(foreign, ("/r/svc-5/x".to_owned(), "Other".to_owned()));
        // A probe error (ZooKeeper unreachable) is the scan's error.
        let failed = scan(names(3), 2, Duration::from_secs(1), |_| async {
            Err::<Probe, _>("down")
        })
        .await;
        assert_eq!(failed, Err("down"));
    }
}
