"""API latency through the dashboard gate against the same Prefect server ungated.

    python bench/dashboard_gate.py [--n 1000] [--runs 10]

One server process serves one Prefect app (``create_app()``, its own SQLite in a
temporary PREFECT_HOME) on two ports: gated by :class:`DashboardGate` and bare. The app
database (admins) is a throwaway PostgreSQL database (BACKJOBS_BENCH_DATABASE_URL). After
seeding ``--runs`` flow runs, the client sends ``POST /api/flow_runs/filter`` ``n`` times
per contender, interleaved round by round over kept-alive connections: bare (the
baseline), an admin's bearer token (the admin re-check cached), the machine credential,
and the admin cookie with its Origin (what the UI sends). Access logs are off on both
ports, so the figures are the gate's own cost. ``ratio`` = bare p50 ÷ gated (bearer) p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import httpx
from _pg import bench_database
from sqlalchemy import text

SECRET = "bench-secret-" + "0123456789abcdef" * 4
AUTH_STRING = "bench:machine-credential"
FILTER = "/api/flow_runs/filter"


def serve(gated_port: int, bare_port: int, app_db: str) -> None:
    """The server side (run in its own process): one Prefect app, gated and bare."""
    import uvicorn
    from prefect.server.api.server import create_app

    from backjobs.dashboard.gate import DashboardGate
    from backjobs.dashboard.tokens import AdminDirectory
    from backjobs.db import make_engine

    app = create_app(final=True)
    gate = DashboardGate(
        app,
        secret=SECRET,
        admins=AdminDirectory(make_engine(app_db)),
        auth_string=AUTH_STRING,
        public_url=f"http://127.0.0.1:{gated_port}",
    )

    def server(asgi: object, port: int, lifespan: str) -> uvicorn.Server:
        config = uvicorn.Config(
            asgi,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="warning",
            access_log=False,
        )
        return uvicorn.Server(config)

    async def both() -> None:
        await asyncio.gather(
            server(gate, gated_port, "on").serve(), server(app, bare_port, "off").serve()
        )

    asyncio.run(both())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the bench server exited")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the bench server did not start in 90 s")


def seed(url: str, runs: int) -> None:
    for _ in range(40):  # SQLite-backed Prefect answers 503 while services start
        flow = httpx.post(f"{url}/api/flows/", json={"name": "bench-flow"}, timeout=10)
        if flow.status_code != 503:
            break
        time.sleep(0.5)
    flow.raise_for_status()
    for i in range(runs):
        body = {"flow_id": flow.json()["id"], "name": f"bench-run-{i}"}
        for _ in range(40):  # the same 503s while Prefect's services write
            created = httpx.post(f"{url}/api/flow_runs/", json=body, timeout=10)
            if created.status_code != 503:
                break
            time.sleep(0.5)
        created.raise_for_status()


def measure(clients: dict[str, httpx.Client], n: int) -> dict[str, list[float]]:
    body = {"limit": 50, "sort": "EXPECTED_START_TIME_DESC"}
    for client in clients.values():  # warm up: connections, caches, the admin lookup
        for _ in range(50):
            assert client.post(FILTER, json=body).status_code == 200
    samples: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(n):
        for name, client in clients.items():
            start = time.perf_counter()
            response = client.post(FILTER, json=body)
            samples[name].append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, (name, response.status_code)
    return samples


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="requests per contender")
    parser.add_argument("--runs", type=int, default=10, help="flow runs seeded")
    parser.add_argument(
        "--serve", nargs=3, metavar=("GATED", "BARE", "APP_DB"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), int(args.serve[1]), args.serve[2])

    from backjobs.dashboard.tokens import Purpose, mint_token

    with (
        bench_database("backjobs_bench_dashboard") as engine,
        tempfile.TemporaryDirectory() as home,
    ):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, email, is_admin) VALUES (1, 'a@x.io', true)"))
        app_db = engine.url.render_as_string(hide_password=False)
        gated_port, bare_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BACKJOBS_"))}
        env |= {
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(gated_port), str(bare_port), app_db], env=env
        )
        try:
            gated, bare = f"http://127.0.0.1:{gated_port}", f"http://127.0.0.1:{bare_port}"
            wait_healthy(gated, process)
            seed(bare, args.runs)
            now = datetime.now(UTC)
            token = mint_token(sub="1", secret=SECRET, now=now, minutes=60, purpose=Purpose.API)
            session = mint_token(
                sub="1", secret=SECRET, now=now, minutes=60, purpose=Purpose.SESSION
            )
            clients = {
                "bare server (baseline)": httpx.Client(base_url=bare),
                "gate, admin bearer": httpx.Client(
                    base_url=gated, headers={"Authorization": f"Bearer {token}"}
                ),
                "gate, machine credential": httpx.Client(
                    base_url=gated,
                    auth=tuple(AUTH_STRING.split(":", 1)),  # type: ignore[arg-type]
                ),
                "gate, admin cookie + Origin": httpx.Client(
                    base_url=gated, cookies={"prefect_jwt": session}, headers={"Origin": gated}
                ),
            }
            samples = measure(clients, args.n)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    report(samples, args)


def report(samples: dict[str, list[float]], args: argparse.Namespace) -> None:
    base_p50 = statistics.median(samples["bare server (baseline)"])
    print(f"POST {FILTER} ({args.runs} flow runs), {args.n} requests each, interleaved")
    print(f"{'contender':<30} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 overhead ms':>16}")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(
            f"{name:<30} {p50:>8.2f} {p(values, 99):>8.2f} {statistics.fmean(values):>8.2f} "
            f"{p50 - base_p50:>16.2f}"
        )
    figures = {
        key: samples[name]
        for key, name in (
            ("bare", "bare server (baseline)"),
            ("bearer", "gate, admin bearer"),
            ("machine", "gate, machine credential"),
            ("cookie", "gate, admin cookie + Origin"),
        )
    }
    out: dict[str, object] = {"bench": "dashboard_gate", "n": args.n, "runs": args.runs}
    for key, values in figures.items():
        out[f"{key}_p50_ms"] = round(statistics.median(values), 3)
        out[f"{key}_p99_ms"] = round(p(values, 99), 3)
    out["bearer_p50_overhead_ms"] = round(statistics.median(figures["bearer"]) - base_p50, 3)
    out["ratio"] = round(base_p50 / statistics.median(figures["bearer"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
