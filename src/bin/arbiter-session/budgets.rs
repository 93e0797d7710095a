//! `arbiter-session budgets`: list, show and set the budgets sessions share.

use arbiter_session::budget::{BudgetId, BudgetTerms, BudgetUsage, BudgetWrite, Period};
use arbiter_session::operator::report::{self, Tabular};
use arbiter_session::{SessionError, SessionStore};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::shell::{Failure, OutputFormat};

/// What `arbiter-session budgets` does.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BudgetsAction {
    /// Every budget, with its current period's usage.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// One budget, with its current period's usage.
    Show {
        /// The budget id.
        budget_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Create a budget, or replace all its terms (an option not given takes its default).
    Set {
        /// The budget id: 1 to 128 characters of A-Z, a-z, 0-9, '.', ':', '/' and '-'.
        budget_id: String,
        /// Units allowed per period.
        #[arg(long)]
        limit: u64,
        /// none (one period that never ends), day or month.
        #[arg(long, default_value = "none")]
        period: String,
        /// The budget charged with this one's charges too.
        #[arg(long)]
        parent: Option<String>,
        /// What a unit is (calls, tokens, usd_micros, …).
        #[arg(long, default_value = "calls")]
        unit: String,
        /// The IANA time zone whose midnight starts a day or a month.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
}

/// A budget as the command prints it.
#[derive(Debug, Serialize)]
struct BudgetLine {
    budget_id: String,
    parent_id: Option<String>,
    limit: u64,
    period: Period,
    unit: String,
    time_zone: String,
    period_start: DateTime<Utc>,
    period_end: Option<DateTime<Utc>>,
    used: u64,
    reserved: u64,
    remaining: u64,
}

impl From<&BudgetUsage> for BudgetLine {
    fn from(b: &BudgetUsage) -> Self {
        BudgetLine {
            budget_id: b.budget_id.to_string(),
            parent_id: b.terms.parent_id.as_ref().map(ToString::to_string),
            limit: b.terms.limit,
            period: b.terms.period,
            unit: b.terms.unit.clone(),
            time_zone: b.terms.time_zone.clone(),
            period_start: b.period_start,
            period_end: b.period_end,
            used: b.used,
            reserved: b.reserved,
            remaining: b.remaining(),
        }
    }
}

impl Tabular for BudgetLine {
    const COLUMNS: &'static [&'static str] = &[
        "budget_id",
        "parent_id",
        "limit",
        "period",
        "unit",
        "time_zone",
        "period_start",
        "used",
        "reserved",
        "remaining",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.budget_id.clone(),
            self.parent_id.clone().unwrap_or_default(),
            self.limit.to_string(),
            self.period.to_string(),
            self.unit.clone(),
            self.time_zone.clone(),
            self.period_start.format("%Y-%m-%d %H:%M:%S").to_string(),
            self.used.to_string(),
            self.reserved.to_string(),
            self.remaining.to_string(),
        ]
    }
}

/// The failure for `err`, naming why a request was refused: the operator wrote it (the
/// error's `Display`, meant for agents, does not say).
fn refused(err: SessionError) -> Failure {
    match err {
        SessionError::InvalidRequest { reason } => Failure(reason),
        other => Failure::from(other),
    }
}

/// Runs the action and prints what it shows (`set` prints the budget as it now is).
pub(crate) async fn run(pool: &PgPool, action: BudgetsAction) -> Result<(), Failure> {
    let store = SessionStore::postgres(pool.clone());
    let (budgets, format) = match action {
        BudgetsAction::List { format } => (store.budgets().await?, format),
        BudgetsAction::Show { budget_id, format } => {
            let id = BudgetId::new(budget_id).map_err(refused)?;
            let budget = store.budget(&id).await?;
            let budget = budget.ok_or_else(|| Failure(format!("budget {id} not found")))?;
            (vec![budget], format)
        }
        BudgetsAction::Set {
            budget_id,
            limit,
            period,
            parent,
            unit,
            time_zone,
        } => {
            let id = BudgetId::new(budget_id).map_err(refused)?;
            let mut terms = BudgetTerms::new(limit);
            terms.period = period.parse().map_err(refused)?;
            terms.parent_id = parent.map(BudgetId::new).transpose().map_err(refused)?;
            terms.unit = unit;
            terms.time_zone = time_zone;
            let done = match store.put_budget(&id, &terms).await.map_err(refused)? {
                BudgetWrite::Created => "created",
                BudgetWrite::Replaced => "replaced",
            };
            eprintln!("budget {id} {done}");
            let budget = store.budget(&id).await?;
            let budget = budget.ok_or_else(|| Failure(format!("budget {id} not found")))?;
            (vec![budget], OutputFormat::Table)
        }
    };
    let lines: Vec<BudgetLine> = budgets.iter().map(BudgetLine::from).collect();
    print!("{}", report::render(&lines, format.into())?);
    Ok(())
}
