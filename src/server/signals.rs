//! The status signals of allowed answers (`crate::http::status`), shared by every way in:
//! HTTP, gRPC `ext_authz` and the answers' JSON bodies.
//!
//! What is left of a shared budget is read from storage (the budget's chain, one level at
//! a time) at most once a second per budget and process, whatever the traffic: a call's
//! answer never waits for more than that read, and a busy budget costs storage one read a
//! second. So `x-arbiter-budget-remaining` may be up to a second old; decisions never use
//! it (they are made against this process's shares, see `store::escrow`).

use std::time::Duration;

use moka::future::Cache;

use crate::budget::BudgetId;
use crate::error::error_chain;
use crate::http::status::{BudgetLeft, Status};
use crate::{SessionStore, TaskSession};

/// How long what was read of a budget is reported before it is read again.
const BUDGET_READ_EVERY: Duration = Duration::from_secs(1);
/// Most budgets whose last read is kept.
const BUDGETS_KEPT: u64 = 10_000;

/// The signals of one store's answers.
#[derive(Debug, Clone)]
pub(crate) struct Signals {
    store: SessionStore,
    /// `None`: no such budget, or its read failed (not read again before the entry ends,
    /// so an outage costs one failed read a second, not one per call).
    budgets: Cache<BudgetId, Option<BudgetLeft>>,
}

impl Signals {
    pub(crate) fn new(store: SessionStore) -> Self {
        Signals {
            store,
            budgets: Cache::builder()
                .max_capacity(BUDGETS_KEPT)
                .time_to_live(BUDGET_READ_EVERY)
                .build(),
        }
    }

    /// The signals of `session`, as the call that was just allowed left it.
    pub(crate) async fn of(&self, session: &TaskSession) -> Status {
        let budget = match &session.budget_id {
            Some(id) => self.budget_left(id).await,
            None => None,
        };
        self.store.status(session, budget)
    }

    async fn budget_left(&self, id: &BudgetId) -> Option<BudgetLeft> {
        // One read per entry, however many answers wait for it (moka coalesces them).
        self.budgets
            .get_with_by_ref(id, async {
                self.store.budget_left(id).await.unwrap_or_else(|err| {
                    tracing::debug!(budget_id = %id, error = %error_chain(&err), "budget not read for the status signals");
                    None
                })
            })
            .await
    }
}
