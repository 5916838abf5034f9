//! Fails the node loudly when applying entries stops making progress.
//!
//! sled 0.34.7 can deadlock under sustained writes (spacejam/sled#1412, open): an insert that
//! splits a node waits, holding the segment accountant's lock, for IO threads that wait for that
//! same lock. Our benches hit it once (`docs/benchmarks.md`). A node stuck like that still answers
//! heartbeats, so the cluster keeps it as a voter while it never applies again, and nothing inside
//! the process can undo the deadlock. The watchdog turns the hang into a crash: when one apply call
//! has run longer than the limit, it logs why and runs its stall action — in a node, aborting the
//! process, so that its supervisor restarts it and the WAL replays what was not applied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one apply call may run before the node is declared stuck. Apply writes to sled's
/// page cache only (no fsync), so even a large batch takes well under a second.
pub const APPLY_STALL_LIMIT: Duration = Duration::from_secs(120);

/// What to do about a stall (given how long the apply has been running).
pub type StallAction = Box<dyn Fn(Duration) + Send>;

/// Shared between the state machine, which marks each apply, and the watchdog thread.
#[derive(Clone)]
pub struct ApplyWatchdog {
    /// Milliseconds since `epoch` (plus one, so 0 means idle) at which the running apply began.
    started: Arc<AtomicU64>,
    epoch: Instant,
}

/// Marks one apply call; dropping it (on every return path) marks the end.
pub struct ApplyGuard<'a> {
    dog: &'a ApplyWatchdog,
}

impl Drop for ApplyGuard<'_> {
    fn drop(&mut self) {
        self.dog.started.store(0, Ordering::Release);
    }
}

impl ApplyWatchdog {
    /// Starts the watchdog thread: it checks every `limit / 4` and runs `on_stall` once per stall.
    /// The thread ends when every clone of the returned watchdog is dropped.
    pub fn start(limit: Duration, on_stall: StallAction) -> std::io::Result<Self> {
        let dog = Self { started: Arc::new(AtomicU64::new(0)), epoch: Instant::now() };
        let weak = Arc::downgrade(&dog.started);
        let epoch = dog.epoch;
        let tick = (limit / 4).max(Duration::from_millis(10));
        std::thread::Builder::new().name("busbar-apply-watchdog".into()).spawn(move || {
            let mut reported = 0;
            while let Some(started) = weak.upgrade() {
                let begun = started.load(Ordering::Acquire);
                drop(started);
                if begun != 0 && begun != reported {
                    let running = epoch.elapsed().saturating_sub(Duration::from_millis(begun - 1));
                    if running > limit {
                        reported = begun;
                        tracing::error!(
                            running_secs = running.as_secs(),
                            "applying committed entries has not finished for {running:?}: the state machine's store \
                             is stuck (sled 0.34 deadlock, spacejam/sled#1412?); stopping the node so it restarts \
                             and replays its log"
                        );
                        on_stall(running);
                    }
                }
                std::thread::sleep(tick);
            }
        })?;
        Ok(dog)
    }

    /// The stall action of a real node: abort, so the process supervisor restarts it.
    pub fn abort_process() -> StallAction {
        Box::new(|_| std::process::abort())
    }

    /// Marks an apply as running until the guard drops.
    pub fn begin(&self) -> ApplyGuard<'_> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.started.store(now + 1, Ordering::Release);
        ApplyGuard { dog: self }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn watchdog(limit: Duration) -> (ApplyWatchdog, mpsc::Receiver<Duration>) {
        let (tx, rx) = mpsc::channel();
        let dog = ApplyWatchdog::start(
            limit,
            Box::new(move |d| {
                let _ = tx.send(d);
            }),
        )
        .unwrap();
        (dog, rx)
    }

    #[test]
    fn a_stuck_apply_runs_the_stall_action_once() {
        let (dog, rx) = watchdog(Duration::from_millis(100));
        let guard = dog.begin();
        let ran_for = rx.recv_timeout(Duration::from_secs(5)).expect("the stall action must run");
        assert!(ran_for > Duration::from_millis(100), "{ran_for:?}");
        assert!(rx.recv_timeout(Duration::from_millis(400)).is_err(), "one report per stall");
        drop(guard);
    }

    #[test]
    fn applies_that_finish_in_time_are_left_alone() {
        let (dog, rx) = watchdog(Duration::from_millis(200));
        for _ in 0..20 {
            let _g = dog.begin();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "no stall was reported");
    }
}
