//! The OpenAPI document (`/openapi.json`): generated from the handlers (`routes`) and the
//! bodies (`api`), with the schemas of constrained fields written here, and the links a
//! stateful client follows from a created session to the routes that take its id.
//!
//! # Invariant: a request the schema calls valid is never refused as invalid
//! Every field the service checks has its check in the schema, as stated or stricter:
//! names are 1 to 64 printable ASCII characters where the library takes 256 bytes, and
//! lists and maps are sized so that any valid body stays under the 64 KiB limit. What no
//! JSON Schema can state (a tool limit or cost names an authorized tool, tool costs need a
//! budget, a budget or parent named must exist, a time zone must be one PostgreSQL knows)
//! is in the field's description; `tests/schemathesis/hooks.py` teaches the generator the
//! same rules. So a client generator that trusts the schema sends nothing answered 400.

use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::{RefOr, Schema};

use super::api::{
    BudgetBody, BudgetList, BudgetView, CloseAnswer, Closed, CreateBody, CreatedView, ErrorBody,
    EventPage, EventView, Health, LiveCount, ReserveAnswer, ReserveBody, SessionPage, SessionView,
    SettleAnswer, SettleBody, StatusFilter, SummaryView, ToolLimitView, UseAnswer, UseBatchBody,
    UseBody, WarningView,
};
use super::{reports, routes};
use crate::model::limits::{MAX_COST, MAX_COUNT, MAX_RATE_WINDOW_SECS};
use crate::operator::report::SessionLine;

/// The pattern of a tool, credential or delegation entry in the schema.
pub(crate) const NAME_PATTERN: &str = "^[!-~]{1,64}$";
/// The pattern of a budget id (`crate::budget::BudgetId`).
pub(crate) const BUDGET_ID_PATTERN: &str = "^[A-Za-z0-9.:/-]{1,128}$";
/// Most tools a body names in the schema (`authorized_tools`, `tools`, the keys of
/// `tool_limits` and `tool_costs`).
const MAX_TOOLS: usize = 64;
/// Most entries of `authorized_credentials` and `delegation_chain` in the schema.
const MAX_ENTRIES: usize = 16;
/// Longest `declared_intent` in the schema, in characters (4 bytes each at most: the
/// library's bound is 4096 bytes).
const MAX_INTENT_CHARS: usize = 1024;

/// The document served at `/openapi.json`, with the links from a created session (201 of
/// `POST /v1/sessions`) to the routes that take its `session_id`, so a stateful tester
/// goes on from a create to its use. Not to `reserve`: a reservation needs a session with
/// a shared budget, which a link cannot promise. (The links are written as JSON: utoipa
/// 5 names a link's fields in snake case, where OpenAPI has `operationId`.)
pub(crate) fn document() -> Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    let links: serde_json::Map<String, Value> = [
        "get_session",
        "session_events",
        "use_session",
        "use_batch",
        "close",
    ]
    .into_iter()
    .map(|operation| {
        let link = json!({
            "operationId": operation,
            "parameters": { "id": "$response.body#/session_id" },
            "description": format!("`{operation}` of the created session"),
        });
        (operation.to_owned(), link)
    })
    .collect();
    if let Some(created) = document.pointer_mut("/paths/~1v1~1sessions/post/responses/201") {
        created["links"] = Value::Object(links);
    }
    never_null_parameters(&mut document);
    document
}

/// A header or path parameter is text or absent, never `null`: utoipa types an optional
/// one `[T, "null"]`, which a generator would send as the text `null`.
fn never_null_parameters(document: &mut Value) {
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut());
    for operation in operations {
        let Some(parameters) = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for parameter in parameters {
            if let Some(types) = parameter
                .pointer_mut("/schema/type")
                .and_then(Value::as_array_mut)
            {
                types.retain(|kind| kind != "null");
                if let [single] = types.as_slice() {
                    let single = single.clone();
                    if let Some(schema) = parameter.get_mut("schema") {
                        schema["type"] = single;
                    }
                }
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "arbiter-session", description = "Durable task sessions for AI-agent gateways"),
    paths(
        routes::create,
        routes::list_sessions,
        routes::get_session,
        routes::session_events,
        routes::use_session,
        routes::use_batch,
        routes::reserve,
        routes::settle,
        routes::close,
        routes::live_sessions,
        routes::close_all,
        routes::put_budget,
        routes::get_budget,
        routes::list_budgets,
        reports::agents,
        reports::tools,
        reports::denials,
        reports::utilization,
        reports::budgets,
        reports::overview,
        routes::check,
        routes::healthz,
        routes::readyz,
        routes::metrics
    ),
    components(schemas(
        CreateBody,
        CreatedView,
        SessionView,
        EventPage,
        EventView,
        SessionPage,
        SessionLine,
        StatusFilter,
        ToolLimitView,
        UseBody,
        UseBatchBody,
        UseAnswer,
        WarningView,
        ReserveBody,
        ReserveAnswer,
        SettleBody,
        SettleAnswer,
        LiveCount,
        CloseAnswer,
        SummaryView,
        Closed,
        BudgetBody,
        BudgetView,
        BudgetList,
        Health,
        ErrorBody
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// A tool, credential or delegation entry.
pub(crate) fn name() -> Schema {
    name_builder().into()
}

fn name_builder() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(64))
        .pattern(Some(NAME_PATTERN))
}

fn names(min: usize, max: usize, description: &str) -> Schema {
    ArrayBuilder::new()
        .items(name_builder())
        .min_items(Some(min))
        .max_items(Some(max))
        .description(Some(description))
        .into()
}

/// `schema`, or null (an optional field a client may send as `null`).
fn optional(schema: Schema) -> Schema {
    match schema {
        Schema::Object(mut object) => {
            let single = match &object.schema_type {
                SchemaType::Type(single) => single.clone(),
                _ => Type::Object,
            };
            object.schema_type = SchemaType::from_iter([single, Type::Null]);
            Schema::Object(object)
        }
        Schema::Array(mut array) => {
            array.schema_type = SchemaType::from_iter([Type::Array, Type::Null]);
            Schema::Array(array)
        }
        other => other,
    }
}

/// `schema` with `text` as its description.
fn described(schema: Schema, text: &str) -> Schema {
    match schema {
        Schema::Object(mut object) => {
            object.description = Some(text.to_owned());
            Schema::Object(object)
        }
        Schema::Array(mut array) => {
            array.description = Some(text.to_owned());
            Schema::Array(array)
        }
        other => other,
    }
}

/// `call_budget`.
pub(crate) fn call_budget() -> Schema {
    described(count(), "Total calls allowed.")
}

/// `rate_limit_per_minute`.
pub(crate) fn rate_limit_per_minute() -> Schema {
    described(
        optional_count(),
        "Calls allowed per rate window; none by default.",
    )
}

/// `delegation_chain`.
pub(crate) fn delegation_chain() -> Schema {
    described(
        entries(),
        "Who delegated to the agent, outermost first (at most 16).",
    )
}

/// `authorized_credentials`.
pub(crate) fn authorized_credentials() -> Schema {
    described(
        entries(),
        "Credentials the agent may use (at most 16); [\"*\"] allows every one.",
    )
}

/// `budget_id` of a session.
pub(crate) fn session_budget_id() -> Schema {
    described(
        budget_id(),
        "The shared budget the session's calls are charged to; it must exist.",
    )
}

/// `authorized_tools`.
pub(crate) fn authorized_tools() -> Schema {
    names(
        0,
        MAX_TOOLS,
        "Tools the agent may call; [\"*\"] allows every tool, [] none.",
    )
}

/// `tools` of a batch.
pub(crate) fn batch_tools() -> Schema {
    names(1, MAX_TOOLS, "The tools, one call each, all or nothing.")
}

/// `authorized_credentials` and `delegation_chain`.
pub(crate) fn entries() -> Schema {
    optional(names(0, MAX_ENTRIES, "At most 16 entries."))
}

/// A whole number from `min` to `max`.
pub(crate) fn whole(min: u64, max: u64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(usize::try_from(min).unwrap_or(usize::MAX)))
        .maximum(Some(usize::try_from(max).unwrap_or(usize::MAX)))
}

/// A count: 1 to `i64::MAX`.
pub(crate) fn count() -> Schema {
    whole(1, MAX_COUNT).into()
}

/// An optional count.
pub(crate) fn optional_count() -> Schema {
    optional(count())
}

/// `time_limit_secs`: 1 s to 24 h.
pub(crate) fn time_limit_secs() -> Schema {
    described(
        whole(1, 24 * 60 * 60).into(),
        "How long the session lives, in seconds.",
    )
}

/// `rate_limit_window_secs`.
pub(crate) fn rate_window_secs() -> Schema {
    described(
        optional(whole(1, MAX_RATE_WINDOW_SECS).into()),
        "Length of the rate window in seconds (default 60).",
    )
}

/// A cost in a shared budget's units: 0 to `MAX_COST`.
pub(crate) fn cost() -> Schema {
    whole(0, MAX_COST).into()
}

/// An optional cost.
pub(crate) fn optional_cost() -> Schema {
    optional(cost())
}

/// An estimate: 1 to `MAX_COST`.
pub(crate) fn estimate() -> Schema {
    whole(1, MAX_COST).into()
}

/// `max_live_sessions`.
pub(crate) fn max_live_sessions() -> Schema {
    described(
        optional(whole(0, MAX_COUNT).into()),
        "Refuse the create (429 too_many_sessions) if the agent already has this many live \
         sessions, decided across every process.",
    )
}

/// `declared_intent`: free text without NUL.
pub(crate) fn declared_intent() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX_INTENT_CHARS))
            .pattern(Some("^[^\\u0000]*$"))
            .description(Some("What the agent says it is doing, for audit."))
            .into(),
    )
}

/// `data_sensitivity_ceiling`.
pub(crate) fn sensitivity() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["public", "internal", "confidential", "restricted"]))
            .description(Some("The most sensitive data the session may touch."))
            .into(),
    )
}

/// A map from tool names to whole numbers from `min` to `max`.
fn tool_map(min: u64, max: u64, description: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(name()))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(
            whole(min, max).into(),
        ))))
        .max_properties(Some(MAX_TOOLS))
        .description(Some(description))
        .into()
}

/// `tool_limits`.
pub(crate) fn tool_limits() -> Schema {
    tool_map(
        1,
        MAX_COUNT,
        "Call limits of single tools inside the budget, by tool name; each tool must be \
         authorized by authorized_tools.",
    )
}

/// `tool_costs`.
pub(crate) fn tool_costs() -> Schema {
    tool_map(
        0,
        MAX_COST,
        "What a call of a tool costs in the shared budget, by tool name (a tool without an \
         entry costs 1); only with budget_id, each tool authorized by authorized_tools.",
    )
}

/// A budget's limit: 0 to `i64::MAX`.
pub(crate) fn limit() -> Schema {
    whole(0, MAX_COUNT).into()
}

/// A budget's period.
pub(crate) fn period() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["none", "day", "month"]))
            .into(),
    )
}

/// A budget's unit.
pub(crate) fn unit() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_.:/-]{1,32}$"))
            .into(),
    )
}

/// A budget's time zone.
pub(crate) fn time_zone() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_+/-]{1,64}$"))
            .description(Some(
                "The IANA time zone whose midnight starts a day or a month (default UTC); \
                 it must be one PostgreSQL knows (pg_timezone_names).",
            ))
            .into(),
    )
}

/// A budget id.
pub(crate) fn budget_id() -> Schema {
    optional(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(BUDGET_ID_PATTERN))
            .into(),
    )
}
