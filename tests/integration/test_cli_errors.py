"""``backjobs`` given bad input, as an operator types it: one line, an exit status, no
traceback unless ``--debug``. Each case runs the real command from the test's own folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.prefect_api import clean_env

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
