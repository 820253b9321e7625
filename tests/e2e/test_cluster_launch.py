"""`ensemble launch` against a real 3-node Ray cluster (head + 2 workers) on loopback.

The jobs here run trivial entrypoints, so these tests check the launch machinery itself (job
packaging, auth, log streaming, RUN_DIR parsing, failure reporting, the CLI path) and stay
independent of how long `ensemble train` takes.
"""

from __future__ import annotations

import dataclasses
import io
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster import LocalCluster  # tests/e2e is on sys.path (pytest rootdir-relative import)
from ensemble import launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
name: launch-e2e
output_dir: /tmp/ensemble-launch-e2e
members:
  clf:
    kind: classifier
"""


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(num_workers=2, cpus_per_node=1) as c:
        yield c


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project dir: a config, code, and things launch must not upload."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(CONFIG)
    (tmp_path / "code.py").write_text("VALUE = 42\n")
    for skipped in ("runs/old", ".git/objects", "benchmarks/results"):
        (tmp_path / skipped).mkdir(parents=True)
        (tmp_path / skipped / "big.bin").write_bytes(b"x" * 1000)
    return tmp_path


def _python(code: str) -> str:
    return f"python -c {shlex.quote(textwrap.dedent(code))}"


def test_trivial_job_uploads_project_streams_logs_and_reports_run_dir(cluster, project):
    spec = launch.build_job(
        project / "configs" / "run.yaml",
        working_dir=project,
        env={"ENSEMBLE_E2E": "yes"},
        environ={"RAY_AUTH_MODE": "token", "HOME": "/not/passed"},
    )
    spec = dataclasses.replace(
        spec,
        entrypoint=_python(
            """
            import os, code
            print("files", sorted(os.listdir(".")))
            print("env", os.environ.get("ENSEMBLE_E2E"), os.environ.get("RAY_AUTH_MODE"))
            print("value", code.VALUE)
            print("RUN_DIR=/tmp/first")
            print("RUN_DIR=/tmp/x")
            """
        ),
    )
    out = io.StringIO()
    result = launch.launch(spec, cluster.dashboard_url, out=out, headers=cluster.auth_headers)

    assert result.ok, (result, out.getvalue())
    assert result.job_id == spec.submission_id
    assert result.run_dir == "/tmp/x"  # the last RUN_DIR line wins
    logs = out.getvalue()
    assert "files ['code.py', 'configs', 'pyproject.toml']" in logs  # no runs/, .git, results
    assert "env yes token" in logs
    assert "value 42" in logs


def test_failed_job_reports_status_and_no_run_dir(cluster, project):
    spec = launch.build_job(project / "configs" / "run.yaml", working_dir=project)
    spec = dataclasses.replace(spec, entrypoint=_python("import sys; print('boom'); sys.exit(3)"))
    out = io.StringIO()
    result = launch.launch(spec, cluster.dashboard_url, out=out, headers=cluster.auth_headers)

    assert result.status == "FAILED"
    assert not result.ok
    assert result.run_dir is None
    assert "boom" in out.getvalue()
    assert "3" in (result.message or "")  # Ray's message names the exit code


def test_wrong_token_is_refused(cluster, project):
    spec = launch.build_job(project / "configs" / "run.yaml", working_dir=project)
    with pytest.raises(ConnectionError, match="refused this client.s token"):
        launch.launch(
            spec, cluster.dashboard_url, headers={"Authorization": "Bearer not-the-token"}
        )


def test_cli_submits_with_token_from_env(cluster, project):
    """`python -m ensemble.cli launch` in a fresh process: token from the env, options after
    CONFIG, `--` before the overrides; the submitted job is checked, then stopped.

    (A ray:// address works too, but Ray Client's per-connection servers take fixed ports
    23000-24000 that other Ray users of this machine may hold, so the test stays on HTTP.)
    """
    argv = [
        sys.executable, "-m", "ensemble.cli", "launch", "configs/run.yaml",
        "--address", cluster.dashboard_url,
        "--command", "tune",
        "--storage-path", "/tmp/shared-storage",
        "--env", "ENSEMBLE_FLAG=1",
        "--job-id", "cli-e2e-job",
        "--no-wait",
        "--", "training.rounds=2",
    ]  # fmt: skip
    env = {  # only what this test sets may reach the job
        k: v
        for k, v in cluster.client_environ().items()
        if k not in launch.PASSTHROUGH_ENV and not k.startswith(launch.PASSTHROUGH_PREFIX)
    }
    env.update(cluster.env)
    proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "JOB_ID=cli-e2e-job"

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers)
    info = client.get_job_info("cli-e2e-job")
    assert info.entrypoint == (
        "python -m ensemble.cli tune --address auto configs/run.yaml "
        "training.rounds=2 ray.storage_path=/tmp/shared-storage"
    )
    assert info.runtime_env["env_vars"] == {"RAY_AUTH_MODE": "token", "ENSEMBLE_FLAG": "1"}
    assert info.metadata["ensemble_command"] == "tune"
    client.stop_job("cli-e2e-job")
    deadline = time.monotonic() + 60
    while str(client.get_job_status("cli-e2e-job").value) not in ("STOPPED", "FAILED"):
        assert time.monotonic() < deadline, "job did not stop"
        time.sleep(0.5)
