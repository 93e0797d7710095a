//! `arbiter_session::server` in-process: the routes of `arbiter-session serve` called with
//! `tower::ServiceExt::oneshot`, over a real store on a fresh database. Every route, both
//! roles, every error code the routes can reach, the body limit, `Retry-After`, Envoy's
//! ext_authz check (headers, and a JSON-RPC body), `/metrics`, `/openapi.json`, `/readyz`
//! following the database through a fault proxy, and the connection loop's bounds on real
//! sockets. What needs the process (signals, flags, start-up refusal) is in `serve.rs`.

mod common;

use std::time::Duration;

use arbiter_session::server::{ConnectionLimits, Server, Tokens, serve_connections};
use arbiter_session::{PgStorage, SessionStore};
use axum::Router;
use axum::http::{Method, StatusCode, header};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use common::service::{
    ADMIN, Answer, GATEWAY, Service, VIEWER, assert_error, create, service, service_with,
    service_with_viewer, sessions_in, tokens, until,
};

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn routes_roles_and_errors(pool: PgPool) {
    let service = service(&common::database_url(&pool).await).await;
    let agent = Uuid::new_v4();
    let body = json!({
        "agent_id": agent, "authorized_tools": ["search", "fetch"], "call_budget": 3,
        "time_limit_secs": 600, "declared_intent": "tests"
    });

    // Roles: no token and a wrong one are 401; the gateway may not create.
    let none = service
        .call(Method::POST, "/v1/sessions")
        .json(&body)
        .send()
        .await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_error(
        &service.post("/v1/sessions", "wrong", body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &service.post("/v1/sessions", GATEWAY, body.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(
        sessions_in(&pool).await,
        0,
        "nothing written for a refused create"
    );

    // Malformed input is 400 and writes nothing.
    let mut unknown = body.clone();
    unknown["surprise"] = json!(1);
    assert_error(
        &service.post("/v1/sessions", ADMIN, unknown).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let mut zero = body.clone();
    zero["call_budget"] = json!(0);
    assert_error(
        &service.post("/v1/sessions", ADMIN, zero).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    for limits in [
        json!({ "fetch": 0 }),
        json!({ "rm": 1 }),
        json!({ "fetch": -1 }),
    ] {
        let mut bad = body.clone();
        bad["tool_limits"] = limits;
        assert_error(
            &service.post("/v1/sessions", ADMIN, bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let broken = service
        .call(Method::POST, "/v1/sessions")
        .bearer(ADMIN)
        .header("content-type", "application/json")
        .text("{\"agent_id\":")
        .send()
        .await;
    assert_error(&broken, StatusCode::BAD_REQUEST, "invalid_request");
    let huge = json!({ "agent_id": agent, "authorized_tools": ["x".repeat(70 * 1024)],
        "call_budget": 1, "time_limit_secs": 60 });
    assert_error(
        &service.post("/v1/sessions", ADMIN, huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert_error(
        &service.get("/v1/sessions/not-a-uuid", ADMIN).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_eq!(sessions_in(&pool).await, 0);

    // Create, read with both roles, use until the budget denies.
    let id = create(&service, body.clone()).await;
    for token in [ADMIN, GATEWAY] {
        let session = service.get(&format!("/v1/sessions/{id}"), token).await;
        assert_eq!(session.status, StatusCode::OK);
        assert_eq!(
            (
                session.body["calls_remaining"].as_u64(),
                session.body["status"].as_str()
            ),
            (Some(3), Some("active"))
        );
    }
    let use_path = format!("/v1/sessions/{id}/use");
    let call = |tool: &str, agent: Uuid| json!({ "tool": tool, "agent_id": agent });
    assert_error(
        &service.post(&use_path, ADMIN, call("search", agent)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let used = service
        .post(&use_path, GATEWAY, call("search", agent))
        .await;
    assert_eq!(used.status, StatusCode::OK, "{}", used.body);
    let seconds = used.body["seconds_remaining"]
        .as_u64()
        .expect("seconds left");
    assert!((595..=600).contains(&seconds), "{seconds}");
    assert_eq!(
        used.body,
        json!({ "calls_made": 1, "calls_remaining": 2, "status": "active",
                "seconds_remaining": seconds, "warnings": [] })
    );
    // The headers say what the body says.
    assert_eq!(used.header("x-arbiter-calls-remaining"), Some("2"));
    assert_eq!(
        used.header("x-arbiter-seconds-remaining"),
        Some(seconds.to_string().as_str())
    );
    assert_eq!(used.header("x-arbiter-warning"), None);
    assert_eq!(used.header("x-arbiter-budget-remaining"), None);
    assert_error(
        &service.post(&use_path, GATEWAY, call("rm", agent)).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_error(
        &service
            .post(&use_path, GATEWAY, call("search", Uuid::new_v4()))
            .await,
        StatusCode::FORBIDDEN,
        "agent_mismatch",
    );
    let batch_path = format!("/v1/sessions/{id}/use-batch");
    let batch = |tools: &[&str]| json!({ "tools": tools, "agent_id": agent });
    assert_error(
        &service
            .post(&batch_path, GATEWAY, batch(&["search", "fetch", "search"]))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    let used = service
        .post(&batch_path, GATEWAY, batch(&["search", "fetch"]))
        .await;
    assert_eq!(
        (used.status, used.body["calls_remaining"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    // Under a tenth of the calls left: the warning, in the body and the header.
    assert_eq!(used.body["warnings"], json!(["budget_low"]));
    assert_eq!(used.header("x-arbiter-warning"), Some("budget_low"));
    let denied = service
        .post(&use_path, GATEWAY, call("search", agent))
        .await;
    assert_error(&denied, StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    assert_eq!(
        denied.body["message"], "session budget exceeded",
        "the opaque Display"
    );
    let row = common::row(&pool, id).await;
    assert_eq!(row.calls_made, 3, "exactly the allowed calls are stored");

    // Close (the gateway may), then every use is 410.
    let closed = service
        .post(&format!("/v1/sessions/{id}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(
        (closed.status, closed.body["status"].as_str()),
        (StatusCode::OK, Some("closed"))
    );
    // What the session came to, the denials from its trail.
    let summary = &closed.body["summary"];
    let used_secs = summary["time_used_secs"].as_u64().expect("time used");
    assert!(used_secs <= 5, "{used_secs}");
    assert_eq!(
        summary,
        &json!({
            "calls_made": 3, "call_budget": 3, "budget_used_percent": 100.0,
            "time_used_secs": used_secs, "time_limit_secs": 600,
            "time_used_percent": summary["time_used_percent"],
            "denials": { "agent_mismatch": 1, "budget": 2, "tool": 1 },
            "budget_units_charged": 0
        })
    );
    assert!(
        summary["time_used_percent"]
            .as_f64()
            .is_some_and(|p| p < 1.0)
    );
    assert_error(
        &service
            .post(&use_path, GATEWAY, call("search", agent))
            .await,
        StatusCode::GONE,
        "already_closed",
    );
    assert_error(
        &service
            .get(&format!("/v1/sessions/{}", Uuid::new_v4()), ADMIN)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // A tool's own limit: accepted on create, returned by get, denied past it as the
    // budget is.
    let mut limited_body = body.clone();
    limited_body["tool_limits"] = json!({ "fetch": 1 });
    let limited_id = create(&service, limited_body).await;
    let session_path = format!("/v1/sessions/{limited_id}");
    let session = service.get(&session_path, GATEWAY).await;
    assert_eq!(
        session.body["tool_limits"],
        json!({ "fetch": { "limit": 1, "calls": 0 } })
    );
    let limited_use = format!("{session_path}/use");
    let used = service
        .post(&limited_use, GATEWAY, call("fetch", agent))
        .await;
    assert_eq!(used.status, StatusCode::OK);
    assert_error(
        &service
            .post(&limited_use, GATEWAY, call("fetch", agent))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    let session = service.get(&session_path, GATEWAY).await;
    assert_eq!(
        (
            session.body["tool_limits"]["fetch"]["calls"].as_u64(),
            session.body["calls_made"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let closed = service
        .post(&format!("{session_path}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(closed.status, StatusCode::OK);

    // Agents: the cap, the live count, close-all.
    let mut capped = body.clone();
    capped["max_live_sessions"] = json!(1);
    create(&service, capped.clone()).await;
    assert_error(
        &service.post("/v1/sessions", ADMIN, capped).await,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_sessions",
    );
    let live = format!("/v1/agents/{agent}/live-sessions");
    assert_error(
        &service.get(&live, GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(service.get(&live, ADMIN).await.body, json!({ "count": 1 }));
    let all = service
        .post(&format!("/v1/agents/{agent}/close-all"), ADMIN, json!({}))
        .await;
    assert_eq!(
        (all.status, all.body),
        (StatusCode::OK, json!({ "closed": 1 }))
    );
    assert_eq!(service.get(&live, ADMIN).await.body, json!({ "count": 0 }));

    // A full rate window says when to come back; an expired session is 408.
    let rated = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["*"],
        "call_budget": 10, "time_limit_secs": 1, "rate_limit_per_minute": 1 }),
    )
    .await;
    let rated_use = format!("/v1/sessions/{rated}/use");
    assert_eq!(
        service
            .post(&rated_use, GATEWAY, call("search", agent))
            .await
            .status,
        StatusCode::OK
    );
    let limited = service
        .post(&rated_use, GATEWAY, call("search", agent))
        .await;
    let retry_after: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After on a full window");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_error(
        &service
            .post(&rated_use, GATEWAY, call("search", agent))
            .await,
        StatusCode::REQUEST_TIMEOUT,
        "expired",
    );

    // Unknown routes answer in the same shape.
    assert_error(
        &service.get("/v2/nothing", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

async fn budgets_in(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.budgets"#)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// The budget routes: create (201) and replace (200) with the admin token only, read with
/// both, list with the admin's; ids with `/` in the path, plain or percent-encoded; every
/// kind of bad input is 400 and writes nothing.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn budget_routes_roles_and_bad_input(pool: PgPool) {
    let service = service(&common::database_url(&pool).await).await;
    let acme = json!({ "limit": 300, "period": "month", "time_zone": "Pacific/Auckland",
        "unit": "usd_micros" });
    assert_error(
        &service.put("/v1/budgets/acme", GATEWAY, acme.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let created = service.put("/v1/budgets/acme", ADMIN, acme.clone()).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["limit"], 300);
    assert_eq!(created.body["period"], "month");
    assert_eq!(created.body["unit"], "usd_micros");
    assert_eq!(created.body["used"], 0);
    assert_eq!(created.body["reserved"], 0);
    assert_eq!(created.body["remaining"], 300);
    assert!(created.body["parent_id"].is_null(), "{}", created.body);
    // A month in Auckland starts at local midnight of its first day: 11:00 or 12:00 UTC
    // the day before, by the season.
    let start: chrono::DateTime<chrono::Utc> = created.body["period_start"]
        .as_str()
        .and_then(|at| at.parse().ok())
        .expect("a period start");
    let local = start.with_timezone(&chrono::FixedOffset::east_opt(13 * 3600).expect("NZDT"));
    assert_eq!(
        (local.format("%d %H:%M").to_string()),
        "01 00:00",
        "{start}"
    );

    let payments = json!({ "limit": 200, "parent_id": "acme" });
    let made = service
        .put("/v1/budgets/acme/payments", ADMIN, payments.clone())
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["budget_id"], "acme/payments");
    assert_eq!(made.body["period"], "none");
    assert_eq!(made.body["unit"], "calls");
    assert_eq!(made.body["time_zone"], "UTC");
    let mut lower = payments.clone();
    lower["limit"] = json!(150);
    let replaced = service
        .put("/v1/budgets/acme%2Fpayments", ADMIN, lower)
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
    assert_eq!(replaced.body["limit"], 150);
    for token in [ADMIN, GATEWAY] {
        let read = service.get("/v1/budgets/acme/payments", token).await;
        assert_eq!(read.status, StatusCode::OK, "{}", read.body);
        assert_eq!(read.body["parent_id"], "acme");
        assert_eq!(read.body["remaining"], 150);
    }
    assert_error(
        &service.get("/v1/budgets/nobody", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &service.get("/v1/budgets", GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let list = service.get("/v1/budgets", ADMIN).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    let ids: Vec<&str> = list.body["budgets"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|b| b["budget_id"].as_str())
        .collect();
    assert_eq!(ids, ["acme", "acme/payments"]);

    // Bad input: 400, nothing written.
    let deep: Vec<String> = (0..7).map(|level| format!("deep{level}")).collect();
    let mut parent: Option<&str> = Some("acme");
    for id in &deep {
        let body = json!({ "limit": 1, "parent_id": parent });
        let answer = service.put(&format!("/v1/budgets/{id}"), ADMIN, body).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{id}: {}", answer.body);
        parent = Some(id);
    }
    let before = budgets_in(&pool).await;
    let refused = [
        ("acme", json!({ "limit": -1 })),
        ("acme", json!({ "limit": 1.5 })),
        ("acme", json!({ "limit": "10" })),
        ("acme", json!({})),
        ("acme", json!({ "limit": 9_223_372_036_854_775_808_u64 })),
        ("acme", json!({ "limit": 1, "surprise": true })),
        ("acme", json!({ "limit": 1, "period": "week" })),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "Mars/Olympus" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "x; DROP" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "day", "time_zone": "Pacific/Auckland" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "UTC" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "Pacific/Auckland",
            "parent_id": "acme/payments" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "Pacific/Auckland",
            "parent_id": "acme" }),
        ),
        (
            "acme",
            json!({ "limit": 1, "period": "month", "time_zone": "Pacific/Auckland",
            "unit": "dollars and cents" }),
        ),
        ("team", json!({ "limit": 1, "parent_id": "nobody" })),
        ("team", json!({ "limit": 1, "parent_id": "bad id" })),
        ("team", json!({ "limit": 1, "parent_id": "deep6" })),
        ("a%20b", json!({ "limit": 1 })),
        ("a_b", json!({ "limit": 1 })),
        (&"x".repeat(129), json!({ "limit": 1 })),
    ];
    for (id, body) in refused {
        let answer = service
            .put(&format!("/v1/budgets/{id}"), ADMIN, body.clone())
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(
            !answer.body["message"]
                .as_str()
                .unwrap_or_default()
                .contains(id),
            "{body}: {}",
            answer.body
        );
    }
    assert_eq!(
        budgets_in(&pool).await,
        before,
        "a refused put wrote nothing"
    );
    let acme_now = service.get("/v1/budgets/acme", ADMIN).await;
    assert_eq!(acme_now.body["limit"], 300, "{}", acme_now.body);
    assert!(acme_now.body["parent_id"].is_null(), "{}", acme_now.body);
}

/// Sessions drawing on a shared budget over HTTP: `budget_id` and `tool_costs` at create
/// (an unknown budget is 400 and creates nothing), `cost` on `/use` and `/use-batch`,
/// `x-arbiter-cost` on the check, and the budget's denial as the session's own (429
/// `budget_exceeded`).
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn sessions_spend_a_shared_budget_over_http(pool: PgPool) {
    let service = service(&common::database_url(&pool).await).await;
    let put = service
        .put(
            "/v1/budgets/acme",
            ADMIN,
            json!({ "limit": 10, "unit": "tokens" }),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let agent = Uuid::new_v4();
    let body = json!({ "agent_id": agent, "authorized_tools": ["search", "write"],
        "call_budget": 100, "time_limit_secs": 600, "budget_id": "acme",
        "tool_costs": { "write": 3 } });
    for (field, value) in [
        ("budget_id", json!("nobody")),
        ("budget_id", json!("bad id")),
        ("tool_costs", json!({ "rm": 1 })),
        ("tool_costs", json!({ "write": -1 })),
        ("tool_costs", json!({ "write": 1_000_000_000_001_u64 })),
    ] {
        let mut bad = body.clone();
        bad[field] = value;
        assert_error(
            &service.post("/v1/sessions", ADMIN, bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    assert_eq!(sessions_in(&pool).await, 0);
    let created = service.post("/v1/sessions", ADMIN, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["budget_id"], "acme");
    assert_eq!(created.body["tool_costs"], json!({ "write": 3 }));
    let id = created.body["session_id"]
        .as_str()
        .expect("an id")
        .to_owned();

    let path = format!("/v1/sessions/{id}/use");
    let batch = format!("/v1/sessions/{id}/use-batch");
    let ok = |answer: Answer| assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    // What is left of the shared budget, read once the call was written: 10 - 3.
    let first = service
        .post(
            &path,
            GATEWAY,
            json!({ "tool": "write", "agent_id": agent }),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(
        (
            first.header("x-arbiter-budget-remaining"),
            &first.body["budget_remaining"]
        ),
        (Some("7"), &json!(7))
    );
    // `2.0` is a whole number to JSON Schema, so to the service too.
    ok(service
        .post(
            &path,
            GATEWAY,
            json!({ "tool": "search", "agent_id": agent, "cost": 2.0 }),
        )
        .await);
    ok(service
        .post(
            &batch,
            GATEWAY,
            json!({ "tools": ["search", "search"], "agent_id": agent }),
        )
        .await);
    for bad in [json!(-1), json!(1.5), json!("2")] {
        assert_error(
            &service
                .post(
                    &path,
                    GATEWAY,
                    json!({ "tool": "search", "agent_id": agent, "cost": bad }),
                )
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    // A client's own `x-arbiter-*` headers: the check names them for Envoy to drop, but
    // for those its answer sets itself.
    let check = |cost: &str| {
        service
            .call(Method::POST, "/v1/check/tools")
            .bearer(GATEWAY)
            .header("x-arbiter-session", &id)
            .header("x-arbiter-agent", agent.to_string())
            .header("x-arbiter-tool", "search")
            .header("x-arbiter-cost", cost)
            .header("x-arbiter-calls-remaining", "1000")
            .header("X-Arbiter-Budget-Remaining", "1000")
            .header("x-arbiter-trusted", "yes")
            .send()
    };
    for bad in ["-1", "two", "", "1.0", "1000000000001"] {
        assert_error(
            &check(bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let checked = check("2").await;
    assert_eq!(checked.status, StatusCode::OK, "{}", checked.body);
    let mut dropped: Vec<&str> = checked
        .header("x-envoy-auth-headers-to-remove")
        .expect("headers to drop")
        .split(',')
        .collect();
    dropped.sort_unstable();
    assert_eq!(
        dropped,
        [
            "x-arbiter-agent",
            "x-arbiter-cost",
            "x-arbiter-session",
            "x-arbiter-tool",
            "x-arbiter-trusted"
        ]
    );
    assert_eq!(checked.header("x-arbiter-calls-remaining"), Some("95"));
    assert!(checked.header("x-arbiter-budget-remaining").is_some());
    // 3 + 2 + 2 + 2 spent: 1 left.
    let denied = service
        .post(
            &batch,
            GATEWAY,
            json!({ "tools": ["search"], "agent_id": agent, "cost": 2 }),
        )
        .await;
    assert_error(&denied, StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    assert_eq!(denied.body["message"], "session budget exceeded");
    assert_error(
        &check("5").await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    ok(service
        .post(
            &path,
            GATEWAY,
            json!({ "tool": "search", "agent_id": agent }),
        )
        .await);
    let acme = service.get("/v1/budgets/acme", GATEWAY).await;
    assert_eq!(
        (&acme.body["used"], &acme.body["remaining"]),
        (&json!(10), &json!(0)),
        "{}",
        acme.body
    );
    let session = service.get(&format!("/v1/sessions/{id}"), ADMIN).await;
    assert_eq!(session.body["calls_made"], 6, "{}", session.body);
    // Once the last read of the budget is a second old, an answer reads it again: nothing
    // left, so under a tenth, whatever the session's own calls.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let last = check("0").await;
    assert_eq!(last.status, StatusCode::OK, "{}", last.body);
    assert_eq!(
        (
            last.header("x-arbiter-budget-remaining"),
            last.header("x-arbiter-warning")
        ),
        (Some("0"), Some("budget_low"))
    );
    assert_eq!(last.body["warnings"], json!(["budget_low"]));
    let closed = service
        .post(&format!("/v1/sessions/{id}/close"), ADMIN, json!({}))
        .await;
    assert_eq!(
        closed.body["summary"]["budget_units_charged"], 10,
        "{}",
        closed.body
    );
    assert_eq!(
        closed.body["summary"]["denials"],
        json!({ "shared_budget": 2 }),
        "{}",
        closed.body
    );
}

/// Reservations over HTTP: reserve answers like `/use` with the reservation, the budget
/// shows it held, settle answers what it charged, released and overran, once; bad input is
/// 400 and an unknown reservation 404.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn reservations_over_http(pool: PgPool) {
    let service = service(&common::database_url(&pool).await).await;
    let put = service
        .put(
            "/v1/budgets/acme",
            ADMIN,
            json!({ "limit": 100, "unit": "tokens" }),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["chat"], "call_budget": 10,
            "time_limit_secs": 600, "budget_id": "acme" }),
    )
    .await;
    let reserve = format!("/v1/sessions/{id}/reserve");
    for bad in [
        json!({ "tool": "chat", "agent_id": agent }),
        json!({ "tool": "chat", "agent_id": agent, "cost": -1 }),
        json!({ "tool": "chat", "agent_id": agent, "cost": 0 }),
        json!({ "tool": "chat", "agent_id": agent, "cost": 1_000_000_000_001_u64 }),
        json!({ "tool": "chat", "agent_id": agent, "cost": 1, "extra": true }),
    ] {
        assert_error(
            &service.post(&reserve, GATEWAY, bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    assert_error(
        &service
            .post(
                &reserve,
                ADMIN,
                json!({ "tool": "chat", "agent_id": agent, "cost": 1 }),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let reserved = service
        .post(
            &reserve,
            GATEWAY,
            json!({ "tool": "chat", "agent_id": agent, "cost": 60 }),
        )
        .await;
    assert_eq!(reserved.status, StatusCode::OK, "{}", reserved.body);
    assert_eq!(
        (&reserved.body["calls_made"], &reserved.body["estimate"]),
        (&json!(1), &json!(60)),
        "{}",
        reserved.body
    );
    // The status signals, as `/use` answers them: 100 - 60 held, 9 calls left.
    assert_eq!(
        (
            &reserved.body["calls_remaining"],
            &reserved.body["budget_remaining"],
            &reserved.body["warnings"]
        ),
        (&json!(9), &json!(40), &json!([])),
        "{}",
        reserved.body
    );
    assert_eq!(
        (
            reserved.header("x-arbiter-calls-remaining"),
            reserved.header("x-arbiter-budget-remaining")
        ),
        (Some("9"), Some("40"))
    );
    let acme = service.get("/v1/budgets/acme", GATEWAY).await;
    assert_eq!(
        (
            &acme.body["used"],
            &acme.body["reserved"],
            &acme.body["remaining"]
        ),
        (&json!(0), &json!(60), &json!(40)),
        "{}",
        acme.body
    );
    // More than what is left is denied like a call.
    assert_error(
        &service
            .post(
                &reserve,
                GATEWAY,
                json!({ "tool": "chat", "agent_id": agent, "cost": 41 }),
            )
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    let settle = format!(
        "/v1/reservations/{}/settle",
        reserved.body["reservation_id"].as_str().expect("an id")
    );
    for bad in [json!({}), json!({ "cost": 1.5 }), json!({ "cost": -3 })] {
        assert_error(
            &service.post(&settle, GATEWAY, bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let settled = service.post(&settle, GATEWAY, json!({ "cost": 75 })).await;
    assert_eq!(settled.status, StatusCode::OK, "{}", settled.body);
    assert_eq!(
        settled.body,
        json!({ "reservation_id": reserved.body["reservation_id"], "charged": 75,
            "released": 0, "overrun": 15 })
    );
    assert_error(
        &service.post(&settle, GATEWAY, json!({ "cost": 75 })).await,
        StatusCode::CONFLICT,
        "reservation_settled",
    );
    assert_error(
        &service
            .post(
                &format!("/v1/reservations/{}/settle", Uuid::new_v4()),
                GATEWAY,
                json!({ "cost": 1 }),
            )
            .await,
        StatusCode::NOT_FOUND,
        "reservation_not_found",
    );
    assert_error(
        &service
            .post(
                "/v1/reservations/nope/settle",
                GATEWAY,
                json!({ "cost": 1 }),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let acme = service.get("/v1/budgets/acme", GATEWAY).await;
    assert_eq!(
        (
            &acme.body["used"],
            &acme.body["reserved"],
            &acme.body["overrun"],
            &acme.body["remaining"]
        ),
        (&json!(75), &json!(0), &json!(15), &json!(25)),
        "{}",
        acme.body
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn ext_authz_metrics_and_openapi(pool: PgPool) {
    // This test's own recorder: sqlx::test runs it on one thread, store tasks included, so
    // the counters are this test's alone whatever runs beside it.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    arbiter_session::server::describe_metrics();
    let storage = PgStorage::connect_with(
        &common::database_url(&pool).await,
        PgStorage::pool_options(),
    )
    .await
    .expect("the store connects");
    let server = Server::new(SessionStore::new(storage), tokens()).with_metrics(handle);
    let service = Service {
        app: server
            .router()
            .merge(server.metrics_router().expect("a handle was given")),
        store: SessionStore::new(PgStorage::new(pool.clone())),
    };
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 2, "time_limit_secs": 600 }),
    )
    .await;
    // A check as Envoy sends it: the gateway's token, the session and agent headers.
    let check = |path: &str, session: &str| {
        service
            .call(Method::POST, &format!("/v1/check{path}"))
            .bearer(GATEWAY)
            .header("x-arbiter-session", session)
            .header("x-arbiter-agent", agent.to_string())
    };
    let session = id.to_string();

    // Headers only.
    let allowed = check("/mcp", &session)
        .header("x-arbiter-tool", "search")
        .send()
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.header("x-arbiter-calls-remaining"), Some("1"));

    // An MCP tools/call forwarded with its body: the tool comes from params.name.
    let rpc = |tool: &str| {
        json!({ "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": { "name": tool, "arguments": {} } })
    };
    let denied = check("/", &session)
        .json(&rpc("delete_everything"))
        .send()
        .await;
    assert_error(&denied, StatusCode::FORBIDDEN, "tool_not_authorized");
    let allowed = check("/mcp", &session).json(&rpc("search")).send().await;
    assert_eq!(allowed.header("x-arbiter-calls-remaining"), Some("0"));
    let bad = check("/mcp", "{not a uuid}")
        .header("x-arbiter-tool", "search")
        .send()
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_request");
    // The admin token may not check.
    let admin = service
        .call(Method::POST, "/v1/check/mcp")
        .bearer(ADMIN)
        .header("x-arbiter-session", &session)
        .header("x-arbiter-agent", agent.to_string())
        .header("x-arbiter-tool", "search")
        .send()
        .await;
    assert_eq!(admin.status, StatusCode::FORBIDDEN);
    assert_eq!(common::row(&pool, id).await.calls_made, 2);

    // Metrics show the decisions that were made, and the requests by route.
    let metrics = service.call(Method::GET, "/metrics").send().await;
    let metrics = metrics.body.as_str().expect("Prometheus text");
    let allowed_line = metrics
        .lines()
        .find(|line| {
            line.starts_with("arbiter_session_decisions_total") && line.contains("result=\"allow\"")
        })
        .unwrap_or_else(|| panic!("no allow counter in\n{metrics}"));
    assert!(allowed_line.ends_with(" 2"), "{allowed_line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("arbiter_session_decisions_total")
                && l.contains("reason=\"tool\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbiter_http_requests_total{route=\"/v1/check/{*rest}\",status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("arbiter_session_use_seconds"), "{metrics}");

    // The OpenAPI document is generated from the handlers.
    let doc = service.call(Method::GET, "/openapi.json").send().await;
    assert_eq!(doc.status, StatusCode::OK);
    let doc = doc.body;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}/use",
        "/v1/agents/{agent_id}/close-all",
        "/readyz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(
        doc["components"]["schemas"]["CreateBody"]["properties"]["max_live_sessions"].is_object()
    );
    // What a client generator and a stateful tester need: the constraints the service
    // checks, and links from a created session to the routes that take its id.
    let create = &doc["components"]["schemas"]["CreateBody"]["properties"];
    assert_eq!(
        (
            &create["call_budget"]["minimum"],
            &create["time_limit_secs"]["maximum"]
        ),
        (&json!(1), &json!(86_400))
    );
    assert_eq!(
        create["authorized_tools"]["items"]["pattern"],
        "^[!-~]{1,64}$"
    );
    // The alphabet `BudgetId` takes: no `_`.
    assert_eq!(create["budget_id"]["pattern"], "^[A-Za-z0-9.:/-]{1,128}$");
    let links = &doc["paths"]["/v1/sessions"]["post"]["responses"]["201"]["links"];
    for operation in [
        "get_session",
        "session_events",
        "use_session",
        "use_batch",
        "close",
    ] {
        assert_eq!(links[operation]["operationId"], operation, "{links}");
        assert_eq!(
            links[operation]["parameters"]["id"],
            "$response.body#/session_id"
        );
    }
    // A header is text or absent, never null.
    let check = &doc["paths"]["/v1/check/{rest}"]["post"]["parameters"];
    let cost = check
        .as_array()
        .and_then(|parameters| parameters.iter().find(|p| p["name"] == "x-arbiter-cost"))
        .expect("the cost header");
    assert_eq!(cost["schema"]["type"], "integer", "{cost}");

    let health = service.call(Method::GET, "/healthz").send().await;
    assert_eq!(
        (health.status, health.body),
        (StatusCode::OK, json!({ "status": "ok" }))
    );
    // Without a handle there is no `/metrics` route.
    assert!(
        Server::new(service.store.clone(), tokens())
            .metrics_router()
            .is_none()
    );
}

/// `/readyz` follows the database: not ready while it is away (and a use is counted but
/// not durable), ready again once it is back, with the pending call written.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn readyz_follows_the_database(pool: PgPool) {
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let service = service(&common::database_url_through(&pool, &proxy).await).await;
    let ready = || async { service.call(Method::GET, "/readyz").send().await.status };
    assert_eq!(ready().await, StatusCode::OK);

    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600 }),
    )
    .await;
    let call = json!({ "tool": "search", "agent_id": agent });
    let use_path = format!("/v1/sessions/{id}/use");
    assert_eq!(
        service.post(&use_path, GATEWAY, call.clone()).await.status,
        StatusCode::OK
    );

    // The database goes away: not ready (once the last check, at most a second old, is
    // stale), and a use is counted but not durable.
    proxy.refuse();
    proxy.cut();
    until(
        Duration::from_secs(5),
        "still ready without a database",
        || async { ready().await == StatusCode::SERVICE_UNAVAILABLE },
    )
    .await;
    let unready = service.call(Method::GET, "/readyz").send().await;
    assert_eq!(
        unready.body["status"].as_str(),
        Some("postgresql unavailable"),
        "{}",
        unready.body
    );
    assert_error(
        &service.post(&use_path, GATEWAY, call.clone()).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    assert_eq!(common::row(&pool, id).await.calls_made, 1);
    // A session this process never loaded cannot be read: 503, never 404.
    assert_error(
        &service
            .get(&format!("/v1/sessions/{}", Uuid::new_v4()), GATEWAY)
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_read",
    );

    // Back: ready again, and the pending call is written.
    proxy.heal();
    until(
        Duration::from_secs(15),
        "not ready and durable after the heal",
        || async {
            ready().await == StatusCode::OK && common::row(&pool, id).await.calls_made == 2
        },
    )
    .await;
}

/// Security review, defect 1: the check decides the tool a JSON-RPC body names, whatever
/// `x-arbiter-tool` says. A header that disagrees with the body, a body the check cannot
/// read, a body Envoy cut short, and a JSON-RPC batch with one forbidden call are each
/// denied, and none of them counts a call.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn check_decides_the_tool_the_body_names(pool: PgPool) {
    let service = service(&common::database_url(&pool).await).await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600 }),
    )
    .await;
    let check = || {
        service
            .call(Method::POST, "/v1/check/mcp")
            .bearer(GATEWAY)
            .header("x-arbiter-session", id.to_string())
            .header("x-arbiter-agent", agent.to_string())
    };
    let call = |tool: &str| {
        json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": tool, "arguments": {} } })
    };

    // The reviewer's request: the header says search, the body calls delete_repo.
    let bypass = check()
        .header("x-arbiter-tool", "search")
        .json(&call("delete_repo"))
        .send()
        .await;
    assert_ne!(bypass.status, StatusCode::OK, "{}", bypass.body);
    assert_error(&bypass, StatusCode::BAD_REQUEST, "invalid_request");
    // Without the header the body's tool is decided: denied by the allow-list.
    assert_error(
        &check().json(&call("delete_repo")).send().await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    // A body the check cannot read, without the header.
    assert_error(
        &check()
            .text("{\"jsonrpc\":\"2.0\",\"method\":\"tools/call\",")
            .send()
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // ... or with it: an upstream might read what the check could not.
    assert_error(
        &check()
            .header("x-arbiter-tool", "search")
            .text(
                "{\"method\":\"tools/call\",\"params\":{\"name\":\"search\",\"name\":\"delete_repo\"}}",
            )
            .send()
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A body Envoy cut at max_request_bytes (allow_partial_message: true).
    assert_error(
        &check()
            .header("x-envoy-auth-partial-body", "true")
            .json(&call("search"))
            .send()
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A batch decides every call it holds, all or nothing.
    assert_error(
        &check()
            .json(&json!([call("search"), call("delete_repo")]))
            .send()
            .await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        0,
        "nothing counted"
    );

    let allowed = check()
        .json(&json!([call("search"), call("search")]))
        .send()
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.header("x-arbiter-calls-remaining"), Some("3"));
    // A header that agrees with the body is fine.
    let agreed = check()
        .header("x-arbiter-tool", "search")
        .json(&call("search"))
        .send()
        .await;
    assert_eq!(agreed.status, StatusCode::OK);
    assert_eq!(common::row(&pool, id).await.calls_made, 3);
}

/// Security review, defect 3: `/readyz` needs no token, so a flood of it must not take
/// the pool's connections from real calls. With the readiness query stuck behind a lock,
/// 64 clients flooding `/readyz` leave every `/use` answered.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_readyz_flood_changes_no_answer_of_use(pool: PgPool) {
    let service = std::sync::Arc::new(
        service_with(&common::database_url(&pool).await, 4, true, tokens()).await,
    );
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 100, "time_limit_secs": 600 }),
    )
    .await;
    // Every readiness query now waits for this lock.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut locker = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE public._sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let (service, stop) = (service.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = service.call(Method::GET, "/readyz").send().await.status;
                    assert!(
                        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                        "{status}"
                    );
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/v1/sessions/{id}/use");
    for call in 1..=20 {
        let answer = service
            .post(
                &path,
                GATEWAY,
                json!({ "tool": "search", "agent_id": agent }),
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "call {call}: {}",
            answer.body
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for task in flood {
        sent += task.await.expect("flood task");
    }
    assert!(sent >= 64, "the flood ran ({sent} requests)");
    locker.rollback().await.expect("rollback");
    assert_eq!(common::row(&pool, id).await.calls_made, 20);
}

/// The README's grants for the gateway role (the ```sql block that grants to
/// `arbiter_gateway`), for `role`.
fn readme_gateway_grants(role: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains("TO arbiter_gateway"))
        .expect("the README has the gateway role's grants");
    block
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(|statement| statement.replace("arbiter_gateway", role))
        .collect()
}

/// Security review, defect 6: the service runs as a role with exactly the README's grants,
/// with no upkeep, through create, use, a denial, a write that fails and is reconciled
/// into a row changed meanwhile, and close; the schema's owner runs `arbiter-session
/// upkeep`. The role is dropped afterwards, whatever the outcome.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn runs_as_a_role_with_only_the_readmes_grants(pool: PgPool) {
    let role = format!("arbiter_gateway_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
        .execute(&pool)
        .await
        .expect("create the role");
    let body = {
        let (pool, role) = (pool.clone(), role.clone());
        tokio::spawn(async move { run_as_gateway_role(pool, &role).await })
    };
    let outcome = body.await;
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .expect("drop the role");
    }
    if let Err(panicked) = outcome {
        std::panic::resume_unwind(panicked.into_panic());
    }
}

async fn run_as_gateway_role(pool: PgPool, role: &str) {
    for grant in readme_gateway_grants(role) {
        sqlx::query(sqlx::AssertSqlSafe(grant.clone()))
            .execute(&pool)
            .await
            .expect(&grant);
    }
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let url = common::database_url_through(&pool, &proxy).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let as_role = format!("{scheme}://{role}@{host}");
    let service = service_with(&as_role, 16, false, tokens()).await;
    let ready = service.call(Method::GET, "/readyz").send().await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    let budget = service
        .put(
            "/v1/budgets/team",
            ADMIN,
            json!({ "limit": 10, "period": "day" }),
        )
        .await;
    assert_eq!(budget.status, StatusCode::CREATED, "{}", budget.body);
    let budget = service.get("/v1/budgets/team", GATEWAY).await;
    assert_eq!(budget.body["remaining"], 10, "{}", budget.body);
    // A session drawing on it: its calls are charged through the process's share.
    let spender = Uuid::new_v4();
    let charged = create(
        &service,
        json!({ "agent_id": spender, "authorized_tools": ["search"], "call_budget": 5,
        "time_limit_secs": 600, "budget_id": "team", "tool_costs": { "search": 3 } }),
    )
    .await;
    let charge = service
        .post(
            &format!("/v1/sessions/{charged}/use"),
            GATEWAY,
            json!({ "tool": "search", "agent_id": spender }),
        )
        .await;
    assert_eq!(charge.status, StatusCode::OK, "{}", charge.body);
    let budget = service.get("/v1/budgets/team", GATEWAY).await;
    assert_eq!(budget.body["used"], 3, "{}", budget.body);
    let reserved = service
        .post(
            &format!("/v1/sessions/{charged}/reserve"),
            GATEWAY,
            json!({ "tool": "search", "agent_id": spender, "cost": 4 }),
        )
        .await;
    assert_eq!(reserved.status, StatusCode::OK, "{}", reserved.body);
    let settle = format!(
        "/v1/reservations/{}/settle",
        reserved.body["reservation_id"].as_str().expect("an id")
    );
    let settled = service.post(&settle, GATEWAY, json!({ "cost": 1 })).await;
    assert_eq!(settled.status, StatusCode::OK, "{}", settled.body);
    let budget = service.get("/v1/budgets/team", GATEWAY).await;
    assert_eq!(budget.body["used"], 4, "{}", budget.body);

    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600, "tool_limits": { "search": 4 } }),
    )
    .await;
    let path = format!("/v1/sessions/{id}/use");
    let call = |tool: &str, who: Uuid| json!({ "tool": tool, "agent_id": who });
    assert_eq!(
        service
            .post(&path, GATEWAY, call("search", agent))
            .await
            .status,
        StatusCode::OK
    );
    assert_error(
        &service.post(&path, GATEWAY, call("delete", agent)).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_error(
        &service
            .post(&path, GATEWAY, call("search", Uuid::new_v4()))
            .await,
        StatusCode::FORBIDDEN,
        "agent_mismatch",
    );
    // A write that fails: the call stays pending while the owner changes the row, and is
    // merged into it (a locked update) once the database is back.
    proxy.refuse();
    proxy.cut();
    assert_error(
        &service.post(&path, GATEWAY, call("search", agent)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    sqlx::query!(
        "UPDATE arbiter.sessions SET declared_intent = 'changed by the operator' WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .expect("the owner's update");
    proxy.heal();
    until(Duration::from_secs(15), "not reconciled", || async {
        common::row(&pool, id).await.calls_made == 2
    })
    .await;
    let closed = service
        .post(&format!("/v1/sessions/{id}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(closed.status, StatusCode::OK, "{}", closed.body);

    // The owner's upkeep, beside the service.
    let upkeep = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter-session"))
        .arg("upkeep")
        .env("DATABASE_URL", common::database_url(&pool).await)
        .output()
        .expect("the binary runs");
    assert!(
        upkeep.status.success(),
        "{}",
        String::from_utf8_lossy(&upkeep.stderr)
    );
    let report = service.store.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    let kinds = common::event_kinds(&pool, id).await;
    assert!(kinds.contains(&"reconciled".to_owned()), "{kinds:?}");
    // The tool, the stranger, and the write that failed.
    assert_eq!(
        kinds.iter().filter(|kind| *kind == "denied").count(),
        3,
        "{kinds:?}"
    );
    let verdict = arbiter_session::operator::chain::verify_audit_chain(&pool, id)
        .await
        .expect("verify");
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// Security review, defect 7: without tokens, only requests whose `Host` is a loopback
/// name are served, so a web page whose name resolves to 127.0.0.1 (DNS rebinding) cannot
/// drive the service from a browser.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn without_tokens_only_loopback_hosts_are_answered(pool: PgPool) {
    let service = service_with(
        &common::database_url(&pool).await,
        16,
        true,
        Tokens::disabled(),
    )
    .await;
    let with_host = |host: Option<&str>| {
        let call = service.call(Method::POST, "/v1/sessions").json(
            &json!({ "agent_id": Uuid::new_v4(), "authorized_tools": ["search"],
                "call_budget": 1, "time_limit_secs": 60 }),
        );
        match host {
            Some(host) => call.header(header::HOST.as_str(), host),
            None => call,
        }
        .send()
    };
    for host in [
        Some("attacker.example:8080"),
        Some("attacker.example"),
        Some("127.0.0.1.attacker.example:8080"),
        Some("localhost.attacker.example:8080"),
        None,
    ] {
        assert_error(&with_host(host).await, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_eq!(sessions_in(&pool).await, 0);
    for host in [
        "localhost:8080",
        "127.0.0.1:8080",
        "[::1]:8080",
        "localhost",
    ] {
        let answer = with_host(Some(host)).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{host}");
    }
}

/// Reads from `stream` until the server closes it (EOF or reset); how long that took.
async fn closed_within(stream: &mut tokio::net::TcpStream, bound: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            bound.saturating_sub(started.elapsed()),
            tokio::io::AsyncReadExt::read(stream, &mut buf),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Security review, defect 2: a head sent too slowly, an idle keep-alive connection and a
/// connection past the bound each hold nothing for longer than their bound; at shutdown, a
/// connection that holds half a head is closed at once.
#[tokio::test]
async fn connections_are_bounded_in_time_and_number() {
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("its address");
    let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let limits = ConnectionLimits::default()
        .with_header_read_timeout(Duration::from_secs(1))
        .with_idle_timeout(Duration::from_secs(2))
        .with_max_connections(2);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve_connections(
        listener,
        app,
        limits,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let connect = || async {
        tokio::net::TcpStream::connect(address)
            .await
            .expect("a connection")
    };

    // Half a head: closed after the header timeout, not the idle one.
    let mut slow = connect().await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let took = closed_within(&mut slow, Duration::from_secs(10))
        .await
        .expect("a half-sent head is cut");
    assert!(took < Duration::from_millis(1900), "{took:?}");

    // A keep-alive connection that answered one request, then sent nothing.
    let mut idle = connect().await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let took = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(took >= Duration::from_millis(1500), "{took:?}");

    // Two connections are open: a third is not served until one of them closes.
    let first = connect().await;
    let mut second = connect().await;
    let mut third = connect().await;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read_to_end(&mut third, &mut answer),
    )
    .await;
    assert!(waited.is_err(), "served past the bound: {answer:?}");
    drop(first);
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut third, &mut answer),
    )
    .await
    .expect("served once a connection closed")
    .expect("read");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // Shutdown: the connection holding half a head is closed at once, not at the drain
    // deadline, and none had to be cut.
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).expect("the server listens for the stop");
    let took = closed_within(&mut second, Duration::from_secs(4))
        .await
        .expect("closed at shutdown");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let drained = served.await.expect("the server task");
    assert_eq!((drained.open, drained.cut), (1, 0), "{drained:?}");
}

/// The viewer token reads sessions, budgets and live counts, and every route that changes
/// anything answers it 403, with nothing changed.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_viewer_reads_and_changes_nothing(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let put = service
        .put("/v1/budgets/acme", ADMIN, json!({ "limit": 10 }))
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 5,
            "time_limit_secs": 600, "budget_id": "acme" }),
    )
    .await;

    for path in [
        format!("/v1/sessions/{id}"),
        "/v1/budgets".to_owned(),
        "/v1/budgets/acme".to_owned(),
        format!("/v1/agents/{agent}/live-sessions"),
    ] {
        let read = service.get(&path, VIEWER).await;
        assert_eq!(read.status, StatusCode::OK, "{path}: {}", read.body);
    }

    let call = json!({ "tool": "search", "agent_id": agent, "cost": 1 });
    let writes = [
        (
            "/v1/sessions".to_owned(),
            json!({ "agent_id": agent, "authorized_tools": ["search"],
            "call_budget": 1, "time_limit_secs": 60 }),
        ),
        (format!("/v1/sessions/{id}/use"), call.clone()),
        (
            format!("/v1/sessions/{id}/use-batch"),
            json!({ "tools": ["search"], "agent_id": agent }),
        ),
        (format!("/v1/sessions/{id}/reserve"), call),
        (
            format!("/v1/reservations/{}/settle", Uuid::new_v4()),
            json!({ "cost": 1 }),
        ),
        (format!("/v1/sessions/{id}/close"), json!({})),
        (format!("/v1/agents/{agent}/close-all"), json!({})),
    ];
    for (path, body) in writes {
        let answer = service.post(&path, VIEWER, body).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_error(
        &service
            .put("/v1/budgets/acme", VIEWER, json!({ "limit": 1_000 }))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let check = service
        .call(Method::POST, "/v1/check/tools")
        .bearer(VIEWER)
        .header("x-arbiter-session", id.to_string())
        .header("x-arbiter-agent", agent.to_string())
        .header("x-arbiter-tool", "search")
        .send()
        .await;
    assert_error(&check, StatusCode::FORBIDDEN, "forbidden");

    // Nothing changed.
    assert_eq!(sessions_in(&pool).await, 1);
    let row = common::row(&pool, id).await;
    assert_eq!((row.calls_made, row.status.as_str()), (0, "active"));
    let acme = service.get("/v1/budgets/acme", VIEWER).await;
    assert_eq!(
        (&acme.body["limit"], &acme.body["used"]),
        (&json!(10), &json!(0))
    );
}

/// A session's trail over HTTP, for the viewer: in the order things happened, with each
/// state change's hash and whether the chains verify, in pages that join up; the gateway
/// may not read it, an unknown session is 404, and a limit out of range is 400.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_sessions_trail_in_pages(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 3,
            "time_limit_secs": 600 }),
    )
    .await;
    let call = |tool: &str| json!({ "tool": tool, "agent_id": agent });
    let use_path = format!("/v1/sessions/{id}/use");
    for tool in ["search", "search", "rm"] {
        service.post(&use_path, GATEWAY, call(tool)).await;
    }
    // The denial reaches the trail with the close's summary (its writer is flushed).
    let closed = service
        .post(&format!("/v1/sessions/{id}/close"), ADMIN, json!({}))
        .await;
    assert_eq!(closed.status, StatusCode::OK);

    let events = format!("/v1/sessions/{id}/events");
    let all = service.get(&events, VIEWER).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.body["chain_intact"], true, "{}", all.body);
    let kinds: Vec<&str> = all.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| event["kind"].as_str().expect("a kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "call_allowed",
            "call_allowed",
            "denied",
            "closed"
        ]
    );
    assert!(all.body["events"][1]["hash"].is_string());
    assert!(all.body["events"][3]["reason"] == "tool");
    assert!(all.body["next_cursor"].is_null());

    // Pages of two join up into the same trail.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("{events}?limit=2&cursor={cursor}"),
            None => format!("{events}?limit=2"),
        };
        let page = service.get(&path, ADMIN).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        paged.extend(page.body["events"].as_array().expect("events").clone());
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(&Value::Array(paged), &all.body["events"]);

    assert_error(
        &service.get(&events, GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &service
            .get(&format!("/v1/sessions/{}/events", Uuid::new_v4()), VIEWER)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    for bad in ["limit=0", "limit=1001", "cursor=x", "other=1"] {
        assert_error(
            &service.get(&format!("{events}?{bad}"), VIEWER).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
}

/// The sessions over HTTP, for the viewer: newest first, narrowed by agent, status, budget
/// and creation instant, in pages that join up; the gateway may not list them.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn sessions_listed_in_pages(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let put = service
        .put("/v1/budgets/acme", ADMIN, json!({ "limit": 10 }))
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let mut created = Vec::new();
    for (agent, budget) in [
        (first, false),
        (first, true),
        (second, false),
        (first, false),
    ] {
        let mut body = json!({ "agent_id": agent, "authorized_tools": ["search"],
            "call_budget": 5, "time_limit_secs": 600 });
        if budget {
            body["budget_id"] = json!("acme");
        }
        created.push(create(&service, body).await);
    }
    let closed = service
        .post(
            &format!("/v1/sessions/{}/close", created[3]),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(closed.status, StatusCode::OK);

    let ids = |answer: &Answer| -> Vec<Uuid> {
        answer.body["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| {
                s["session_id"]
                    .as_str()
                    .expect("an id")
                    .parse()
                    .expect("a UUID")
            })
            .collect()
    };
    let newest_first: Vec<Uuid> = created.iter().rev().copied().collect();
    let all = service.get("/v1/sessions", VIEWER).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(ids(&all), newest_first);

    let mine = service
        .get(
            &format!("/v1/sessions?agent_id={first}&status=active"),
            VIEWER,
        )
        .await;
    assert_eq!(ids(&mine), [created[1], created[0]]);
    let charged = service.get("/v1/sessions?budget_id=acme", ADMIN).await;
    assert_eq!(ids(&charged), [created[1]]);
    let later = service
        .get("/v1/sessions?created_since=2999-01-01T00:00:00Z", VIEWER)
        .await;
    assert_eq!(ids(&later), Vec::<Uuid>::new());

    let mut paged = Vec::new();
    let mut path = "/v1/sessions?limit=3".to_owned();
    loop {
        let page = service.get(&path, VIEWER).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        paged.extend(ids(&page));
        match page.body["next_cursor"].as_str() {
            Some(next) => path = format!("/v1/sessions?limit=3&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(paged, newest_first);

    assert_error(
        &service.get("/v1/sessions", GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    for bad in [
        "limit=0",
        "status=gone",
        "cursor=1-x",
        "budget_id=a_b",
        "other=1",
        // An instant chrono reads with a sign, before PostgreSQL's range.
        "created_since=-100000-01-01T00:00:00Z",
    ] {
        assert_error(
            &service.get(&format!("/v1/sessions?{bad}"), VIEWER).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
}
