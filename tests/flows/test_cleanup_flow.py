"""CleanupJob as Prefect runs it: counts, a failing part, the artifact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from sqlalchemy import func, select

from backjobs.models import Marker, RefreshToken, StoredFile, User
from backjobs.settings import get_settings
from flows.cleanup import CleanupResult, cleanup_job
from tests.conftest import Database

pytestmark = pytest.mark.usefixtures("prefect_harness")

AS_OF = datetime(2030, 1, 1, tzinfo=UTC)


def seed(db: Database, storage_root: Path, *, stuck: bool = False) -> None:
    """Two rows to delete and one to keep in each table."""
    (storage_root / "up").mkdir(parents=True, exist_ok=True)
    for name in ("old-a", "old-b", "new"):
        (storage_root / "up" / name).write_bytes(b"x")
    with db.session() as s:
        user = User(email="owner@example.com")
        s.add(user)
        s.flush()
        old, new = AS_OF - timedelta(days=40), AS_OF - timedelta(hours=1)
        s.add_all(
            [
                RefreshToken(user_id=user.id, token_hash=f"t{i}", expires_at=t)
                for i, t in enumerate([old, new, AS_OF + timedelta(days=1)])
            ]
        )
        s.add_all(
            [
                Marker(owner_id=user.id, title=f"m{i}", deleted_at=t)
                for i, t in enumerate([old, old, new])
            ]
        )
        s.add_all(
            [
                StoredFile(owner_id=user.id, storage_key=f"up/{k}", created_at=t)
                for k, t in [("old-a", old), ("old-b", old), ("new", new)]
            ]
        )
        if stuck:
            (storage_root / "up" / "stuck").mkdir()
            (storage_root / "up" / "stuck" / "f").write_bytes(b"x")
            s.add(StoredFile(owner_id=user.id, storage_key="up/stuck", created_at=old))
        s.commit()


def counts(db: Database) -> tuple[int, int, int]:
    with db.session() as s:
        return tuple(  # type: ignore[return-value]
            s.scalar(select(func.count()).select_from(m))
            for m in (RefreshToken, Marker, StoredFile)
        )


def artifacts_of(flow_run_id: object) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in found if a.key}


def test_cleanup_deletes_exactly_the_expired_rows(app_env: Database) -> None:
    root = get_settings().storage_root
    seed(app_env, root)
    result = cleanup_job(as_of=AS_OF)
    assert result == CleanupResult(
        refresh_tokens_deleted=2,
        markers_deleted=2,
        orphaned_files_removed=2,
        orphaned_files_bad_keys=0,
    )
    assert counts(app_env) == (1, 1, 1)
    assert sorted(p.name for p in (root / "up").iterdir()) == ["new"]
    # Running again finds nothing more.
    assert cleanup_job(as_of=AS_OF).refresh_tokens_deleted == 0


def test_a_failing_part_fails_the_run_by_name_and_spares_the_others(app_env: Database) -> None:
    seed(app_env, get_settings().storage_root, stuck=True)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    assert "orphaned-files" in (state.message or "")
    with pytest.raises(ExceptionGroup) as raised:
        state.result()
    assert "1 of 3 parts failed: orphaned-files" in str(raised.value)
    # Tokens and markers were deleted; of the files only the stuck one is left.
    assert counts(app_env) == (1, 1, 2)


def test_the_run_publishes_its_counts_as_an_artifact(app_env: Database) -> None:
    seed(app_env, get_settings().storage_root)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    table = artifacts_of(state.state_details.flow_run_id)["cleanup-job-result"]
    assert {"count": "refresh_tokens_deleted", "value": "2"} in json.loads(str(table))
