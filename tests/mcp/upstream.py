"""The upstream of the MCP proxy's end-to-end test: a server of the official MCP SDK
(`mcp` on PyPI) with the tools search, write_file and delete, each counting the calls
that reached it. GET /counts answers the counts, so the test can check that exactly the
allowed calls came through. `search` streams three progress notifications before its
result, and its result is large, so the answer is a real SSE stream.

Usage: python upstream.py PORT
"""

import sys

from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

# What search answers after its query: large enough to span many reads (100 kB).
PADDING = "0123456789" * 10_000

server = MCPServer("arbiter-test-upstream", log_level="WARNING")
counts = {"search": 0, "write_file": 0, "delete": 0}


@server.tool()
async def search(query: str, ctx: Context) -> str:
    """Searches; reports its progress as it goes."""
    counts["search"] += 1
    for step in range(1, 4):
        await ctx.report_progress(step, 3, f"step {step}")
    return f"results for {query}: {PADDING}"


@server.tool()
def write_file(path: str, content: str) -> str:
    """Writes a file."""
    counts["write_file"] += 1
    return f"wrote {len(content)} bytes to {path}"


@server.tool()
def delete(path: str) -> str:
    """Deletes a file."""
    counts["delete"] += 1
    return f"deleted {path}"


@server.custom_route("/counts", methods=["GET"])
async def get_counts(request: Request) -> JSONResponse:
    return JSONResponse(counts)


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
