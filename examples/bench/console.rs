//! The console's page loads at scale (part of `--history N`, on the database with history):
//! each page's requests, as `src/server/console/console.js` makes them, sent to
//! `arbiter-session serve` (the binary in `ARBITER_SERVE_BIN`) over that database; the
//! median of [`LOADS`] loads per page, in milliseconds. The assets (page, script,
//! stylesheet) are loaded once per browser session and timed as a page of their own.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Instant;

use arbiter_session::budget::{BudgetId, BudgetTerms, Period};
use arbiter_session::{PgStorage, SessionStore};
use chrono::{Days, Utc};
use serde_json::Value;

use crate::{ADMIN_TOKEN, HttpService};

/// Loads per page; the median is recorded.
const LOADS: usize = 7;

/// A budget tree for the budgets page: a tenant, 5 teams, 6 agents under each (per day).
async fn seed_budgets(storage: &PgStorage) -> Result<(), Box<dyn Error>> {
    let store = SessionStore::new(storage.clone());
    let put = async |id: String, parent: Option<String>, limit: u64| {
        let mut terms = BudgetTerms::new(limit);
        terms.period = Period::Day;
        terms.parent_id = parent.map(BudgetId::new).transpose()?;
        store.put_budget(&BudgetId::new(id)?, &terms).await?;
        Ok::<_, Box<dyn Error>>(())
    };
    put("tenant".to_owned(), None, 1_000_000).await?;
    for team in 0..5 {
        put(
            format!("tenant/team-{team}"),
            Some("tenant".to_owned()),
            200_000,
        )
        .await?;
        for agent in 0..6 {
            let parent = format!("tenant/team-{team}");
            put(format!("{parent}/agent-{agent}"), Some(parent), 30_000).await?;
        }
    }
    Ok(())
}

/// Each page's median load, in milliseconds, by page.
pub async fn page_loads(
    storage: &PgStorage,
    url: &str,
) -> Result<BTreeMap<String, f64>, Box<dyn Error>> {
    let Ok(binary) = std::env::var("ARBITER_SERVE_BIN") else {
        eprintln!("(no ARBITER_SERVE_BIN: the console's page loads are skipped)");
        return Ok(BTreeMap::new());
    };
    seed_budgets(storage).await?;
    let service = HttpService::start(&binary, url)?;
    let client = reqwest::Client::new();
    let base = service.base.clone();
    let get = async |path: String| -> Result<Value, Box<dyn Error>> {
        let response = client
            .get(format!("{base}/{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("{path}: {}", response.status()).into());
        }
        let text = response.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    // The oldest session of the history: 100 events.
    let oldest = get("v1/reports/utilization?limit=1".to_owned()).await?;
    let field = |name: &str| {
        oldest
            .pointer(&format!("/rows/0/{name}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or("no session in the history")
    };
    let (session, agent) = (field("session_id")?, field("agent_id")?);
    let today = Utc::now().date_naive();
    let week = format!("since={}&until={today}", today - Days::new(6));
    let year = format!("since={}&until={today}", today - Days::new(400));
    let pages: Vec<(&str, Vec<String>)> = vec![
        (
            "assets",
            vec![
                "ui/".into(),
                "ui/console.js".into(),
                "ui/console.css".into(),
            ],
        ),
        ("overview", vec!["v1/overview".into()]),
        ("sessions", vec!["v1/sessions?limit=50".into()]),
        // Filtered: the live ones (few among 100,000), and one agent's.
        (
            "sessions_active",
            vec!["v1/sessions?status=active&limit=50".into()],
        ),
        (
            "sessions_of_agent",
            vec![format!("v1/sessions?agent_id={agent}&limit=50")],
        ),
        ("budgets", vec!["v1/budgets".into()]),
        (
            "budget_history",
            vec![format!("v1/reports/budgets?{year}&limit=1000")],
        ),
        (
            "reports_agents_7d",
            vec![format!("v1/reports/agents?{week}&limit=500")],
        ),
        (
            "reports_tools_7d",
            vec![format!("v1/reports/tools?{week}&limit=500")],
        ),
        (
            "reports_denials_7d",
            vec![format!("v1/reports/denials?{week}&limit=500")],
        ),
        (
            "reports_utilization_7d",
            vec![format!("v1/reports/utilization?{week}&limit=500")],
        ),
    ];
    let mut medians = BTreeMap::new();
    for (page, paths) in pages {
        let mut loads = Vec::with_capacity(LOADS);
        for _ in 0..LOADS {
            let started = Instant::now();
            for path in &paths {
                get(path.clone()).await?;
            }
            loads.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        medians.insert(page.to_owned(), median(loads));
    }
    // The session's page asks for the session and its first 200 events at once.
    let mut loads = Vec::with_capacity(LOADS);
    for _ in 0..LOADS {
        let started = Instant::now();
        let (one, events) = tokio::join!(
            get(format!("v1/sessions/{session}")),
            get(format!("v1/sessions/{session}/events?limit=200"))
        );
        one?;
        let events = events?;
        if events["chain_intact"] != Value::Bool(true) {
            return Err(format!("the session's chain does not verify: {events}").into());
        }
        loads.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    medians.insert("session".to_owned(), median(loads));
    for (page, ms) in &medians {
        eprintln!("console page {page:<23} {ms:>7.1} ms (median of {LOADS})");
    }
    service.stop()?;
    Ok(medians)
}

fn median(mut loads: Vec<f64>) -> f64 {
    loads.sort_by(f64::total_cmp);
    loads.get(loads.len() / 2).copied().unwrap_or(f64::NAN)
}
