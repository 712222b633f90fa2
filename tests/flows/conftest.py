"""Flow tests run the real flows, in the test process, against a real Prefect server.

They share the test run's one server (``shared_prefect_server`` of
``tests.support.prefect_server``: every test looks up its own runs by id), started like the
end-to-end tests' servers from a copy of a Prefect database migrated once per run: Prefect's
own ``prefect_test_harness`` migrates a new database in every process, ≈ 10 s of CPU each
on this suite's 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.support.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_harness(shared_prefect_server: PrefectServer) -> Iterator[None]:
    with temporary_settings(updates={PREFECT_API_URL: shared_prefect_server.api_url}):
        yield
