"""The files in cluster/ and the job that `ensemble launch` builds, checked without a cluster.

Each cluster file is checked with the tool that will read it where one exists here (Ray's
launcher schema, Ray Serve's config schema, the CLI's own parser and config loader), and the
files are checked against each other: versions, image, shared volume, paths.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from ensemble import cli, launch
from ensemble import config as C

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
TORCH_PIN = "torch==2.13.0"
SHARED = "/mnt/shared"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dockerfile() -> tuple[str, dict[str, str]]:
    """The Dockerfile's text and its ARG defaults."""
    text = (CLUSTER / "Dockerfile").read_text()
    return text, dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


def _workdir() -> str:
    text, _ = _dockerfile()
    return re.findall(r"^WORKDIR (\S+)$", text, flags=re.M)[-1]


def _parse_cli(argv: list[str]):
    """Parse `ensemble ...` (argv without 'ensemble') as the CLI does."""
    try:
        return cli.parse_args(argv)
    except SystemExit as err:  # argparse reports errors by exiting
        raise AssertionError(f"`ensemble {shlex.join(argv)}` does not parse") from err


def _overrides(args) -> list[str]:
    return [o for o in args.overrides if o != "--"]


# ----------------------------------------------------------------------- launcher YAML (AWS)
def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(CLUSTER / "aws.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs first

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_launcher_yaml_has_cpu_head_gpu_workers_token_auth_and_pinned_setup():
    cfg = _yaml(CLUSTER / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU instance
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)

    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if c.strip() == f"pip install {TORCH_PIN}")
    project_at = next(i for i, c in enumerate(setup) if "pip install -e ~/ensemble" in c)
    assert torch_at < project_at  # torch first, then the package
    assert f'"ray[default,train,tune,serve]=={ray.__version__}"' in " ".join(setup)
    assert cfg["file_mounts"]["~/ensemble"] == "."

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# ------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_matches_this_ray_installs_torch_first_and_the_project():
    text, args = _dockerfile()
    base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
    for name, value in args.items():
        base = base.replace(f"${{{name}}}", value)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    lines = [ln.strip() for ln in text.splitlines()]
    torch_at = lines.index(f"RUN pip install --no-cache-dir {TORCH_PIN}")
    project_at = next(i for i, ln in enumerate(lines) if "pip install --no-cache-dir ." in ln)
    assert torch_at < project_at
    assert "COPY --chown=ray:users ensemble ./ensemble" in lines
    assert "COPY --chown=ray:users configs ./configs" in lines

    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("**") :][:1] == ["**"]  # deny everything, then allow
    allowed = {p[1:] for p in ignore if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "ensemble/**", "configs/**"}


# ------------------------------------------------------------------------------- KubeRay
def _manifests() -> dict[str, dict]:
    return {p.name: _yaml(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    return [(name, g["template"]["spec"]) for name, g in groups]


def test_kuberay_clusters_use_this_ray_token_auth_one_image_gpu_workers_and_shared_volume():
    docs = _manifests()
    assert {d["kind"] for d in docs.values()} == {"RayJob", "RayService", "PersistentVolumeClaim"}
    pvc = next(d for d in docs.values() if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for name, doc in docs.items():
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpu_groups = []
        for group, pod in _pod_specs(spec):
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert list(claims.values()) == [pvc["metadata"]["name"]], (name, group)
            for container in pod["containers"]:
                images.add(container["image"])
                mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
                assert mounts[next(iter(claims))] == SHARED, (name, group)
                if "nvidia.com/gpu" in container["resources"].get("limits", {}):
                    gpu_groups.append(group)
        assert gpu_groups and "head" not in gpu_groups, name
    assert len(images) == 1, images


def test_rayjob_train_and_tune_run_the_same_cluster():
    docs = _manifests()
    assert _cluster_spec(docs["rayjob-train.yaml"]) == _cluster_spec(docs["rayjob-tune.yaml"])


@pytest.mark.parametrize("manifest, command", [("rayjob-train.yaml", "train"),
                                               ("rayjob-tune.yaml", "tune")])  # fmt: skip
def test_rayjob_entrypoint_is_a_valid_ensemble_command_on_a_valid_config(manifest, command):
    argv = shlex.split(_manifests()[manifest]["spec"]["entrypoint"])
    assert argv[0] == "ensemble"
    args = _parse_cli(argv[1:])
    assert args.command == command
    assert args.address == "auto"
    # the config is the repo's file as the image has it (Dockerfile WORKDIR)
    assert args.config.startswith(_workdir() + "/")
    repo_config = REPO / Path(args.config).relative_to(_workdir())
    assert repo_config.is_file(), repo_config
    cfg = C.load(repo_config, _overrides(args))
    assert cfg.ray.storage_path.startswith(SHARED + "/")
    assert cfg.output_dir.startswith(SHARED + "/")
    assert all(m.gpus_per_worker >= 1 for m in cfg.members.values())


def test_rayservice_serve_config_is_valid_and_serves_what_the_train_job_writes():
    from ray.serve.schema import ServeDeploySchema

    docs = _manifests()
    serve_cfg = yaml.safe_load(docs["rayservice.yaml"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_cfg)
    (app,) = schema.applications
    assert app.import_path == "ensemble.serving.app:build_app"
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))

    train_args = _parse_cli(shlex.split(docs["rayjob-train.yaml"]["spec"]["entrypoint"])[1:])
    train_cfg = C.load(REPO / "configs" / Path(train_args.config).name, _overrides(train_args))
    assert app.args["run_dir"] == train_cfg.output_dir
    serve_fields = {f for f in C.ServeConfig.__dataclass_fields__}
    assert set(app.args) - {"run_dir", "method"} <= serve_fields
    C.ServeConfig(**{k: v for k, v in app.args.items() if k in serve_fields})  # valid values


# ------------------------------------------------------------------------ README commands
def _readme_commands() -> list[list[str]]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.split(" #")[0].strip() for block in blocks for ln in block.splitlines()]
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("ensemble ")]


def test_readme_launch_commands_parse_and_build_valid_jobs(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = _readme_commands()
    assert sum(argv[0] == "launch" for argv in commands) >= 3
    for argv in commands:
        args = _parse_cli(argv)
        assert args.command == argv[0]
        if args.command == "launch":
            spec = launch.job_from_args(args)  # validates options, overrides and the config
            assert spec.entrypoint.startswith("python -m ensemble.cli ")


# ------------------------------------------------------------------------ launch: the job
@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text(
        "name: my run/1\noutput_dir: /shared/runs/x\nmembers:\n  clf: {kind: classifier}\n"
    )
    return tmp_path


def test_build_job_entrypoint_runtime_env_and_metadata(project):
    spec = launch.build_job(
        project / "configs" / "run.yaml",
        command="tune",
        overrides=["training.rounds=2", "members.clf.lr=1e-4"],
        storage_path="s3://bucket/ens",
        working_dir=project,
        env={"EXTRA": "1"},
        environ={"RAY_AUTH_MODE": "token", "ENSEMBLE_X": "y", "HOME": "/h", "RAY_AUTH_TOKEN": "s"},
    )
    assert spec.entrypoint == (
        "python -m ensemble.cli tune --address auto configs/run.yaml training.rounds=2 "
        "members.clf.lr=1e-4 ray.storage_path=s3://bucket/ens"
    )
    assert _parse_cli(shlex.split(spec.entrypoint)[3:]).command == "tune"
    assert spec.output_key == "TUNE_DIR"
    env = spec.runtime_env
    assert env["working_dir"] == str(project)
    assert {"runs/", ".git", "benchmarks/results"} <= set(env["excludes"])
    assert env["env_vars"] == {"RAY_AUTH_MODE": "token", "ENSEMBLE_X": "y", "EXTRA": "1"}
    assert re.fullmatch(r"ensemble-tune-my-run-1-[0-9a-f]{8}", spec.submission_id)
    assert spec.metadata == {"ensemble_command": "tune", "config": "configs/run.yaml",
                             "name": "my run/1"}  # fmt: skip


def test_build_job_defaults_to_the_project_dir_of_the_cwd(project, monkeypatch):
    (project / "configs" / "deep").mkdir()
    monkeypatch.chdir(project / "configs" / "deep")
    spec = launch.build_job("../run.yaml", environ={}, submission_id="fixed")
    assert spec.runtime_env["working_dir"] == str(project)
    assert spec.submission_id == "fixed"
    assert spec.output_key == "RUN_DIR"
    assert shlex.split(spec.entrypoint)[6] == "configs/run.yaml"
    assert launch.find_project_dir(project.parent / "nowhere") == project.parent / "nowhere"


def test_build_job_rejects_bad_input_with_the_fix(project, tmp_path_factory):
    cfg = project / "configs" / "run.yaml"
    with pytest.raises(ValueError, match="not one of"):
        launch.build_job(cfg, command="serve", working_dir=project)
    with pytest.raises(C.ConfigError, match="must look like key=value"):
        launch.build_job(cfg, overrides=["training.rounds"], working_dir=project)
    with pytest.raises(ValueError, match="does not exist"):
        launch.build_job(project / "nope.yaml", working_dir=project)
    elsewhere = tmp_path_factory.mktemp("other")
    with pytest.raises(ValueError, match="outside the working dir.*--working-dir"):
        launch.build_job(cfg, working_dir=elsewhere)
    with pytest.raises(C.ConfigError, match="roundz"):
        launch.build_job(cfg, overrides=["training.roundz=2"], working_dir=project)


def test_build_job_warns_about_local_storage_and_relative_output_dir(project, caplog):
    cfg = project / "configs" / "run.yaml"
    launch.build_job(cfg, working_dir=project, overrides=["output_dir=runs/x"])
    text = caplog.text
    assert "ray.storage_path is not set" in text and "--storage-path" in text
    assert "output_dir=runs/x is relative" in text
    caplog.clear()
    launch.build_job(cfg, working_dir=project, storage_path="/shared/ray")
    assert caplog.text == ""


def test_parse_run_dir_takes_the_last_line_of_its_key():
    logs = "RUN_DIR=/a\nepoch 1\n  RUN_DIR=/b/c d  \nRUN_DIR=\nTUNE_DIR=/t\nxRUN_DIR=/no\n"
    assert launch.parse_run_dir(logs) == "/b/c d"
    assert launch.parse_run_dir(logs.splitlines(), key="TUNE_DIR") == "/t"
    assert launch.parse_run_dir("nothing here") is None


def test_resolve_address_refuses_an_env_var_pointing_elsewhere():
    assert launch.resolve_address("http://h:8265", {}) == "http://h:8265"
    assert launch.resolve_address(None, {"RAY_ADDRESS": "http://e:8265"}) == "http://e:8265"
    assert launch.resolve_address("http://e:8265/", {"RAY_ADDRESS": "http://e:8265"})
    with pytest.raises(ValueError, match="unset RAY_API_SERVER_ADDRESS"):
        launch.resolve_address("http://h:8265", {"RAY_API_SERVER_ADDRESS": "http://e:8265"})
    with pytest.raises(ValueError, match="pass --address"):
        launch.resolve_address(None, {})


# ------------------------------------------------------------------------ launch: the CLI
def test_cli_options_before_or_after_config_and_overrides_after_dashdash(project, monkeypatch):
    monkeypatch.chdir(project)
    for argv in (
        ["launch", "configs/run.yaml", "--address", "http://h:1", "--storage-path", "/s",
         "--env", "A=1", "--", "training.rounds=2"],
        ["launch", "--address", "http://h:1", "--env", "A=1", "configs/run.yaml",
         "--storage-path", "/s", "training.rounds=2"],
    ):  # fmt: skip
        args = _parse_cli(argv)
        spec = launch.job_from_args(args)
        assert args.address == "http://h:1"
        assert spec.entrypoint.endswith("configs/run.yaml training.rounds=2 ray.storage_path=/s")
        assert spec.runtime_env["env_vars"]["A"] == "1"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--env", "NOVALUE"], "must be KEY=VALUE"),
        (["training.roundz=2"], "roundz"),
        (["--address", "http://127.0.0.6:26999"], "Failed to connect"),  # nothing listens
    ],
)
def test_cli_reports_bad_input_and_unreachable_cluster_with_exit_2(
    project, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(project)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    argv = ["launch", "configs/run.yaml", "--storage-path", "/s", *extra]
    if "--address" not in extra:
        argv += ["--address", "http://127.0.0.6:26999"]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
