"""The serve / query CLI hooks (argument parsing, overrides, --write-config), without starting
Ray. `run_dir` is in conftest.py."""

from __future__ import annotations

import argparse

import pytest
import yaml

from ensemble.serving import commands, settings


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
