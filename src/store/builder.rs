//! [`SessionStoreBuilder`]: the store's options and their defaults, stated once, on the
//! setters.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use uuid::Uuid;

use super::SessionStore;
use super::escrow::{self, Escrow};
use super::inner::{Inner, Parts};
use super::listener::Listener;
use super::maintenance::Maintenance;
use super::reconciler::Reconciler;
use super::stats::Counters;
use super::time_bounded::TimeBounded;
use crate::clock::{Clock, SystemClock};
use crate::storage::Storage;

const CACHE_CAPACITY: u64 = 100_000;
const CACHE_IDLE: Duration = Duration::from_secs(300);
const RECONCILE_INTERVAL: Duration = Duration::from_millis(250);
const STORAGE_TIMEOUT: Duration = Duration::from_secs(5);
const DENIAL_BUFFER: usize = 10_000;
const DENIAL_BUFFER_BYTES: usize = 16 * 1024 * 1024;
const NEGATIVE_CAPACITY: u64 = 10_000;
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);
const COLD_LOADS: usize = 1;
const RESERVATION_TTL: Duration = Duration::from_secs(10 * 60);

/// Builds a [`SessionStore`]. Obtained from [`SessionStore::builder`].
#[derive(Debug)]
#[must_use]
pub struct SessionStoreBuilder<S> {
    storage: S,
    cache_capacity: u64,
    cache_idle: Duration,
    clock: Arc<dyn Clock>,
    reconcile_interval: Duration,
    instance_id: Uuid,
    storage_timeout: Duration,
    negative_capacity: u64,
    negative_ttl: Duration,
    listen_for_changes: bool,
    denial_buffer: usize,
    denial_buffer_bytes: usize,
    maintenance_interval: Option<Duration>,
    cold_loads: usize,
    share_lease: Duration,
    reservation_ttl: Duration,
}

impl<S: Storage> SessionStoreBuilder<S> {
    pub(super) fn new(storage: S) -> Self {
        SessionStoreBuilder {
            storage,
            cache_capacity: CACHE_CAPACITY,
            cache_idle: CACHE_IDLE,
            clock: Arc::new(SystemClock),
            reconcile_interval: RECONCILE_INTERVAL,
            instance_id: Uuid::new_v4(),
            storage_timeout: STORAGE_TIMEOUT,
            negative_capacity: NEGATIVE_CAPACITY,
            negative_ttl: NEGATIVE_TTL,
            listen_for_changes: true,
            denial_buffer: DENIAL_BUFFER,
            denial_buffer_bytes: DENIAL_BUFFER_BYTES,
            maintenance_interval: Some(MAINTENANCE_INTERVAL),
            cold_loads: COLD_LOADS,
            share_lease: escrow::LEASE,
            reservation_ttl: RESERVATION_TTL,
        }
    }

    /// How long this store's share of a shared budget stays its own without a renewal
    /// (default 10 s; the store renews it while it is in use). The units a process that
    /// died was holding come back to the others this long after its last renewal, at the
    /// next grant of the budget's tree. Shorter leases mean more renewals.
    pub fn share_lease(mut self, lease: Duration) -> Self {
        self.share_lease = std::cmp::max(lease, Duration::from_millis(100));
        self
    }

    /// How long a reservation stays open (default 10 minutes): one not settled by then
    /// lapses, settled at its estimate, and settling it afterwards is
    /// [`SessionError::ReservationSettled`](crate::SessionError::ReservationSettled).
    /// Between 1 s and 24 h.
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.reservation_ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(24 * 60 * 60));
        self
    }

    /// Longest wait for any one call's storage work (default 5 s), connection acquisition
    /// and waiting behind other writes included. Past it, a mutation returns
    /// `StorageWriteThrough` (its change stays counted and pending) and a read returns
    /// `StorageRead`: a stalled PostgreSQL never stalls the gateway for longer.
    pub fn storage_timeout(mut self, timeout: Duration) -> Self {
        self.storage_timeout = timeout;
        self
    }

    /// Whether to listen to the storage's change feed (default `true`; PostgreSQL's is
    /// LISTEN/NOTIFY, one connection per store) and drop sessions whose status another
    /// process or an operator changed. Without it, such a change is seen at this store's
    /// next write of the session (a version conflict) or when the entry leaves the cache.
    pub fn listen_for_changes(mut self, listen: bool) -> Self {
        self.listen_for_changes = listen;
        self
    }

    /// Most denied calls waiting to be recorded (default 10,000). Denials are written in
    /// batches off the hot path; past this bound they are dropped and counted in
    /// `stats().denials_dropped`.
    pub fn denial_buffer(mut self, denials: usize) -> Self {
        self.denial_buffer = denials;
        self
    }

    /// Most bytes of memory the denials waiting to be recorded may hold (default 16 MiB),
    /// beside [`Self::denial_buffer`]'s count: a denial keeps at most
    /// [`DENIAL_TOOLS_KEPT`](crate::audit::DENIAL_TOOLS_KEPT) tool names of up to
    /// [`MAX_NAME_BYTES`](crate::model::limits::MAX_NAME_BYTES) each, so a flood of
    /// oversized denied calls fills this bound first. Past it, denials are dropped and
    /// counted like those past the count.
    pub fn denial_buffer_bytes(mut self, bytes: usize) -> Self {
        self.denial_buffer_bytes = bytes;
        self
    }

    /// Most loads from storage at once for sessions the cache does not hold (default 1,
    /// at least 1): the cold-load lane. An agent chooses the session id it presents, so
    /// random ids make every lookup miss; the lane keeps those lookups from taking the
    /// storage's connections and the database's time from the writes of cached sessions.
    /// Lookups past it wait for the lane within their `storage_timeout`. One load takes
    /// well under a millisecond, so one lane loads over a thousand sessions a second;
    /// raise it where many sessions are first used in this process (several gateway
    /// processes behind a balancer) and the database has cores to spare. `scripts/bench`
    /// measures what a flood of unknown ids costs the calls beside it
    /// (`ratio_unknown_ids_64`).
    pub fn cold_loads(mut self, loads: usize) -> Self {
        self.cold_loads = std::cmp::max(loads, 1);
        self
    }

    /// The negative cache: remember up to `capacity` ids found missing (default 10,000)
    /// for `ttl` (default 5 s), answering `NotFound` for them without a storage round
    /// trip. A capacity of 0 disables it.
    pub fn negative_cache(mut self, capacity: u64, ttl: Duration) -> Self {
        self.negative_capacity = capacity;
        self.negative_ttl = ttl;
        self
    }

    /// Most sessions kept in the cache (default 100,000). Memory stays bounded by this
    /// plus the pending set.
    pub fn cache_capacity(mut self, sessions: u64) -> Self {
        self.cache_capacity = sessions;
        self
    }

    /// How long an unused session stays cached (default 5 min). This only reclaims memory;
    /// whether a session is expired is always decided by the clock. Pending sessions stay
    /// regardless.
    pub fn cache_idle(mut self, idle: Duration) -> Self {
        self.cache_idle = idle;
        self
    }

    /// The clock every decision reads (default [`SystemClock`]). Tests pass a manual clock
    /// (the `testing` feature's `ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// First retry delay of the reconciler (default 250 ms). It doubles after each pass
    /// that made nothing durable, up to 10 s, and starts over after one that did.
    pub fn reconcile_interval(mut self, interval: Duration) -> Self {
        self.reconcile_interval = interval;
        self
    }

    /// How often the store runs the storage's upkeep ([`Storage::maintain`]: for PostgreSQL,
    /// creating the audit trail's daily partitions a week ahead, rolling up the days that
    /// are over for the reports, and today up to a few seconds ago): when the store is
    /// first used, then at this interval (default and least: a minute). One day's report
    /// reads the events since the last rollup raw, so a longer interval makes it dearer.
    /// `None` runs none; the operator then runs `arbiter-session partitions ensure` daily
    /// and `arbiter-session rollup` as often as reports need (events of a day without a
    /// partition still land, in the default partition, where retention cannot drop them
    /// whole).
    pub fn maintenance_interval(mut self, every: Option<Duration>) -> Self {
        self.maintenance_interval = every;
        self
    }

    /// The id this process writes into every audit event (default: random per store).
    pub fn instance_id(mut self, instance_id: Uuid) -> Self {
        self.instance_id = instance_id;
        self
    }

    /// Builds the store. Starts no task: each background task starts on first need, so a
    /// store may be built outside a tokio runtime.
    pub fn build(self) -> SessionStore<S> {
        let counters = Arc::new(Counters::default());
        let evictions = Arc::clone(&counters);
        let cache = Cache::builder()
            .max_capacity(self.cache_capacity)
            .time_to_idle(self.cache_idle)
            // Counting only: persistence never depends on this lazy listener.
            .eviction_listener(move |_, _, cause| {
                if cause.was_evicted() {
                    Counters::bump(&evictions.evictions);
                }
            })
            .build();
        let inner = Inner::new(Parts {
            storage: TimeBounded::new(self.storage, self.storage_timeout),
            clock: self.clock,
            cache,
            negative_cache: Cache::builder()
                .max_capacity(self.negative_capacity)
                .time_to_live(self.negative_ttl)
                .build(),
            counters,
            cold_loads: self.cold_loads,
            instance_id: self.instance_id,
            reconciler: Reconciler::new(self.reconcile_interval),
            listener: Listener::new(self.listen_for_changes),
            maintenance: Maintenance::new(self.maintenance_interval),
            denial_buffer: (self.denial_buffer, self.denial_buffer_bytes),
            escrow: Escrow::new(self.instance_id, self.share_lease, self.storage_timeout),
        });
        SessionStore {
            inner,
            // At most 24 h (clamped by `reservation_ttl`).
            reservation_ttl: chrono::Duration::from_std(self.reservation_ttl)
                .unwrap_or(chrono::Duration::minutes(10)),
        }
    }
}
