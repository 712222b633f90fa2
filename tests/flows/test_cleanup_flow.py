"""CleanupJob as Prefect runs it: counts, a failing part, the artifact."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from backjobs.jobs.cleanup import CleanupResult
from backjobs.settings import get_settings
from flows.cleanup import cleanup_job
from tests.support.databases import Database
from tests.support.seeding import CLEANUP_AS_OF as AS_OF
from tests.support.seeding import cleanup_counts as counts
from tests.support.seeding import outbox_rows
from tests.support.seeding import seed_cleanup as seed

pytestmark = pytest.mark.usefixtures("prefect_harness")


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
        outbox_rows_deleted=2,
    )
    assert counts(app_env) == (1, 1, 1)
    assert outbox_rows(app_env) == 2
    assert sorted(p.name for p in (root / "up").iterdir()) == ["new"]
    # Running again finds nothing more.
    assert cleanup_job(as_of=AS_OF).refresh_tokens_deleted == 0


def test_a_failing_part_fails_the_run_by_name_and_spares_the_others(app_env: Database) -> None:
    seed(app_env, get_settings().storage_root, stuck=True)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    assert "remove_orphaned_files" in (state.message or "")
    with pytest.raises(ExceptionGroup) as raised:
        state.result()
    assert "cleanup-job: 1 of 4 parts failed: remove_orphaned_files" in str(raised.value)
    # Tokens, markers and outbox rows were deleted; of the files only the stuck one is left.
    assert counts(app_env) == (1, 1, 2)
    assert outbox_rows(app_env) == 2


def test_the_run_publishes_its_counts_as_an_artifact(app_env: Database) -> None:
    seed(app_env, get_settings().storage_root)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    table = artifacts_of(state.state_details.flow_run_id)["cleanup-job-result"]
    assert {"count": "refresh_tokens_deleted", "value": "2"} in json.loads(str(table))
