"""`stack down` pauses its worker's pool while started runs end, and the next `up` resumes
it — but only a pool `down` paused: one an operator paused stays paused. Against a real
Prefect server (the end-to-end stack test covers the whole `down`/`up` cycle)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from backjobs.stack.api import hold_work_pool, resume_held_work_pool

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def _new_pool(*, paused: bool) -> str:
    name = f"hold-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=name, type="process", is_paused=paused))
    return name


async def _paused(name: str) -> bool:
    async with get_client() as client:
        return bool((await client.read_work_pool(name)).is_paused)


def test_down_pauses_a_ready_pool_and_up_resumes_it(tmp_path: Path) -> None:
    marker = tmp_path / "pool-held-by-down"
    pool = asyncio.run(_new_pool(paused=False))

    assert asyncio.run(hold_work_pool(pool, marker)) is True
    assert asyncio.run(_paused(pool)) is True
    assert marker.read_text() == f"{pool}\n"

    assert asyncio.run(resume_held_work_pool(marker)) == pool
    assert asyncio.run(_paused(pool)) is False
    assert not marker.exists()
    assert asyncio.run(resume_held_work_pool(marker)) is None  # nothing held: nothing done


def test_a_pool_an_operator_paused_stays_paused_through_down_and_up(tmp_path: Path) -> None:
    marker = tmp_path / "pool-held-by-down"
    pool = asyncio.run(_new_pool(paused=True))

    assert asyncio.run(hold_work_pool(pool, marker)) is False
    assert not marker.exists()
    assert asyncio.run(resume_held_work_pool(marker)) is None
    assert asyncio.run(_paused(pool)) is True
