"""The deployments' pull step finds the project on the worker's machine, never by a path
baked in at deploy time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backjobs.orchestration.deploy import set_project_directory

STEP = (
    "import os; from backjobs.orchestration.deploy import set_project_directory as s; "
    "print(s()['directory'])"
)


def project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prefect.yaml").write_text("deployments: []\n")
    return folder


def test_backjobs_project_dir_is_where_the_run_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = project(tmp_path / "checkout")
    monkeypatch.setenv("BACKJOBS_PROJECT_DIR", str(folder))
    assert set_project_directory() == {"directory": str(folder)}
    assert Path.cwd() == folder


def test_a_backjobs_project_dir_without_prefect_yaml_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKJOBS_PROJECT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"BACKJOBS_PROJECT_DIR=.*no prefect.yaml"):
        set_project_directory()


def test_without_the_variable_the_workers_own_directory_is_used(tmp_path: Path) -> None:
    # The flow run's process is the worker's child: its parent's directory is the worker's.
    folder = project(tmp_path / "checkout")
    elsewhere = tmp_path / "run-tmp"
    elsewhere.mkdir()
    child = f"subprocess.run([sys.executable, '-c', {STEP!r}], cwd={str(elsewhere)!r})"
    worker = f"import subprocess, sys; sys.exit({child}.returncode)"
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", worker], cwd=folder, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder)

    done = subprocess.run(
        [sys.executable, "-c", worker], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "set BACKJOBS_PROJECT_DIR in the worker's environment" in done.stderr
