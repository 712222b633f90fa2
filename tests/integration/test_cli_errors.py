"""``backjobs`` given bad input, as an operator types it: one line, an exit status, no
traceback unless ``--debug``. Each case runs the real command from the test's own folder.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.databases import Database
from tests.support.prefect_api import clean_env

pytestmark = pytest.mark.slow  # every test runs the backjobs command as a process

BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "postgresql://postgres@127.0.0.1:9/backjobs"  # the discard port: refused


def backjobs(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKJOBS, *args],
        cwd=Path.cwd(),
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_an_unreachable_database_is_one_line_and_exit_1() -> None:
    done = backjobs("db", "upgrade", BACKJOBS_DATABASE_URL=UNREACHABLE)
    assert done.returncode == 1
    line = one_error_line(done)
    assert "127.0.0.1:9" in line and "Connection refused" in line
    assert "check BACKJOBS_DATABASE_URL" in line and "--debug" in line
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_shows_the_traceback(position: str) -> None:
    args = ["--debug", "db", "upgrade"] if position == "before" else ["db", "upgrade", "--debug"]
    done = backjobs(*args, BACKJOBS_DATABASE_URL=UNREACHABLE)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "OperationalError" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("backjobs: error: database ")


def test_a_database_url_that_is_no_url_is_a_usage_error() -> None:
    done = backjobs("db", "upgrade", BACKJOBS_DATABASE_URL="sqlite")
    assert done.returncode == 2
    assert "invalid setting BACKJOBS_DATABASE_URL" in one_error_line(done)


def test_an_unknown_revision_is_a_usage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/app.db"
    done = backjobs("db", "upgrade", "--revision", "nope", BACKJOBS_DATABASE_URL=url)
    assert done.returncode == 2
    line = one_error_line(done)
    assert "--revision 'nope'" in line and "head" in line
    assert not (tmp_path / "app.db").exists()


@pytest.mark.parametrize("as_of", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00"])
def test_an_as_of_beyond_the_calendar_in_utc_is_a_usage_error(as_of: str) -> None:
    done = backjobs("run", "cleanup-job", "--as-of", as_of)
    assert done.returncode == 2
    line = one_error_line(done)
    assert as_of in line and "outside years 1-9999" in line


def test_a_mistyped_job_is_refused_before_prefect_is_imported(tmp_path: Path) -> None:
    """``run`` and ``trigger`` read the job's name from prefect.yaml alone: a typo is one
    line at once, not after the ≈ 1.5 s of importing Prefect."""
    code = (
        "import json, sys\n"
        "from backjobs.cli import main\n"
        f"project = ['--project-dir', {str(ROOT)!r}]\n"
        "codes = [main(['db', 'upgrade']), main(['run', 'NoSuchJob', *project]),\n"
        "         main(['trigger', 'NoSuchJob', *project])]\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')\n"
        "print(json.dumps([codes, loaded]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path.cwd(),
        env=os.environ
        | {
            "BACKJOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'app.db'}",
            "PREFECT_API_URL": "http://127.0.0.1:9/api",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    codes, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [0, 2, 2] and loaded == []
    refusals = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(refusals) == 2, done.stderr
    for line in refusals:
        assert "unknown job 'NoSuchJob'" in line and "cleanup-job (CleanupJob)" in line


def test_an_entrypoint_with_a_syntax_error_is_a_problem_line() -> None:
    (Path.cwd() / "flows").mkdir()
    (Path.cwd() / "flows" / "cleanup.py").write_text("def cleanup_job(:\n    pass\n")
    (Path.cwd() / "prefect.yaml").write_text(
        "deployments:\n  - name: cleanup-job\n    entrypoint: flows/cleanup.py:cleanup_job\n"
    )
    done = backjobs("deployments", "check")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cleanup-job: entrypoint file flows/cleanup.py does not parse" in done.stderr
    assert "(line 1)" in done.stderr


@pytest.mark.parametrize(
    ("wait", "problem"), [("-1", "between 0 and 3600"), ("soon", "not a number")]
)
def test_a_bad_stop_wait_is_a_usage_error_naming_it(wait: str, problem: str) -> None:
    done = backjobs("stack", "down", "--wait", wait)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "--wait" in line and problem in line and repr(wait) in line


def test_run_without_a_server_makes_prefect_home_or_says_why_not(tmp_path: Path) -> None:
    """A service account whose HOME does not exist: `backjobs run` still runs the job."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert backjobs("db", "upgrade", BACKJOBS_DATABASE_URL=url).returncode == 0
    env = clean_env() | {"BACKJOBS_DATABASE_URL": url, "BACKJOBS_STORAGE_ROOT": str(tmp_path)}
    missing = tmp_path / "no-such-home"
    run = ["run", "cleanup-job", "--project-dir", str(ROOT)]
    done = subprocess.run(
        [BACKJOBS, *run], env=env | {"HOME": str(missing)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (missing / ".prefect").is_dir()
    assert "Failed to create the Prefect home" not in done.stderr

    (tmp_path / "a-file").write_text("")
    unusable = tmp_path / "a-file" / "home"  # under a file: cannot be made, even by root
    done = subprocess.run(
        [BACKJOBS, *run], env=env | {"HOME": str(unusable)}, capture_output=True, text=True
    )
    assert done.returncode == 2
    line = one_error_line(done)
    assert f"{unusable / '.prefect'}" in line and "PREFECT_HOME" in line


# --- Issue 18 item 7: every command fails in one line -----------------------------------

CLOSED_PORT = "postgresql://postgres@127.0.0.1:9/backjobs"


def only_line(done: subprocess.CompletedProcess[str]) -> str:
    """stderr holds exactly one line, the error: no traceback, no INFO line before it."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("backjobs"), done.stderr
    return lines[0]


def downgraded(db: Database, revision: str) -> str:
    """``db`` moved back to ``revision`` (``base``: no backjobs schema at all)."""
    from alembic import command

    from backjobs.db.migrate import alembic_config

    db.engine.dispose()
    command.downgrade(alembic_config(db.url), revision)
    return db.url


def test_an_as_of_where_a_jobs_date_arithmetic_would_overflow_is_refused_up_front() -> None:
    done = backjobs("run", "cleanup-job", "--as-of", "0001-01-02T00:00:00Z")
    assert done.returncode == 2
    line = one_error_line(done)
    assert "0001-01-02T00:00:00Z" in line and "outside the years a job can run at" in line
    assert "1900-8999" in line
    done = backjobs("trigger", "cleanup-job", "--as-of", "9500-01-01T00:00:00Z")
    assert done.returncode == 2 and "1900-8999" in one_error_line(done)


@pytest.mark.parametrize(
    "args", [("show", "99999999999999999999"), ("retry", "--id", "1", "99999999999999999999")]
)
def test_an_outbox_id_beyond_the_id_column_is_a_usage_error(
    db: Database, args: tuple[str, ...]
) -> None:
    done = backjobs("outbox", *args, BACKJOBS_DATABASE_URL=db.url)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "99999999999999999999" in line and "ids run from 1 to 9223372036854775807" in line
    assert "Traceback" not in done.stderr and "Overflow" not in done.stderr


def test_the_python_api_refuses_an_id_beyond_the_column_as_an_unknown_one(db: Database) -> None:
    from datetime import UTC, datetime

    from backjobs.outbox_admin import RetryRefused, describe_task, retry_failed

    with db.session() as session, pytest.raises(LookupError, match="no outbox row with id"):
        describe_task(session, 2**70)
    with db.session() as session, pytest.raises(RetryRefused, match="no such outbox row"):
        retry_failed(session, ids=[2**70], now=datetime.now(UTC))


@pytest.mark.parametrize(
    "args",
    [
        ("outbox", "status"),
        ("outbox", "show", "1"),
        ("outbox", "retry", "--id", "1"),
        ("run", "cleanup-job"),
        ("dashboard-token", "admin@example.com"),
    ],
)
def test_a_closed_port_is_a_connection_error_in_every_command(args: tuple[str, ...]) -> None:
    done = backjobs(*args, BACKJOBS_DATABASE_URL=CLOSED_PORT)
    assert done.returncode == 1
    line = only_line(done)
    assert "127.0.0.1" in line and "Connection refused" in line
    assert "check BACKJOBS_DATABASE_URL" in line
    assert "migrated" not in line


@pytest.mark.parametrize(
    "args",
    [
        ("outbox", "status"),
        ("outbox", "show", "1"),
        ("outbox", "retry", "--id", "1"),
        ("run", "cleanup-job"),
        ("dashboard-token", "admin@example.com"),
    ],
)
def test_an_unmigrated_database_names_db_upgrade_in_every_command(
    db: Database, args: tuple[str, ...]
) -> None:
    url = downgraded(db, "base")
    done = backjobs(*args, BACKJOBS_DATABASE_URL=url)
    assert done.returncode == 2
    line = only_line(done)
    assert "not migrated" in line and "backjobs db upgrade" in line
    assert "SELECT" not in line and "Connection refused" not in line


def test_run_on_a_database_behind_the_latest_migration_names_db_upgrade(db: Database) -> None:
    url = downgraded(db, "0002")
    done = backjobs("run", "cleanup-job", BACKJOBS_DATABASE_URL=url)
    assert done.returncode == 2
    line = only_line(done)
    assert "at revision 0002, not the latest (0003)" in line and "backjobs db upgrade" in line


@pytest.mark.parametrize(
    "args",
    [
        ("outbox", "status"),
        ("outbox", "show", "1"),
        ("run", "cleanup-job"),
        ("dashboard-token", "admin@example.com"),
    ],
)
def test_read_only_commands_create_nothing_for_a_mistyped_sqlite_path(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    typo = tmp_path / "vra" / "backjobs.db"
    done = backjobs(*args, BACKJOBS_DATABASE_URL=f"sqlite:///{typo}")
    assert done.returncode == 2
    line = only_line(done)
    assert f"no such file {typo}" in line and "BACKJOBS_DATABASE_URL" in line
    assert not typo.parent.exists()


def test_a_dot_env_that_is_a_folder_is_named_and_nothing_is_created() -> None:
    (Path.cwd() / ".env").mkdir()
    done = backjobs("outbox", "status")
    assert done.returncode == 2
    line = only_line(done)
    assert f"{Path.cwd() / '.env'} is not a file" in line
    assert not (Path.cwd() / "var").exists()


def test_a_dot_env_with_invalid_utf8_is_named() -> None:
    (Path.cwd() / ".env").write_bytes(b"BACKJOBS_SMTP_HOST=mail\nBACKJOBS_EMAIL_FROM=caf\xe9@x\n")
    done = backjobs("db", "upgrade")
    assert done.returncode == 2
    line = only_line(done)
    assert f"{Path.cwd() / '.env'} is not UTF-8" in line and "line 2" in line
    assert not (Path.cwd() / "var").exists()


@pytest.mark.parametrize(
    ("revision", "says"),
    [
        ("0001", "is at 0003, a later revision than 0001"),
        ("base", "is a downgrade"),
        ("", "--revision is empty"),
        ("  ", "--revision is empty"),
    ],
)
def test_db_upgrade_refuses_a_downgrade_and_an_empty_revision(
    db: Database, revision: str, says: str
) -> None:
    from backjobs.db.migrate import current_revision

    done = backjobs("db", "upgrade", "--revision", revision, BACKJOBS_DATABASE_URL=db.url)
    assert done.returncode == 2
    line = only_line(done)
    assert says in line
    assert current_revision(db.engine) == "0003"


def test_db_upgrade_to_a_later_revision_says_where_the_database_is(db: Database) -> None:
    url = downgraded(db, "0001")
    done = backjobs("db", "upgrade", "--revision", "0002", BACKJOBS_DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("is at 0002")
    done = backjobs("db", "upgrade", BACKJOBS_DATABASE_URL=url)
    assert done.stdout.strip().endswith("is at head (0003)")


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_dashboard_port_must_be_1_to_65535(port: str) -> None:
    done = backjobs("dashboard", f"--port={port}")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "--port" in line and repr(port) in line


@pytest.mark.parametrize(
    "value", ["", "not a url", "ftp://files.example", "//app.example", "https://"]
)
def test_app_base_url_must_be_an_absolute_http_url(value: str) -> None:
    done = backjobs("db", "upgrade", BACKJOBS_APP_BASE_URL=value)
    assert done.returncode == 2
    line = only_line(done)
    assert "invalid setting BACKJOBS_APP_BASE_URL" in line and "absolute http(s) URL" in line
    assert not (Path.cwd() / "var").exists()


def test_stack_env_with_a_missing_var_dir_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-stack"
    done = backjobs("stack", "env", "--var-dir", str(missing))
    assert done.returncode == 1
    assert f"no stack in {missing}" in done.stderr and "export" not in done.stdout
    assert not missing.exists()
    done = backjobs("stack", "down", "--var-dir", str(missing))
    assert done.returncode == 0 and "nothing to stop" in done.stdout
    assert not missing.exists()


SERVER_COMMANDS = [
    ("trigger", "cleanup-job", "--project-dir", str(ROOT)),
    ("deploy", str(ROOT / "prefect.yaml")),
]


@pytest.mark.parametrize("args", SERVER_COMMANDS)
def test_a_prefect_server_that_is_down_is_one_line_naming_its_url(args: tuple[str, ...]) -> None:
    done = backjobs(*args, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert done.returncode == 1
    line = one_error_line(done)
    assert "the Prefect server at http://127.0.0.1:9/api cannot be reached" in line, line
    assert "Connection refused" in line or "connection attempts failed" in line, line


@pytest.mark.parametrize("args", SERVER_COMMANDS)
def test_without_a_server_and_no_stack_up_the_refusal_names_prefect_api_url_alone(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    """The local stack is named only while it is up (test_stack: a new shell beside one);
    a stack folder whose dashboard has gone, its pid file left behind, is not."""
    stopped = tmp_path / "var" / "stack"
    stopped.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stopped / "dashboard.pid").write_text(str(dead.pid))
    done = subprocess.run(
        [BACKJOBS, *args],
        cwd=Path.cwd(),
        env=clean_env() | {"BACKJOBS_STACK_DIR": str(stopped.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    line = one_error_line(done)
    assert line.startswith("backjobs: error: set PREFECT_API_URL to the Prefect server "), line
    assert "stack" not in line, line


@pytest.mark.parametrize("bad", ["a setting trigger does not use", "a stack folder in a loop"])
def test_without_a_server_the_refusal_stands_when_the_stack_cannot_be_looked_for(
    bad: str, tmp_path: Path
) -> None:
    """Looking for a running stack is only a hint: it never replaces the refusal."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    setting = (
        {"BACKJOBS_DASHBOARD_PORT": "http"}
        if bad.startswith("a setting")
        else {"BACKJOBS_STACK_DIR": str(loop / "var")}
    )
    done = subprocess.run(
        [BACKJOBS, *SERVER_COMMANDS[0]],
        cwd=Path.cwd(),
        env=clean_env() | setting,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert (
        line
        == "backjobs: error: set PREFECT_API_URL to the Prefect server that holds the deployments"
    ), line


def test_a_prefect_server_that_never_answers_is_named_within_seconds() -> None:
    """A port that accepts and never answers: Prefect's client alone waited over 5 min."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections complete in the backlog; nothing is ever read
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/api"
        started = time.monotonic()
        done = backjobs(*SERVER_COMMANDS[0], PREFECT_API_URL=url)
        waited = time.monotonic() - started
    assert done.returncode == 1
    line = one_error_line(done)
    assert f"the Prefect server at {url} cannot be reached" in line, line
    assert "no answer to GET /health in 15 s" in line, line
    assert waited < 60, waited


def test_an_api_url_without_api_is_a_usage_error_saying_so() -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{site.server_address[1]}"
        done = backjobs(*SERVER_COMMANDS[1], PREFECT_API_URL=url)
        site.shutdown()
    assert done.returncode == 2
    line = one_error_line(done)
    assert f"PREFECT_API_URL={url} answered 404 to GET /health" in line and "/api" in line, line


def test_output_into_a_reader_that_stopped_ends_quietly_as_a_unix_tool_does() -> None:
    """``backjobs deployments check | true``: the reader closes the pipe; no error line,
    no Python complaint at exit, the status a shell gives a tool killed by SIGPIPE."""
    command = subprocess.Popen(
        [BACKJOBS, "deployments", "check"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert command.stdout is not None and command.stderr is not None
    command.stdout.close()  # before the command starts writing: its first write fails
    stderr = command.stderr.read().decode()
    assert command.wait(timeout=120) == 141, stderr
    assert stderr == ""
