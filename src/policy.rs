//! Pure policy: given a session, a request and `now`, the new state or the denial.
//! No I/O and no clock reads, so every rule here is tested without a database or a sleep.
//!
//! # Invariant: check order
//! A call is checked in this order, and the first failing check is the error reported:
//! agent binding -> closed -> expired (status or time) -> budget -> tool allow-list -> tool
//! limit -> rate window. The agent binding comes before even the request's shape (an empty
//! or oversized batch): a caller that is not the session's agent learns nothing else, and
//! only its mismatch is recorded. A denied call consumes nothing: the input session is never
//! modified, and a denial returns no new state. A batch is all-or-nothing: every tool is
//! checked, and the budget, each limited tool (counting its repeats in the batch) and the
//! rate window must have room for the whole batch. A reservation is a call, checked the
//! same way, then against the session's open reservations (at most
//! [`limits::MAX_OPEN_RESERVATIONS`]). A settlement is checked against nothing but the
//! reservation being open: the work was done, whatever became of the session since.
//!
//! A tool's limit is reported as [`SessionError::BudgetExceeded`] with the tool's limit
//! and calls. Its limit is always below the session's budget: a tool's calls are some of
//! the session's, so a limit at or above the budget is never reached before the budget
//! is, which is checked first. That is how the audit trail tells the two apart
//! ([`DenialReason::of_call`](crate::audit::DenialReason::of_call)).
//!
//! # Invariant: one budget, tool limit and window rule
//! `decide` (a new call) and `merge_unwritten` (a call a store counted but could not
//! write, re-applied on top of a newer stored row) count calls with the same three
//! helpers, `calls_after`, `tool_limits_after` and `window_after`. So inside one stored
//! rate window the calls of every store, `Ok` or reconciled, never pass the window's
//! limit, and no call passes the budget or a tool's limit, however the writes interleave.

use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound as _, Utc};
use uuid::Uuid;

use crate::audit::{AuditEvent, EventKind, ReservationChange};
use crate::error::SessionError;
use crate::model::{OpenReservation, SessionStatus, TaskSession, ToolLimit, limits};

/// A state change the store can be asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mutation<'a> {
    /// Count one call per tool, all or nothing; `cost`, when given, is what the call costs
    /// in the session's shared budget (else its tools' costs). With `reserve`, the call
    /// reserves its cost: it stays charged until settled or lapsed.
    Use {
        tools: &'a [&'a str],
        agent: Option<Uuid>,
        cost: Option<u64>,
        reserve: Option<Reserve>,
    },
    /// Settle a reservation of the session at its actual cost.
    Settle(Settle),
    /// Close the session.
    Close,
    /// Mark the session expired if its time limit has passed (from `expire_due`).
    Expire,
}

/// The reservation a call makes: its id, and how long it stays open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserve {
    pub(crate) reservation_id: Uuid,
    pub(crate) ttl: Duration,
}

/// A reservation to settle, as it was made, and its actual cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settle {
    pub(crate) reservation_id: Uuid,
    /// The cost it reserved, charged when it was made.
    pub(crate) estimate: u64,
    /// The share the estimate was charged to.
    pub(crate) share_id: Uuid,
    pub(crate) actual: u64,
}

/// The outcome of deciding a mutation that is allowed.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "moved once per call; boxing would add an allocation to the hot path"
)]
pub(crate) enum Decision {
    /// Apply this new state and record this event.
    Apply(TaskSession, EventKind),
    /// Nothing to change (an `Expire` of a session that is not due).
    Unchanged,
}

/// Decides `mutation` against `session` at `now`.
pub(crate) fn decide(
    session: &TaskSession,
    mutation: Mutation<'_>,
    now: DateTime<Utc>,
) -> Result<Decision, SessionError> {
    match mutation {
        Mutation::Use {
            tools,
            agent,
            reserve,
            ..
        } => {
            let mut next = decide_use(session, tools, agent, now)?;
            if let Some(reserve) = reserve {
                next.reservations = reserved(session, reserve, now)?;
            }
            let kind = if tools.len() == 1 {
                EventKind::CallAllowed
            } else {
                EventKind::BatchAllowed
            };
            Ok(Decision::Apply(next, kind))
        }
        Mutation::Settle(settle) => {
            if session
                .open_reservation(settle.reservation_id, now)
                .is_none()
            {
                return Err(SessionError::ReservationSettled(settle.reservation_id));
            }
            Ok(Decision::Apply(
                TaskSession {
                    reservations: without(session, settle.reservation_id, now),
                    ..session.clone()
                },
                EventKind::Settled,
            ))
        }
        Mutation::Close => match session.status {
            SessionStatus::Closed => Err(SessionError::AlreadyClosed(session.session_id)),
            SessionStatus::Expired => Err(SessionError::Expired(session.session_id)),
            SessionStatus::Active => Ok(Decision::Apply(
                with_status(session, SessionStatus::Closed),
                EventKind::Closed,
            )),
        },
        Mutation::Expire => Ok(
            if session.status == SessionStatus::Active && now >= session.expires_at {
                Decision::Apply(
                    with_status(session, SessionStatus::Expired),
                    EventKind::Expired,
                )
            } else {
                Decision::Unchanged
            },
        ),
    }
}

/// The session's open reservations after `reserve` at `now` (lapsed ones dropped), if it
/// may hold one more.
fn reserved(
    session: &TaskSession,
    reserve: Reserve,
    now: DateTime<Utc>,
) -> Result<Arc<[OpenReservation]>, SessionError> {
    if session.budget_id.is_none() {
        return Err(SessionError::InvalidRequest {
            reason: "only a session with a shared budget can reserve".to_owned(),
        });
    }
    let mut open = without(session, reserve.reservation_id, now).to_vec();
    if open.len() >= limits::MAX_OPEN_RESERVATIONS {
        return Err(SessionError::InvalidRequest {
            reason: format!(
                "a session holds at most {} open reservations",
                limits::MAX_OPEN_RESERVATIONS
            ),
        });
    }
    // PostgreSQL keeps microseconds: a reloaded session equals the cached one.
    let expires_at = now
        .checked_add_signed(reserve.ttl)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .trunc_subsecs(6);
    open.push(OpenReservation {
        reservation_id: reserve.reservation_id,
        expires_at,
    });
    Ok(open.into())
}

/// The session's reservations open at `now`, but `reservation_id`.
fn without(
    session: &TaskSession,
    reservation_id: Uuid,
    now: DateTime<Utc>,
) -> Arc<[OpenReservation]> {
    session
        .reservations
        .iter()
        .filter(|open| open.reservation_id != reservation_id && now < open.expires_at)
        .copied()
        .collect()
}

fn with_status(session: &TaskSession, status: SessionStatus) -> TaskSession {
    TaskSession {
        status,
        ..session.clone()
    }
}

fn decide_use(
    session: &TaskSession,
    tools: &[&str],
    agent: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<TaskSession, SessionError> {
    let id = session.session_id;
    if let Some(actual) = agent
        && actual != session.agent_id
    {
        return Err(SessionError::AgentMismatch {
            session_id: id,
            expected: session.agent_id,
            actual,
        });
    }
    if tools.is_empty() || tools.len() > limits::MAX_TOOLS {
        return Err(SessionError::InvalidRequest {
            reason: format!("a batch needs 1..={} tools", limits::MAX_TOOLS),
        });
    }
    match session.status {
        SessionStatus::Closed => return Err(SessionError::AlreadyClosed(id)),
        SessionStatus::Expired => return Err(SessionError::Expired(id)),
        SessionStatus::Active if now >= session.expires_at => {
            return Err(SessionError::Expired(id));
        }
        SessionStatus::Active => {}
    }
    // `tools.len()` is at most `limits::MAX_TOOLS` (checked above).
    let calls = tools.len() as u64;
    let calls_made = calls_after(session, calls).ok_or(SessionError::BudgetExceeded {
        session_id: id,
        limit: session.call_budget,
        used: session.calls_made,
    })?;
    if let Some(tool) = tools.iter().find(|tool| !session.is_tool_authorized(tool)) {
        return Err(SessionError::ToolNotAuthorized {
            session_id: id,
            tool: (*tool).to_owned(),
        });
    }
    let tool_limits = tool_limits_after(session, tools.iter().copied()).map_err(|full| {
        SessionError::BudgetExceeded {
            session_id: id,
            limit: full.limit,
            used: full.calls,
        }
    })?;
    let (window_started_at, window_calls) =
        window_after(session, calls, now).ok_or(SessionError::RateLimited {
            session_id: id,
            limit_per_minute: session.rate_limit_per_minute.unwrap_or(0),
        })?;
    Ok(TaskSession {
        calls_made,
        rate_window_started_at: Some(window_started_at),
        rate_window_calls: window_calls,
        tool_limits,
        ..session.clone()
    })
}

/// `calls_made` after `calls` more calls, if the budget has room for them.
fn calls_after(session: &TaskSession, calls: u64) -> Option<u64> {
    session
        .calls_made
        .checked_add(calls)
        .filter(|&after| after <= session.call_budget)
}

/// The tool limits after a call of `tools` (each repeat counts), if every limited tool
/// among them has room; otherwise the first one without, as it stood. Shares the limits
/// when no tool of the call has one.
fn tool_limits_after<'t>(
    session: &TaskSession,
    tools: impl IntoIterator<Item = &'t str>,
) -> Result<Arc<[ToolLimit]>, ToolLimit> {
    if session.tool_limits.is_empty() {
        return Ok(Arc::clone(&session.tool_limits));
    }
    let mut after: Option<Vec<ToolLimit>> = None;
    for tool in tools {
        let Some(index) = session.tool_limit_index(tool) else {
            continue;
        };
        let limits = after.get_or_insert_with(|| session.tool_limits.to_vec());
        // `index` is a position in `session.tool_limits`, which `limits` copies.
        let limit = &mut limits[index];
        if limit.calls >= limit.limit {
            return Err(session.tool_limits[index].clone());
        }
        limit.calls += 1;
    }
    Ok(after.map_or_else(|| Arc::clone(&session.tool_limits), Arc::from))
}

/// The rate window after `calls` more calls at `at` (its start and its count), if the
/// window has room for them.
fn window_after(
    session: &TaskSession,
    calls: u64,
    at: DateTime<Utc>,
) -> Option<(DateTime<Utc>, u64)> {
    let (started_at, counted) = current_window(session, at);
    let after = counted.saturating_add(calls);
    session
        .rate_limit_per_minute
        .is_none_or(|limit| after <= limit)
        .then_some((started_at, after))
}

/// Re-applies the changes recorded by `unwritten` (changes a store applied to its cache
/// but could not write) on top of `fresh`, the newer row in storage, in order. Returns
/// the merged state and the events dropped; `unwritten` keeps only the events that still
/// apply, renumbered so the trail's counters follow the merged timeline. `admit` may drop a
/// call before it is counted (one charged to a shared budget's share that died).
///
/// # Invariant: monotonic merge
/// A terminal status in storage wins; an unwritten close or expiry applies only over
/// active. Counters never decrease. Each unwritten call is counted by the rules of a new
/// call at the time it was decided (`calls_after`, `tool_limits_after`, `window_after`):
/// it must fit the budget, each limited tool's limit and the rate window that was running
/// then *in storage*, and the session must
/// still be active; a call that does not fit is dropped with its event. Every unwritten
/// call was answered `StorageWriteThrough` (denied), so dropping one never takes back a
/// call that got `Ok`, and a closed session never gains a call, even in the audit trail.
/// A reservation is open in the merged state only if the call that made it is kept; an
/// unwritten settlement applies only to a reservation still open in storage, so a
/// reservation is settled at most once, whichever stores settle it.
pub(crate) fn merge_unwritten(
    fresh: &TaskSession,
    unwritten: &mut Vec<AuditEvent>,
    mut admit: impl FnMut(&AuditEvent) -> bool,
) -> (TaskSession, Vec<AuditEvent>) {
    let mut merged = fresh.clone();
    let mut dropped = Vec::new();
    let mut kept = Vec::with_capacity(unwritten.len());
    for mut event in unwritten.drain(..) {
        if merge_one(&mut merged, &mut event, &mut admit) {
            kept.push(event);
        } else {
            dropped.push(event);
        }
    }
    *unwritten = kept;
    (merged, dropped)
}

/// Re-applies one unwritten event on `merged` (see [`merge_unwritten`]); `false` when it
/// is dropped.
fn merge_one(
    merged: &mut TaskSession,
    event: &mut AuditEvent,
    admit: &mut impl FnMut(&AuditEvent) -> bool,
) -> bool {
    match event.kind {
        EventKind::CallAllowed | EventKind::BatchAllowed => {
            if merged.status != SessionStatus::Active || !admit(event) {
                return false;
            }
            // At most `limits::MAX_TOOLS` tools per event.
            let calls = event.tools.len() as u64;
            let (Some(calls_made), Ok(tool_limits), Some((window_started_at, window_calls))) = (
                calls_after(merged, calls),
                tool_limits_after(merged, event.tools.iter().map(String::as_str)),
                window_after(merged, calls, event.occurred_at),
            ) else {
                return false;
            };
            if let Some(ReservationChange::Made { expires_at }) = event.reservation {
                let at = event.occurred_at;
                let mut open = without(merged, event.key, at).to_vec();
                if open.len() >= limits::MAX_OPEN_RESERVATIONS {
                    return false;
                }
                open.push(OpenReservation {
                    reservation_id: event.key,
                    expires_at,
                });
                merged.reservations = open.into();
            }
            merged.calls_made = calls_made;
            merged.tool_limits = tool_limits;
            merged.rate_window_started_at = Some(window_started_at);
            merged.rate_window_calls = window_calls;
        }
        EventKind::Settled => {
            // Settled meanwhile by another store, or lapsed: this settlement did not
            // happen (it was answered `StorageWriteThrough`).
            let Some(ReservationChange::Settled { reservation_id, .. }) = event.reservation else {
                return false;
            };
            if merged
                .open_reservation(reservation_id, event.occurred_at)
                .is_none()
            {
                return false;
            }
            merged.reservations = without(merged, reservation_id, event.occurred_at);
        }
        EventKind::Closed | EventKind::Expired if merged.status == SessionStatus::Active => {
            merged.status = event.status;
        }
        _ => {}
    }
    event.calls_made = merged.calls_made;
    event.rate_window_calls = merged.rate_window_calls;
    event.status = merged.status;
    event.tool_calls = crate::audit::tool_calls_of(event.kind, &event.tools, merged);
    true
}

/// The rate window a call at `now` falls in, and the calls already counted in it.
///
/// Windows are fixed: one starts at the first call after the previous one ended and lasts
/// `rate_limit_window_secs`. A clock that moved backwards stays in the current window.
fn current_window(session: &TaskSession, now: DateTime<Utc>) -> (DateTime<Utc>, u64) {
    // A stored row may hold any window a CHECK allows; one too long to represent simply
    // never ends.
    let window_end = i64::try_from(session.rate_limit_window_secs)
        .ok()
        .and_then(Duration::try_seconds)
        .and_then(|window| session.rate_window_started_at?.checked_add_signed(window))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    match session.rate_window_started_at {
        Some(started) if now < window_end => (started, session.rate_window_calls),
        _ => (now, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CreateSessionRequest;

    /// The instant the tests' sessions are created.
    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("valid timestamp")
    }

    fn session(tools: &[&str], budget: u64, rate: Option<u64>) -> (TaskSession, DateTime<Utc>) {
        let now = start();
        let mut req = CreateSessionRequest::new(
            Uuid::new_v4(),
            tools.iter().copied(),
            budget,
            Duration::minutes(10),
        );
        req.rate_limit_per_minute = rate;
        (TaskSession::from_request(Uuid::new_v4(), &req, now), now)
    }

    fn use_tools(
        s: &TaskSession,
        tools: &[&str],
        agent: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> Result<TaskSession, SessionError> {
        match decide(
            s,
            Mutation::Use {
                tools,
                agent,
                cost: None,
                reserve: None,
            },
            now,
        )? {
            Decision::Apply(next, _) => Ok(next),
            Decision::Unchanged => panic!("a use always changes state"),
        }
    }

    #[test]
    fn check_order_agent_first_then_closed_expired_budget_tool_rate() {
        let (mut s, now) = session(&["read"], 1, Some(1));
        s.calls_made = 1;
        s.status = SessionStatus::Closed;
        s.rate_window_started_at = Some(now);
        s.rate_window_calls = 1;
        let stranger = Some(Uuid::new_v4());
        let late = s.expires_at;
        let err = |s: &TaskSession, agent| use_tools(s, &["write"], agent, late).unwrap_err();

        assert!(matches!(
            err(&s, stranger),
            SessionError::AgentMismatch { .. }
        ));
        // Before the request's shape, too.
        assert!(matches!(
            use_tools(&s, &[], stranger, late).unwrap_err(),
            SessionError::AgentMismatch { .. }
        ));
        assert!(matches!(
            use_tools(&s, &[], Some(s.agent_id), late).unwrap_err(),
            SessionError::InvalidRequest { .. }
        ));
        assert!(matches!(err(&s, None), SessionError::AlreadyClosed(_)));
        s.status = SessionStatus::Active;
        assert!(matches!(err(&s, None), SessionError::Expired(_)));
        let early = now;
        let err = |s: &TaskSession| use_tools(s, &["write"], Some(s.agent_id), early).unwrap_err();
        assert!(matches!(
            err(&s),
            SessionError::BudgetExceeded {
                limit: 1,
                used: 1,
                ..
            }
        ));
        s.calls_made = 0;
        assert!(matches!(err(&s), SessionError::ToolNotAuthorized { tool, .. } if tool == "write"));
        let e = use_tools(&s, &["read"], None, early).unwrap_err();
        assert!(matches!(
            e,
            SessionError::RateLimited {
                limit_per_minute: 1,
                ..
            }
        ));
    }

    #[test]
    fn expired_status_is_reported_even_before_expiry_time() {
        let (mut s, now) = session(&["read"], 5, None);
        s.status = SessionStatus::Expired;
        assert!(matches!(
            use_tools(&s, &["read"], None, now),
            Err(SessionError::Expired(_))
        ));
    }

    #[test]
    fn wildcard_authorizes_every_tool_and_empty_list_none() {
        let (s, now) = session(&["*"], 5, None);
        assert!(use_tools(&s, &["anything", "else"], None, now).is_ok());
        let (s, now) = session(&[], 5, None);
        assert!(matches!(
            use_tools(&s, &["anything"], None, now),
            Err(SessionError::ToolNotAuthorized { .. })
        ));
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let (s, now) = session(&["a", "b"], 3, None);
        assert!(matches!(
            use_tools(&s, &["a", "x", "b"], None, now),
            Err(SessionError::ToolNotAuthorized { tool, .. }) if tool == "x"
        ));
        assert!(matches!(
            use_tools(&s, &["a", "b", "a", "b"], None, now),
            Err(SessionError::BudgetExceeded {
                limit: 3,
                used: 0,
                ..
            })
        ));
        let next = use_tools(&s, &["a", "b", "a"], None, now).expect("fits");
        assert_eq!(next.calls_made, 3);
        assert_eq!(s.calls_made, 0, "the input is never modified");
    }

    #[test]
    fn empty_batch_is_invalid() {
        let (s, now) = session(&["a"], 3, None);
        assert!(matches!(
            use_tools(&s, &[], None, now),
            Err(SessionError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn rate_window_resets_after_its_length() {
        let (mut s, now) = session(&["a"], 100, Some(2));
        for _ in 0..2 {
            s = use_tools(&s, &["a"], None, now).expect("within rate");
        }
        let almost = now + Duration::seconds(59);
        assert!(matches!(
            use_tools(&s, &["a"], None, almost),
            Err(SessionError::RateLimited { .. })
        ));
        let next_window = now + Duration::seconds(60);
        let s = use_tools(&s, &["a", "a"], None, next_window).expect("new window");
        assert_eq!(s.rate_window_started_at, Some(next_window));
        assert_eq!((s.calls_made, s.rate_window_calls), (4, 2));
    }

    #[test]
    fn a_batch_larger_than_the_rate_limit_is_refused_whole() {
        let (s, now) = session(&["a"], 100, Some(2));
        assert!(matches!(
            use_tools(&s, &["a", "a", "a"], None, now),
            Err(SessionError::RateLimited { .. })
        ));
    }

    #[test]
    fn an_unrepresentable_window_never_ends_and_never_panics() {
        let (mut s, now) = session(&["a"], 100, Some(1));
        s.rate_limit_window_secs = u64::MAX;
        let s = use_tools(&s, &["a"], None, now).expect("first call");
        assert!(matches!(
            use_tools(&s, &["a"], None, now + Duration::minutes(9)),
            Err(SessionError::RateLimited { .. })
        ));
    }

    #[test]
    fn close_and_expire_transitions() {
        let (s, now) = session(&["a"], 1, None);
        let Ok(Decision::Apply(closed, EventKind::Closed)) = decide(&s, Mutation::Close, now)
        else {
            panic!("an active session closes");
        };
        assert_eq!(closed.status, SessionStatus::Closed);
        assert!(matches!(
            decide(&closed, Mutation::Close, now),
            Err(SessionError::AlreadyClosed(_))
        ));
        assert!(matches!(
            decide(&s, Mutation::Expire, now),
            Ok(Decision::Unchanged)
        ));
        assert!(matches!(
            decide(&closed, Mutation::Expire, s.expires_at),
            Ok(Decision::Unchanged)
        ));
        let Ok(Decision::Apply(expired, EventKind::Expired)) =
            decide(&s, Mutation::Expire, s.expires_at)
        else {
            panic!("a due session expires");
        };
        assert!(matches!(
            decide(&expired, Mutation::Close, now),
            Err(SessionError::Expired(_))
        ));
    }

    fn call_at(s: &TaskSession, at: DateTime<Utc>) -> AuditEvent {
        AuditEvent::new(
            EventKind::CallAllowed,
            vec!["a".to_owned()],
            s,
            at,
            Uuid::nil(),
        )
    }

    #[test]
    fn merge_counts_unwritten_calls_in_the_stored_window_still_running() {
        let (s, now) = session(&["a"], 100, Some(5));
        // Storage: another store filled the window that started at `now`.
        let mut stored = s.clone();
        for _ in 0..4 {
            stored = use_tools(&stored, &["a"], None, now).expect("room");
        }
        let later = now + Duration::seconds(2);
        let mut unwritten = vec![call_at(&s, later), call_at(&s, later)];
        let (merged, _) = merge_unwritten(&stored, &mut unwritten, |_| true);
        assert_eq!(
            (merged.calls_made, merged.rate_window_calls),
            (5, 5),
            "one of the two fits the running window; the other is dropped"
        );
        assert_eq!(merged.rate_window_started_at, Some(now));
        assert_eq!(unwritten.len(), 1);
        assert_eq!(unwritten[0].rate_window_calls, 5);

        // Once the stored window is over, an unwritten call opens the next one.
        let next = now + Duration::seconds(61);
        let mut unwritten = vec![call_at(&s, next)];
        let (merged, _) = merge_unwritten(&merged, &mut unwritten, |_| true);
        assert_eq!(merged.rate_window_started_at, Some(next));
        assert_eq!((merged.calls_made, merged.rate_window_calls), (6, 1));
    }

    #[test]
    fn merge_drops_what_admit_refuses_and_returns_every_dropped_event() {
        let (s, now) = session(&["a"], 3, None);
        let mut calls: Vec<AuditEvent> = (0..5).map(|_| call_at(&s, now)).collect();
        let refused = calls[1].key;
        let (merged, dropped) = merge_unwritten(&s, &mut calls, |event| event.key != refused);
        // The second is refused by `admit`, the fifth by the budget (3 calls).
        assert_eq!(merged.calls_made, 3);
        assert_eq!(calls.len(), 3);
        assert!(calls.iter().all(|event| event.key != refused));
        assert_eq!(
            calls
                .iter()
                .map(|event| event.calls_made)
                .collect::<Vec<_>>(),
            [1, 2, 3],
            "the kept events are renumbered"
        );
        assert_eq!(dropped.len(), 1 + 1);
        assert_eq!(dropped[0].key, refused);
    }

    /// A session of `budget` calls over `write`, `read` and `search`, where `write` may be
    /// called `limit` times.
    fn limited(budget: u64, limit: u64, rate: Option<u64>) -> (TaskSession, DateTime<Utc>) {
        let now = start();
        let mut req = CreateSessionRequest::new(
            Uuid::new_v4(),
            ["write", "read", "search"],
            budget,
            Duration::minutes(10),
        )
        .with_tool_limit("write", limit);
        req.rate_limit_per_minute = rate;
        req.validate().expect("a valid request");
        (TaskSession::from_request(Uuid::new_v4(), &req, now), now)
    }

    fn write_calls(s: &TaskSession) -> u64 {
        s.tool_limit("write").map_or(0, |l| l.calls)
    }

    #[test]
    fn a_limited_tool_counts_against_its_limit_and_the_budget() {
        let (mut s, now) = limited(10, 2, None);
        for _ in 0..2 {
            s = use_tools(&s, &["write"], None, now).expect("within the tool's limit");
        }
        s = use_tools(&s, &["read"], None, now).expect("an unlimited tool");
        assert_eq!((s.calls_made, write_calls(&s)), (3, 2));
        assert!(matches!(
            use_tools(&s, &["write"], None, now),
            Err(SessionError::BudgetExceeded {
                limit: 2,
                used: 2,
                ..
            })
        ));
        let next = use_tools(&s, &["read", "search"], None, now).expect("the budget has room");
        assert_eq!((next.calls_made, write_calls(&next)), (5, 2));
    }

    #[test]
    fn a_batch_counts_a_limited_tools_repeats_all_or_nothing() {
        let (s, now) = limited(10, 2, None);
        let denied = use_tools(
            &s,
            &["read", "write", "search", "write", "write"],
            None,
            now,
        );
        assert!(matches!(
            denied,
            Err(SessionError::BudgetExceeded {
                limit: 2,
                used: 0,
                ..
            })
        ));
        assert_eq!((s.calls_made, write_calls(&s)), (0, 0), "nothing counted");
        let next = use_tools(&s, &["write", "read", "write"], None, now).expect("fits");
        assert_eq!((next.calls_made, write_calls(&next)), (3, 2));
        // Sessions without a limited tool in the call share the limits unchanged.
        let again = use_tools(&next, &["read"], None, now).expect("fits");
        assert!(Arc::ptr_eq(&again.tool_limits, &next.tool_limits));
    }

    #[test]
    fn tool_limit_comes_after_the_allow_list_and_the_budget_and_before_the_rate() {
        let (mut s, now) = limited(3, 1, Some(1));
        s = use_tools(&s, &["write"], None, now).expect("first call");
        // The rate window is full too: the tool's limit is reported first.
        assert!(matches!(
            use_tools(&s, &["write"], None, now),
            Err(SessionError::BudgetExceeded {
                limit: 1,
                used: 1,
                ..
            })
        ));
        // A tool outside the allow-list is reported before the tool's limit.
        assert!(matches!(
            use_tools(&s, &["write", "delete"], None, now),
            Err(SessionError::ToolNotAuthorized { tool, .. }) if tool == "delete"
        ));
        // The session's budget is reported before the tool's limit.
        s.calls_made = 3;
        assert!(matches!(
            use_tools(&s, &["write"], None, now),
            Err(SessionError::BudgetExceeded {
                limit: 3,
                used: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_tool_limits_denial_is_told_apart_from_the_budgets() {
        use crate::audit::DenialReason;
        let (s, now) = limited(3, 1, None);
        let s = use_tools(&s, &["write"], None, now).expect("first call");
        let tool = use_tools(&s, &["write"], None, now).unwrap_err();
        assert_eq!(
            DenialReason::of_call(&tool, &s),
            Some(DenialReason::ToolBudget)
        );
        let budget = use_tools(&s, &["read", "read", "read"], None, now).unwrap_err();
        assert_eq!(
            DenialReason::of_call(&budget, &s),
            Some(DenialReason::Budget)
        );
    }

    #[test]
    fn merge_never_takes_a_limited_tool_past_its_limit() {
        let (s, now) = limited(10, 2, None);
        // Storage: another store made one `write` call meanwhile.
        let stored = use_tools(&s, &["write"], None, now).expect("room");
        let write = |at| {
            AuditEvent::new(
                EventKind::CallAllowed,
                vec!["write".to_owned()],
                &s,
                at,
                Uuid::nil(),
            )
        };
        let read = AuditEvent::new(
            EventKind::CallAllowed,
            vec!["read".to_owned()],
            &s,
            now,
            Uuid::nil(),
        );
        let mut unwritten = vec![write(now), write(now), read];
        let (merged, _) = merge_unwritten(&stored, &mut unwritten, |_| true);
        assert_eq!(
            (merged.calls_made, write_calls(&merged)),
            (3, 2),
            "one unwritten write fits the tool's limit, the other is dropped; the read fits"
        );
        assert_eq!(unwritten.len(), 2);
        // Each kept event records the counts of the merged state it now leads to.
        let counted: Vec<Vec<(String, u64)>> = unwritten
            .iter()
            .map(|event| {
                event
                    .tool_calls
                    .iter()
                    .map(|count| (count.tool.to_string(), count.calls))
                    .collect()
            })
            .collect();
        assert_eq!(counted, [vec![("write".to_owned(), 2)], vec![]]);
    }

    fn with_budget(s: &TaskSession) -> TaskSession {
        TaskSession {
            budget_id: Some(crate::budget::BudgetId::new("team").expect("valid")),
            ..s.clone()
        }
    }

    fn reserve(s: &TaskSession, id: Uuid, now: DateTime<Utc>) -> Result<TaskSession, SessionError> {
        let mutation = Mutation::Use {
            tools: &["a"],
            agent: None,
            cost: Some(5),
            reserve: Some(Reserve {
                reservation_id: id,
                ttl: Duration::minutes(10),
            }),
        };
        match decide(s, mutation, now)? {
            Decision::Apply(next, EventKind::CallAllowed) => Ok(next),
            other => panic!("a reservation is a call: {other:?}"),
        }
    }

    fn settle(s: &TaskSession, id: Uuid, now: DateTime<Utc>) -> Result<TaskSession, SessionError> {
        let mutation = Mutation::Settle(Settle {
            reservation_id: id,
            estimate: 5,
            share_id: Uuid::nil(),
            actual: 2,
        });
        match decide(s, mutation, now)? {
            Decision::Apply(next, EventKind::Settled) => Ok(next),
            other => panic!("a settlement is recorded: {other:?}"),
        }
    }

    #[test]
    fn a_reservation_is_a_call_settled_once_until_it_lapses() {
        let (s, now) = session(&["a"], 5, None);
        let id = Uuid::new_v4();
        assert!(
            matches!(
                reserve(&s, id, now),
                Err(SessionError::InvalidRequest { .. })
            ),
            "no shared budget, no reservation"
        );
        let s = with_budget(&s);
        let reserved = reserve(&s, id, now).expect("reserved");
        assert_eq!(reserved.calls_made, 1);
        assert_eq!(
            reserved.open_reservation(id, now).map(|r| r.expires_at),
            Some(now + Duration::minutes(10))
        );
        // Settled whatever became of the session, once.
        let closed = with_status(&reserved, SessionStatus::Closed);
        let settled = settle(&closed, id, now).expect("settled");
        assert!(settled.reservations.is_empty());
        assert_eq!(settled.calls_made, 1, "a settlement is not a call");
        assert!(matches!(
            settle(&settled, id, now),
            Err(SessionError::ReservationSettled(r)) if r == id
        ));
        // Lapsed: settled at its estimate already.
        let later = now + Duration::minutes(10);
        assert!(matches!(
            settle(&reserved, id, later),
            Err(SessionError::ReservationSettled(_))
        ));
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_open_reservations() {
        let (s, now) = session(&["a"], 100, None);
        let mut s = with_budget(&s);
        s.expires_at = now + Duration::hours(1);
        for _ in 0..limits::MAX_OPEN_RESERVATIONS {
            s = reserve(&s, Uuid::new_v4(), now).expect("room");
        }
        assert!(matches!(
            reserve(&s, Uuid::new_v4(), now),
            Err(SessionError::InvalidRequest { .. })
        ));
        // Lapsed ones make room again.
        let later = now + Duration::minutes(10);
        let s = reserve(&s, Uuid::new_v4(), later).expect("the others lapsed");
        assert_eq!(s.reservations.len(), 1);
    }

    #[test]
    fn merge_settles_a_reservation_at_most_once() {
        let (s, now) = session(&["a"], 10, None);
        let s = with_budget(&s);
        let id = Uuid::new_v4();
        let stored = reserve(&s, id, now).expect("reserved");
        let settled = settle(&stored, id, now).expect("settled");
        let mut event = AuditEvent::new(EventKind::Settled, Vec::new(), &settled, now, Uuid::nil());
        event.reservation = Some(ReservationChange::Settled {
            reservation_id: id,
            charged: 2,
        });
        // Still open in storage: the unwritten settlement applies.
        let mut unwritten = vec![event.clone()];
        let (merged, dropped) = merge_unwritten(&stored, &mut unwritten, |_| true);
        assert!(dropped.is_empty() && merged.reservations.is_empty());
        // Settled by another store meanwhile: it is dropped.
        let mut unwritten = vec![event];
        let (merged, dropped) = merge_unwritten(&settled, &mut unwritten, |_| true);
        assert_eq!((dropped.len(), unwritten.len()), (1, 0));
        assert_eq!(merged, settled);
        // An unwritten reservation is open after the merge only if its call is kept.
        let mut made = call_at(&stored, now);
        made.key = id;
        made.reservation = Some(ReservationChange::Made {
            expires_at: now + Duration::minutes(10),
        });
        let mut unwritten = vec![made.clone()];
        let (merged, _) = merge_unwritten(&s, &mut unwritten, |_| true);
        assert!(merged.open_reservation(id, now).is_some());
        let mut unwritten = vec![made];
        let (merged, dropped) = merge_unwritten(&s, &mut unwritten, |_| false);
        assert_eq!(dropped.len(), 1);
        assert!(merged.reservations.is_empty());
    }
}
