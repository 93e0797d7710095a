//! The operator's console over a real store, in-process: the report routes answer the rows
//! `operator::report` reads for the CLI, in pages that join up; the overview counts the last
//! hour exactly; only the admin and viewer tokens read them; and `/ui/` is served with its
//! Content-Security-Policy, asking nothing of another host. The console in a browser is
//! `tests/console/browser.py`, which `scripts/test` runs.

mod common;

use std::time::Duration;

use arbiter_session::operator::report::{self, ReportFilter};
use axum::http::{Method, StatusCode};
use chrono::{Days, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use common::service::{
    ADMIN, GATEWAY, Service, VIEWER, assert_error, create, service_with_viewer, until,
};

/// Two agents' sessions on budget `team`: calls allowed (one a batch of two) and denials
/// for a tool, the call budget and an agent mismatch. Returns the sessions and the agents.
async fn traffic(service: &Service) -> ([Uuid; 2], [Uuid; 2]) {
    let put = service
        .put(
            "/v1/budgets/team",
            ADMIN,
            json!({ "limit": 100, "period": "day" }),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let agents = [Uuid::new_v4(), Uuid::new_v4()];
    let mut sessions = [Uuid::nil(); 2];
    for (session, agent) in sessions.iter_mut().zip(agents) {
        *session = create(
            service,
            json!({ "agent_id": agent, "authorized_tools": ["search", "write"],
                "call_budget": 3, "time_limit_secs": 600, "budget_id": "team" }),
        )
        .await;
    }
    let [a, b] = sessions;
    let [agent_a, agent_b] = agents;
    let use_tool = async |session: Uuid, tool: &str, agent: Uuid| {
        let path = format!("/v1/sessions/{session}/use");
        let body = json!({ "tool": tool, "agent_id": agent });
        service.post(&path, GATEWAY, body).await.status
    };
    assert_eq!(use_tool(a, "search", agent_a).await, StatusCode::OK);
    assert_eq!(use_tool(a, "delete", agent_a).await, StatusCode::FORBIDDEN);
    assert_eq!(use_tool(b, "write", agent_a).await, StatusCode::FORBIDDEN);
    let batch = service
        .post(
            &format!("/v1/sessions/{b}/use-batch"),
            GATEWAY,
            json!({ "tools": ["search", "write"], "agent_id": agent_b }),
        )
        .await;
    assert_eq!(batch.status, StatusCode::OK, "{}", batch.body);
    assert_eq!(use_tool(b, "search", agent_b).await, StatusCode::OK);
    assert_eq!(
        use_tool(b, "search", agent_b).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Denials reach the trail through this store's buffered writer.
    until(
        Duration::from_secs(10),
        "the 3 denials are written",
        || async {
            let denials = report::denials(service.store.storage().pool(), ReportFilter::default());
            denials
                .await
                .expect("read")
                .iter()
                .map(|d| d.denials)
                .sum::<i64>()
                == 3
        },
    )
    .await;
    (sessions, agents)
}

fn rows_of<T: serde::Serialize>(rows: Vec<T>) -> Value {
    serde_json::to_value(rows).expect("JSON")
}

/// Every page of `path` (a report route, with its query) read with `limit`, joined.
async fn every_page(service: &Service, path: &str, limit: u32) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{path}&limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page = service.get(&url, VIEWER).await;
        assert_eq!(page.status, StatusCode::OK, "{url}: {}", page.body);
        let got = page.body["rows"].as_array().expect("rows").clone();
        assert!(got.len() <= limit as usize, "{url}: {} rows", got.len());
        rows.extend(got);
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return rows,
        }
    }
}

/// Each report over HTTP is the CLI's read of it, row for row, whether read whole or one
/// row a page; a range ending yesterday or starting tomorrow is empty.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn reports_over_http_are_the_clis_rows(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let (_, [agent_a, _]) = traffic(&service).await;
    let today = Utc::now().date_naive();
    let range = format!("since={today}&until={today}");
    let all = ReportFilter::default()
        .with_since(Some(today))
        .with_until(Some(today));
    let expected = [
        (
            "agents",
            rows_of(report::agent_activity(&pool, all).await.unwrap()),
        ),
        (
            "tools",
            rows_of(report::tool_usage(&pool, all).await.unwrap()),
        ),
        (
            "denials",
            rows_of(report::denials(&pool, all).await.unwrap()),
        ),
        (
            "utilization",
            rows_of(report::utilization(&pool, all).await.unwrap()),
        ),
        (
            "budgets",
            rows_of(report::budget_periods(&pool, all).await.unwrap()),
        ),
    ];
    let row_counts: Vec<usize> = expected
        .iter()
        .map(|(_, rows)| rows.as_array().map_or(0, Vec::len))
        .collect();
    // agents: 2 (one row each); tools: search, write, delete; denials: budget, tool,
    // agent_mismatch; utilization: 2 sessions; budgets: team's day.
    assert_eq!(row_counts, [2, 3, 3, 2, 1]);
    for (name, rows) in &expected {
        let path = format!("/v1/reports/{name}?{range}");
        for limit in [1, 1000] {
            let read = every_page(&service, &path, limit).await;
            assert_eq!(&Value::Array(read), rows, "{name}, {limit} a page");
        }
    }
    let denials = service.get("/v1/reports/denials?limit=10", VIEWER).await;
    let reasons: Vec<&str> = denials.body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| row["reason"].as_str().expect("reason"))
        .collect();
    assert_eq!(reasons, ["agent_mismatch", "budget", "tool"]);

    let agent_a_only = format!("/v1/reports/agents?agent_id={agent_a}&{range}");
    let rows = every_page(&service, &agent_a_only, 10).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["agent_id"], json!(agent_a));
    assert_eq!(rows[0]["calls_allowed"], 1);

    let yesterday = today - Days::new(1);
    let tomorrow = today + Days::new(1);
    for name in ["agents", "tools", "denials", "utilization"] {
        for range in [format!("until={yesterday}"), format!("since={tomorrow}")] {
            let path = format!("/v1/reports/{name}?{range}");
            assert_eq!(
                every_page(&service, &path, 10).await,
                [] as [Value; 0],
                "{path}"
            );
        }
    }
    // A range that ends before it starts is empty, not an error.
    let backwards = format!("/v1/reports/tools?since={tomorrow}&until={yesterday}");
    assert_eq!(every_page(&service, &backwards, 10).await.len(), 0);
}

/// The report routes are the console's: the gateway may not read them, and a bad day,
/// limit, cursor or parameter is 400.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn report_routes_refuse_the_gateway_and_bad_queries(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    for name in ["agents", "tools", "denials", "utilization", "budgets"] {
        let path = format!("/v1/reports/{name}");
        assert_eq!(service.get(&path, ADMIN).await.status, StatusCode::OK);
        // RFC 3339's first and last days.
        let widest = format!("{path}?since=0000-01-01&until=9999-12-31");
        let widest = service.get(&widest, VIEWER).await;
        assert_eq!(widest.status, StatusCode::OK, "{}", widest.body);
        assert_error(
            &service.get(&path, GATEWAY).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
        assert_error(
            &service.get(&path, "not-a-token-at-all").await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        for query in [
            "since=2026-13-01",
            // Days chrono reads with a sign, past PostgreSQL's range.
            "since=-100000-01-01",
            "until=%2B100000-01-01",
            "until=yesterday",
            "limit=0",
            "limit=1001",
            "cursor=nonsense",
            "cursor=12-0g",
            "page=2",
        ] {
            let answer = service.get(&format!("{path}?{query}"), VIEWER).await;
            assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
        }
    }
    let per_agent = format!("/v1/reports/budgets?agent_id={}", Uuid::new_v4());
    assert_error(
        &service.get(&per_agent, VIEWER).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &service.get("/v1/reports/sessions", VIEWER).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &service.get("/v1/overview", GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
}

/// The overview counts the last hour exactly: calls allowed (a batch's tools one each) and
/// denials by reason in the current minute, the live sessions, and the budgets by how full.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_overview_counts_the_last_hour(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let ([a, _], _) = traffic(&service).await;
    let put = service
        .put("/v1/budgets/idle", ADMIN, json!({ "limit": 1000 }))
        .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.body);
    let closed = service
        .post(&format!("/v1/sessions/{a}/close"), ADMIN, json!({}))
        .await;
    assert_eq!(closed.status, StatusCode::OK, "{}", closed.body);

    let overview = service.get("/v1/overview", VIEWER).await;
    assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
    let body = &overview.body;
    assert_eq!(body["live_sessions"], 1);
    assert_eq!(body["pending_sessions"], 0);
    assert_eq!(body["calls_last_hour"], 4);
    assert_eq!(body["denials_last_hour"], 3);
    let minutes = body["minutes"].as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    let busy: Vec<&Value> = minutes
        .iter()
        .filter(|m| m["allowed"] != 0 || m["denied"] != json!({}))
        .collect();
    // The traffic took well under a minute, but may straddle a minute's turn.
    assert!(matches!(busy.len(), 1 | 2), "{busy:?}");
    let allowed: i64 = busy.iter().map(|m| m["allowed"].as_i64().unwrap()).sum();
    assert_eq!(allowed, 4);
    let mut denied = serde_json::Map::new();
    for minute in &busy {
        for (reason, n) in minute["denied"].as_object().expect("denied") {
            let sum = denied.get(reason).and_then(Value::as_i64).unwrap_or(0);
            denied.insert(reason.clone(), json!(sum + n.as_i64().unwrap()));
        }
    }
    assert_eq!(
        Value::Object(denied),
        json!({ "agent_mismatch": 1, "budget": 1, "tool": 1 })
    );
    let budgets: Vec<&str> = body["busiest_budgets"]
        .as_array()
        .expect("budgets")
        .iter()
        .map(|b| b["budget_id"].as_str().expect("an id"))
        .collect();
    assert_eq!(budgets, ["team", "idle"]);
    assert_eq!(body["busiest_budgets"][0]["used"], 4);
}

/// `/ui` sends the browser to `ui/`; the page, its script and its stylesheet are served
/// with a policy that allows this origin only, and name no other host.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_console_is_served_under_a_strict_policy(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let moved = service.call(Method::GET, "/ui").send().await;
    assert_eq!(moved.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(moved.header("location"), Some("ui/"));
    for (path, content_type) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/console.js", "text/javascript; charset=utf-8"),
        ("/ui/console.css", "text/css; charset=utf-8"),
    ] {
        // The assets hold no data: no token is needed to load them.
        let asset = service.call(Method::GET, path).send().await;
        assert_eq!(asset.status, StatusCode::OK, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        let policy = asset.header("content-security-policy").expect("a policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{policy}");
        assert_eq!(asset.header("x-content-type-options"), Some("nosniff"));
        let text = asset.body.as_str().expect("text");
        // SVG's namespace is a name, never fetched.
        let without_namespace = text.replace("http://www.w3.org/2000/svg", "");
        assert!(!without_namespace.contains("://"), "{path} names a host");
    }
    let page = service.call(Method::GET, "/ui/").send().await;
    let html = page.body.as_str().expect("text");
    assert!(html.contains(r#"src="console.js""#), "{html}");
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
}

/// A session past its time limit is listed as expired, and only under `status=expired`,
/// though no store has marked its row yet (serve marks none: a session's expiry is decided
/// when it is next used).
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_session_past_its_time_is_listed_expired(pool: PgPool) {
    let service = service_with_viewer(&pool).await;
    let agent = Uuid::new_v4();
    let session = |secs: u64| {
        json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 5,
            "time_limit_secs": secs })
    };
    let short = create(&service, session(1)).await;
    let long = create(&service, session(600)).await;
    let listed = async |query: &str| -> Vec<(Uuid, String)> {
        let page = service.get(&format!("/v1/sessions?{query}"), VIEWER).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        page.body["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| {
                let id = s["session_id"].as_str().and_then(|id| id.parse().ok());
                let status = s["status"].as_str().unwrap_or_default().to_owned();
                (id.expect("a session id"), status)
            })
            .collect()
    };
    let expired = (short, "expired".to_owned());
    until(
        Duration::from_secs(10),
        "the short session is past its time",
        || async { listed("status=expired").await == [expired.clone()] },
    )
    .await;
    let active = (long, "active".to_owned());
    assert_eq!(listed("status=active").await, std::slice::from_ref(&active));
    assert_eq!(listed("").await, [active, expired]);
    let stored = common::row(&pool, short).await;
    assert_eq!(stored.status, "active", "nothing marked the row");
}
