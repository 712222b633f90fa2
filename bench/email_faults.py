"""EmailSendJob under a scripted mix of SMTP faults: nothing lost, nothing sent twice.

    python bench/email_faults.py [--n 10000] [--outage-seconds 30] [--failure-rate 0.05]

Queues ``n`` emails on a throwaway PostgreSQL database (one in ten has a second
recipient, ``busy…``, whose mailbox answers ``452`` the first time), starts an aiosmtpd
server in its own process, and runs **two sender processes at once**, each calling
``send_due_emails`` in a loop as the schedule would (a run the server fails is logged and
started again 0.3 s later). The server's script, by wall time since the start:

- from the start until the 530 phase ends: ``451`` to a random ``--failure-rate`` of
  RCPTs;
- once 500 pairs are delivered: one sender is **SIGKILLed** mid-batch (a fresh one is
  started in its place, as the next scheduled run would be);
- 2 s later: **refused connections** for ``--outage-seconds`` (the listener is closed);
- then a **530 phase** (``530 5.7.0 Authentication required`` to MAIL FROM) for 5 s;
- then healthy, until the outbox is drained.

Every delivered (Message-ID, recipient) pair is logged by the server. Reported:
``delivered`` (unique pairs), ``duplicates`` (extra copies of a pair), of which
``explained`` belong to rows the killed sender had claimed (resent with the same
Message-ID once its lease ran out), ``lost`` (expected pairs never delivered, rows not
failed), ``failed`` rows, and ``ratio`` = unique delivered ÷ expected pairs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pg import bench_database
from sqlalchemy import Engine, insert, text

from backjobs.mail.render import new_message_id, validate_context
from backjobs.models import AppTask

SENDER = "bench@backjobs.test"
LEASE_SECONDS = 6
KILL_AFTER_PAIRS, OUTAGE_AFTER_KILL, AUTH_PHASE = 500, 2.0, 5.0
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)", re.MULTILINE)

# --- the scripted server (its own process) -----------------------------------------------

HEALTHY, FLAKY, REFUSING, AUTH = 0, 1, 2, 3


class _ScriptedHandler:
    def __init__(self, phase: Any, log_path: str, failure_rate: float) -> None:
        self.phase, self.failure_rate = phase, failure_rate
        self.log = open(log_path, "a", buffering=1)
        self.busy_refused: set[str] = set()
        self.rng = random.Random(7)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.phase.value == AUTH:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("busy") and address not in self.busy_refused:
            self.busy_refused.add(address)
            return "452 4.2.2 mailbox full"
        if self.phase.value != HEALTHY and self.rng.random() < self.failure_rate:
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        found = _MESSAGE_ID.search(envelope.original_content)
        message_id = found.group(1).decode() if found else "?"
        self.log.write("".join(f"{message_id}\t{rcpt}\n" for rcpt in envelope.rcpt_tos))
        return "250 OK"


def _server(port: int, phase: Any, log_path: str, failure_rate: float, ready: Any) -> None:
    from aiosmtpd.controller import Controller

    handler = _ScriptedHandler(phase, log_path, failure_rate)
    controller: Controller | None = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    ready.set()
    while True:  # the outage: close the listener, open it again afterwards
        time.sleep(0.05)
        if phase.value == REFUSING and controller is not None:
            controller.stop()
            controller = None
        elif phase.value != REFUSING and controller is None:
            controller = Controller(handler, hostname="127.0.0.1", port=port)
            controller.start()


# --- a sender process: the job's logic in a loop, as the schedule runs it -------------------


def sender_main(url: str, port: int, stop_file: str) -> None:
    import logging

    from backjobs.db import make_engine
    from backjobs.jobs.email_send import EmailServerUnavailable, send_due_emails
    from backjobs.mail import make_transport
    from backjobs.settings import load_settings

    logging.basicConfig(level=logging.CRITICAL)
    settings = load_settings(
        database_url=url, email_transport="smtp", smtp_host="127.0.0.1", smtp_port=port,
        smtp_timeout_seconds=5, email_from=SENDER, email_connections=4, email_batch_size=100,
        email_lease_seconds=LEASE_SECONDS, email_backoff_base_seconds=1,
        email_backoff_max_seconds=4, email_time_budget_seconds=20,
    )  # fmt: skip
    engine = make_engine(url)
    runs = failed_runs = 0
    while not os.path.exists(stop_file):
        transport = make_transport(settings)
        runs += 1
        try:
            result = send_due_emails(
                engine, now=datetime.now(UTC), settings=settings, transport=transport
            )
            idle = result.sent + result.retried + result.failed == 0
        except EmailServerUnavailable:
            failed_runs += 1
            idle = True
        finally:
            transport.close()
        if idle:
            time.sleep(0.3)
    print(json.dumps({"runs": runs, "failed_runs": failed_runs}), flush=True)


def _spawn_sender(url: str, port: int, stop_file: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--sender", url, str(port), stop_file],
        stdout=subprocess.PIPE,
        text=True,
    )


# --- orchestration -------------------------------------------------------------------------


def seed(engine: Engine, n: int) -> int:
    """``n`` queued emails as enqueue_email writes them; return the expected pairs."""
    rows, pairs = [], 0
    now = datetime.now(UTC)
    for i in range(n):
        to = [f"user{i}@example.com"] + ([f"busy{i}@example.com"] if i % 10 == 0 else [])
        pairs += len(to)
        payload = {
            "template": "generic",
            "to": to,
            "context": validate_context("generic", {"subject": f"Message {i}", "body": "Hi"}),
            "message_id": new_message_id(sender=SENDER),
        }
        rows.append({"task_type": "email_send", "payload": payload, "next_attempt_at": now})
    with engine.begin() as conn:
        for first in range(0, n, 5000):
            conn.execute(insert(AppTask), rows[first : first + 5000])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE app_tasks"))
    return pairs


def _held_by_killed(engine: Engine) -> set[int]:
    """Rows the killed sender held: processing, and not renewed for 2.5 s afterwards
    (the live sender renews its claims every lease / 3 = 2 s)."""
    query = text("SELECT id, claim_token, locked_until FROM app_tasks WHERE status = 'processing'")
    with engine.connect() as conn:
        first = set(conn.execute(query).all())
    time.sleep(2.5)
    with engine.connect() as conn:
        second = set(conn.execute(query).all())
    return {row[0] for row in first & second}


def _open_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM app_tasks WHERE status IN ('pending', 'processing')")
            )
            or 0
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--failure-rate", type=float, default=0.05)
    args = parser.parse_args()
    work = Path(f"/tmp/backjobs_email_faults_{os.getpid()}")
    work.mkdir(exist_ok=True)
    log_path, stop_file = work / "delivered.tsv", work / "stop"
    log_path.write_text("")
    ctx = mp.get_context("spawn")
    phase, ready = ctx.Value("i", FLAKY), ctx.Event()
    port = _free_port()
    server = ctx.Process(
        target=_server, args=(port, phase, str(log_path), args.failure_rate, ready), daemon=True
    )
    server.start()
    ready.wait(30)
    try:
        with bench_database("backjobs_bench_faults") as engine:
            expected = seed(engine, args.n)
            url = engine.url.render_as_string(hide_password=False)
            report = _run(engine, url, port, phase, args, log_path, stop_file)
            report |= _tally(engine, log_path, expected)
    finally:
        server.terminate()
    _print(args, report)


def _lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 16), b""))


def _run(
    engine: Engine,
    url: str,
    port: int,
    phase: Any,
    args: argparse.Namespace,
    log_path: Path,
    stop_file: Path,
) -> dict[str, Any]:
    start = time.monotonic()
    senders = [_spawn_sender(url, port, str(stop_file)) for _ in range(2)]
    timeline: list[tuple[float, str]] = []

    def at(seconds: float) -> None:
        time.sleep(max(0.0, start + seconds - time.monotonic()))

    while _lines(log_path) < KILL_AFTER_PAIRS and time.monotonic() - start < 120:
        time.sleep(0.01)
    senders[0].send_signal(signal.SIGKILL)
    senders[0].wait()
    killed_at = time.monotonic() - start
    timeline.append((killed_at, "SIGKILL sender 1"))
    senders.append(_spawn_sender(url, port, str(stop_file)))  # the next scheduled run
    killed_rows = _held_by_killed(engine)
    at(killed_at + OUTAGE_AFTER_KILL)
    phase.value = REFUSING
    timeline.append((time.monotonic() - start, "connections refused"))
    at(killed_at + OUTAGE_AFTER_KILL + args.outage_seconds)
    phase.value = AUTH
    timeline.append((time.monotonic() - start, "530 to MAIL FROM"))
    at(killed_at + OUTAGE_AFTER_KILL + args.outage_seconds + AUTH_PHASE)
    phase.value = HEALTHY
    timeline.append((time.monotonic() - start, "healthy"))
    while _open_rows(engine) and time.monotonic() - start < 600:
        time.sleep(0.5)
    timeline.append((time.monotonic() - start, "outbox drained"))
    stop_file.write_text("stop")
    runs = [
        json.loads((s.communicate(timeout=120)[0] or "{}").strip() or "{}") for s in senders[1:]
    ]
    return {
        "seconds": round(time.monotonic() - start, 1),
        "killed_rows": killed_rows,
        "timeline": timeline,
        "sender_runs": sum(r.get("runs", 0) for r in runs),
        "sender_failed_runs": sum(r.get("failed_runs", 0) for r in runs),
    }


def _tally(engine: Engine, log_path: Path, expected: int) -> dict[str, Any]:
    pairs = Counter(tuple(line.split("\t")) for line in log_path.read_text().splitlines())
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, status, payload->>'message_id', attempts FROM app_tasks")
        ).all()
    row_of = {message_id: task_id for task_id, _, message_id, _ in rows}
    statuses = Counter(status for _, status, _, _ in rows)
    return {
        "pairs": pairs,
        "row_of": row_of,
        "expected": expected,
        "statuses": statuses,
        "max_attempts_used": max(attempts for *_, attempts in rows),
    }


def _print(args: argparse.Namespace, r: dict[str, Any]) -> None:
    pairs: Counter[tuple[str, ...]] = r["pairs"]
    delivered = len(pairs)
    duplicates = sum(count - 1 for count in pairs.values())
    explained = sum(
        count - 1
        for (message_id, _), count in pairs.items()
        if count > 1 and r["row_of"].get(message_id) in r["killed_rows"]
    )
    failed = r["statuses"].get("failed", 0)
    lost = r["expected"] - delivered if failed == 0 else None
    print("timeline (s since start):")
    for seconds, event in r["timeline"]:
        print(f"  {seconds:6.1f}  {event}")
    print(f"{'emails queued':<34} {args.n:>8}")
    print(f"{'(message, recipient) pairs expected':<34} {r['expected']:>8}")
    print(f"{'delivered (unique pairs)':<34} {delivered:>8}")
    print(f"{'duplicates':<34} {duplicates:>8}   explained by the SIGKILL: {explained}")
    print(f"{'rows held by the killed sender':<34} {len(r['killed_rows']):>8}")
    print(f"{'lost':<34} {lost!s:>8}")
    print(f"{'failed rows':<34} {failed:>8}")
    print(
        f"{'sender runs (failed by the server)':<34} {r['sender_runs']:>8} "
        f"({r['sender_failed_runs']})"
    )
    print(f"{'most attempts used by a row':<34} {r['max_attempts_used']:>8}")
    figures = {
        "bench": "email_faults",
        "n": args.n,
        "outage_seconds": args.outage_seconds,
        "failure_rate": args.failure_rate,
        "seconds": r["seconds"],
        "expected": r["expected"],
        "delivered": delivered,
        "duplicates": duplicates,
        "duplicates_unexplained": duplicates - explained,
        "lost": lost,
        "failed": failed,
        "ratio": round(delivered / r["expected"], 4),
    }
    print(json.dumps(figures))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--sender":
        sender_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
