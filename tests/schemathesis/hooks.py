"""What no JSON Schema can say about the service's bodies, taught to schemathesis's
generator (scripts/test runs it with SCHEMATHESIS_HOOKS pointing here). Each rule is
stated in the field's description in the OpenAPI document too:

* a tool named in tool_limits or tool_costs must be authorized by authorized_tools;
* tool_costs needs a budget_id, and a budget_id or parent_id must name a budget that
  exists (scripts/test creates `schemathesis-root` first);
* a time zone must be one PostgreSQL knows;
* a budget's period and time zone never change, and a budget cannot be its own ancestor,
  so each PUT names a budget of its own.

Everything else the generator makes is sent as it made it.
"""

import uuid

import schemathesis

ROOT_BUDGET = "schemathesis-root"


def _authorized(body, tool):
    tools = body.get("authorized_tools") or []
    return "*" in tools or tool in tools


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    """Applied to every request of every phase, just before it is sent."""
    method, path = case.method.upper(), case.operation.path
    body = case.body if isinstance(case.body, dict) else None
    if method == "POST" and path == "/v1/sessions" and body is not None:
        for field in ("tool_limits", "tool_costs"):
            if isinstance(body.get(field), dict):
                body[field] = {tool: value for tool, value in body[field].items() if _authorized(body, tool)}
        if body.get("budget_id") is not None or body.get("tool_costs"):
            body["budget_id"] = ROOT_BUDGET
    if method == "PUT" and path == "/v1/budgets/{budget_id}":
        if isinstance(case.path_parameters, dict):
            case.path_parameters["budget_id"] = f"st-{uuid.uuid4().hex}"
        if body is not None:
            if body.get("parent_id") is not None:
                body["parent_id"] = ROOT_BUDGET
            if body.get("time_zone") is not None:
                body["time_zone"] = "Europe/Paris"
