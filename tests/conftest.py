"""Shared test set-up: Prefect's offline defaults, the fixtures of ``tests/support/``, and
settings that never come from a developer's shell or ``.env``.

Helpers shared by several test modules live in ``tests/support/``; no test module imports
another.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import pytest

from backjobs.settings import get_settings

pytest_plugins = [
    "tests.support.databases",
    "tests.support.files",
    "tests.support.prefect_server",
    "tests.support.smtp",
    "tests.support.postfix",  # after smtp, whose certificates it uses
]


# Tiers that start a Prefect server (flows: a temporary one; e2e: servers, workers,
# browsers) are `slow` as a whole, so the fast loop (`-m "not slow"`) needs no marker per test.
SERVER_TIERS = frozenset({"flows", "e2e"})


# The order in which the test processes take modules (`./scripts/test` runs them with
# --dist loadfile --no-loadscope-reorder). xdist hands the 5 processes the first five
# modules in turn, then, in the same turn, the next ones to each process whose module has
# two tests or fewer (`LoadScopeScheduling._reschedule`), and later another whenever a
# process has two tests or fewer left. So: the three modules that wait minutes on real time
# (heartbeats, alert windows, scheduled failures) and use little CPU meanwhile take three
# processes, the two longest CPU-bound modules the other two; test_deploy queues behind the
# zombie module, test_ops behind test_scaling and test_cli behind the silence module (each a
# module of one test), and the long modules after those follow where a process frees up.
# Every other module comes in collection order, so the short ones fill the end and no
# process runs alone there. With 4 processes (BACKJOBS_TEST_PROCESSES=4) the silence module
# queues behind the zombie one instead. Measured per-module times are in docs/test-time.md;
# a module missing here still runs.
SCHEDULE_FIRST = (
    "e2e/test_alerts_zombie.py",
    "e2e/test_alerts.py",
    "e2e/test_stack.py",
    "e2e/test_scaling.py",
    "e2e/test_alerts_silence.py",
    "e2e/test_deploy.py",
    "e2e/test_ops.py",
    "flows/test_cli.py",
    "integration/test_cli_errors.py",
    "e2e/test_dashboard_browser.py",
    "integration/test_email_send_processes.py",
    "e2e/test_run_endings.py",
    "e2e/test_worker.py",
    "integration/test_email_faults.py",
    "integration/test_email_server_refusals.py",
)


def _schedule_rank(item: pytest.Item) -> int:
    module = f"{item.path.parent.name}/{item.path.name}"
    return SCHEDULE_FIRST.index(module) if module in SCHEDULE_FIRST else len(SCHEDULE_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name in SERVER_TIERS:
            item.add_marker(pytest.mark.slow)
    items.sort(key=_schedule_rank)  # stable: within a rank, collection order


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # A developer's .env or shell must not leak into tests: run each test from its own
    # empty folder (settings read .env from the working directory) with no BACKJOBS_*.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    for key in list(os.environ):
        if key.startswith("BACKJOBS_") and not key.startswith("BACKJOBS_TEST_"):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
