"""A real browser signs in to the gated dashboard through a one-time link.

Headless Debian Chromium (installed when missing, else skipped with the reason), driven by
Playwright: without the cookie it gets the sign-in page; after the link it sees the
deployments page, and every API call the UI makes passes the gate. The screenshot is
saved under the test's tmp folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from backjobs.dashboard.tokens import mint_token, sign_in_url
from backjobs.db import make_engine
from tests.support.browser import chromium_page, require_chromium
from tests.support.dashboard import SECRET, GatedDashboard, gated_dashboard, migrated_sqlite
from tests.support.prefect_api import call_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatedDashboard]:
    require_chromium()  # skip before starting a server when there is no browser
    url = migrated_sqlite(tmp_path_factory.mktemp("app-db"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO users (id, email, is_admin) VALUES (1, 'a@example.com', true)")
        )
    engine.dispose()
    with gated_dashboard(tmp_path_factory.mktemp("dash"), app_db_url=url) as d:
        flow = api_post(d, "/flows/", {"name": "gate-demo-flow"})
        api_post(d, "/deployments/", {"name": "gate-demo", "flow_id": flow["id"]})
        yield d


def api_post(dash: GatedDashboard, path: str, body: dict[str, object]) -> dict[str, object]:
    result: dict[str, object] = call_json(
        "POST", f"{dash.api}{path}", headers=dash.machine_headers(), body=body
    )
    return result


def test_an_admin_signs_in_and_sees_the_deployments(dash: GatedDashboard, tmp_path: Path) -> None:
    link = sign_in_url(
        dash.url, mint_token(sub="1", secret=SECRET, now=datetime.now(UTC), minutes=5)
    )
    refused: list[str] = []
    with chromium_page() as page:
        page.on(
            "response",
            lambda r: refused.append(f"{r.status} {r.url}") if r.status in (401, 403) else None,
        )
        page.goto(f"{dash.url}/v2/deployments")
        assert "Sign in to the dashboard" in page.content()
        refused.clear()

        page.goto(link)  # shows a button: fetching the link alone does not spend it
        assert page.context.cookies() == []
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{dash.url}/v2/**")
        page.goto(f"{dash.url}/v2/deployments")
        page.get_by_text("gate-demo", exact=True).first.wait_for(state="visible")
        page.get_by_text("gate-demo-flow").first.wait_for(state="visible")
        screenshot = tmp_path / "deployments.png"
        page.screenshot(path=str(screenshot), full_page=True)

        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["prefect_jwt"]["httpOnly"] and cookies["prefect_jwt"]["sameSite"] == "Strict"
    assert screenshot.stat().st_size > 10_000
    assert refused == []
