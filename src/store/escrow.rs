//! Escrow: this process's shares of the shared budgets its sessions draw on, and the holds
//! each round of decisions takes from them.
//!
//! A process never asks the database whether a call fits a shared budget: it holds a share
//! of each budget it uses (`arbiter.budget_grant` takes it from what is left at every
//! level of the budget's chain), decides calls against that share in memory, and writes
//! each allowed call's cost to its own share's row in the statement that writes the call
//! (`arbiter.budget_charge`). So no call of a busy budget waits for another process's, and
//! no call writes a row another process writes. A process holds one share of a budget per
//! lane of its group commit: a round takes the lanes in turn, its calls are charged to its
//! lane's share and written on that lane (`group_commit`), so the process's own statements
//! in flight never update one row either, and neither waits for the other's commit.
//!
//! # Invariant: a process never spends a unit it was not granted
//! A round of one session takes a hold of its calls' costs from the live share before it
//! decides ([`Escrow::hold`]); each allowed call spends from the hold, and a call the hold
//! cannot pay for is denied. A hold is only ever taken from units the share was granted and
//! not yet charged, so what this process's calls charge to a share never passes what
//! storage granted it; storage never grants past any level's limit; and
//! `arbiter.budget_charge` refuses a share whose lease ran out, whose units may have gone
//! back to the budget. Units of a round that were not spent go back to the share when the
//! round's hold is dropped. A call charged to a share that died before its
//! write landed (the process could not renew the lease) is dropped when its session is
//! reconciled (it was answered `StorageWriteThrough`), never charged elsewhere.
//!
//! # Invariant: no unit stranded
//! A call is denied by a shared budget only after a grant, asked for after the call's
//! round began, found fewer units than it needed at some level, and no share of this
//! process could pay for it, alone or once the other lanes' shares gave their units back
//! and storage was asked again: every unit not spent is then held by another process or a
//! reservation. A share is sized to its lane's recent use, and storage grants at most half
//! of what is left, and no more than the asker's part of it (in proportion to what the
//! tree's live shares want, and no more than an equal part), so the last units are spread
//! among the shares that ask, and they run out together. A share's unspent units go back
//! when it has been idle for [`IDLE_RETURN`], when its period ends and at shutdown; a
//! process that died returns them when its lease runs out ([`LEASE`]), at the next grant
//! of the budget's tree. What a settlement releases of a reservation's estimate goes back
//! at the next grant of the tree too, whichever process makes it (migration
//! `20261206000007_budget_reservations.sql`): a settlement takes nothing from a hold and
//! never needs a live share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use super::group_commit::LANES;
use super::inner::Inner;
use super::time_bounded::TimeBounded;
use super::worker::{Parking, Worker};
use crate::budget::BudgetId;
use crate::error::{StorageError, error_chain};
use crate::metrics::{self, Counter};
use crate::storage::{ShareGrant, ShareRequest, Storage};

/// How long a share stays its holder's without a renewal: the bound on how long a dead
/// process keeps units from the others.
pub(crate) const LEASE: Duration = Duration::from_secs(10);
/// A share unused this long gives back what it holds beyond what it charged.
pub(crate) const IDLE_RETURN: Duration = Duration::from_secs(1);
/// How often the escrow's task renews leases and gives back idle units.
const TICK: Duration = Duration::from_millis(250);
/// A grant asks for two of these windows of the account's recent use.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Before an account has a recent use, a grant asks for this many times its need.
const COLD_START_ROUNDS: u64 = 8;
/// Grants one round asks for at most before it takes what is left: other rounds may take
/// what a grant added first.
const REFILLS_PER_ROUND: usize = 4;

/// This store's shares: per budget its sessions drew on, one account per lane.
#[derive(Debug)]
pub(super) struct Escrow {
    holder: Uuid,
    lease: Duration,
    /// A share is used for new calls only until this long before its lease may have run
    /// out: a write decided then still lands before the lease does.
    margin: Duration,
    /// Per budget, one account per lane of the group commit.
    accounts: Mutex<HashMap<BudgetId, Arc<[Arc<Account>]>>>,
    task: Worker,
}

/// One budget's shares in this process for the calls of one lane of the group commit.
#[derive(Debug)]
struct Account {
    budget: BudgetId,
    lane: usize,
    /// One grant or release of this account at a time.
    refill: tokio::sync::Mutex<()>,
    /// Units the rounds waiting for a grant of this account need: a grant asks for them
    /// all, so that a burst of rounds costs one grant, not one each.
    waiting: AtomicU64,
    state: Mutex<AccountState>,
}

#[derive(Debug, Default)]
struct AccountState {
    live: Option<Share>,
    /// Shares replaced (their period ended, or storage closed them), for
    /// [`Escrow::is_dead`]: until their lease has run out, calls charged to them may still
    /// land.
    retired: Vec<(Uuid, Instant)>,
    /// The level that had no room when the last grant found less than it needed; cleared
    /// by a grant that did not.
    exhausted: Option<BudgetId>,
    /// When that grant was asked for, and the room it found.
    exhausted_asked_at: Option<(Instant, u64)>,
    /// Units charged since `window_start`, for sizing the next grant.
    recent: u64,
    window_start: Option<Instant>,
    /// Units charged in the window before.
    last_window: u64,
    last_charge: Option<Instant>,
    /// Holds taken from the live share and not yet dropped.
    holds: usize,
    /// The live share holds exactly what storage counted as used, and nothing was taken
    /// since: nothing to resync.
    settled: bool,
}

#[derive(Debug, Clone)]
struct Share {
    id: Uuid,
    granted: u64,
    /// Units held or spent by this process's calls (written, in flight or pending).
    charged: u64,
    /// Calls may be charged to it until then (its lease, less the margin).
    usable_until: Instant,
    /// Its lease has certainly run out by then if not renewed.
    dead_after: Instant,
    /// Calls decided from then on belong to the budget's next period.
    period_end: Option<DateTime<Utc>>,
}

impl Share {
    fn available(&self) -> u64 {
        self.granted.saturating_sub(self.charged)
    }

    fn usable(&self, now: Instant, at: DateTime<Utc>) -> bool {
        now < self.usable_until && self.period_end.is_none_or(|end| at < end)
    }
}

/// Units of one budget held for one round of decisions: each allowed call spends from it.
/// Dropping it gives back what was not spent, so a round whose caller went away strands
/// nothing; what was spent stays charged (its write may land).
#[derive(Debug)]
pub(crate) struct Hold {
    account: Arc<Account>,
    share: Option<Uuid>,
    held: u64,
    spent: u64,
    /// Why the hold has fewer units than asked for.
    short: Option<Shortfall>,
}

/// Why a hold could not get every unit asked for.
#[derive(Debug, Clone)]
pub(crate) enum Shortfall {
    /// A grant found no room at this level.
    Exhausted(BudgetId),
    /// Storage did not answer the grant.
    Unavailable(String),
}

impl Hold {
    /// The group commit's lane of the share the hold's units come from; `None` when it
    /// holds none (its round charges nothing).
    pub(crate) fn lane(&self) -> Option<usize> {
        self.share.map(|_| self.account.lane)
    }

    /// Spends `cost` units for one call: the share they were charged to, or why they could
    /// not be.
    pub(crate) fn spend(&mut self, cost: u64) -> Result<Option<Uuid>, Shortfall> {
        if cost == 0 {
            return Ok(self.share);
        }
        match self.spent.checked_add(cost) {
            Some(after) if after <= self.held => {
                self.spent = after;
                Ok(self.share)
            }
            _ => Err(self
                .short
                .clone()
                .unwrap_or_else(|| Shortfall::Exhausted(self.account.budget.clone()))),
        }
    }

    /// Forgets what was spent: the round is decided again from the start.
    pub(crate) fn restart(&mut self) {
        self.spent = 0;
    }
}

impl Escrow {
    pub(super) fn new(holder: Uuid, lease: Duration, storage_timeout: Duration) -> Self {
        Escrow {
            holder,
            lease,
            margin: std::cmp::min(storage_timeout + Duration::from_secs(1), lease / 2),
            accounts: Mutex::default(),
            task: Worker::default(),
        }
    }

    /// The accounts of `budget`, one per lane.
    fn budget_accounts(&self, budget: &BudgetId) -> Arc<[Arc<Account>]> {
        let mut accounts = lock(&self.accounts);
        if let Some(lanes) = accounts.get(budget) {
            return Arc::clone(lanes);
        }
        let lanes: Arc<[Arc<Account>]> = (0..LANES)
            .map(|lane| {
                Arc::new(Account {
                    budget: budget.clone(),
                    lane,
                    refill: tokio::sync::Mutex::new(()),
                    waiting: AtomicU64::new(0),
                    state: Mutex::default(),
                })
            })
            .collect();
        accounts.insert(budget.clone(), Arc::clone(&lanes));
        lanes
    }

    fn accounts(&self) -> Vec<Arc<Account>> {
        lock(&self.accounts)
            .values()
            .flat_map(|lanes| lanes.iter().cloned())
            .collect()
    }

    /// Holds `units` of `budget` for a round of `lane` decided at `at`, granting more from
    /// storage first (by `deadline`) if the lane's live share has fewer, and taking them from
    /// another lane's share if storage has no more. Fewer units (maybe none) when no share
    /// of this process and no room in storage has them, or storage did not answer.
    pub(super) async fn hold<S: Storage>(
        &self,
        store: &Weak<Inner<S>>,
        storage: &TimeBounded<S>,
        (budget, lane): (&BudgetId, usize),
        units: u64,
        at: DateTime<Utc>,
        deadline: Instant,
    ) -> Hold {
        let lanes = self.budget_accounts(budget);
        let account = Arc::clone(&lanes[lane % LANES]);
        if units == 0 {
            // Nothing to pay for (free calls, or calls the session refuses anyway): no
            // storage, whatever an agent sends.
            return Hold::empty(&account);
        }
        self.task.start(|parking| Some(run(store.clone(), parking)));
        let began = Instant::now();
        // Other rounds may take what a grant added before this one does: ask again while
        // storage still had room (a few times: each grant is sized to the recent rate).
        let mut short = Some(Shortfall::Unavailable(format!(
            "other calls took the units of {REFILLS_PER_ROUND} grants first"
        )));
        for _ in 0..REFILLS_PER_ROUND {
            if let Some(hold) = Account::take(&account, units, at, false) {
                return hold;
            }
            let refilled = {
                let _waiting = Waiting::add(&account, units);
                self.refill(storage, &account, units, at, began, deadline)
                    .await
            };
            match refilled {
                Ok(Refill::Room) => {}
                Ok(Refill::Exhausted) => {
                    short = None;
                    break;
                }
                Err(err) => {
                    short = Some(Shortfall::Unavailable(error_chain(&err)));
                    break;
                }
            }
        }
        // What this process holds for another lane pays for the round rather than a
        // denial: a call is refused only when no share of this process has its cost.
        let others = || lanes.iter().filter(|other| other.lane != account.lane);
        if let Some(hold) = others().find_map(|other| Account::take(other, units, at, false)) {
            return hold;
        }
        // Spread over the lanes' shares, the units may still pay for it together: give the
        // other lanes' back, and ask storage once more (this happens only as the budget
        // runs out).
        // The level that had no room, as the last grant found it: a grant after the give
        // back forgets it, and other rounds may take what it added.
        let tightest = account.lock().exhausted.clone();
        if short.is_none() {
            let mut gave_back = false;
            for other in others() {
                gave_back |= self.give_back(storage, other, deadline).await;
            }
            if gave_back {
                let _waiting = Waiting::add(&account, units);
                if let Err(err) = self
                    .refill(storage, &account, units, at, Instant::now(), deadline)
                    .await
                {
                    short = Some(Shortfall::Unavailable(error_chain(&err)));
                }
            }
        }
        let mut hold =
            Account::take(&account, units, at, true).unwrap_or_else(|| Hold::empty(&account));
        if hold.held < units {
            hold.short = short
                .or(hold.short.take())
                .or(tightest.map(Shortfall::Exhausted));
        }
        hold
    }

    /// Gives back to storage the units `account`'s live share holds and has not charged;
    /// whether there were any. Those storage does not take back (it did not answer) stay
    /// granted there until the account's next grant reads its share again.
    async fn give_back<S: Storage>(
        &self,
        storage: &TimeBounded<S>,
        account: &Account,
        deadline: Instant,
    ) -> bool {
        let Ok(_one) = tokio::time::timeout_at(deadline, account.refill.lock()).await else {
            return false;
        };
        let share = {
            let mut state = account.lock();
            match state.live.clone() {
                Some(live) if live.available() > 0 => {
                    state.keep_only_charged();
                    live
                }
                _ => return false,
            }
        };
        if let Err(err) = storage
            .by(
                deadline,
                storage.release_share(share.id, share.charged, false),
            )
            .await
        {
            tracing::debug!(budget_id = %account.budget, error = %error_chain(&err),
                "giving back a lane's units failed");
            return false;
        }
        true
    }

    /// Gives back the units of an unwritten call the merge dropped, if its share is still
    /// the live one.
    pub(super) fn refund(&self, event: &crate::audit::AuditEvent) {
        if let (Some(budget), Some(share), Some(cost)) =
            (&event.budget_id, event.charged_share(), event.cost)
        {
            for account in self.budget_accounts(budget).iter() {
                account.refund(share, u64::try_from(cost).unwrap_or(0));
            }
        }
    }

    /// Storage refused a write charging `share`: it is closed. Its calls not written are
    /// dropped at reconcile, and the next round of its budget takes a new share.
    pub(super) fn mark_dead(&self, share: Uuid) {
        let now = Instant::now();
        for account in self.accounts() {
            let mut state = account.lock();
            if state.live.as_ref().is_some_and(|live| live.id == share) {
                state.retire_now();
            }
            for (id, dead_after) in &mut state.retired {
                if *id == share {
                    *dead_after = now;
                }
            }
        }
    }

    /// Whether calls charged to `share` can no longer land: its lease has run out, or
    /// storage closed it. A share this process does not know is left to storage to judge.
    pub(super) fn is_dead(&self, share: Uuid) -> bool {
        let now = Instant::now();
        self.accounts().iter().any(|account| {
            let state = account.lock();
            let live_dead = state
                .live
                .as_ref()
                .is_some_and(|live| live.id == share && now >= live.dead_after);
            live_dead
                || state
                    .retired
                    .iter()
                    .any(|(id, dead_after)| *id == share && now >= *dead_after)
        })
    }

    /// Grants the account enough for `units` more, if storage has room: one grant at a
    /// time per account; a share storage closed is replaced by a new one. A round that
    /// `began` before a grant that found no room was asked for takes that answer.
    async fn refill<S: Storage>(
        &self,
        storage: &TimeBounded<S>,
        account: &Account,
        units: u64,
        at: DateTime<Utc>,
        began: Instant,
        deadline: Instant,
    ) -> Result<Refill, StorageError> {
        let _one = tokio::time::timeout_at(deadline, account.refill.lock())
            .await
            .map_err(|_| storage.timed_out())?;
        // A grant asked for after this round began found less room than this round needs:
        // its answer is this round's too, so a flood of calls on a spent budget costs one
        // grant at a time.
        {
            let state = account.lock();
            let available = state
                .live
                .as_ref()
                .filter(|live| live.usable(Instant::now(), at))
                .map_or(0, Share::available);
            let need = units - std::cmp::min(available, units);
            if state
                .exhausted_asked_at
                .is_some_and(|(asked, room)| asked >= began && need > room)
            {
                return Ok(Refill::Exhausted);
            }
        }
        for _ in 0..2 {
            let (share_id, need, want) = {
                let mut state = account.lock();
                let now = Instant::now();
                let over = state.live.as_ref().is_some_and(|live| {
                    live.period_end.is_some_and(|end| at >= end) || now >= live.dead_after
                });
                if over {
                    state.retire();
                }
                let available = state.live.as_ref().map_or(0, Share::available);
                if state.live.as_ref().is_some_and(|live| live.usable(now, at))
                    && available >= units
                {
                    // Another round's grant got there first.
                    return Ok(Refill::Room);
                }
                let need = units - std::cmp::min(available, units);
                // Before there is a rate, enough for a few more rounds like this one.
                let want = std::cmp::max(
                    std::cmp::max(
                        need.saturating_mul(COLD_START_ROUNDS),
                        state.rate_based_want(),
                    ),
                    account.waiting.load(Ordering::Relaxed).saturating_mul(2),
                );
                let share_id = state
                    .live
                    .as_ref()
                    .map_or_else(Uuid::new_v4, |live| live.id);
                (share_id, need, want)
            };
            let sent_at = Instant::now();
            let grant = storage
                .by(
                    deadline,
                    storage.grant_share(ShareRequest {
                        share_id,
                        holder: self.holder,
                        budget_id: &account.budget,
                        need,
                        want,
                        lease: self.lease,
                    }),
                )
                .await?;
            let answered = Answered {
                share_id,
                sent_at,
                received_at: Instant::now(),
                need,
            };
            if account.granted(&grant, answered, self.lease, self.margin) {
                metrics::count(Counter::ShareGrants, 1);
                return Ok(if grant.added < need {
                    Refill::Exhausted
                } else {
                    Refill::Room
                });
            }
            // Storage closed the share (its lease ran out, or its period is over): a new
            // one, once.
        }
        Ok(Refill::Room)
    }

    /// Renews the leases of shares in use, and gives back the units of idle ones and of
    /// those whose period is over. Run by the escrow's task every [`TICK`].
    ///
    /// An idle account gives back everything its share holds beyond what it charged. When,
    /// besides, it has been idle for a lease, no round holds units of it and nothing of
    /// the store is pending (`quiescent`), it gives back all but what storage counted as
    /// used, and takes that as what it charged: units charged by a round whose caller went
    /// away mid-write, and whose write never landed, come back too.
    async fn upkeep<S: Storage>(
        &self,
        storage: &TimeBounded<S>,
        at: DateTime<Utc>,
        quiescent: bool,
    ) {
        for account in self.accounts() {
            let Ok(_one) = account.refill.try_lock() else {
                continue;
            };
            let (share, action) = {
                let mut state = account.lock();
                let now = Instant::now();
                let Some(live) = state.live.clone() else {
                    continue;
                };
                let idle_for = |long: Duration| {
                    state
                        .last_charge
                        .is_none_or(|last| now.duration_since(last) >= long)
                };
                let idle = idle_for(IDLE_RETURN);
                // Longer than any write decided before can still be in flight: a resync
                // while one is would make storage refuse its charge.
                let long_idle = idle_for(self.lease);
                if live.period_end.is_some_and(|end| at >= end) {
                    state.retire();
                    (live, Upkeep::Release)
                } else if long_idle && quiescent && state.holds == 0 && !state.settled {
                    state.keep_only_charged();
                    (live, Upkeep::Resync)
                } else if idle && live.available() > 0 {
                    state.keep_only_charged();
                    (live, Upkeep::Release)
                } else if !idle && live.usable_until.saturating_duration_since(now) < self.lease / 2
                {
                    (live, Upkeep::Renew)
                } else {
                    continue;
                }
            };
            let deadline = Instant::now() + storage.after();
            match action {
                Upkeep::Resync => {
                    let released = storage
                        .by(deadline, storage.release_share(share.id, 0, false))
                        .await;
                    match released {
                        // The share now holds exactly what storage counted as used.
                        Ok(returned) => account.resynced(share.id, share.granted, returned),
                        Err(err) => {
                            tracing::debug!(budget_id = %account.budget, error = %error_chain(&err),
                            "giving back a share's idle units failed")
                        }
                    }
                }
                Upkeep::Release => {
                    let released = storage
                        .by(
                            deadline,
                            storage.release_share(share.id, share.charged, false),
                        )
                        .await;
                    if let Err(err) = released {
                        // They stay granted in storage, unused here until the next grant
                        // of this account reads the share's total again.
                        tracing::debug!(budget_id = %account.budget, error = %error_chain(&err),
                            "giving back a share's idle units failed");
                    }
                }
                Upkeep::Renew => {
                    let sent_at = Instant::now();
                    let grant = storage
                        .by(
                            deadline,
                            storage.grant_share(ShareRequest {
                                share_id: share.id,
                                holder: self.holder,
                                budget_id: &account.budget,
                                need: 0,
                                want: 0,
                                lease: self.lease,
                            }),
                        )
                        .await;
                    match grant {
                        Ok(grant) => {
                            let answered = Answered {
                                share_id: share.id,
                                sent_at,
                                received_at: Instant::now(),
                                need: 0,
                            };
                            account.granted(&grant, answered, self.lease, self.margin);
                        }
                        Err(err) => {
                            tracing::debug!(budget_id = %account.budget, error = %error_chain(&err), "renewing a share's lease failed; trying again")
                        }
                    }
                }
            }
        }
    }

    /// Gives back every share's unspent units, closing the shares when `close` (nothing of
    /// this process is pending, so nothing more will be charged to them). What storage
    /// does not answer in time is reclaimed after the lease.
    pub(super) async fn release_all<S: Storage>(&self, storage: &TimeBounded<S>, close: bool) {
        for account in self.accounts() {
            let _one = account.refill.lock().await;
            let live = account.lock().live.take();
            let Some(share) = live else { continue };
            let deadline = Instant::now() + storage.after();
            if let Err(err) = storage
                .by(
                    deadline,
                    storage.release_share(share.id, share.charged, close),
                )
                .await
            {
                tracing::warn!(budget_id = %account.budget, error = %error_chain(&err),
                    "a share's units were not given back; they return when its lease runs out");
            }
        }
    }
}

/// A round's units counted in its account's `waiting` while it waits for a grant, and
/// taken out when it stops, answered or cancelled.
struct Waiting<'a> {
    account: &'a Account,
    units: u64,
}

impl<'a> Waiting<'a> {
    fn add(account: &'a Account, units: u64) -> Self {
        account.waiting.fetch_add(units, Ordering::Relaxed);
        Waiting { account, units }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.account
            .waiting
            .fetch_sub(self.units, Ordering::Relaxed);
    }
}

/// What a refill found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refill {
    /// Storage had room for the round (it may have gone to other rounds since).
    Room,
    /// Storage had less room than the round needs at some level.
    Exhausted,
}

#[derive(Debug, Clone, Copy)]
enum Upkeep {
    /// Give back all but what storage counted as used.
    Resync,
    /// Give back what is not charged.
    Release,
    Renew,
}

impl Account {
    fn lock(&self) -> MutexGuard<'_, AccountState> {
        lock(&self.state)
    }

    /// A hold of `units` from the live share if it has them (or, with `partial`, of what it
    /// has), charged to it at once so that no other round takes them.
    fn take(account: &Arc<Account>, units: u64, at: DateTime<Utc>, partial: bool) -> Option<Hold> {
        let mut state = account.lock();
        let now = Instant::now();
        let exhausted = state.exhausted.clone();
        let Some(live) = state.live.as_mut().filter(|live| live.usable(now, at)) else {
            drop(state);
            return partial.then(|| {
                let mut hold = Hold::empty(account);
                hold.short = exhausted.map(Shortfall::Exhausted);
                hold
            });
        };
        let held = std::cmp::min(units, live.available());
        if held < units && !partial {
            return None;
        }
        live.charged += held;
        let share = live.id;
        state.note_charge(held, now);
        state.holds += 1;
        state.settled &= held == 0;
        Some(Hold {
            account: Arc::clone(account),
            share: Some(share),
            held,
            spent: 0,
            short: (held < units)
                .then(|| exhausted.map(Shortfall::Exhausted))
                .flatten(),
        })
    }

    /// A release of everything beyond `used` gave back `returned` of the `granted` the
    /// share held: it now holds `used`, all of it charged.
    fn resynced(&self, share: Uuid, granted: u64, returned: u64) {
        let mut state = self.lock();
        if let Some(live) = state.live.as_mut().filter(|live| live.id == share) {
            live.granted = granted.saturating_sub(returned);
            live.charged = live.granted;
            state.settled = true;
        }
    }

    fn refund(&self, share: Uuid, units: u64) {
        let mut state = self.lock();
        if let Some(live) = state.live.as_mut().filter(|live| live.id == share) {
            live.charged = live.charged.saturating_sub(units);
        }
    }

    /// Takes in a grant's answer; `false` if storage had closed the share (it is retired,
    /// and the caller asks again on a new share).
    fn granted(
        &self,
        grant: &ShareGrant,
        answered: Answered,
        lease: Duration,
        margin: Duration,
    ) -> bool {
        let Answered {
            share_id,
            sent_at,
            received_at,
            need,
        } = answered;
        let mut state = self.lock();
        if !grant.share_open {
            if state.live.as_ref().is_some_and(|live| live.id == share_id) {
                state.retire_now();
            }
            return false;
        }
        let charged = state
            .live
            .as_ref()
            .filter(|live| live.id == share_id)
            .map_or(0, |live| live.charged);
        if state.live.as_ref().is_some_and(|live| live.id != share_id) {
            state.retire();
        }
        state.live = Some(Share {
            id: share_id,
            granted: grant.granted,
            charged,
            usable_until: (sent_at + lease).checked_sub(margin).unwrap_or(sent_at),
            dead_after: received_at + lease,
            period_end: grant.period_end,
        });
        state.settled = false;
        (state.exhausted, state.exhausted_asked_at) = if grant.added < need {
            let tightest = grant
                .tightest
                .clone()
                .unwrap_or_else(|| self.budget.clone());
            (Some(tightest), Some((sent_at, grant.room)))
        } else {
            (None, None)
        };
        true
    }
}

/// When a grant for a share was asked and answered, and what it needed.
#[derive(Debug, Clone, Copy)]
struct Answered {
    share_id: Uuid,
    sent_at: Instant,
    received_at: Instant,
    need: u64,
}

impl AccountState {
    /// The live share's unspent units are on their way back to storage: no round may take
    /// them meanwhile.
    fn keep_only_charged(&mut self) {
        if let Some(live) = self.live.as_mut() {
            live.granted = live.charged;
        }
    }

    /// The live share stops taking calls; calls charged to it may land until its lease
    /// runs out.
    fn retire(&mut self) {
        if let Some(live) = self.live.take() {
            self.retired.push((live.id, live.dead_after));
        }
        let now = Instant::now();
        self.retired
            .retain(|(_, dead_after)| *dead_after + LEASE > now);
    }

    /// Storage closed the live share: calls charged to it can no longer land.
    fn retire_now(&mut self) {
        if let Some(live) = self.live.take() {
            self.retired.push((live.id, Instant::now()));
        }
    }

    fn note_charge(&mut self, units: u64, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= RATE_WINDOW {
            self.last_window = self.recent;
            self.recent = 0;
            self.window_start = Some(now);
        }
        self.recent += units;
        self.last_charge = Some(now);
    }

    /// Units for about two windows of the recent rate.
    fn rate_based_want(&self) -> u64 {
        std::cmp::max(self.recent, self.last_window).saturating_mul(2)
    }
}

impl Hold {
    /// A hold of nothing (it counts as no hold of its account).
    fn empty(account: &Arc<Account>) -> Self {
        Hold {
            account: Arc::clone(account),
            share: None,
            held: 0,
            spent: 0,
            short: None,
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let Some(share) = self.share else { return };
        let mut state = self.account.lock();
        state.holds = state.holds.saturating_sub(1);
        if let Some(live) = state.live.as_mut().filter(|live| live.id == share) {
            live.charged = live.charged.saturating_sub(self.held - self.spent);
        }
    }
}

/// A std mutex whose holder never panics while holding it (map and counter operations).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The escrow's task: renews and gives back every [`TICK`], holding the store only while
/// it works, so dropping the store ends it.
async fn run<S: Storage>(store: Weak<Inner<S>>, parking: Parking) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = parking.closed() => return,
        }
        let Some(inner) = store.upgrade() else { return };
        let storage = Arc::clone(inner.storage());
        let at = inner.now();
        let quiescent = inner.pending_len() == 0;
        tokio::select! {
            biased;
            () = parking.closed() => return,
            () = inner.escrow().upkeep(&storage, at, quiescent) => {}
        }
    }
}
