"""The shared task policy under Prefect: transient DB errors retry, others fail at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, task

from tasks._policy import DB_TASK_OPTIONS
from tests.support.db_errors import error_of

pytestmark = pytest.mark.usefixtures("prefect_harness")

calls: list[str] = []
errors: dict[str, Exception] = {}


@task(**(DB_TASK_OPTIONS | {"retry_delay_seconds": 0}))
def fails_once(kind: str) -> int:
    calls.append(kind)
    if len(calls) == 1:
        raise errors[kind]
    return len(calls)


@flow
def runs_it(kind: str) -> int:
    return fails_once(kind)


@pytest.fixture(autouse=True)
def real_errors(tmp_path: Path) -> None:
    calls.clear()
    errors["transient"] = error_of("postgresql://postgres@127.0.0.1:1/none", "select 1")
    errors["permanent"] = error_of(f"sqlite:///{tmp_path}/x.db", "select * from missing")


def test_a_transient_database_error_is_retried() -> None:
    assert runs_it("transient") == 2
    assert calls == ["transient", "transient"]


def test_a_permanent_database_error_fails_the_task_at_once() -> None:
    state = runs_it("permanent", return_state=True)
    assert state.is_failed() and "no such table" in (state.message or "")
    assert calls == ["permanent"]
