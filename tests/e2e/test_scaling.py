"""Scaling out: the Prefect server and the app database on PostgreSQL, two workers on one
pool, twenty runs of one deployment, each executed exactly once.

The deployment is a test-only project in a temporary folder (its own prefect.yaml and a
trivial async flow that records its flow run id and its worker's pid in the app
database), so the figure measures Prefect's hand-out of runs, not a job's work.
"""

from __future__ import annotations

import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from backjobs.db import make_engine
from tests.support.databases import PG_ADMIN_URL, Database, drop_pg_database
from tests.support.prefect_server import PrefectServer, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNS = 20

FLOW = '''
"""Record this flow run: its id and the pid of the worker that started its process."""
import os

import psycopg
from prefect import flow
from prefect.runtime import flow_run


@flow
async def record_run() -> None:
    with psycopg.connect(os.environ["BACKJOBS_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "insert into executions (flow_run_id, worker_pid) values (%s, %s)",
            (flow_run.id, os.getppid()),
        )
'''

PROJECT = """
name: scaling
prefect-version: 3.9.1
deployments:
  - name: record-run
    description: "No schedule: triggered by the test."
    entrypoint: record.py:record_run
    work_pool:
      name: scale
"""


@pytest.fixture(scope="module")
def pg_prefect_server(
    tmp_path_factory: pytest.TempPathFactory, pg_template: str
) -> Iterator[PrefectServer]:
    """A Prefect server whose own database is a fresh PostgreSQL database."""
    name = f"backjobs_prefect_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
    server = start_server(
        tmp_path_factory.mktemp("prefect-pg-home"),
        database_url=url.render_as_string(hide_password=False),
    )
    try:
        yield server
    finally:
        stop_server(server)
        drop_pg_database(name)


def test_two_workers_execute_each_of_twenty_runs_exactly_once(
    pg_prefect_server: PrefectServer, pg_db: Database, tmp_path: Path
) -> None:
    server = pg_prefect_server
    with pg_db.engine.begin() as conn:
        conn.execute(text("create table executions (flow_run_id text not null, worker_pid int)"))
    project = tmp_path / "project"
    project.mkdir()
    (project / "record.py").write_text(textwrap.dedent(FLOW))
    (project / "prefect.yaml").write_text(PROJECT)
    server.create_pool("scale")
    server.prefect("--no-prompt", "deploy", "--all", cwd=project)

    env = {"BACKJOBS_DATABASE_URL": pg_db.url}
    first = server.start_worker("scale", env=env, limit=2, log=tmp_path / "worker-1.log")
    second = server.start_worker("scale", env=env, limit=2, log=tmp_path / "worker-2.log")
    deployment = server.api("deployments/name/record-run/record-run")
    ids = [
        server.api(f"deployments/{deployment['id']}/create_flow_run", {})["id"] for _ in range(RUNS)
    ]
    # ≈ 20 s on an idle 2-core machine; the bound leaves room for a busy one.
    runs = server.wait_until_final(ids, timeout=480)
    assert Counter(r["state_type"] for r in runs.values()) == {"COMPLETED": RUNS}

    with pg_db.engine.connect() as conn:
        rows = conn.execute(text("select flow_run_id, worker_pid from executions")).all()
    executions = Counter(run_id for run_id, _ in rows)
    assert executions == dict.fromkeys(ids, 1)  # each run once, and no other
    per_worker = Counter(pid for _, pid in rows)
    print(f"runs per worker pid: {dict(per_worker)}")
    # Both workers took part (each holds at most two runs at once).
    assert set(per_worker) == {first.pid, second.pid}
