"""EmailSendJob's drain against a plain smtplib loop, both into the same local SMTP sink.

    python bench/email_send.py [--n 10000] [--connections 4] [--batch-size 100]

Queues ``n`` emails (template ``generic``) on a throwaway PostgreSQL database, starts an
aiosmtpd sink in its own process, then measures, each in a fresh process:

- baseline: ``n`` messages rendered *before* the clock starts, sent by one ``smtplib``
  connection in a loop;
- project: ``send_due_emails`` (the job's logic, without Prefect's per-run overhead)
  draining the outbox: claim, render, send over ``--connections`` connections, acknowledge.

``--sink-delay-ms`` makes the sink wait before accepting each message, as a remote
server's round trip does; 0 (the default) is a local sink answering at once.

Reported: emails/s, peak RSS, RSS after the first tenth of the drain (flat memory: the
drain holds one batch at a time), and the DB share of the drain (time in SQL statements
and commits ÷ wall time). ``ratio`` = project emails/s ÷ baseline emails/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pg import bench_database
from sqlalchemy import Engine, event, insert, text
from sqlalchemy.orm import Session

from backjobs.jobs.email_send import send_due_emails
from backjobs.mail import make_transport
from backjobs.mail.render import build_message, new_message_id, render_email, validate_context
from backjobs.models import AppTask
from backjobs.settings import load_settings

NOW = datetime(2030, 1, 1, tzinfo=UTC)
SENDER = "bench@backjobs.test"
BODY = "Hello,\n\nthis is message {i} of the benchmark.\nIt has two paragraphs.\n\nBye"


# --- the sink -------------------------------------------------------------------------


class _CountingHandler:
    def __init__(self, counter: Any, cpu: Any, delay: float) -> None:
        self.counter, self.cpu, self.delay = counter, cpu, delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:  # a remote server's round trip and queue write, simulated
            await asyncio.sleep(self.delay)
        with self.counter.get_lock():
            self.counter.value += 1
        self.cpu.value = time.process_time()  # the sink's CPU use, read between phases
        return "250 OK"


def _sink(port: int, counter: Any, cpu: Any, delay: float, ready: Any) -> None:
    from aiosmtpd.controller import Controller

    handler = _CountingHandler(counter, cpu, delay)
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    cpu.value = time.process_time()  # start-up excluded from the first phase's figure
    ready.set()
    threading.Event().wait()


# --- the two contenders, each in its own process -------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _baseline(port: int, n: int, out: Any) -> None:
    import smtplib

    messages = []
    for i in range(n):
        rendered = render_email("generic", {"subject": f"Message {i}", "body": BODY.format(i=i)})
        to = [f"user{i}@example.com"]
        message = build_message(rendered, task_id=i, to=to, sender=SENDER, date=NOW)
        messages.append((to, message.data))
    connection = smtplib.SMTP("127.0.0.1", port)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    for to, data in messages:
        connection.sendmail(SENDER, to, data)
    seconds = time.perf_counter() - start
    connection.quit()
    cpu = _cpu_seconds() - cpu
    out.put({"sent": n, "seconds": seconds, "cpu_seconds": cpu, "peak_kib": _peak_kib()})


def _project(url: str, port: int, n: int, connections: int, batch: int, out: Any) -> None:
    from backjobs.db import make_engine

    settings = load_settings(
        database_url=url, email_transport="smtp", smtp_host="127.0.0.1", smtp_port=port,
        email_from=SENDER, email_connections=connections, email_batch_size=batch,
        email_time_budget_seconds=3600, email_lease_seconds=3600,
    )  # fmt: skip
    engine = make_engine(url)
    db_seconds = _instrument(engine)
    early: list[int] = []
    transport = make_transport(settings)
    progress = threading.Thread(target=_watch_rss, args=(engine, n, early), daemon=True)
    progress.start()
    cpu = _cpu_seconds()
    start = time.perf_counter()
    result = send_due_emails(engine, now=NOW, settings=settings, transport=transport)
    seconds = time.perf_counter() - start
    transport.close()
    out.put(
        {
            "sent": result.sent,
            "failed": result.failed + result.retried,
            "seconds": seconds,
            "cpu_seconds": _cpu_seconds() - cpu,
            "db_seconds": db_seconds[0],
            "peak_kib": _peak_kib(),
            "early_rss_kib": early[0] if early else _rss_kib(),
            "final_rss_kib": _rss_kib(),
        }
    )


def _instrument(engine: Engine) -> list[float]:
    """Sum the time spent in SQL statements and commits (the drain's DB share)."""
    total = [0.0]
    marks: dict[int, float] = {}

    def before(conn: Any, *_: Any) -> None:
        marks[id(conn)] = time.perf_counter()

    def after(conn: Any, *_: Any) -> None:
        total[0] += time.perf_counter() - marks.pop(id(conn), time.perf_counter())

    def before_commit(session: Session) -> None:
        marks[id(session)] = time.perf_counter()

    def after_commit(session: Session) -> None:
        total[0] += time.perf_counter() - marks.pop(id(session), time.perf_counter())

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(Session, "before_commit", before_commit)
    event.listen(Session, "after_commit", after_commit)
    return total


def _watch_rss(engine: Engine, n: int, early: list[int]) -> None:
    # RSS once a tenth of the queue is sent: against the peak, shows memory stays flat.
    while True:
        time.sleep(0.2)
        with engine.connect() as conn:
            done = conn.scalar(text("SELECT count(*) FROM app_tasks WHERE status = 'completed'"))
        if (done or 0) >= n // 10:
            early.append(_rss_kib())
            return


# --- orchestration ---------------------------------------------------------------------


def seed(engine: Engine, n: int) -> None:
    """``n`` queued emails, payloads exactly as enqueue_email writes them."""
    chunk = 5000
    with engine.begin() as conn:
        for first in range(0, n, chunk):
            rows = []
            for i in range(first, min(n, first + chunk)):
                context = validate_context(
                    "generic", {"subject": f"Message {i}", "body": BODY.format(i=i)}
                )
                payload = {
                    "template": "generic",
                    "to": [f"user{i}@example.com"],
                    "context": context,
                    "message_id": new_message_id(sender=SENDER),
                }
                rows.append({"task_type": "email_send", "payload": payload, "next_attempt_at": NOW})
            conn.execute(insert(AppTask), rows)
    # Statistics as a table in use has them. Right after a bulk enqueue, before autovacuum
    # analyses the table, the planner may think no row is pending and sort them all.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE app_tasks"))


def _in_process(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, out))
    process.start()
    result: dict[str, Any] = out.get(timeout=3600)
    process.join()
    return result


def _start_sink(delay: float) -> tuple[Any, Any, int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    counter, cpu, ready = ctx.Value("q", 0), ctx.Value("d", 0.0), ctx.Event()
    sink = ctx.Process(target=_sink, args=(port, counter, cpu, delay, ready), daemon=True)
    sink.start()
    ready.wait(30)
    return sink, (counter, cpu), port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="queued emails")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--sink-delay-ms",
        type=float,
        default=0.0,
        help="the sink waits this long before accepting each message (a remote server)",
    )
    args = parser.parse_args()
    sink, (counter, sink_cpu), port = _start_sink(args.sink_delay_ms / 1000)
    try:
        with bench_database("backjobs_bench_email") as engine:
            seed(engine, args.n)
            url = engine.url.render_as_string(hide_password=False)
            engine.dispose()
            cpu_ready = sink_cpu.value
            base = _in_process(_baseline, port, args.n)
            received_base, cpu_base = counter.value, sink_cpu.value
            job = _in_process(_project, url, port, args.n, args.connections, args.batch_size)
            received_job = counter.value - received_base
            base["sink_cpu_seconds"] = cpu_base - cpu_ready
            job["sink_cpu_seconds"] = sink_cpu.value - cpu_base
    finally:
        sink.terminate()
    assert received_base == args.n and job["sent"] == received_job == args.n, (
        received_base, received_job, job,
    )  # fmt: skip
    report(args, base, job)


def report(args: argparse.Namespace, base: dict[str, Any], job: dict[str, Any]) -> None:
    base_rate, job_rate = base["sent"] / base["seconds"], job["sent"] / job["seconds"]
    share = job["db_seconds"] / job["seconds"]
    print(
        f"{'method':<44} {'emails':>7} {'seconds':>8} {'emails/s':>9} {'CPU s':>6} "
        f"{'sink CPU s':>10} {'peak MiB':>9}"
    )
    rows = [
        ("smtplib loop, 1 connection, pre-rendered", base, base_rate),
        (f"EmailSendJob, {args.connections} connections, batch {args.batch_size}", job, job_rate),
    ]
    for name, figures, rate in rows:
        print(
            f"{name:<44} {figures['sent']:>7} {figures['seconds']:>8.2f} {rate:>9.0f} "
            f"{figures['cpu_seconds']:>6.2f} {figures['sink_cpu_seconds']:>10.2f} "
            f"{figures['peak_kib'] / 1024:>9.1f}"
        )
    print(
        f"job: DB share {share:.1%} ({job['db_seconds']:.2f} s in SQL + commits); RSS at 10% "
        f"{job['early_rss_kib'] / 1024:.1f} MiB, at the end {job['final_rss_kib'] / 1024:.1f} MiB"
    )
    figures = {
        "bench": "email_send",
        "n": args.n,
        "connections": args.connections,
        "batch_size": args.batch_size,
        "sink_delay_ms": args.sink_delay_ms,
        "baseline_emails_per_s": round(base_rate),
        "project_emails_per_s": round(job_rate),
        "db_share": round(share, 3),
        "baseline_client_cpu_ms_per_email": round(base["cpu_seconds"] / base["sent"] * 1000, 3),
        "project_client_cpu_ms_per_email": round(job["cpu_seconds"] / job["sent"] * 1000, 3),
        "sink_cpu_ms_per_email": round(job["sink_cpu_seconds"] / job["sent"] * 1000, 3),
        "baseline_peak_mib": round(base["peak_kib"] / 1024, 1),
        "project_peak_mib": round(job["peak_kib"] / 1024, 1),
        "project_rss_at_10pct_mib": round(job["early_rss_kib"] / 1024, 1),
        "ratio": round(job_rate / base_rate, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
