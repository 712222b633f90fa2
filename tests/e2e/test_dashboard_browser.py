"""A real browser signs in to the gated dashboard and works in the admin's role.

Headless Debian Chromium (installed when missing, else skipped with the reason), driven by
Playwright, on one gated dashboard:

- without the cookie it gets the sign-in page; after the link it sees the deployments;
- from the UI it triggers a custom run (a parameter set in the form), cancels it,
  retries a failed run, pauses and resumes a schedule, and every call the UI makes for
  that passes the gate (no 401 or 403);
- it browses every page of the UI, and no request leaves the dashboard's origin: every
  request Chromium starts is recorded (answered or failed, so an attempt counts even
  offline), and the Content-Security-Policy is seen stopping the analytics host the UI
  calls on every page.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from backjobs.dashboard.tokens import Purpose, mint_token, sign_in_url
from backjobs.db import make_engine
from tests.support.browser import chromium_page, require_chromium
from tests.support.dashboard import SECRET, GatedDashboard, gated_dashboard, migrated_sqlite
from tests.support.prefect_api import call_json

pytestmark = pytest.mark.slow

PAGES = (
    "/v2/dashboard",
    "/v2/runs",
    "/v2/flows",
    "/v2/deployments",
    "/v2/work-pools",
    "/v2/blocks",
    "/v2/variables",
    "/v2/automations",
    "/v2/events",
    "/v2/concurrency-limits",
    "/v2/settings",
)


class Demo:
    def __init__(self, dash: GatedDashboard) -> None:
        self.dash = dash
        flow = self.api("POST", "/flows/", {"name": "gate-demo-flow"})
        self.flow = flow["id"]
        schema = {"type": "object", "properties": {"note": {"type": "string", "title": "note"}}}
        self.deployment = self.api(
            "POST",
            "/deployments/",
            {
                "name": "gate-demo",
                "flow_id": flow["id"],
                "schedules": [{"schedule": {"cron": "0 3 * * *"}, "active": True}],
                "parameter_openapi_schema": schema,
            },
        )["id"]
        failed = self.api("POST", f"/deployments/{self.deployment}/create_flow_run", {})
        self.api(
            "POST",
            f"/flow_runs/{failed['id']}/set_state",
            {"state": {"type": "FAILED", "name": "Failed"}, "force": True},
        )
        self.failed_run = failed["id"]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        headers = self.dash.machine_headers()
        return call_json(method, f"{self.dash.api}{path}", headers=headers, body=body)

    def run(self, run_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api("GET", f"/flow_runs/{run_id}")
        return found

    def schedule_active(self) -> bool:
        return bool(self.api("GET", f"/deployments/{self.deployment}")["schedules"][0]["active"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    require_chromium()  # skip before starting a server when there is no browser
    url = migrated_sqlite(tmp_path_factory.mktemp("app-db"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO users (id, email, is_admin) VALUES (1, 'a@example.com', true)")
        )
    engine.dispose()
    with gated_dashboard(tmp_path_factory.mktemp("dash"), app_db_url=url) as d:
        yield Demo(d)


def link(dash: GatedDashboard) -> str:
    token = mint_token(
        sub="1", secret=SECRET, now=datetime.now(UTC), minutes=5, purpose=Purpose.SIGN_IN
    )
    return sign_in_url(dash.url, token)


def sign_in(page: Any, dash: GatedDashboard) -> None:
    page.goto(link(dash))  # shows a button: fetching the link alone does not spend it
    assert page.context.cookies() == []
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{dash.url}/v2/**")


def wait_until(condition: Any, page: Any, what: str, timeout_ms: int = 30_000) -> None:
    waited = 0
    while not condition():
        assert waited < timeout_ms, f"not seen within {timeout_ms} ms: {what}"
        page.wait_for_timeout(250)
        waited += 250


def flip(switch: Any, page: Any, *, to: bool, done: Any, busy: list[str], what: str) -> None:
    """Click ``switch`` from on to off (``to=False``) or back, until ``done()`` holds.

    A SQLite-backed Prefect server answers a write that meets its busy database with 503
    "Service Unavailable" at once (SQLITE_BUSY_SNAPSHOT); the UI then shows the switch as it
    was, and an admin clicks again. So does this, only after such an answer (``busy``: the
    page's PATCH requests answered 503), at most three times. Each click waits for the UI to
    show the switch in the state it starts from: a click on a switch drawn before its data
    is lost.
    """
    for _ in range(3):
        shown = f"the switch shown {'off' if to else 'on'}"
        wait_until(lambda: done() or switch.is_checked() is not to, page, shown)
        if done():
            return
        refusals = len(busy)
        switch.click()
        wait_until(lambda n=refusals: done() or len(busy) > n, page, what)
        if done():
            return
    pytest.fail(f"{what}: the server answered 503 three times: {busy}")


def test_an_admin_signs_in_and_operates_from_the_ui(demo: Demo, tmp_path: Path) -> None:
    dash = demo.dash
    refused: list[str] = []
    busy: list[str] = []

    def record(response: Any) -> None:
        seen = f"{response.status} {response.request.method} {response.url}"
        if response.status in (401, 403):
            refused.append(seen)
        elif response.status == 503 and response.request.method == "PATCH":
            busy.append(seen)

    with chromium_page() as page:
        page.on("response", record)
        page.goto(f"{dash.url}/v2/deployments")
        assert "Sign in to the dashboard" in page.content()
        refused.clear()
        sign_in(page, dash)
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["prefect_jwt"]["httpOnly"] and cookies["prefect_jwt"]["sameSite"] == "Strict"
        page.goto(f"{dash.url}/v2/deployments")
        page.get_by_text("gate-demo", exact=True).first.wait_for(state="visible")
        page.screenshot(path=str(tmp_path / "deployments.png"), full_page=True)

        # A custom run with a parameter.
        before = {r["id"] for r in demo.api("POST", "/flow_runs/filter", {})}
        page.goto(f"{dash.url}/v2/deployments/deployment/{demo.deployment}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Custom run").click()
        page.locator("textarea").first.fill("from the ui")
        page.get_by_role("button", name="Submit").click()

        def new_runs() -> list[dict[str, Any]]:
            runs = demo.api("POST", "/flow_runs/filter", {})
            return [r for r in runs if r["id"] not in before and not r["auto_scheduled"]]

        wait_until(lambda: len(new_runs()) == 1, page, "the custom run")
        custom = new_runs()[0]
        assert custom["parameters"] == {"note": "from the ui"}

        # Cancel it.
        page.goto(f"{dash.url}/v2/runs/flow-run/{custom['id']}")
        page.get_by_text(custom["name"]).first.wait_for(state="visible")
        page.screenshot(path=str(tmp_path / "custom-run.png"), full_page=True)
        page.get_by_role("button", name="Open menu").first.click()
        page.get_by_role("menuitem", name="Cancel").click()
        dialog = page.get_by_role("alertdialog").or_(page.get_by_role("dialog"))
        dialog.get_by_role("button", name="Cancel Flow Run").click()
        wait_until(
            lambda: demo.run(custom["id"])["state_type"] in ("CANCELLED", "CANCELLING"),
            page,
            "the run cancelled",
        )

        # Retry the failed run.
        page.goto(f"{dash.url}/v2/runs/flow-run/{demo.failed_run}")
        page.get_by_role("button", name="Open menu").first.click()
        page.get_by_role("menuitem", name="Retry").click()
        retry_dialog = page.get_by_role("alertdialog").or_(page.get_by_role("dialog"))
        retry_dialog.get_by_role("button", name="Retry").click()
        wait_until(
            lambda: demo.run(demo.failed_run)["state_name"] == "AwaitingRetry",
            page,
            "the failed run retried",
        )

        # Pause and resume the schedule.
        page.goto(f"{dash.url}/v2/deployments/deployment/{demo.deployment}")
        switch = page.get_by_role("switch").first
        flip(
            switch,
            page,
            to=False,
            done=lambda: not demo.schedule_active(),
            busy=busy,
            what="the schedule paused",
        )
        flip(
            switch, page, to=True, done=demo.schedule_active, busy=busy, what="the schedule resumed"
        )
        page.screenshot(path=str(tmp_path / "deployment.png"), full_page=True)
    assert refused == []
    log = dash.log()
    assert f"POST /api/deployments/{demo.deployment}/create_flow_run 201" in log
    assert f"PATCH /api/deployments/{demo.deployment}/schedules/" in log


class Traffic:
    """Everything a browser context tried to load or call, recorded as it happens.

    ``attempted`` holds every request Chromium started, whether it was answered or failed
    (a host that cannot be resolved offline still fires ``request``, then
    ``requestfailed``); ``blocked`` holds what the Content-Security-Policy stopped before
    any request was made (the page's ``securitypolicyviolation`` events).
    """

    def __init__(self, context: Any) -> None:
        self.attempted: list[str] = []
        self.failed: list[str] = []
        self.blocked: list[str] = []
        self.refused: list[str] = []
        context.on("request", lambda r: self.attempted.append(r.url))
        context.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        context.on(
            "response",
            lambda r: (
                self.refused.append(f"{r.status} {r.url}") if r.status in (401, 403) else None
            ),
        )
        context.expose_binding(
            "backjobsBlocked",
            lambda _source, uri, directive: self.blocked.append(f"{directive} {uri}"),
        )
        context.add_init_script(
            "document.addEventListener('securitypolicyviolation',"
            " e => window.backjobsBlocked(e.blockedURI, e.effectiveDirective))"
        )

    def elsewhere(self, origin: str) -> list[str]:
        """Requests started (sent or failed) to anywhere but ``origin``."""
        urls = {*self.attempted, *(f.split(" (", 1)[0] for f in self.failed)}
        return sorted(u for u in urls if not u.startswith((f"{origin}/", "data:", "blob:")))


def test_no_request_leaves_the_dashboards_origin(demo: Demo) -> None:
    dash = demo.dash
    with chromium_page() as page:
        traffic = Traffic(page.context)
        sign_in(page, dash)
        visited = [
            *PAGES,
            f"/v2/deployments/deployment/{demo.deployment}",
            f"/v2/flows/flow/{demo.flow}",
            f"/v2/runs/flow-run/{demo.failed_run}",
        ]
        for path in visited:
            response = page.goto(f"{dash.url}{path}")
            assert response is not None
            policy = response.headers.get("content-security-policy", "")
            assert "connect-src 'self'" in policy and "script-src 'self'" in policy, path
            page.wait_for_load_state("networkidle")
    # The UI tries an analytics host on its pages: the policy must stop it before it is a
    # request; had it not, the attempt would be in ``attempted`` even with no network.
    elsewhere = traffic.elsewhere(dash.url)
    assert elsewhere == [], f"failed: {set(traffic.failed)}; blocked: {set(traffic.blocked)}"
    own = [b for b in traffic.blocked if b.split(" ", 1)[1].startswith(dash.url)]
    assert own == []  # the policy stops nothing of the dashboard's own
    # The attempt was seen, and stopped: Prefect 3.9's UI asks an analytics host for its
    # config on every load (with a policy that let it through, this test fails on
    # ``elsewhere``: the request is started, then fails offline with
    # ERR_NAME_NOT_RESOLVED). Drop this line once Prefect's UI stops calling out.
    assert any(b.startswith("connect-src https://") for b in traffic.blocked), traffic.blocked
    assert len(traffic.attempted) > 50  # the pages did load their scripts and call the API
    assert any("/api/" in u for u in traffic.attempted)
    assert traffic.refused == []
