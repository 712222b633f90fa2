"""The stack's worker and its pool: no JWT secret for workers and runs, no command or env
override offered to a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from backjobs.settings import load_settings
from backjobs.stack.config import load_stack
from backjobs.stack.pool import locked_process_template

ROOT = Path(__file__).resolve().parents[2]


def test_workers_and_runs_get_the_machine_credential_but_no_jwt_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKJOBS_JWT_SECRET", "from-the-shell-" + "x" * 32)
    settings = load_settings(jwt_secret="s" * 40, dashboard_auth_string="m:credential")
    stack = load_stack(settings, var_dir=tmp_path, project_file=ROOT / "prefect.yaml")
    worker = stack.child_env(prefect_home="prefect-client", client=True)
    assert "BACKJOBS_JWT_SECRET" not in worker
    assert "BACKJOBS_DASHBOARD_AUTH_STRING" not in worker
    assert worker["PREFECT_API_AUTH_STRING"] == "m:credential"
    assert worker["PREFECT_CLIENT_MAX_RETRIES"] == "8"  # a busy SQLite server answers 503
    server = stack.child_env(prefect_home="prefect", client=False)
    assert server["BACKJOBS_JWT_SECRET"] == "s" * 40


def test_the_pool_template_fixes_command_and_env() -> None:
    template = locked_process_template()
    variables = template["variables"]
    assert set(variables["properties"]) == {"name", "labels", "stream_output", "working_dir"}
    assert variables["additionalProperties"] is False
    configuration = template["job_configuration"]
    assert configuration["command"] is None
    assert configuration["env"] == {
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "backjobs",
    }
    assert configuration["working_dir"] == "{{ working_dir }}"
    assert configuration["stream_output"] == "{{ stream_output }}"
