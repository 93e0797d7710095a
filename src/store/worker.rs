//! The one way the store runs background work: a task per component, spawned on first
//! need, parked on a [`Notify`] while idle, ended when the component (and so the store) is
//! dropped. The group commit's sender, the reconciler, the denial log's writer and the
//! change-feed listener each own one [`Worker`].
//!
//! # Invariant: no lost wake-up, no task outliving its store
//! [`Worker::wake`] leaves a permit in the `Notify` when the task is not waiting, so work
//! handed over between the task's last look and its parking is seen at once: a task
//! parks only after it found nothing to do, and anything added after that wakes it.
//! While parked, a task holds only a weak reference to its owner and the shared
//! [`Parking`]; dropping the [`Worker`] (or [`Worker::stop`]) marks it closed and wakes
//! it, and the task ends. A closed worker starts no task again.
//! A task that ends for another reason (its runtime shut down) clears `started` on the
//! way out, so the next wake, in whatever runtime, starts a new one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A component's background task: not started until first needed.
#[derive(Debug, Default)]
pub(crate) struct Worker {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    wake: Notify,
    /// True while a task exists.
    started: AtomicBool,
    /// Set when the [`Worker`] is dropped or stopped, or its start found nothing to run
    /// (see [`Worker::start`]).
    closed: AtomicBool,
    /// Notified when a task ends (its [`Parking`] is dropped).
    ended: Notify,
}

/// The task's side of its [`Worker`]: where it parks. Dropping it (the task ended) lets
/// the next wake start a new task.
#[derive(Debug)]
pub(crate) struct Parking {
    shared: Arc<Shared>,
}

impl Worker {
    /// Starts the task with `task` unless one is running. Called on hot paths: when the
    /// task runs, this is one relaxed load. If `task` returns `None` there is nothing to
    /// run, and later calls never ask again.
    pub(crate) fn start<F, Fut>(&self, task: F)
    where
        F: FnOnce(Parking) -> Option<Fut>,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shared = &self.shared;
        if shared.started.load(Ordering::Relaxed) {
            return;
        }
        // SeqCst, paired with `stop`: either this sees the worker closed, or `stop` sees
        // the task started and waits for it.
        if shared.closed.load(Ordering::SeqCst) || shared.started.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(run) = task(Parking {
            shared: Arc::clone(shared),
        }) {
            tokio::spawn(run);
        } else {
            // Nothing to run, ever: closed, so later calls return at the check above.
            shared.closed.store(true, Ordering::SeqCst);
        }
    }

    /// Wakes the task, starting it with `task` if none runs. Must be called inside a tokio
    /// runtime.
    pub(crate) fn wake<F, Fut>(&self, task: F)
    where
        F: FnOnce(Parking) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.start(|parking| Some(task(parking)));
        self.shared.wake.notify_one();
    }

    /// Closes the worker for good and waits until its task, if one runs, has ended: the
    /// task sees [`Parking::closed`] resolve and returns, dropping whatever it was awaiting.
    /// No task starts after this.
    pub(crate) async fn stop(&self) {
        let shared = &self.shared;
        shared.closed.store(true, Ordering::SeqCst);
        shared.wake.notify_one();
        loop {
            let ended = shared.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the two is not missed.
            ended.as_mut().enable();
            if !shared.started.load(Ordering::SeqCst) {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Parking {
    /// Waits until the task is woken (at once if it was woken since it last parked);
    /// `false` once its worker is dropped: the task should return.
    pub(crate) async fn park(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        self.shared.wake.notified().await;
        !self.is_closed()
    }

    /// Resolves once the worker is dropped. For a task that waits on something else (the
    /// listener's feed) and never needs waking.
    pub(crate) async fn closed(&self) {
        while self.park().await {}
    }

    fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.shared.started.store(false, Ordering::SeqCst);
        self.shared.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A worker's owner, as a component would be: the task counts its wake-ups.
    #[derive(Default)]
    struct Owner {
        worker: Worker,
        woken: AtomicUsize,
    }

    fn wake(owner: &Arc<Owner>) {
        let weak = Arc::downgrade(owner);
        owner.worker.wake(|parking| run(weak, parking));
    }

    async fn run(owner: Weak<Owner>, parking: Parking) {
        while parking.park().await {
            let Some(owner) = owner.upgrade() else { return };
            owner.woken.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wake_before_parking_is_not_lost_and_a_dropped_owner_ends_the_task() {
        let owner = Arc::new(Owner::default());
        let shared = Arc::clone(&owner.worker.shared);
        // Woken twice before the task first runs: one permit, one pass.
        wake(&owner);
        wake(&owner);
        tokio::task::yield_now().await;
        assert_eq!(owner.woken.load(Ordering::SeqCst), 1);
        assert!(shared.started.load(Ordering::SeqCst));
        wake(&owner);
        tokio::task::yield_now().await;
        assert_eq!(owner.woken.load(Ordering::SeqCst), 2);
        drop(owner);
        tokio::task::yield_now().await;
        assert!(
            !shared.started.load(Ordering::SeqCst),
            "the task ended with its owner"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_start_with_nothing_to_run_is_not_retried() {
        let worker = Worker::default();
        let asked = AtomicUsize::new(0);
        for _ in 0..3 {
            worker.start(|_| {
                asked.fetch_add(1, Ordering::SeqCst);
                None::<std::future::Ready<()>>
            });
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_ends_a_busy_task_before_it_returns_and_nothing_starts_after_it() {
        /// Marks its future dropped: the task's work was cancelled.
        struct Cancelled(Arc<AtomicBool>);
        impl Drop for Cancelled {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let worker = Worker::default();
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancelled);
        worker.start(|parking| {
            Some(async move {
                let _guard = Cancelled(flag);
                // Work that would never end on its own.
                tokio::select! {
                    () = std::future::pending() => {}
                    () = parking.closed() => {}
                }
            })
        });
        tokio::task::yield_now().await;
        assert!(!cancelled.load(Ordering::SeqCst), "the task is busy");
        worker.stop().await;
        assert!(
            cancelled.load(Ordering::SeqCst),
            "ended before stop returned"
        );
        let asked = AtomicUsize::new(0);
        worker.start(|_| {
            asked.fetch_add(1, Ordering::SeqCst);
            None::<std::future::Ready<()>>
        });
        assert_eq!(
            asked.load(Ordering::SeqCst),
            0,
            "a stopped worker starts nothing"
        );
        // A second stop, with no task, returns at once.
        worker.stop().await;
    }

    #[test]
    fn a_task_whose_runtime_ended_is_started_again_by_the_next_wake() {
        let owner = Arc::new(Owner::default());
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                wake(&owner);
                tokio::task::yield_now().await;
            });
            // Dropping the runtime drops the parked task.
            drop(runtime);
        }
        assert_eq!(owner.woken.load(Ordering::SeqCst), 2);
    }
}
