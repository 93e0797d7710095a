//! A round: the mutations of one session that one holder of its lock decides together, in
//! arrival order, each against the state the ones before it left (see `inner`'s
//! "Combining"). A round decides; it does no I/O. What its write's outcome means for each
//! caller is here too, so every caller of a round is answered by the same rules.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::escrow::{Hold, Shortfall};
use super::queued::{Answer, Mutated};
use crate::audit::{AuditEvent, ReservationChange};
use crate::budget::BudgetId;
use crate::error::SessionError;
use crate::model::TaskSession;
use crate::policy::{self, Decision, Mutation};

/// A mutation's decision within a round, before the write's outcome is known.
enum Decided {
    /// Changed the session; the state right after it.
    Changed(TaskSession),
    /// Nothing to change; the state it saw.
    Unchanged(TaskSession),
    /// Denied by the policy: nothing consumed.
    Denied(SessionError),
}

/// Every mutation of a round decided in order: the final state (if any mutation changed
/// the session), the events to write, and each mutation's decision.
pub(super) struct Round {
    next: Option<TaskSession>,
    events: Vec<AuditEvent>,
    decided: Vec<Decided>,
}

impl Round {
    /// What the calls of `mutations` on `session` at `now` may cost its shared budget at
    /// most: what a round's hold must hold. A call an earlier check is sure to deny (the
    /// session is not live, its budget is spent, a tool is not allowed, another agent
    /// presents it) costs nothing here, so that calls the session refuses anyway never ask
    /// storage for units. `None` for a session without a shared budget.
    pub(super) fn cost(
        session: &TaskSession,
        mutations: &[Mutation<'_>],
        now: DateTime<Utc>,
    ) -> Option<(BudgetId, u64)> {
        let budget = session.budget_id.clone()?;
        let open = session.is_live(now) && session.calls_remaining() > 0;
        let units = mutations
            .iter()
            .filter_map(|mutation| match mutation {
                Mutation::Use {
                    tools, cost, agent, ..
                } if open
                    && agent.is_none_or(|agent| agent == session.agent_id)
                    && tools.iter().all(|tool| session.is_tool_authorized(tool)) =>
                {
                    session.cost_of(tools, *cost)
                }
                // A settlement takes no units from the share: what it charges above the
                // estimate is an overrun, charged whatever the room.
                Mutation::Use { .. } | Mutation::Settle(_) | Mutation::Close | Mutation::Expire => {
                    None
                }
            })
            .fold(0, u64::saturating_add);
        Some((budget, units))
    }

    /// Decides `mutations` in order at `now`, each against the state the ones before it
    /// left, starting from `start`; events are recorded as made by `instance_id`. A call
    /// of a session with a shared budget is allowed only if `hold` pays for it, last of
    /// every check.
    pub(super) fn decide(
        start: &TaskSession,
        mutations: &[Mutation<'_>],
        now: DateTime<Utc>,
        instance_id: Uuid,
        mut hold: Option<&mut Hold>,
    ) -> Self {
        let mut next: Option<TaskSession> = None;
        let mut events = Vec::new();
        let decided = mutations
            .iter()
            .map(|mutation| {
                let current = next.as_ref().unwrap_or(start);
                match decide_one(current, *mutation, now, instance_id, hold.as_deref_mut()) {
                    Ok(Some((changed, event))) => {
                        events.push(event);
                        Decided::Changed(next.insert(changed).clone())
                    }
                    Ok(None) => Decided::Unchanged(current.clone()),
                    Err(denial) => Decided::Denied(denial),
                }
            })
            .collect();
        Round {
            next,
            events,
            decided,
        }
    }

    /// The state after the round, if any mutation changed the session: what to write.
    pub(super) fn next(&self) -> Option<&TaskSession> {
        self.next.as_ref()
    }

    /// The events of the mutations that changed the session, in order.
    pub(super) fn events(&self) -> &[AuditEvent] {
        &self.events
    }

    /// The state after the round and its events, taken out to go into the slot; the
    /// decisions stay for the answers.
    pub(super) fn take_changes(&mut self) -> (Option<TaskSession>, Vec<AuditEvent>) {
        (self.next.take(), std::mem::take(&mut self.events))
    }

    /// The callers' answers once the round's write succeeded (or there was none).
    pub(super) fn answers(self) -> Vec<Answer> {
        self.answer_each(|session| {
            Ok(Mutated {
                session,
                changed: true,
            })
        })
    }

    /// The callers' answers once the round's write failed with `detail`: every mutation
    /// that changed the session is `StorageWriteThrough` (counted in the cache, not known
    /// to be durable); the others are answered as if the write had succeeded.
    pub(super) fn answers_after_failure(self, session_id: Uuid, detail: &str) -> Vec<Answer> {
        self.answer_each(|_| {
            Err(SessionError::StorageWriteThrough {
                session_id,
                detail: detail.to_owned(),
            })
        })
    }

    /// One answer per mutation, in order: `changed` for those that changed the session,
    /// the state seen for those with nothing to change, the denial for the others.
    fn answer_each(self, changed: impl Fn(TaskSession) -> Answer) -> Vec<Answer> {
        self.decided
            .into_iter()
            .map(|decided| match decided {
                Decided::Changed(session) => changed(session),
                Decided::Unchanged(session) => Ok(Mutated {
                    session,
                    changed: false,
                }),
                Decided::Denied(err) => Err(err),
            })
            .collect()
    }
}

/// Decides `mutation` against `current`: the new state and its audit event, `None` if
/// nothing changes, or the denial. A call the policy allows is then charged to the shared
/// budget, if the session has one, from `hold`.
fn decide_one(
    current: &TaskSession,
    mutation: Mutation<'_>,
    now: DateTime<Utc>,
    instance_id: Uuid,
    hold: Option<&mut Hold>,
) -> Result<Option<(TaskSession, AuditEvent)>, SessionError> {
    let (next, kind) = match policy::decide(current, mutation, now)? {
        Decision::Apply(next, kind) => (next, kind),
        Decision::Unchanged => return Ok(None),
    };
    let mut event = match mutation {
        Mutation::Use { tools, .. } => AuditEvent::new(
            kind,
            tools.iter().map(|t| (*t).to_owned()).collect(),
            &next,
            now,
            instance_id,
        ),
        Mutation::Settle(_) | Mutation::Close | Mutation::Expire => {
            AuditEvent::new(kind, Vec::new(), &next, now, instance_id)
        }
    };
    match mutation {
        Mutation::Use {
            tools,
            cost,
            reserve,
            ..
        } => {
            if let (Some(cost), Some(budget)) = (current.cost_of(tools, cost), &current.budget_id) {
                let spent = match hold {
                    Some(hold) => hold.spend(cost),
                    None => Err(Shortfall::Exhausted(budget.clone())),
                };
                event.share_id = spent.map_err(|short| match short {
                    Shortfall::Exhausted(tightest) => SessionError::SharedBudgetExceeded {
                        session_id: current.session_id,
                        budget_id: tightest.to_string(),
                    },
                    Shortfall::Unavailable(detail) => SessionError::StorageRead {
                        session_id: Some(current.session_id),
                        detail,
                    },
                })?;
                // At most `limits::MAX_COST` per call.
                event.cost = Some(i64::try_from(cost).unwrap_or(i64::MAX));
                event.budget_id = Some(budget.clone());
            }
            if let Some(reserve) = reserve {
                // The reservation's id is its event's key: the trail names it.
                event.key = reserve.reservation_id;
                let made = next
                    .reservations
                    .iter()
                    .find(|open| open.reservation_id == reserve.reservation_id);
                if let Some(made) = made {
                    event.reservation = Some(ReservationChange::Made {
                        expires_at: made.expires_at,
                    });
                }
            }
        }
        Mutation::Settle(settle) => {
            // Both at most `limits::MAX_COST`.
            let signed = |units: u64| i64::try_from(units).unwrap_or(i64::MAX);
            event.cost = Some(signed(settle.actual) - signed(settle.estimate));
            event.share_id = Some(settle.share_id);
            event.budget_id.clone_from(&current.budget_id);
            event.reservation = Some(ReservationChange::Settled {
                reservation_id: settle.reservation_id,
                charged: settle.actual,
            });
        }
        Mutation::Close | Mutation::Expire => {}
    }
    Ok(Some((next, event)))
}
