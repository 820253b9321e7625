"""Config loading: every shipped YAML, errors named with their fix, defaults and overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ensemble import config as C
from ensemble.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = C.load(path)
    assert isinstance(cfg, C.RunConfig) and cfg.members
    assert all(isinstance(m, C.MemberConfig) for m in cfg.members.values())
    # the resolved YAML saved next to a run loads back to the same config
    saved = tmp_path / "config.yaml"
    saved.write_text(C.to_yaml(cfg))
    assert C.load(saved) == cfg


def test_tiny_config_matches_what_the_tests_rely_on() -> None:
    cfg = C.load(TINY)
    kinds = {m.kind for m in cfg.members.values()}
    assert kinds == {"classifier", "regressor", "teacher", "student"}
    for m in cfg.members.values():
        assert m.pretrained is False
        assert m.arch["num_hidden_layers"] == 2 and m.arch["hidden_size"] == 32


def test_configs_are_frozen() -> None:
    cfg = C.load(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("training.roundz=2", r"training\.roundz.*Did you mean.*'rounds'"),
        ("members.classifier.lrr=1", r"members\.classifier\.lrr.*Did you mean.*'lr'"),
        ("membrs.x=1", r"'membrs'.*Did you mean.*'members'"),
    ],
)
def test_unknown_key_names_the_key_and_a_suggestion(override: str, pattern: str) -> None:
    with pytest.raises(C.ConfigError, match=pattern):
        C.load(TINY, [override])


def test_unknown_key_in_the_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text().replace("rounds: 1", "rounds: 1\n  seeed: 3"))
    with pytest.raises(C.ConfigError, match=r"training\.seeed.*Did you mean.*'seed'"):
        C.load(path)


def test_wrong_type_is_rejected_with_the_key() -> None:
    with pytest.raises(C.ConfigError, match=r"bad value for 'training\.rounds'.*'abc'"):
        C.load(TINY, ["training.rounds=abc"])


def test_literal_violation_lists_the_allowed_values() -> None:
    with pytest.raises(C.ConfigError, match=r"members\.classifier\.scheduler.*linear.*cosine"):
        C.load(TINY, ["members.classifier.scheduler=exponential"])
    with pytest.raises(C.ConfigError, match=r"pretrain.*mlm.*finetune.*curriculum.*distill"):
        C.load(TINY, ["members.teacher.stages=[{name: pretrain}]"])
    with pytest.raises(C.ConfigError, match=r"serve\.cascade_confidence.*margin.*max_prob"):
        C.load(TINY, ["serve.cascade_confidence=entropy"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("members.classifier.zero_stage=5", r"zero_stage=5 must be 0, 1, 2 or 3"),
        ("members.classifier.lr=0", r"lr=0.0 must be > 0"),
        ("members.regressor.loss=cross_entropy", r"regressor's loss must be mse or huber"),
        ("members.classifier.loss=mse", r"loss=mse is for regressors"),
        ("training.rounds=0", r"training\.rounds=0 must be >= 1"),
        ("data.max_length=4", r"data\.max_length=4 is too short"),
        ("training.guidance.mutual=-1", r"training\.guidance\.mutual=-1.0 must be >= 0"),
        ("serve.max_ongoing_requests=1", r"max_ongoing_requests must be >= serve\.max_batch_size"),
        ("serve.forward_chunk_size=-1", r"serve\.forward_chunk_size must be >= 0"),
        ("serve.max_concurrent_fanouts=0", r"serve\.max_concurrent_fanouts must be >= 1"),
        ("serve.cascade_max_accuracy_loss=5", r"cascade_max_accuracy_loss=5.0 must be.*0\.005"),
    ],
)
def test_invalid_values_name_the_fix(override: str, pattern: str) -> None:
    with pytest.raises(C.ConfigError, match=pattern):
        C.load(TINY, [override])


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(C.ConfigError) as err:
        C.load(TINY, ["members.classifier.zero_stage=5", "members.classifier.num_workers=0"])
    assert "zero_stage=5" in str(err.value) and "num_workers=0" in str(err.value)


def test_student_needs_a_teacher_of_kind_teacher() -> None:
    with pytest.raises(C.ConfigError, match=r"a student needs `teacher: <member name>`"):
        C.load(TINY, ["members.student.teacher=null"])
    with pytest.raises(C.ConfigError, match=r"has kind=classifier; set its kind to teacher"):
        C.load(TINY, ["members.student.teacher=classifier"])
    with pytest.raises(C.ConfigError, match=r"'teachr' is not a member\. Did you mean 'teacher'"):
        C.load(TINY, ["members.student.teacher=teachr"])
    with pytest.raises(C.ConfigError, match=r"`teacher` is only for kind=student"):
        C.load(TINY, ["members.classifier.teacher=teacher"])


def test_bad_override_syntax() -> None:
    with pytest.raises(C.ConfigError, match=r"'training\.rounds' must look like key=value"):
        C.load(TINY, ["training.rounds"])


def test_missing_file_names_an_example() -> None:
    with pytest.raises(C.ConfigError, match=r"not found; pass a YAML such as configs/tiny\.yaml"):
        C.load(TINY.parent / "nope.yaml")


def test_member_defaults_apply_under_every_member_and_members_win(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "member_defaults: {lr: 0.002, micro_batch_size: 8, arch: {hidden_size: 32}}\n"
        "members:\n"
        "  a: {kind: classifier}\n"
        "  b: {kind: regressor, lr: 0.0005, arch: {num_hidden_layers: 1}}\n"
    )
    cfg = C.load(path)
    a, b = cfg.members["a"], cfg.members["b"]
    assert (a.lr, a.micro_batch_size, a.arch) == (0.002, 8, {"hidden_size": 32})
    assert (b.lr, b.micro_batch_size) == (0.0005, 8)
    assert b.arch == {"hidden_size": 32, "num_hidden_layers": 1}  # dicts merge key by key
    assert b.kind == "regressor" and b.task_loss == "mse" and a.task_loss == "cross_entropy"


def test_dotted_overrides_reach_one_member_and_the_defaults() -> None:
    cfg = C.load(TINY, ["members.student.lr=1e-4", "training.rounds=2"])
    assert cfg.members["student"].lr == pytest.approx(1e-4)
    assert cfg.members["classifier"].lr == pytest.approx(1e-3)  # from member_defaults
    assert cfg.training.rounds == 2
    cfg = C.load(TINY, ["member_defaults.lr=0.5"])
    assert {m.lr for m in cfg.members.values()} == {0.5}
    cfg = C.load(TINY, ["members.extra.kind=classifier"])
    assert cfg.members["extra"].lr == pytest.approx(1e-3)  # a new member gets the defaults too


def test_stage_lists_from_an_override() -> None:
    cfg = C.load(TINY, ["members.teacher.stages=[{name: mlm}, {name: finetune, epochs: 2}]"])
    stages = cfg.members["teacher"].stages
    assert [(s.name, s.epochs) for s in stages] == [("mlm", 1.0), ("finetune", 2.0)]
    assert isinstance(stages[0], C.StageConfig)


def test_replace_revalidates() -> None:
    cfg = C.load(TINY)
    assert C.replace(cfg, {"training.rounds": 3}).training.rounds == 3
    assert cfg.training.rounds == 1
    with pytest.raises(C.ConfigError, match="training.rounds=0"):
        C.replace(cfg, {"training.rounds": 0})


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(TINY), "training.rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "config OK: 4 members" in out and "2 round(s)" in out


def test_cli_validate_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(TINY), "training.roundz=2"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "Did you mean" in err and "rounds" in err


def test_cli_validate_checks_stage_order(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(TINY), "members.teacher.stages=[{name: finetune}, {name: mlm}]"])
    assert code == 2
    assert "mlm must come before supervised stages" in capsys.readouterr().err


def test_cli_validate_with_data(sst_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = main(["validate", str(TINY), "--data", f"data.source={sst_dir}"])
    assert ok == 0
    assert "data OK" in capsys.readouterr().out
    bad = main(["validate", str(TINY), "--data", f"data.source={sst_dir}",
                "data.label_column=no_such_column"])
    assert bad == 2
    assert "no_such_column" in capsys.readouterr().err


def test_retired_combine_method_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run directories written before training.combiner hold combine_method, which never acted."""
    path = tmp_path / "old.yaml"
    old = C.to_dict(C.load(REPO / "configs" / "tiny.yaml"))
    old["training"].update(rounds=2, combine_method="soft_vote")
    path.write_text(yaml.safe_dump(old))
    with caplog.at_level("WARNING", logger="ensemble.config"):
        cfg = C.load(path)
    assert cfg.training.rounds == 2 and cfg.training.combiner == "auto"
    assert "training.combine_method=soft_vote is ignored" in caplog.text
    assert "training.combiner" in caplog.text
    fixed = C.load(path, ["training.combiner=stacking", "training.combiner_select=best"])
    assert (fixed.training.combiner, fixed.training.combiner_select) == ("stacking", "best")
    with pytest.raises(C.ConfigError, match="expected one of \\['one_se', 'best'\\]"):
        C.load(REPO / "configs" / "tiny.yaml", ["training.combiner_select=worst"])


def test_calibrate_defaults_on_and_can_be_switched_off() -> None:
    assert C.load(TINY).training.calibrate is True
    assert C.load(TINY, ["training.calibrate=false"]).training.calibrate is False
    with pytest.raises(C.ConfigError, match="training.calibrate"):
        C.load(TINY, ["training.calibrate=maybe"])
