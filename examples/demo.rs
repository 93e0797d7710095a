//! The operator's console with something to look at: the service's routes and `/ui/` over a
//! database of demo data, with traffic that goes on until Ctrl-C.
//!
//! Run it with `scripts/demo`, which makes the database `arbiter_demo` afresh on the
//! PostgreSQL the scripts find (or on a throwaway one) and prints the console's URL and a
//! viewer token. It seeds a tenant's budget tree (`acme`, two teams, four agents, per day),
//! a week of past traffic (so the reports have days to show; it draws on no budget, as a
//! budget's period is the database's day), then keeps four agents calling tools: mostly
//! allowed, some denied for a tool their session does not authorize, a tool's own limit,
//! the call budget or the wrong agent. Not for a database that holds anything else: it
//! writes demo rows.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use arbiter_session::budget::{BudgetId, BudgetTerms, Period};
use arbiter_session::clock::Clock;
use arbiter_session::operator::report::{self, ReportFilter};
use arbiter_session::server::{ConnectionLimits, Server, Tokens, serve_connections};
use arbiter_session::{CreateSessionRequest, PgStorage, SessionError, SessionStore, migrate};
use chrono::{DateTime, TimeDelta, Utc};
use tokio::net::TcpListener;
use uuid::Uuid;

/// An agent of the demo: its name, its budget, the tools its sessions authorize, and the
/// session it works in now.
struct Agent {
    name: &'static str,
    id: Uuid,
    budget: &'static str,
    tools: &'static [&'static str],
    session: Option<Uuid>,
}

const AGENTS: [(&str, &str, &[&str]); 4] = [
    (
        "ada",
        "acme/research/ada",
        &["search", "read_file", "run_sql"],
    ),
    (
        "lin",
        "acme/research/lin",
        &["search", "browse", "summarize"],
    ),
    (
        "sam",
        "acme/support/sam",
        &["search", "send_email", "read_ticket"],
    ),
    (
        "kim",
        "acme/support/kim",
        &["read_ticket", "send_email", "refund"],
    ),
];

/// Tools no demo session authorizes: an agent that tries one is denied.
const FORBIDDEN: [&str; 3] = ["delete_repo", "wire_money", "shell"];

/// The store's clock, `behind` the system's: it lets the demo make past days' traffic
/// through the same store code as today's.
#[derive(Debug)]
struct Behind(TimeDelta);

impl Clock for Behind {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() - self.0
    }
}

/// A small pseudo-random sequence (xorshift), so the demo needs no dependency for it.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        // Every list here is short and not empty.
        &items[usize::try_from(self.roll(items.len() as u64)).unwrap_or(0)]
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL, or run scripts/demo")?;
    let storage = PgStorage::connect(&url).await?;
    migrate(storage.pool()).await?;
    let mut agents: Vec<Agent> = AGENTS
        .iter()
        .map(|&(name, budget, tools)| Agent {
            name,
            id: Uuid::new_v4(),
            budget,
            tools,
            session: None,
        })
        .collect();
    let store = SessionStore::builder(storage.clone())
        .maintenance_interval(Some(Duration::from_secs(30)))
        .build();
    seed_budgets(&store).await?;
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    // The past week's sessions draw on no budget: a budget's period is the database's
    // day, so their calls would land in today's.
    for days_ago in (1..=7).rev() {
        let past = SessionStore::builder(storage.clone())
            .clock(Arc::new(Behind(TimeDelta::days(days_ago))))
            .maintenance_interval(None)
            .build();
        let calls = 40 + dice.roll(80);
        for _ in 0..calls {
            traffic(&past, &mut agents, &mut dice, false).await;
        }
        past.shutdown(Duration::from_secs(5)).await;
        // That day's sessions ended with it.
        for agent in &mut agents {
            agent.session = None;
        }
    }

    // 244 random bits each, from uuid's v4 generator.
    let secret = || format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let viewer = secret();
    let tokens = Tokens::new(&secret(), &secret())?.with_viewer(&viewer)?;
    let app = Server::new(store.clone(), tokens).router();
    let listen = std::env::var("DEMO_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let listener = match TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        // Taken: any free port will do for a look.
        Err(_) => TcpListener::bind("127.0.0.1:0").await?,
    };
    let address = listener.local_addr()?;
    println!("the console:   http://{address}/ui/");
    println!("viewer token:  {viewer}");
    println!("(demo agents calling tools in the background; Ctrl-C stops)");

    let live = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                traffic(&store, &mut agents, &mut dice, true).await;
                tokio::time::sleep(Duration::from_millis(100 + dice.roll(300))).await;
            }
        })
    };
    // DEMO_SECONDS bounds the run (scripts/test runs it for a few seconds).
    let seconds = std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let stop = async move {
        match seconds {
            Some(seconds) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    serve_connections(
        listener,
        app,
        ConnectionLimits::default(),
        stop,
        Duration::from_secs(2),
    )
    .await;
    live.abort();
    store.shutdown(Duration::from_secs(5)).await;
    // What the console showed, as `arbiter-session report agents` would sum it.
    let today = Utc::now().date_naive();
    let filter = ReportFilter::default().with_since(Some(today));
    let days = report::agent_activity(storage.pool(), filter).await?;
    let allowed: i64 = days.iter().map(|day| day.calls_allowed).sum();
    let denied: i64 = days.iter().map(|day| day.calls_denied).sum();
    println!("today: {allowed} calls allowed, {denied} denied");
    Ok(())
}

/// The tenant `acme` (5,000 calls a day), its teams and their agents.
async fn seed_budgets(store: &SessionStore) -> Result<(), Box<dyn Error>> {
    let tree = [
        ("acme", None, 5_000),
        ("acme/research", Some("acme"), 2_400),
        ("acme/support", Some("acme"), 1_600),
        ("acme/research/ada", Some("acme/research"), 900),
        ("acme/research/lin", Some("acme/research"), 700),
        ("acme/support/sam", Some("acme/support"), 500),
        ("acme/support/kim", Some("acme/support"), 400),
    ];
    for (id, parent, limit) in tree {
        let mut terms = BudgetTerms::new(limit);
        terms.period = Period::Day;
        terms.parent_id = parent.map(BudgetId::new).transpose()?;
        store.put_budget(&BudgetId::new(id)?, &terms).await?;
    }
    Ok(())
}

/// One step of an agent's work: a call in its session (a new session when it has none,
/// charged to the agent's budget if `charged`), allowed or denied as the store decides.
async fn traffic(store: &SessionStore, agents: &mut [Agent], dice: &mut Dice, charged: bool) {
    let index = usize::try_from(dice.roll(agents.len() as u64)).unwrap_or(0);
    let Some(agent) = agents.get_mut(index) else {
        return;
    };
    let session = match agent.session {
        Some(session) => session,
        None => match new_session(store, agent, dice, charged).await {
            Some(session) => session,
            None => return,
        },
    };
    agent.session = Some(session);
    let outcome = match dice.roll(20) {
        0 => {
            let tool = dice.pick(&FORBIDDEN);
            store.use_session(session, tool, Some(agent.id)).await
        }
        // Another agent presenting this session.
        1 => {
            let tool = agent.tools[0];
            store.use_session(session, tool, Some(Uuid::new_v4())).await
        }
        2 | 3 => {
            let batch = [*dice.pick(agent.tools), *dice.pick(agent.tools)];
            store
                .use_session_batch(session, &batch, Some(agent.id))
                .await
        }
        _ => {
            let tool = dice.pick(agent.tools);
            store.use_session(session, tool, Some(agent.id)).await
        }
    };
    match outcome {
        // Now and then an agent finishes early.
        Ok(_) if dice.roll(40) == 0 => {
            let _ = store.close(session).await;
            agent.session = None;
        }
        Ok(_) => {}
        // Spent, or over: the next step starts a new session.
        Err(
            SessionError::BudgetExceeded { .. }
            | SessionError::Expired(_)
            | SessionError::AlreadyClosed(_)
            | SessionError::NotFound(_),
        ) => {
            let _ = store.close(session).await;
            agent.session = None;
        }
        Err(_) => {}
    }
}

/// A new session for `agent`: a small call budget, 20 minutes, a limit of 3 on its third
/// tool, 40 calls a minute, charged to its budget if `charged`.
async fn new_session(
    store: &SessionStore,
    agent: &Agent,
    dice: &mut Dice,
    charged: bool,
) -> Option<Uuid> {
    let request = CreateSessionRequest::new(
        agent.id,
        agent.tools.iter().copied(),
        10 + dice.roll(30),
        chrono::Duration::minutes(20),
    )
    .with_tool_limit(agent.tools[2], 3)
    .with_rate_limit_per_minute(40)
    .with_declared_intent(format!("{}: demo task", agent.name));
    let request = if charged {
        request.with_budget(BudgetId::new(agent.budget).ok()?)
    } else {
        request
    };
    store.create(request).await.ok().map(|s| s.session_id)
}
