"""The repository's own packages are the ones imported, and tests never read a `.env`."""

from __future__ import annotations

from pathlib import Path

import pytest

import flows
import tasks
from backjobs.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


def test_flows_and_tasks_are_the_repositorys_own() -> None:
    # Generic names: an installed package called `tasks` or `flows` must not shadow them.
    assert Path(tasks.__file__).resolve().parent == ROOT / "tasks"
    assert Path(flows.__file__).resolve().parent == ROOT / "flows"


def test_every_job_has_one_stem_in_flows_tasks_and_jobs() -> None:
    stems = {p.stem for p in (ROOT / "src/backjobs/jobs").glob("*.py")} - {"__init__"}
    for folder in ("flows", "tasks"):
        names = {p.stem for p in (ROOT / folder).glob("*.py")} - {"__init__", "_policy"}
        assert names <= stems, f"{folder}/ has modules without a job module: {names - stems}"
        assert names, f"{folder}/ is empty"


def test_a_env_file_in_the_repository_never_reaches_a_test(monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = ROOT / ".env"
    if env_file.exists():
        pytest.skip("a developer .env exists; this test writes and removes its own")
    env_file.write_text("BACKJOBS_DELETE_BATCH_SIZE=7\n")
    try:
        get_settings.cache_clear()
        assert get_settings().delete_batch_size == 1000
        # ... while the same file is read when the working directory is the repository.
        monkeypatch.chdir(ROOT)
        get_settings.cache_clear()
        assert get_settings().delete_batch_size == 7
    finally:
        env_file.unlink()
        get_settings.cache_clear()
