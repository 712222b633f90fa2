"""The job base (the seed's ``JobBase<TJob>``): what every job flow shares.

``job_flow("CleanupJob")`` turns a body ``(as_of: datetime) -> Result`` into a Prefect
flow named ``cleanup-job`` that takes one parameter, ``as_of``, and:

- resolves ``as_of``: the parameter (a naive value is read as UTC), else the run's
  scheduled start time (the exact cron time even when the run starts late), else now;
  always an aware UTC datetime. The clock is read here and nowhere else;
- logs ``[CleanupJob] Starting job execution``, then ``... Job completed successfully``,
  a warning ``... Job was cancelled`` on cancellation, or an error with the traceback
  ``... Job failed with error`` on failure, re-raising in both cases as the seed does;
- publishes the body's result (a frozen dataclass of counts) as a table artifact keyed
  ``<flow-name>-result`` and logs it, so the UI shows what the run did.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import TerminationSignal

R = TypeVar("R")

CANCELLED = (TerminationSignal, KeyboardInterrupt, asyncio.CancelledError)


def kebab(name: str) -> str:
    """``ProcessRecurringTransactionsJob`` -> ``process-recurring-transactions-job``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def to_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def resolve_as_of(as_of: datetime | None) -> datetime:
    """The job's clock: ``as_of``, else the run's scheduled start, else now (UTC)."""
    if as_of is not None:
        return to_utc(as_of)
    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time
    if scheduled is not None:
        return to_utc(datetime.fromisoformat(scheduled.isoformat()))
    return datetime.now(UTC)


def result_rows(result: Any) -> list[dict[str, str]]:
    """A result dataclass as ``[{"count": field, "value": value}]`` rows."""
    items: list[tuple[str, Any]] = [("result", result)]
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        items = list(dataclasses.asdict(result).items())
    return [{"count": key, "value": _show(value)} for key, value in items]


def _show(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 20:
        return f"{', '.join(map(str, value[:20]))}, … ({len(value)} in all)"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


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


def job_flow(
    job_name: str, *, description: str | None = None, **flow_options: Any
) -> Callable[[Callable[[datetime], R]], Flow[..., R]]:
    """Decorate a job body ``(as_of) -> result`` into the job's Prefect flow."""

    def decorate(body: Callable[[datetime], R]) -> Flow[..., R]:
        def run(as_of: datetime | None = None) -> R:
            logger = get_run_logger()
            when = resolve_as_of(as_of)
            logger.info("[%s] Starting job execution (as_of %s)", job_name, when.isoformat())
            try:
                result = body(when)
            except CANCELLED:
                logger.warning("[%s] Job was cancelled", job_name)
                raise
            except BaseException:
                logger.exception("[%s] Job failed with error", job_name)
                raise
            publish_result(job_name, result)
            logger.info("[%s] Job completed successfully", job_name)
            return result

        run.__name__ = run.__qualname__ = kebab(job_name).replace("-", "_")
        run.__module__ = body.__module__
        run.__doc__ = body.__doc__
        return flow(
            name=kebab(job_name),
            description=description or (body.__doc__ or "").strip().split("\n")[0] or None,
            log_prints=False,
            **flow_options,
        )(run)

    return decorate
