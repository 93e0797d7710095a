//! Reservations of shared budgets over a real PostgreSQL: a reservation is a call charged
//! its estimate, settled once at its actual cost (the rest goes back to the budget, an
//! overrun is charged in full, even past the limit), whichever processes settle it; one not
//! settled lapses at its estimate; and the trail explains every unit throughout.

mod common;

use std::time::Duration;

use arbiter_session::budget::BudgetUsage;
use arbiter_session::model::limits::MAX_OPEN_RESERVATIONS;
use arbiter_session::{PgStorage, SessionError, SessionStore};
use common::{assert_the_trail_explains_every_unit, budget_id as id, put_budget as put};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// A store with its own pool, as another gateway process has.
async fn process(pool: &PgPool) -> SessionStore {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&common::database_url(pool).await)
        .await
        .expect("a pool");
    SessionStore::builder(PgStorage::new(pool)).build()
}

/// A session of a new agent allowed `search`, with 1,000 calls, drawing on `budget`.
async fn session_on(store: &SessionStore, budget: &str) -> (Uuid, Uuid) {
    let agent = Uuid::new_v4();
    let request = common::request(agent, &["search"], 1_000).with_budget(id(budget));
    let session = store.create(request).await.expect("create");
    (session.session_id, agent)
}

async fn usage(store: &SessionStore, budget: &str) -> BudgetUsage {
    store
        .budget(&id(budget))
        .await
        .expect("read")
        .expect("the budget exists")
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_reservation_holds_its_estimate_and_is_settled_once(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 100, None).await;
    let (session, agent) = session_on(&store, "team").await;

    let reservation = store
        .reserve(session, "search", Some(agent), 30)
        .await
        .expect("reserved");
    assert_eq!(reservation.session.calls_made, 1, "a reservation is a call");
    assert_eq!(reservation.estimate, 30);
    let held = usage(&store, "team").await;
    assert_eq!((held.used, held.reserved, held.remaining()), (0, 30, 70));

    let settled = store
        .settle(reservation.reservation_id, 10)
        .await
        .expect("settled");
    assert_eq!(
        (settled.charged, settled.released, settled.overrun),
        (10, 20, 0)
    );
    let after = usage(&store, "team").await;
    assert_eq!((after.used, after.reserved, after.remaining()), (10, 0, 90));

    assert!(matches!(
        store.settle(reservation.reservation_id, 10).await,
        Err(SessionError::ReservationSettled(r)) if r == reservation.reservation_id
    ));
    assert!(matches!(
        store.settle(Uuid::new_v4(), 1).await,
        Err(SessionError::ReservationNotFound(_))
    ));
    assert_eq!(usage(&store, "team").await.used, 10, "nothing more charged");

    // The trail: the call that reserved is keyed by the reservation and cost 30; its
    // settlement cost -20; the reservation's row says it was settled at 10.
    let trail = sqlx::query!(
        r#"SELECT kind, cost, event_key FROM arbiter.session_events
            WHERE session_id = $1 AND cost IS NOT NULL ORDER BY event_id"#,
        session
    )
    .fetch_all(&pool)
    .await
    .expect("the trail");
    let trail: Vec<_> = trail
        .into_iter()
        .map(|e| (e.kind, e.cost, e.event_key))
        .collect();
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!(
        (trail[0].0.as_str(), trail[0].1, trail[0].2),
        ("call_allowed", Some(30), reservation.reservation_id)
    );
    assert_eq!((trail[1].0.as_str(), trail[1].1), ("settled", Some(-20)));
    let row = sqlx::query!(
        "SELECT charged, settled_at IS NOT NULL AS settled FROM arbiter.budget_reservations
          WHERE reservation_id = $1",
        reservation.reservation_id
    )
    .fetch_one(&pool)
    .await
    .expect("the reservation's row");
    assert_eq!((row.charged, row.settled), (Some(10), Some(true)));
    assert_the_trail_explains_every_unit(&pool).await;
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn what_a_reservation_may_be(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 1_000, None).await;
    let agent = Uuid::new_v4();
    let plain = store
        .create(common::request(agent, &["search"], 10))
        .await
        .expect("create");
    assert!(
        matches!(
            store
                .reserve(plain.session_id, "search", Some(agent), 1)
                .await,
            Err(SessionError::InvalidRequest { .. })
        ),
        "only a session with a shared budget reserves"
    );
    let (session, agent) = session_on(&store, "team").await;
    assert!(matches!(
        store
            .reserve(session, "search", Some(agent), u64::MAX)
            .await,
        Err(SessionError::InvalidRequest { .. })
    ));
    assert!(matches!(
        store.reserve(session, "delete", Some(agent), 1).await,
        Err(SessionError::ToolNotAuthorized { .. })
    ));
    let mut open = Vec::new();
    for _ in 0..MAX_OPEN_RESERVATIONS {
        open.push(
            store
                .reserve(session, "search", Some(agent), 1)
                .await
                .expect("reserved"),
        );
    }
    assert!(
        matches!(
            store.reserve(session, "search", Some(agent), 1).await,
            Err(SessionError::InvalidRequest { .. })
        ),
        "at most {MAX_OPEN_RESERVATIONS} open at once"
    );
    assert_eq!(usage(&store, "team").await.reserved, 32);
    // A settled one makes room; a closed session's reservation is settled all the same.
    store
        .settle(open[0].reservation_id, 0)
        .await
        .expect("settled");
    store
        .reserve(session, "search", Some(agent), 1)
        .await
        .expect("room for one more");
    store.close(session).await.expect("closed");
    store
        .settle(open[1].reservation_id, 3)
        .await
        .expect("a closed session's reservation is settled");
    // A cold store reads the open reservations back from the row.
    let cold = process(&pool).await;
    assert_eq!(
        cold.get(session).await.expect("read").reservations.len(),
        MAX_OPEN_RESERVATIONS - 1
    );
    let budget = usage(&store, "team").await;
    assert_eq!((budget.used, budget.reserved), (3, 31));
    assert_the_trail_explains_every_unit(&pool).await;
}

/// An actual cost above the estimate is charged in full, past the limit: then every
/// further call is denied.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_overrun_is_charged_in_full_and_then_calls_are_denied(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "tenant", 10, None).await;
    put(&store, "tenant/team", 100, Some("tenant")).await;
    let (session, agent) = session_on(&store, "tenant/team").await;
    let reservation = store
        .reserve(session, "search", Some(agent), 8)
        .await
        .expect("reserved");
    let settled = store
        .settle(reservation.reservation_id, 15)
        .await
        .expect("settled");
    assert_eq!(
        (settled.charged, settled.released, settled.overrun),
        (15, 0, 7)
    );
    for budget in ["tenant", "tenant/team"] {
        let after = usage(&store, budget).await;
        assert_eq!((after.used, after.overrun), (15, 7), "{budget}");
    }
    assert_eq!(usage(&store, "tenant").await.remaining(), 0);
    let other = process(&pool).await;
    for store in [&store, &other] {
        assert!(matches!(
            store
                .use_session_with_cost(session, "search", Some(agent), 1)
                .await,
            Err(SessionError::SharedBudgetExceeded { budget_id, .. }) if budget_id == "tenant"
        ));
    }
    assert_the_trail_explains_every_unit(&pool).await;
}

/// What a settlement releases goes back to the budget, whichever process spends it: a
/// reservation of the whole limit denies every call until it is settled, and then exactly
/// what it released is spent.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn released_units_are_spent_by_any_process(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 10, None).await;
    let (session, agent) = session_on(&store, "team").await;
    let reservation = store
        .reserve(session, "search", Some(agent), 10)
        .await
        .expect("reserved");
    let other = process(&pool).await;
    let (spender, spender_agent) = session_on(&other, "team").await;
    assert!(matches!(
        other
            .use_session_with_cost(spender, "search", Some(spender_agent), 1)
            .await,
        Err(SessionError::SharedBudgetExceeded { .. })
    ));
    store
        .settle(reservation.reservation_id, 4)
        .await
        .expect("settled");
    let mut allowed = 0;
    while other
        .use_session_with_cost(spender, "search", Some(spender_agent), 1)
        .await
        .is_ok()
    {
        allowed += 1;
        assert!(allowed <= 6, "more than the settlement released");
    }
    assert_eq!(allowed, 6);
    let budget = usage(&store, "team").await;
    assert_eq!((budget.used, budget.reserved), (10, 0));
    assert_the_trail_explains_every_unit(&pool).await;
}

/// A settlement after the share its estimate was charged to was closed (its process shut
/// down) still gives back and charges exactly: the next grant of the tree counts it once,
/// and every period row's allocation stays the sum of its shares'.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_settlement_on_a_closed_share_is_counted_once(pool: PgPool) {
    let admin = SessionStore::postgres(pool.clone());
    put(&admin, "team", 20, None).await;
    let first = process(&pool).await;
    let (session, agent) = session_on(&first, "team").await;
    let under = first
        .reserve(session, "search", Some(agent), 8)
        .await
        .expect("reserved");
    let over = first
        .reserve(session, "search", Some(agent), 4)
        .await
        .expect("reserved");
    assert!(first.shutdown(Duration::from_secs(5)).await.is_clean());
    let open: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.budget_shares WHERE closed_at IS NULL"#
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(open, 0, "shutdown closes the shares");
    let second = process(&pool).await;
    second
        .settle(under.reservation_id, 2)
        .await
        .expect("released 6");
    second
        .settle(over.reservation_id, 7)
        .await
        .expect("overran by 3");
    // 2 + 7 charged: 11 left, all of them spent by the second process, none more.
    let (spender, spender_agent) = session_on(&second, "team").await;
    let mut allowed = 0;
    while second
        .use_session_with_cost(spender, "search", Some(spender_agent), 1)
        .await
        .is_ok()
    {
        allowed += 1;
        assert!(allowed <= 11, "more than the settlements left");
    }
    assert_eq!(allowed, 11);
    let budget = usage(&admin, "team").await;
    assert_eq!((budget.used, budget.reserved, budget.overrun), (20, 0, 3));
    let off: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.budget_periods p
            WHERE p.allocated <> (
                  SELECT coalesce(sum(s.granted - s.credited_counted + s.overrun_counted), 0)
                    FROM arbiter.budget_shares s,
                         unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
                   WHERE c.budget_id = p.budget_id AND c.period_start = p.period_start)"#
    )
    .fetch_one(&pool)
    .await
    .expect("the check runs");
    assert_eq!(off, 0, "allocation is the sum of the shares'");
    assert_the_trail_explains_every_unit(&pool).await;
}

/// Two processes settling the same reservations at once: each is settled exactly once.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn two_processes_settle_each_reservation_once(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 10_000, None).await;
    let (session, agent) = session_on(&store, "team").await;
    let (a, b) = (process(&pool).await, process(&pool).await);
    let mut settled = 0;
    for _ in 0..20 {
        let reservation = store
            .reserve(session, "search", Some(agent), 5)
            .await
            .expect("reserved");
        let id = reservation.reservation_id;
        let (first, second) = tokio::join!(a.settle(id, 2), b.settle(id, 2));
        for outcome in [first, second] {
            match outcome {
                Ok(_) => settled += 1,
                Err(SessionError::ReservationSettled(_)) => {}
                Err(err) => panic!("unexpected {err:?}"),
            }
        }
    }
    assert_eq!(settled, 20, "each reservation settled exactly once");
    let budget = usage(&store, "team").await;
    assert_eq!((budget.used, budget.reserved), (40, 0));
    assert_the_trail_explains_every_unit(&pool).await;
}

/// A reservation not settled within its time to live lapses at its estimate.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_unsettled_reservation_lapses_at_its_estimate(pool: PgPool) {
    let store = SessionStore::builder(PgStorage::new(pool.clone()))
        .reservation_ttl(Duration::from_secs(1))
        .build();
    put(&store, "team", 100, None).await;
    let (session, agent) = session_on(&store, "team").await;
    let reservation = store
        .reserve(session, "search", Some(agent), 5)
        .await
        .expect("reserved");
    assert_eq!(usage(&store, "team").await.reserved, 5);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let lapsed = usage(&store, "team").await;
    assert_eq!((lapsed.used, lapsed.reserved), (5, 0));
    assert!(matches!(
        store.settle(reservation.reservation_id, 1).await,
        Err(SessionError::ReservationSettled(_))
    ));
    assert_eq!(usage(&store, "team").await.used, 5, "nothing released");
    assert_the_trail_explains_every_unit(&pool).await;
}
