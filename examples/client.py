#!/usr/bin/env python3
"""A gateway's side of `arbiter-session serve`, with Python's standard library only.

Creates a session (admin token), shows a denied tool, asks before every tool call until
the budget denies (gateway token), and closes the session. Exits non-zero if the
service answers anything unexpected, so `scripts/test` runs it as a check.

    ARBITER_URL=http://127.0.0.1:8080 ARBITER_ADMIN_TOKEN=... ARBITER_GATEWAY_TOKEN=... \
        python3 examples/client.py
"""

import json
import os
import sys
import urllib.error
import urllib.request
import uuid

BASE = os.environ.get("ARBITER_URL", "http://127.0.0.1:8080")
ADMIN = os.environ["ARBITER_ADMIN_TOKEN"]
GATEWAY = os.environ["ARBITER_GATEWAY_TOKEN"]


def call(method, path, token, body=None):
    """Sends one request; returns (status, JSON body). Errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def expect(answer, status, what):
    if answer[0] != status:
        sys.exit(f"{what}: expected {status}, got {answer[0]} {answer[1]}")
    return answer[1]


def main():
    agent = str(uuid.uuid4())
    session = expect(
        call("POST", "/v1/sessions", ADMIN, {
            "agent_id": agent,
            "authorized_tools": ["search", "fetch"],
            "call_budget": 3,
            "time_limit_secs": 300,
            "declared_intent": "python client example",
        }),
        201,
        "create",
    )
    session_id = session["session_id"]
    print(f"created {session_id}: {session['calls_remaining']} calls")

    use = f"/v1/sessions/{session_id}/use"
    status, body = call("POST", use, GATEWAY, {"tool": "rm", "agent_id": agent})
    if (status, body["error"]) != (403, "tool_not_authorized"):
        sys.exit(f"rm should be refused: {status} {body}")
    print(f"tool rm: deny {status} {body['error']}")

    for n in range(1, 5):
        status, body = call("POST", use, GATEWAY, {"tool": "search", "agent_id": agent})
        if status == 200:
            warnings = ", ".join(body["warnings"]) or "none"
            print(f"call {n}: allow, {body['calls_remaining']} left, "
                  f"{body['seconds_remaining']} s left, warnings: {warnings}")
        else:
            print(f"call {n}: deny {status} {body['error']} ({body['message']})")
            if (n, status, body["error"]) != (4, 429, "budget_exceeded"):
                sys.exit("the budget should deny the fourth call, and only it")

    closed = expect(call("POST", f"/v1/sessions/{session_id}/close", ADMIN), 200, "close")
    summary = closed["summary"]
    print(f"closed: status {closed['status']}, {summary['calls_made']} of "
          f"{summary['call_budget']} calls ({summary['budget_used_percent']} %), "
          f"denied: {summary['denials']}")
    if summary["denials"] != {"tool": 1, "budget": 1}:
        sys.exit(f"the trail should hold one tool and one budget denial: {summary}")


if __name__ == "__main__":
    main()
