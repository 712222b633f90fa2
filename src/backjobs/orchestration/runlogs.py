"""The run's logs: the domain's records reach the run, one traceback per failure, and a
console that went away never stops a job.

:func:`prepare_run_logging` is called by the job base at every flow start (idempotent).

**A lost console.** A process worker streams its flow-run processes' stdout and stderr
through pipes. When the worker dies (SIGKILL, its machine's OOM killer) and the run's
process goes on, the next write to the console hits the pipe with no reader:
``BrokenPipeError``. Prefect's console handler prints through rich, whose
``Console.on_broken_pipe`` answers that by raising ``SystemExit(1)`` — a
``BaseException``, which the handler's ``except Exception`` does not catch — so a plain
``logger.info`` ended the job ("Job failed with error: 1"), and the run Crashed after its
work was done. :func:`survive_a_lost_console` makes every Prefect console handler go
quiet instead, and points the standard stream whose reader is gone at ``/dev/null``
(``print`` and the interpreter's last flush included). The run's logs still reach the API
(the UI), which is where they are read.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Iterator
from typing import Any

DOMAIN_LOGGER = "backjobs"


def route_domain_logs_to_runs() -> None:
    """Send the ``backjobs`` loggers' records to the current run's logs (idempotent).

    Prefect configures logging once, when ``prefect`` is first imported: only then does
    ``PREFECT_LOGGING_EXTRA_LOGGERS=backjobs`` attach its API handler. A worker started
    without it, or ``backjobs run`` (whose imports come first), would leave the domain's
    warnings on stderr, unattributed. So the job base attaches Prefect's ``APILogHandler``
    itself at every flow start, unless one is there already (the variable was set in
    time): never twice. The records still propagate to the console as before.
    """
    from prefect.logging.handlers import APILogHandler

    domain = logging.getLogger(DOMAIN_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in domain.handlers):
        domain.addHandler(_run_log_handler())
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        engine_logger = logging.getLogger(name)
        if not any(isinstance(f, OneTracebackPerFailure) for f in engine_logger.filters):
            engine_logger.addFilter(ONE_TRACEBACK_PER_FAILURE)


def _run_log_handler() -> logging.Handler:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API handler, for records logged inside a run only.

        The domain also logs outside runs (the app enqueueing, ``backjobs outbox``) and
        from its own threads, where no run is known: those stay on the console instead of
        making Prefect warn that a log had no flow run id.
        """

        def emit(self, record: logging.LogRecord) -> None:
            if (
                getattr(record, "flow_run_id", None)
                or FlowRunContext.get() is not None
                or TaskRunContext.get() is not None
            ):
                super().emit(record)

    return RunLogHandler()


class OneTracebackPerFailure(logging.Filter):
    """Keep the traceback of an exception the first time a run logger logs it.

    A part's error used to be printed three times: by the task engine ("Task run failed
    with exception"), by the job base ("Job failed with error") and by the flow engine
    ("Encountered exception during execution"). The first record keeps the traceback and
    marks the exception; later records of the same exception (or of a group all of whose
    exceptions are marked) keep their message and lose only the repeated traceback.
    """

    MARK = "_backjobs_traceback_logged"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if self._logged(exc):
            record.exc_info = None
            record.exc_text = None
        else:
            try:
                setattr(exc, self.MARK, True)
            except AttributeError:  # pragma: no cover - exceptions take attributes
                pass
        return True

    def _logged(self, exc: BaseException) -> bool:
        if getattr(exc, self.MARK, False):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return all(self._logged(e) for e in exc.exceptions)
        return False


ONE_TRACEBACK_PER_FAILURE = OneTracebackPerFailure()


def prepare_run_logging() -> None:
    """Everything the job base sets up for a run's logs (idempotent)."""
    route_domain_logs_to_runs()
    survive_a_lost_console()


CONSOLE_GUARDED = "_backjobs_survives_a_lost_console"


def survive_a_lost_console() -> None:
    """Make every Prefect console handler survive a closed stdout/stderr (idempotent)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in _every_handler():
        if isinstance(handler, PrefectConsoleHandler):
            console = handler.console
            if not getattr(console, CONSOLE_GUARDED, False):
                console.on_broken_pipe = _ConsoleGone(console)  # type: ignore[method-assign]
                setattr(console, CONSOLE_GUARDED, True)


class _ConsoleGone:
    """Replaces rich's ``Console.on_broken_pipe`` (which raises ``SystemExit(1)``)."""

    def __init__(self, console: Any) -> None:
        self._console = console

    def __call__(self) -> None:
        self._console.quiet = True  # this console writes nothing more
        fds = {1, 2}
        try:
            fds.add(self._console.file.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        for fd in sorted(fds):
            if reader_gone(fd):
                to_devnull(fd)


def reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe (or socket) whose reading end has closed."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def to_devnull(fd: int) -> None:
    """Point ``fd`` at ``/dev/null``: writes to it succeed and go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def _every_handler() -> Iterator[logging.Handler]:
    loggers = [logging.getLogger()] + [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        yield from list(logger.handlers)
