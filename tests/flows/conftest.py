"""Flow tests run the real flows, in the test process, against a real Prefect server.

One server per test process (session scope), started like the end-to-end tests' servers
from a copy of a Prefect database migrated once per run (``tests.support.prefect_server``):
Prefect's own ``prefect_test_harness`` migrates a new database in every process, ≈ 10 s of
CPU each on this suite's 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.support.prefect_server import start_server, stop_server


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    server = start_server(tmp_path_factory.mktemp("flows-prefect-home"))
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        stop_server(server)
