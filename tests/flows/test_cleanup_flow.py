"""CleanupJob as Prefect runs it: counts, a failing part, the artifact."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from backjobs.jobs.cleanup import CleanupResult
from backjobs.orchestration.jobbase import result_rows
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
    # The state's message names the part and its reason (issue 17, item 5).
    assert "1 of 4 parts failed: remove_orphaned_files (" in (state.message or "")
    assert "could not be removed" in (state.message or ""), state.message
    # Tokens, markers and outbox rows were deleted; of the files only the stuck one is left.
    assert counts(app_env) == (1, 1, 2)
    assert outbox_rows(app_env) == 2


def test_the_run_publishes_its_counts_as_an_artifact(app_env: Database) -> None:
    seed(app_env, get_settings().storage_root)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    table = artifacts_of(state.state_details.flow_run_id)["cleanup-job-result"]
    assert {"count": "refresh_tokens_deleted", "value": "2"} in json.loads(str(table))


def test_a_failed_run_shows_every_parts_counts_and_one_traceback_per_failure(
    app_env: Database, caplog: pytest.LogCaptureFixture
) -> None:
    seed(app_env, get_settings().storage_root, stuck=True)
    state = cleanup_job(as_of=AS_OF, return_state=True)
    assert state.is_failed()
    table = json.loads(str(artifacts_of(state.state_details.flow_run_id)["cleanup-job-result"]))
    shown = {row["count"]: row["value"] for row in table}
    # The failing part's own counts (2 removed, 0 bad keys) next to the others'.
    assert shown == {
        "refresh_tokens_deleted": "2",
        "markers_deleted": "2",
        "orphaned_files_removed": "2",
        "orphaned_files_bad_keys": "0",
        "outbox_rows_deleted": "2",
        "failed_parts": "remove_orphaned_files",
    }
    # The part's traceback once, in the job base's "Job failed" line; the flow engine (and
    # on a worker its entry point) repeat the message only.
    with_traceback = [
        r
        for r in caplog.records
        if r.exc_info and "could not be removed" in "".join(map(str, _leaves(r.exc_info[1])))
    ]
    assert len(with_traceback) == 1, [r.getMessage() for r in with_traceback]
    assert "[CleanupJob] Job failed with error" in with_traceback[0].getMessage()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "[CleanupJob] Job failed with error: cleanup-job: 1 of 4 parts failed" in text
    assert "Encountered exception during execution" in text


def _leaves(exc: BaseException | None) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [] if exc is None else [exc]


def test_an_empty_or_missing_count_is_not_shown_as_markdown() -> None:
    rows = {r["count"]: r["value"] for r in result_rows(CleanupResult(markers_deleted=1))}
    assert rows["failed_parts"] == "none"
    assert rows["refresh_tokens_deleted"] == "not reported"
