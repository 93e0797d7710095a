//! Helpers of the reporting tests (`tests/reporting/`): the known data set's days, the
//! rollup-backed views against the raw events, rolling up until nothing is busy, and a
//! store that runs no upkeep of its own.

use arbiter_session::operator::rollup;
use chrono::NaiveDate;
use sqlx::PgPool;

/// Day `d` of March 2026, the month of the known data set.
pub fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, d).expect("valid day")
}

/// How far each rollup-backed view is from the raw definition of migration
/// 20261124000006 on the same events: (rows in one and not the other, both ways; rows in
/// the view), for agent_daily_activity, tool_daily_usage, denials_by_reason and
/// session_utilization.
pub async fn views_against_raw(pool: &PgPool) -> [(i64, i64); 4] {
    let row = sqlx::query!(
        r#"WITH raw_agents AS (
               SELECT e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
                      count(*) FILTER (WHERE e.kind = 'created') AS sessions_opened,
                      coalesce(sum(cardinality(e.tools))
                               FILTER (WHERE e.kind IN ('call_allowed', 'batch_allowed')), 0)
                          AS calls_allowed,
                      count(*) FILTER (WHERE e.kind = 'denied') AS calls_denied,
                      count(*) FILTER (WHERE e.reason = 'agent_mismatch') AS m,
                      count(*) FILTER (WHERE e.reason = 'closed') AS c,
                      count(*) FILTER (WHERE e.reason = 'expired') AS x,
                      count(*) FILTER (WHERE e.reason = 'budget') AS b,
                      count(*) FILTER (WHERE e.reason = 'tool') AS t,
                      count(*) FILTER (WHERE e.reason = 'rate') AS r,
                      count(*) FILTER (WHERE e.reason = 'write_through') AS w,
                      count(*) FILTER (WHERE e.reason = 'invalid') AS i,
                      count(*) FILTER (WHERE e.reason = 'tool_budget') AS tb
                 FROM arbiter.session_events e
                GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date
           ), view_agents AS (
               SELECT * FROM arbiter.agent_daily_activity
           ), raw_tools AS (
               SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day, e.agent_id, t.tool,
                      count(*) FILTER (WHERE e.kind <> 'denied') AS calls_allowed,
                      count(*) FILTER (WHERE e.kind = 'denied') AS calls_denied,
                      count(DISTINCT e.session_id) AS sessions
                 FROM arbiter.session_events e
                CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
                WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
                GROUP BY 1, 2, 3
           ), view_tools AS (
               SELECT * FROM arbiter.tool_daily_usage
           ), raw_denials AS (
               SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day, e.agent_id, e.reason,
                      count(*) AS denials, count(DISTINCT e.session_id) AS sessions
                 FROM arbiter.session_events e
                WHERE e.kind = 'denied'
                GROUP BY 1, 2, 3
           ), view_denials AS (
               SELECT * FROM arbiter.denials_by_reason
           ), raw_sessions AS (
               SELECT s.session_id, s.agent_id,
                      CASE WHEN s.status = 'active' AND s.expires_at <= now() THEN 'expired'
                           ELSE s.status END AS status,
                      s.call_budget, s.calls_made,
                      round(100.0 * s.calls_made / s.call_budget, 1) AS budget_used_pct,
                      s.calls_made >= s.call_budget AS budget_exhausted,
                      s.created_at, ended.at AS ended_at, ended.at - s.created_at AS duration,
                      coalesce(denied.count, 0) AS denials
                 FROM arbiter.sessions s
                CROSS JOIN LATERAL (
                    SELECT CASE
                               WHEN s.status = 'closed' THEN coalesce(
                                   (SELECT min(e.occurred_at) FROM arbiter.session_events e
                                     WHERE e.session_id = s.session_id AND e.kind = 'closed'),
                                   s.updated_at)
                               WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
                           END AS at
                ) ended
                LEFT JOIN LATERAL (
                    SELECT count(*) AS count FROM arbiter.session_events e
                     WHERE e.session_id = s.session_id AND e.kind = 'denied'
                ) denied ON true
           ), view_sessions AS (
               -- Its last column (tool_use) comes from the row, not the events.
               SELECT session_id, agent_id, status, call_budget, calls_made, budget_used_pct,
                      budget_exhausted, created_at, ended_at, duration, denials
                 FROM arbiter.session_utilization
           )
           SELECT (SELECT count(*) FROM ((SELECT * FROM raw_agents EXCEPT ALL SELECT * FROM view_agents)
                   UNION ALL (SELECT * FROM view_agents EXCEPT ALL SELECT * FROM raw_agents)) d)
                      AS "agents_off!",
                  (SELECT count(*) FROM view_agents) AS "agents!",
                  (SELECT count(*) FROM ((SELECT * FROM raw_tools EXCEPT ALL SELECT * FROM view_tools)
                   UNION ALL (SELECT * FROM view_tools EXCEPT ALL SELECT * FROM raw_tools)) d)
                      AS "tools_off!",
                  (SELECT count(*) FROM view_tools) AS "tools!",
                  (SELECT count(*) FROM ((SELECT * FROM raw_denials EXCEPT ALL SELECT * FROM view_denials)
                   UNION ALL (SELECT * FROM view_denials EXCEPT ALL SELECT * FROM raw_denials)) d)
                      AS "denials_off!",
                  (SELECT count(*) FROM view_denials) AS "denials!",
                  (SELECT count(*) FROM ((SELECT * FROM raw_sessions EXCEPT ALL SELECT * FROM view_sessions)
                   UNION ALL (SELECT * FROM view_sessions EXCEPT ALL SELECT * FROM raw_sessions)) d)
                      AS "sessions_off!",
                  (SELECT count(*) FROM view_sessions) AS "sessions!""#
    )
    .fetch_one(pool)
    .await
    .expect("compare the views with the raw events");
    [
        (row.agents_off, row.agents),
        (row.tools_off, row.tools),
        (row.denials_off, row.denials),
        (row.sessions_off, row.sessions),
    ]
}

/// Rolls up until no day is left busy, and returns the days this test's rollups sealed. The
/// data set's store may still be rolling up with its upkeep: a day one rollup holds is busy
/// for the other, which then stops there.
pub async fn roll_up_all(pool: &PgPool) -> Vec<rollup::RolledDay> {
    let mut rolled = Vec::new();
    for _ in 0..20 {
        let outcome = rollup::roll_up(pool).await.expect("roll up");
        rolled.extend(outcome.rolled);
        if outcome.stopped_at.is_none() {
            return rolled;
        }
    }
    panic!("a day stayed busy through 20 rollups");
}

/// A store over `pool` whose time is `clock` and which runs no upkeep (so no rollup but
/// the test's own).
pub fn store_without_upkeep(
    pool: &PgPool,
    clock: &arbiter_session::testing::ManualClock,
) -> arbiter_session::SessionStore {
    arbiter_session::SessionStore::builder(arbiter_session::PgStorage::new(pool.clone()))
        .clock(std::sync::Arc::new(clock.clone()))
        .maintenance_interval(None)
        .build()
}
