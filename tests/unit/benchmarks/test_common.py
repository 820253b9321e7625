"""benchmarks/common.py: the commit a result file names says whether the code had local edits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import common


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_git_commit_marks_edited_code_but_not_result_files(tmp_path: Path, monkeypatch) -> None:
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(common, "REPO", tmp_path)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()

    assert common.git_commit() == head
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    assert common.git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_commit() == f"{head}+dirty"
