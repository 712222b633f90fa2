"""The job base (the seed's ``JobBase<TJob>``): what every job flow shares.

``job_flow("CleanupJob")`` turns a body ``(as_of: datetime) -> Result`` into a Prefect
flow named ``cleanup-job`` that takes one parameter, ``as_of``, and:

- refuses a run whose schedule is gone or paused (the scheduler inserted it as the
  schedule was removed, or it was queued for a concurrency slot meanwhile): it ends
  **Cancelled**, with a message naming the schedule, before the job does anything
  (:mod:`backjobs.orchestration.orphan_runs`);
- resolves ``as_of``: the parameter (a naive value is read as UTC), else the run's
  scheduled start time (the exact cron time even when the run starts late), else now;
  always an aware UTC datetime. The clock is read here and nowhere else. An ``as_of``
  more than 5 minutes in the future is refused (:class:`FutureAsOfRefused`): a job run
  "from the future" deletes tokens still valid and markers still in their retention.
  ``BACKJOBS_ALLOW_FUTURE_AS_OF=true`` allows it, for rehearsals and test rigs;
- sends the domain's warnings and errors (``logging.getLogger("backjobs...")``) to the
  run's logs in the UI, whatever the environment of the worker or of ``backjobs run``,
  and keeps logging harmless when the console is gone (a dead worker's pipes): see
  :mod:`backjobs.orchestration.runlogs`;
- logs ``[CleanupJob] Starting job execution``, then ``... Job completed successfully``,
  a warning ``... Job was cancelled`` on cancellation, or an error with the traceback
  ``... Job failed with error`` on failure, re-raising in both cases as the seed does.
  Each failure's traceback appears once in the run's logs: a part's where its task
  failed, the job's own where the job base logs it; Prefect's engine repeats only the
  message;
- **ends in a state that says what happened.** A result whose type names counts of work
  left undone (``PROBLEM_COUNTS``: an email that failed, an invalid recurring definition,
  a bad storage key, a user skipped for an invalid address) and has any above zero ends
  the run in a Completed-type state named ``Completed with problems`` whose message gives
  those counts (``failed=2``), with a warning ``... Job completed with problems``. It is
  still a completed run (green in the UI, ``is_completed()``, no alert), but never the
  plain "Completed" of a clean run. A failed run made of parts fails with a message
  naming each failed part and its reason (:class:`PartsFailed`);
- publishes the body's result (a frozen dataclass of counts) as a table artifact keyed
  ``<flow-name>-result`` and logs it, so the UI shows what the run did; when the body
  fails with an error that carries a ``partial_result`` (:class:`PartsFailed`, or a
  part's own error), that partial result is published before the run fails.

A job made of independent parts submits one task per part and hands the futures to
:func:`gather_parts`, which waits for all, merges their results and raises
:class:`PartsFailed` naming each failed part.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, Self, TypeVar, cast

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, wait
from prefect.states import Cancelled, Completed

from backjobs.clock import check_as_of, to_utc
from backjobs.orchestration.orphan_runs import orphaned_run_reason
from backjobs.orchestration.prefect_yaml import kebab
from backjobs.orchestration.runlogs import prepare_run_logging
from backjobs.settings import get_settings

R = TypeVar("R")

CANCELLED = (TerminationSignal, KeyboardInterrupt, asyncio.CancelledError)


def resolve_as_of(as_of: datetime | None) -> datetime:
    """The job's clock: ``as_of``, else the run's scheduled start, else now (UTC)."""
    if as_of is not None:
        return to_utc(as_of)
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    if scheduled is not None:
        return to_utc(datetime.fromisoformat(scheduled.isoformat()))
    return datetime.now(UTC)


def result_rows(result: Any, *, missing: str = "not reported") -> list[dict[str, str]]:
    """A result dataclass as ``[{"count": field, "value": value}]`` rows.

    ``None`` shows as ``missing`` (in a job's result: a part that never reported).
    """
    items: list[tuple[str, Any]] = [("result", result)]
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        items = list(dataclasses.asdict(result).items())
    return [{"count": key, "value": _show(value, missing)} for key, value in items]


def _show(value: Any, missing: str = "not reported") -> str:
    # The UI renders table cells as markdown: "-" alone became a bullet. Empty is "none",
    # a count a part never reported (it failed before) is "not reported".
    if value is None:
        return missing
    if isinstance(value, list | tuple) and len(value) > 20:
        return f"{', '.join(map(str, value[:20]))}, … ({len(value)} in all)"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)


COMPLETED_WITH_PROBLEMS = "Completed with problems"
PROBLEM_COUNTS = "PROBLEM_COUNTS"
"""The class attribute of a result type that names its counts of work left undone."""


def problems(result: Any) -> str:
    """``failed=1, lost=2``: the result's non-zero counts of work left undone, else ``""``.

    Which counts those are is the result type's to say, in its ``PROBLEM_COUNTS``.
    """
    names: Sequence[str] = getattr(type(result), PROBLEM_COUNTS, ())
    counts = [(name, getattr(result, name, None)) for name in names]
    return ", ".join(f"{name}={n}" for name, n in counts if isinstance(n, int) and n > 0)


def final_state(job_name: str, result: R, problem_counts: str) -> R | State[R]:
    """The run's result, or a ``Completed with problems`` state carrying it."""
    if not problem_counts:
        return result
    message = f"{kebab(job_name)}: {problem_counts} (the reasons are in the run's logs)"
    return Completed(name=COMPLETED_WITH_PROBLEMS, message=message, data=result)


def publish_result(job_name: str, result: Any, *, description: str | None = None) -> None:
    """Log the result and attach it to the run as a table artifact."""
    rows = result_rows(result)
    get_run_logger().info(
        "[%s] Result: %s", job_name, ", ".join(f"{r['count']}={r['value']}" for r in rows)
    )
    create_table_artifact(
        table=rows,
        key=f"{kebab(job_name)}-result",
        description=description or f"What this {job_name} run did",
    )


def publish_table(key: str, record: Any, *, description: str, missing: str = "none") -> None:
    """Attach a record (a dataclass of counts) to the run as one more table artifact."""
    create_table_artifact(
        table=result_rows(record, missing=missing), key=key, description=description
    )


class PartsFailed(ExceptionGroup[Exception]):
    """Some of a job's independent parts failed; ``partial_result`` is what all parts did."""

    partial_result: Any

    def __new__(
        cls, message: str, exceptions: Sequence[Exception], partial_result: Any = None
    ) -> Self:
        group = super().__new__(cls, message, exceptions)
        group.partial_result = partial_result
        return group

    def __init__(
        self, message: str, exceptions: Sequence[Exception], partial_result: Any = None
    ) -> None:
        super().__init__(message, exceptions)

    def derive(self, excs: Sequence[Exception], /) -> PartsFailed:  # type: ignore[override]
        return PartsFailed(self.message, list(excs), self.partial_result)


class PartResult(Protocol):
    """A job result made of parts: frozen, with ``failed_parts`` and ``merge``."""

    @property
    def failed_parts(self) -> tuple[str, ...]: ...

    def merge(self, other: Self) -> Self: ...


P = TypeVar("P", bound=PartResult)


def gather_parts(parts: Mapping[str, PrefectFuture[P]], *, empty: P) -> P:
    """Wait for every part and merge their results into ``empty``.

    A part that failed does not stop the others. When any failed, raise
    :class:`PartsFailed` naming each, carrying the merged result of what every part
    reported (a failed part's error may carry its own ``partial_result``).
    """
    wait(list(parts.values()))
    result = empty
    errors: dict[str, Exception] = {}
    for name, future in parts.items():
        outcome = future.result(raise_on_failure=False)
        if future.state.is_completed():
            result = result.merge(outcome)
            continue
        error = outcome if isinstance(outcome, Exception) else None
        errors[name] = error or RuntimeError(f"{name}: ended without a result ({outcome!r})")
        partial = getattr(error, "partial_result", None)
        if partial is not None:
            result = result.merge(partial)
    if not errors:
        return result
    result = dataclasses.replace(result, failed_parts=tuple(errors))  # type: ignore[type-var]
    from prefect.runtime import flow_run

    reasons = "; ".join(f"{name} ({reason_of(error)})" for name, error in errors.items())
    raise PartsFailed(
        f"{flow_run.flow_name}: {len(errors)} of {len(parts)} parts failed: {reasons}",
        list(errors.values()),
        result,
    )


REASON_LENGTH = 300


def reason_of(error: BaseException) -> str:
    """``OSError: disk full``: an error's type and the first line of its message, capped."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= REASON_LENGTH else text[: REASON_LENGTH - 1] + "…"


def job_flow(
    job_name: str, *, description: str | None = None, **flow_options: Any
) -> Callable[[Callable[[datetime], R]], Flow[..., R]]:
    """Decorate a job body ``(as_of) -> result`` into the job's Prefect flow."""

    def decorate(body: Callable[[datetime], R]) -> Flow[..., R]:
        def run(as_of: datetime | None = None) -> R | State[R]:
            prepare_run_logging()
            logger = get_run_logger()
            refused = orphaned_run_reason()
            if refused:
                logger.warning("[%s] Job %s", job_name, refused)
                return Cancelled(message=f"{kebab(job_name)}: {refused}")
            when = resolve_as_of(as_of)
            logger.info("[%s] Starting job execution (as_of %s)", job_name, when.isoformat())
            try:
                check_as_of(
                    when,
                    now=datetime.now(UTC),
                    allow_future=get_settings().allow_future_as_of,
                )
                result = body(when)
            except CANCELLED:
                logger.warning("[%s] Job was cancelled", job_name)
                raise
            except BaseException as exc:
                partial = getattr(exc, "partial_result", None)
                if partial is not None:
                    publish_result(
                        job_name, partial, description=f"What this failed {job_name} run did"
                    )
                logger.error("[%s] Job failed with error: %s", job_name, exc, exc_info=True)
                raise
            publish_result(job_name, result)
            problem_counts = problems(result)
            if problem_counts:
                logger.warning(
                    "[%s] Job completed with problems: %s; the reasons are in the log lines above",
                    job_name,
                    problem_counts,
                )
            else:
                logger.info("[%s] Job completed successfully", job_name)
            return final_state(job_name, result, problem_counts)

        run.__name__ = run.__qualname__ = kebab(job_name).replace("-", "_")
        run.__module__ = body.__module__
        run.__doc__ = body.__doc__
        job = flow(
            name=kebab(job_name),
            description=description or (body.__doc__ or "").strip().split("\n")[0] or None,
            log_prints=False,
            **flow_options,
        )(run)
        # Calling the flow returns the result either way: Prefect unwraps a returned state.
        return cast(Flow[..., R], job)

    return decorate
