"""Settings resolution, the Serve config YAML and the CLI hooks, without starting Ray."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from ensemble import combination
from ensemble.rundir import Manifest, MemberEntry
from ensemble.serving import cascade, commands, deploy, settings
from ensemble.testing import synthetic_predictions

KINDS = {
    "classifier": "classifier",
    "regressor": "regressor",
    "teacher": "teacher",
    "student": "student",
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A manifest + predictions + export dirs holding placeholder files (no weights needed)."""
    members = {}
    for name, kind in KINDS.items():
        export = tmp_path / "members" / name / "export"
        export.mkdir(parents=True)
        (export / "model.safetensors").write_bytes(name.encode())
        members[name] = MemberEntry(
            kind=kind,
            path=f"members/{name}/export",
            num_labels=1 if kind == "regressor" else 5,
            max_length=32,
        )
    Manifest(
        name="t",
        label_names=list("abcde"),
        class_intensity=[0.1, 0.3, 0.5, 0.7, 0.9],
        intensity_edges=[0.2, 0.4, 0.6, 0.8],
        intensity_range=[0, 1],
        members=members,
        combine={
            "method": "weighted",
            "weights": {"classifier": 0.4, "regressor": 0.1, "teacher": 0.4, "student": 0.1},
            "params": {},
        },
        config={"serve": {"port": 18999, "max_batch_size": 8}},
    ).save(tmp_path)
    (tmp_path / "predictions").mkdir()
    np.savez(tmp_path / "predictions" / "dev.npz", **synthetic_predictions(300, 0))
    return tmp_path


def test_serve_config_layers_run_config_and_overrides(run_dir):
    cfg = settings.serve_config_for(run_dir, {"max_batch_size": 4, "host": None})
    assert (cfg.port, cfg.max_batch_size, cfg.host) == (18999, 4, "127.0.0.1")
    with pytest.raises(ValueError, match=r"unknown serve setting\(s\) \['max_batch'\]"):
        settings.serve_config_for(run_dir, {"max_batch": 4})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        settings.serve_config_for(run_dir, {"max_batch_size": 128})


def test_deploy_config_is_a_valid_serve_config(run_dir):
    from ray.serve.schema import ServeDeploySchema

    cfg = settings.serve_config_for(
        run_dir, {"cascade": True, "route_prefix": "/ens", "num_cpus": 0.2}
    )
    config = deploy.deploy_config(run_dir, cfg, method="soft_vote")
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    assert config["http_options"] == {"host": "127.0.0.1", "port": 18999}
    (app,) = config["applications"]
    assert app["import_path"] == "ensemble.serving.app:build_app"
    assert app["route_prefix"] == "/ens"
    assert app["args"]["run_dir"] == str(run_dir.resolve())
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"combiner"} | {f"member_{n}" for n in KINDS}
    live = deps["combiner"]["user_config"]
    assert live["method"] == "soft_vote" and live["weights"]["teacher"] == 0.4
    assert live["cascade"] and 0.0 < live["cascade_threshold"] <= 1.0  # fitted on dev.npz
    member = deps["member_teacher"]
    assert member["user_config"] == {
        "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "forward_chunk_size": 8
    }
    assert member["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.0}


def test_replicas_are_a_count_or_an_autoscaling_config_serve_accepts(run_dir):
    from ray.serve.schema import ServeDeploySchema

    auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
            "downscale_delay_s": 5}
    cfg = settings.serve_config_for(run_dir, {"autoscaling": auto, "combiner_replicas": 2,
                                              "min_members": 2})
    config = deploy.deploy_config(run_dir, cfg)
    ServeDeploySchema.model_validate(config)
    deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deps["combiner"]["num_replicas"] == 2 and "autoscaling_config" not in deps["combiner"]
    assert deps["combiner"]["user_config"]["min_members"] == 2
    member = deps["member_teacher"]
    assert "num_replicas" not in member
    assert member["autoscaling_config"] == {**auto, "target_ongoing_requests": 2.0,
                                            "downscale_delay_s": 5.0}
    bad = [({"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            r"serve.autoscaling is not a valid .*max_replicas \(2\) must be greater"),
           ({"combiner_autoscaling": {"max_replica": 2}},
            r"serve.combiner_autoscaling has unknown keys \['max_replica'\]"),
           ({"min_members": 5}, r"serve.min_members=5 but the run has 4 members; use 1 to 4")]
    for overrides, match in bad:
        with pytest.raises(ValueError, match=match):
            deploy.deploy_config(run_dir, settings.serve_config_for(run_dir, overrides))


def test_explicit_threshold_wins_over_fitting(run_dir):
    cfg = settings.serve_config_for(run_dir, {"cascade": True, "cascade_threshold": 0.42})
    manifest = Manifest.load(run_dir)
    live = settings.combiner_settings(run_dir, manifest, cfg)
    assert (live.cascade_threshold, live.cascade_confidence) == (0.42, "margin")  # auto's reading
    cfg = settings.serve_config_for(
        run_dir, {"cascade": True, "cascade_threshold": 0.8, "cascade_confidence": "max_prob"}
    )
    live = settings.combiner_settings(run_dir, manifest, cfg)
    assert (live.cascade_threshold, live.cascade_confidence) == (0.8, "max_prob")


def test_fitted_threshold_comes_with_the_measure_auto_chose(run_dir):
    manifest = Manifest.load(run_dir)
    live = settings.combiner_settings(
        run_dir, manifest, settings.serve_config_for(run_dir, {"cascade": True})
    )
    spec = manifest.combination()
    threshold, measure, _ = cascade.fit_cascade_from_run(run_dir, spec, "auto")
    assert (live.cascade_threshold, live.cascade_confidence) == (threshold, measure)


def test_cascade_budget_sets_the_fitted_threshold(run_dir):
    manifest = Manifest.load(run_dir)
    spec = manifest.combination()
    for budget in (0.0, 0.05):
        cfg = settings.serve_config_for(
            run_dir, {"cascade": True, "cascade_max_accuracy_loss": budget,
                      "cascade_confidence": "margin"}
        )
        live = settings.combiner_settings(run_dir, manifest, cfg)
        expected, _ = cascade.fit_threshold_from_run(run_dir, spec, budget, measure="margin")
        assert live.cascade_threshold == expected
    # on one confidence measure (thresholds on two measures do not compare), a larger budget
    # never lets the student answer fewer texts
    strict, loose = (
        settings.combiner_settings(run_dir, manifest, settings.serve_config_for(
            run_dir, {"cascade": True, "cascade_max_accuracy_loss": b,
                      "cascade_confidence": "margin"})).cascade_threshold
        for b in (0.0, 0.05)
    )
    assert loose <= strict


def test_cascade_without_predictions_or_student_names_the_fix(run_dir):
    os.remove(run_dir / "predictions" / "dev.npz")
    cfg = settings.serve_config_for(run_dir, {"cascade": True})
    with pytest.raises(ValueError, match="set serve.cascade_threshold"):
        settings.combiner_settings(run_dir, Manifest.load(run_dir), cfg)
    manifest = Manifest.load(run_dir)
    manifest.members.pop("student")
    manifest.combine = combination.without(manifest.combine, ["student"])
    with pytest.raises(ValueError, match="kind 'student'"):
        settings.combiner_settings(run_dir, manifest, cfg)


def test_only_new_member_weights_change_the_build_args(run_dir):
    """Same args -> Serve reconfigures in place; new weights -> new args -> members reload."""
    cfg = settings.serve_config_for(run_dir)
    args = deploy.deploy_config(run_dir, cfg)["applications"][0]["args"]
    other = settings.serve_config_for(run_dir, {"cascade": True, "max_batch_size": 1})
    assert deploy.deploy_config(run_dir, other, "hard_vote")["applications"][0]["args"] == args
    (run_dir / "members" / "teacher" / "export" / "model.safetensors").write_bytes(b"new weights")
    assert deploy.deploy_config(run_dir, cfg)["applications"][0]["args"] != args


def _parse(argv):
    parser = argparse.ArgumentParser(prog="ensemble")
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_serve_write_config(run_dir, tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    args = _parse(
        [
            "serve",
            str(run_dir),
            "--write-config",
            str(out),
            "--port",
            "18123",
            "--max-batch-size",
            "1",
            "--no-cascade",
            "--cascade-confidence",
            "max_prob",
            "--method",
            "hard_vote",
        ]
    )
    assert args.func(args) == 0
    config = yaml.safe_load(out.read_text())
    assert config["http_options"]["port"] == 18123
    deps = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deps["member_student"]["user_config"]["max_batch_size"] == 1
    assert deps["combiner"]["user_config"]["method"] == "hard_vote"
    assert deps["combiner"]["user_config"]["cascade_confidence"] == "max_prob"
    assert "wrote" in capsys.readouterr().out


def test_cli_serve_rejects_an_unknown_cascade_confidence(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's choices: nothing runs
        _parse(["serve", str(run_dir), "--write-config", str(tmp_path / "x.yaml"),
                "--cascade-confidence", "entropy"])
    assert exit_.value.code == 2
    assert "margin" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()


def test_cli_serve_parses_every_switch(run_dir):
    args = _parse(
        [
            "serve",
            str(run_dir),
            "--cascade",
            "--sequential",
            "--num-cpus",
            "0.1",
            "--route-prefix",
            "/x",
            "--detach",
        ]
    )
    assert args.detach and args.func is commands._serve
    over = commands._overrides(args)
    assert over == {"cascade": True, "sequential": True, "num_cpus": 0.1, "route_prefix": "/x"}
    assert not _parse(["serve", str(run_dir)]).detach  # blocking by default


def test_cli_serve_reports_a_bad_run_dir(tmp_path, capsys):
    args = _parse(["serve", str(tmp_path / "nope"), "--write-config", str(tmp_path / "x.yaml")])
    assert args.func(args) == 1
    assert "ensemble train" in capsys.readouterr().err


def test_cli_query_without_a_server_fails_cleanly(capsys):
    args = _parse(["query", "hello", "--url", "http://127.0.0.1:9", "--timeout", "2"])
    assert args.func(args) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_serving_settings_have_one_definition():
    """The deployments' live settings and the serve flags take defaults and types from
    ServeConfig, and copy every setting they share with it."""
    import dataclasses

    from ensemble.config import ServeConfig
    from ensemble.serving.schemas import CombinerSettings, MemberSettings

    default = ServeConfig()
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    for model in (CombinerSettings, MemberSettings):
        for name, info in model.model_fields.items():
            if name in fields and name != "cascade_confidence":  # that one is auto, resolved
                assert info.default == getattr(default, name), (model.__name__, name)
    changed = ServeConfig(max_batch_size=4, max_ongoing_requests=8, forward_chunk_size=2,
                          min_members=2, max_texts=7, sequential=True, request_timeout_s=3.0)
    member = settings.member_settings(changed)
    assert (member.max_batch_size, member.forward_chunk_size) == (4, 2)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    commands.add_commands(sub)
    args = parser.parse_args(["serve", "run", "--port", "9", "--no-cascade-student-in-combiner",
                              "--cascade-confidence", "max_prob", "--num-cpus", "0.5"])
    assert commands._overrides(args) == {"port": 9, "cascade_student_in_combiner": False,
                                         "cascade_confidence": "max_prob", "num_cpus": 0.5}
    assert set(commands._SERVE_HELP) <= fields
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "run", "--cascade-confidence", "best"])


def test_address_means_the_ray_cluster_everywhere_and_the_cli_has_a_version(capsys):
    from ensemble.cli import build_parser

    parser = build_parser()
    for flag in ("--address", "--ray-address"):  # the second: the name serve used before
        assert parser.parse_args(["serve", "run", flag, "auto"]).ray_address == "auto"
    for command in (["train", "c.yaml"], ["tune", "c.yaml"], ["distill", "run", "--layers", "3"],
                    ["predict", "run", "in.csv", "-o", "o"]):
        assert parser.parse_args([*command, "--address", "auto"]).address == "auto"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ensemble ")
