#!/usr/bin/env python3
"""Drives the operator's console (served at <base>/ui/) in headless Chromium.

Standard library only: talks to chromedriver over the W3C WebDriver HTTP protocol and to
the service over its JSON API. Seeds budgets, sessions and calls, then walks every page
of the console and checks what it shows. Exits non-zero, with the reason, on the first
failed expectation, or if the browser logged a CSP violation or a JavaScript error.

    python3 tests/console/browser.py --base http://127.0.0.1:PORT \
        --viewer-token T --gateway-token G --admin-token A --screenshots DIR
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C web element reference key
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--window-size=1280,900"]


class Failure(Exception):
    """A failed expectation: the message says what was expected."""


def step(msg: str) -> None:
    print(f"console: {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# The service's API

class Api:
    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def __call__(self, method: str, path: str, token: str | None, body=None,
                 expect: tuple[int, ...] | None = (200, 201)):
        """Returns (status, decoded JSON or None); raises Failure on an unexpected status."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                status, raw = res.status, res.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if expect is not None and status not in expect:
            raise Failure(f"{method} {path} answered {status} (expected {expect}): {raw[:300]!r}")
        return status, payload


# ------------------------------------------------------------------------------------------
# WebDriver

class WebDriver:
    def __init__(self, url: str):
        self.url = url
        self.sid: str | None = None
        self.logs: list[dict] = []

    def call(self, method: str, path: str, body=None, timeout: float = 60):
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                raw = res.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                value = json.loads(raw).get("value", {})
            except ValueError:
                value = {"error": str(e.code), "message": raw[:300].decode(errors="replace")}
            raise WebDriverError(value.get("error", "?"), value.get("message", "")) from None
        return json.loads(raw).get("value") if raw else None

    def s(self, method: str, path: str, body=None):
        return self.call(method, f"/session/{self.sid}{path}", body)

    def start(self) -> None:
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": CHROME_ARGS},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        self.sid = self.call("POST", "/session", caps)["sessionId"]

    def quit(self) -> None:
        if self.sid:
            try:
                self.call("DELETE", f"/session/{self.sid}", timeout=20)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self.sid = None

    # Navigation and elements
    def get(self, url: str) -> None:
        self.s("POST", "/url", {"url": url})

    def refresh(self) -> None:
        self.s("POST", "/refresh")

    def current_url(self) -> str:
        return self.s("GET", "/url")

    def find(self, css: str) -> str:
        return self.s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.s("POST", "/elements", {"using": "css selector", "value": css})]

    def click(self, el: str) -> None:
        self.s("POST", f"/element/{el}/click")

    def send_keys(self, el: str, text: str) -> None:
        self.s("POST", f"/element/{el}/value", {"text": text})

    def text(self, el: str) -> str:
        return self.s("GET", f"/element/{el}/text")

    def attr(self, el: str, name: str) -> str | None:
        return self.s("GET", f"/element/{el}/attribute/{quote(name, safe='')}")

    def js(self, script: str, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.s("GET", "/screenshot")))

    def wait_for(self, predicate, what: str, timeout: float = 10.0):
        """Polls predicate every 100 ms until it returns something truthy; returns that."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except WebDriverError as e:  # not there yet, or replaced by a re-render
                last_error = e
            if time.monotonic() > deadline:
                extra = f" (last error: {last_error})" if last_error else ""
                raise Failure(f"timed out after {timeout:g} s waiting for {what}{extra}")
            time.sleep(0.1)

    def collect_logs(self) -> None:
        """Drains the browser console log (chromedriver keeps the legacy /se/log endpoint)."""
        if not self.sid:
            return
        for method, path, body in (("POST", "/se/log", {"type": "browser"}),
                                   ("POST", "/log", {"type": "browser"})):
            try:
                self.logs.extend(self.s(method, path, body) or [])
                return
            except WebDriverError:
                continue
        # Without the log, a CSP violation or a script error would pass unseen.
        raise Failure("this chromedriver exposes no browser log: CSP and script errors cannot be checked")


class WebDriverError(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message.splitlines()[0] if message else ''}")
        self.error = error


def problems_in(logs: list[dict]) -> list[str]:
    """CSP violations, uncaught exceptions and console.error calls. Failed HTTP answers
    ("Failed to load resource: ... 403") are expected when a wrong token is tried."""
    bad = []
    for entry in logs:
        msg = entry.get("message", "")
        source = entry.get("source", "")
        if "Content Security Policy" in msg or "Content-Security-Policy" in msg:
            bad.append(f"CSP violation: {msg}")
        elif entry.get("level") == "SEVERE" and source != "network" and "Failed to load resource" not in msg:
            bad.append(f"{source or 'browser'} error: {msg}")
    return bad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromedriver() -> str:
    found = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None)
    if not found:
        raise Failure("chromedriver not found (apt-get install chromium-driver)")
    if not os.access(CHROMIUM, os.X_OK):
        raise Failure(f"{CHROMIUM} not found (apt-get install chromium)")
    return found


def start_chromedriver() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([find_chromedriver(), f"--port={port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failure(f"chromedriver exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/status", timeout=2) as res:
                if json.loads(res.read())["value"].get("ready"):
                    return proc, url
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise Failure("chromedriver did not become ready within 20 s")


def as_int(text: str) -> int:
    digits = re.sub(r"\D", "", text or "")
    if not digits:
        raise Failure(f"expected a number, got {text!r}")
    return int(digits)


# ------------------------------------------------------------------------------------------
# The scenario

# A tool name that would run script if a page wrote it as markup (printable ASCII, no
# space, as the OpenAPI document allows): the console must show it as text.
HOSTILE_TOOL = "<img/src=x/onerror=window.__xss=1>"


def seed(api: Api, admin: str, gateway: str) -> list[dict]:
    budget = {"limit": 100, "period": "day", "unit": "calls", "time_zone": "UTC"}
    api("PUT", "/v1/budgets/demo-team", admin, budget)
    api("PUT", "/v1/budgets/demo-team/alice", admin, {**budget, "limit": 40, "parent_id": "demo-team"})
    sessions = []
    for i in range(3):
        agent = str(uuid.uuid4())
        _, body = api("POST", "/v1/sessions", admin, {
            "agent_id": agent, "authorized_tools": ["search", "write_file", HOSTILE_TOOL], "call_budget": 20,
            "time_limit_secs": 3600, "declared_intent": "console test",
            "tool_limits": {"write_file": 2}, "budget_id": "demo-team/alice"})
        sid = body["session_id"]
        calls = i + 1  # 1, 2 and 3 calls: 6 in all
        for _ in range(calls):
            api("POST", f"/v1/sessions/{sid}/use", gateway, {"tool": "search", "agent_id": agent}, expect=(200,))
        sessions.append({"id": sid, "agent": agent, "calls": calls})
    step(f"seeded budgets demo-team, demo-team/alice and {len(sessions)} sessions with 6 calls")
    return sessions


def login(wd: WebDriver, token: str) -> None:
    wd.wait_for(lambda: wd.js("return !document.getElementById('login-view').hidden"), "the login form")
    field = wd.find("#login #token")
    wd.send_keys(field, token)
    wd.click(wd.find("#login button[type=submit]"))


def nav(wd: WebDriver, page: str) -> None:
    wd.click(wd.find(f'#nav a[data-page="{page}"]'))
    wd.wait_for(lambda: wd.js("return location.hash").startswith(f"#/{page}"), f"#/{page}")


def budget_used(wd: WebDriver, budget_id: str) -> int:
    css = f'.budget-bar[data-budget-id="{budget_id}"]'
    el = wd.wait_for(lambda: wd.find(css), f"the bar of budget {budget_id}")
    return int(wd.attr(el, "data-used"))


def overview_denials(wd: WebDriver) -> int:
    text = wd.wait_for(lambda: re.search(r"\d", t := wd.text(wd.find("#overview-denials"))) and t,
                       "the overview's denials figure")
    return as_int(text)


def run(args, wd: WebDriver, shots: Path) -> None:
    api = Api(args.base)
    ui = args.base.rstrip("/") + "/ui"

    # The CSP is what guarantees that the page talks to no other host.
    with urllib.request.urlopen(ui + "/", timeout=30) as res:
        csp = res.headers.get("content-security-policy", "")
    if "default-src 'none'" not in csp:
        raise Failure(f"{ui}/ is served without default-src 'none' in its CSP: {csp!r}")
    step("ui served with a Content-Security-Policy of default-src 'none'")

    sessions = seed(api, args.admin_token, args.gateway_token)

    wd.get(ui)
    wd.wait_for(lambda: wd.current_url().split("#")[0].endswith("/ui/"), "the redirect to /ui/")
    wd.wait_for(lambda: wd.js("return !document.getElementById('login-view').hidden"), "the login form")
    step("login form shown")

    login(wd, args.viewer_token)

    def overview_shown():
        if wd.js("return !document.getElementById('login-view').hidden"):
            refused = wd.text(wd.find("#login-error"))
            if refused:
                raise Failure(f"the viewer token was refused: {refused}")
        return re.search(r"\d", wd.text(wd.find("#overview-live")))
    wd.wait_for(overview_shown, "the overview's figures")
    wd.wait_for(lambda: wd.find_all(".chart-box svg rect.seg"), "the calls-per-minute chart")
    step(f"viewer logged in; overview: {wd.text(wd.find('#overview-live'))} live sessions, "
         f"{wd.text(wd.find('#overview-calls'))} calls in the last hour")
    wd.screenshot(shots / "overview.png")

    nav(wd, "sessions")
    ids = [x["id"] for x in sessions]
    wd.wait_for(lambda: all(wd.find_all(f'tr.session-row[data-session-id="{i}"]') for i in ids),
                "the 3 seeded sessions in the table")
    step("sessions table lists the 3 seeded sessions")
    wd.screenshot(shots / "sessions.png")

    chosen = sessions[-1]
    wd.click(wd.find(f'tr.session-row[data-session-id="{chosen["id"]}"] a'))
    wd.wait_for(lambda: "verified" in wd.text(wd.find("#chain-verdict")), "the chain verdict 'verified'")
    want = 1 + chosen["calls"]
    rows = wd.wait_for(lambda: len(wd.find_all("tr.event-row")) >= want and wd.find_all("tr.event-row"),
                       f"at least {want} timeline rows")
    kinds = [wd.attr(r, "data-kind") for r in rows]
    if kinds[0] != "created" or kinds.count("call_allowed") < chosen["calls"]:
        raise Failure(f"timeline kinds {kinds}: expected created then {chosen['calls']} call_allowed")
    step(f"session {chosen['id']}: chain verified, {len(rows)} events ({', '.join(kinds)})")
    shown = wd.js("return document.body.textContent.includes(arguments[0])", HOSTILE_TOOL)
    ran = wd.js("return window.__xss !== undefined || document.querySelector('#view img') !== null")
    if not shown or ran:
        raise Failure(f"the tool {HOSTILE_TOOL!r} was not shown as text (shown: {shown}, ran: {ran})")
    step("a tool named as markup is shown as text")
    wd.screenshot(shots / "session.png")

    nav(wd, "budgets")
    before = budget_used(wd, "demo-team/alice")
    for _ in range(3):
        api("POST", f"/v1/sessions/{chosen['id']}/use", args.gateway_token,
            {"tool": "search", "agent_id": chosen["agent"]}, expect=(200,))

    def used_went_up():
        wd.refresh()
        now = budget_used(wd, "demo-team/alice")
        if now > before + 3:
            raise Failure(f"budget demo-team/alice used went {before} → {now}, expected +3")
        if now == before + 3:
            return True
        time.sleep(0.5)
        return False
    wd.wait_for(used_went_up, "budget demo-team/alice's used to grow by 3", timeout=15)
    step(f"budget demo-team/alice used {before} → {before + 3}")
    wd.screenshot(shots / "budgets.png")

    nav(wd, "overview")
    denials = overview_denials(wd)
    api("POST", f"/v1/sessions/{chosen['id']}/use", args.gateway_token,
        {"tool": "delete", "agent_id": chosen["agent"]}, expect=(403,))
    # No reload: the overview must refresh itself (every 3 s).
    after = wd.wait_for(lambda: (n := overview_denials(wd)) > denials and n,
                        "the overview's denials figure to grow", timeout=15)
    step(f"overview denials {denials} → {after} after a denied call")
    wd.screenshot(shots / "overview-denial.png")

    nav(wd, "reports")

    def report_rows():
        if wd.find_all("#report-table tr.report-row"):
            return True
        if "No rows" in wd.text(wd.find("#report-table")):
            time.sleep(1)  # today's figures may lag a little: ask again
            wd.click(wd.find("#report-form button[type=submit]"))
        return False
    wd.wait_for(report_rows, "a row in the report table", timeout=15)
    step(f"reports: {len(wd.find_all('#report-table tr.report-row'))} rows")
    wd.screenshot(shots / "reports.png")

    wd.collect_logs()
    wd.click(wd.find("#sign-out"))
    wd.wait_for(lambda: wd.js("return !document.getElementById('login-view').hidden"), "the login form after sign out")
    if wd.js("return sessionStorage.getItem('arbiter-token')") is not None:
        raise Failure("sign out left the token in sessionStorage")
    step("signed out")

    login(wd, args.gateway_token)
    message = wd.wait_for(
        lambda: wd.js("return !document.getElementById('login-view').hidden") and wd.text(wd.find("#login-error")),
        "the login form to come back with an error for the gateway token")
    if wd.js("return sessionStorage.getItem('arbiter-token')") is not None:
        raise Failure("a refused token stayed in sessionStorage")
    step(f"gateway token refused: {message}")
    wd.screenshot(shots / "gateway-refused.png")

    wd.collect_logs()
    bad = problems_in(wd.logs)
    if bad:
        raise Failure("the browser logged errors:\n  " + "\n  ".join(bad))
    step(f"browser log: {len(wd.logs)} entries, no CSP violation, no JavaScript error")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="service base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--viewer-token", required=True)
    p.add_argument("--gateway-token", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--screenshots", required=True, type=Path)
    args = p.parse_args()
    args.screenshots.mkdir(parents=True, exist_ok=True)

    driver_proc = None
    wd = None
    try:
        driver_proc, url = start_chromedriver()
        wd = WebDriver(url)
        wd.start()
        run(args, wd, args.screenshots)
        step("all checks passed")
        return 0
    except (Failure, WebDriverError, OSError) as e:
        print(f"console: FAILED: {e}", file=sys.stderr, flush=True)
        if wd and wd.sid:
            try:
                wd.screenshot(args.screenshots / "failure.png")
                wd.collect_logs()
                for line in problems_in(wd.logs):
                    print(f"console:   browser: {line}", file=sys.stderr)
            except Exception:  # noqa: BLE001 - diagnostics only
                pass
        return 1
    finally:
        if wd:
            wd.quit()
        if driver_proc:
            driver_proc.terminate()
            try:
                driver_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                driver_proc.kill()


if __name__ == "__main__":
    sys.exit(main())
