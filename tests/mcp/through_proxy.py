"""The official MCP SDK's client (`mcp` on PyPI) through arbiter-session's MCP proxy,
against a server of the same SDK (upstream.py). Run by scripts/test; exits non-zero on
the first check that fails.

The session allows `search` and `write_file` (a tool limit of 1) with a budget of 4
calls. Checked: list_tools shows exactly those two tools; the allowed calls return the
server's results, search's whole (100 kB, streamed over SSE after three progress
notifications); every denial arrives as an error the SDK raises, whose data holds the
denial's code; the upstream counted exactly the allowed calls; a wrong token is 401 and
reaches nothing.

Environment: ARBITER_URL (the service), ARBITER_ADMIN_TOKEN, UPSTREAM_URL (the
upstream's base URL, for its /counts).
"""

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
import uuid

import httpx2
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client

ARBITER = os.environ["ARBITER_URL"]
ADMIN = os.environ["ARBITER_ADMIN_TOKEN"]
UPSTREAM = os.environ["UPSTREAM_URL"]
PADDING = "0123456789" * 10_000


def fail(message):
    sys.exit(f"through_proxy: {message}")


def check(condition, message):
    if not condition:
        fail(message)


def http(method, url, token=None, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json, text/event-stream")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def create_session():
    status, session = http(
        "POST",
        f"{ARBITER}/v1/sessions",
        ADMIN,
        {
            "agent_id": str(uuid.uuid4()),
            "authorized_tools": ["search", "write_file"],
            "call_budget": 4,
            "time_limit_secs": 600,
            "tool_limits": {"write_file": 1},
        },
    )
    check(status == 201, f"create: {status} {session}")
    return session["session_token"]


def text_of(result):
    check(not result.is_error, f"a tool failed: {result}")
    return "".join(block.text for block in result.content if block.type == "text")


async def expect_denied(call, code):
    try:
        result = await call
    except MCPError as err:
        check(err.data and err.data.get("error") == code, f"denied as {err.data}, not {code}")
        print(f"  denied as the SDK raises it: {err.message} ({code})")
        return
    fail(f"a call that should be denied ({code}) was answered: {result}")


async def main():
    token = create_session()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as client:
        async with streamable_http_client(f"{ARBITER}/mcp", http_client=client) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()

                listed = sorted(tool.name for tool in (await session.list_tools()).tools)
                check(listed == ["search", "write_file"], f"list_tools shows {listed}")
                print(f"list_tools: {listed}")

                wrote = text_of(await session.call_tool("write_file", {"path": "a.txt", "content": "hello"}))
                check(wrote == "wrote 5 bytes to a.txt", f"write_file answered {wrote!r}")
                print(f"write_file: {wrote}")
                await expect_denied(session.call_tool("write_file", {"path": "b.txt", "content": "x"}), "budget_exceeded")
                await expect_denied(session.call_tool("delete", {"path": "a.txt"}), "tool_not_authorized")

                for n in range(1, 4):
                    progress = []

                    async def on_progress(done, total, message, progress=progress):
                        progress.append(done)

                    found = text_of(await session.call_tool("search", {"query": f"q{n}"}, progress_callback=on_progress))
                    check(found == f"results for q{n}: {PADDING}", f"search {n}: {len(found)} characters, not whole")
                    check(progress == [1, 2, 3], f"search {n}: progress {progress}")
                    print(f"search {n}: {len(found)} characters, whole, after progress {progress}")
                await expect_denied(session.call_tool("search", {"query": "q4"}), "budget_exceeded")

    status, counts = http("GET", f"{UPSTREAM}/counts")
    check(status == 200, f"counts: {status}")
    check(counts == {"search": 3, "write_file": 1, "delete": 0}, f"the upstream counted {counts}")
    print(f"the upstream counted exactly the allowed calls: {counts}")

    status, body = http("POST", f"{ARBITER}/mcp", "arb_" + "0" * 32 + "_" + "0" * 64,
                        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    check(status == 401, f"a wrong token: {status} {body}")
    status, counts = http("GET", f"{UPSTREAM}/counts")
    check(counts == {"search": 3, "write_file": 1, "delete": 0}, f"after a wrong token: {counts}")
    print("a wrong token: 401, nothing forwarded")


if __name__ == "__main__":
    asyncio.run(main())
