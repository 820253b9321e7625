"""ensemble.orchestrate without training: config checks, the run directory (fresh, resumed,
refused, grown), and the jobs each member gets in a round.

Only `student_job` needs Ray (it puts the student's splits in the object store); it uses the
session's local Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble import config as C
from ensemble import distill as D
from ensemble import orchestrate as O
from ensemble.data import Splits
from ensemble.rundir import RunState
from ensemble.testing import synthetic_splits

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def _cfg(run_dir: Path, *overrides: str) -> C.RunConfig:
    return C.load(TINY, [f"output_dir={run_dir}", *overrides])


def _splits(n: int = 40, seed: int = 0) -> Splits:
    return synthetic_splits(n, seed)


# ---------------------------------------------------------------------------- check_config


def test_check_config_accepts_the_tiny_config(tmp_path: Path) -> None:
    O.check_config(_cfg(tmp_path))


def test_check_config_reports_every_stage_problem_at_once(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "members.classifier.stages=[{name: finetune}, {name: mlm}]",
               "members.student.stages=[{name: mlm}, {name: distill}]")
    with pytest.raises(C.ConfigError) as err:
        O.check_config(cfg)
    msg = str(err.value)
    assert "members.classifier.stages must end with a supervised stage" in msg
    assert "members.classifier.stages[1]: mlm must come before supervised stages" in msg
    assert "members.student.stages[0]: a student starts from its teacher" in msg


def test_check_config_rejects_a_missing_mlm_corpus(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    cfg = _cfg(tmp_path, f"members.teacher.stages=[{{name: mlm, corpus: {missing}}}, "
                         "{name: finetune}]")
    with pytest.raises(C.ConfigError, match=r"members\.teacher\.stages\[0\]\.corpus=.*not a file"):
        O.check_config(cfg)


# ------------------------------------------------------------------------- prepare_run_dir


def test_prepare_run_dir_creates_the_dir_and_saves_the_resolved_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "run"
    cfg = _cfg(run_dir)
    got, added = O.prepare_run_dir(cfg)
    assert got == run_dir.resolve() and run_dir.is_dir() and added == []
    assert C.load(run_dir / "config.yaml") == cfg


def test_prepare_run_dir_resumes_the_same_run(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run")
    O.prepare_run_dir(cfg)
    assert O.prepare_run_dir(cfg) == ((tmp_path / "run").resolve(), [])
    # settings outside data and members (rounds, logging, serving) may change on resume
    later = _cfg(tmp_path / "run", "training.log_every=3", "serve.port=8123")
    assert O.prepare_run_dir(later)[1] == []
    assert C.load(tmp_path / "run" / "config.yaml") == later


@pytest.mark.parametrize(
    ("override", "diff"),
    [
        ("members.classifier.lr=0.002", "members.classifier.lr: 0.001 -> 0.002"),
        ("data.max_train_samples=100", "data.max_train_samples: 256 -> 100"),
        # members without a seed of their own train with the run's: a resume keeps it
        ("training.seed=5", "training.seed: 0 -> 5"),
    ],
)
def test_prepare_run_dir_refuses_changed_data_or_members_and_names_the_change(
    tmp_path: Path, override: str, diff: str
) -> None:
    run_dir = tmp_path / "run"
    O.prepare_run_dir(_cfg(run_dir))
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(C.ConfigError) as err:
        O.prepare_run_dir(_cfg(run_dir, override))
    msg = str(err.value)
    assert diff in msg and "pass a new output_dir" in msg and str(run_dir.resolve()) in msg
    assert (run_dir / "config.yaml").read_text() == saved  # the old run's config is kept


def test_prepare_run_dir_grows_a_one_round_run_by_an_added_member(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    O.prepare_run_dir(_cfg(run_dir))
    grown = _cfg(run_dir, "members.extra={kind: classifier, seed: 7}")
    assert O.prepare_run_dir(grown)[1] == ["extra"]
    assert C.load(run_dir / "config.yaml") == grown  # the grown config is the run's now
    assert O.prepare_run_dir(grown)[1] == []  # and re-running it is a plain resume


@pytest.mark.parametrize(
    "overrides",
    [
        ["training.rounds=2"],  # growth is for one-round runs only
        ["members.classifier.lr=0.002"],  # an added member, but an old one changed too
        ["data.max_length=24"],  # an added member, but the data changed
        ["training.seed=5"],  # an added member, but the old ones' seed changed
    ],
    ids=["two_rounds", "changed_member", "changed_data", "changed_seed"],
)
def test_prepare_run_dir_refuses_growth_that_changes_the_run(
    tmp_path: Path, overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    rounds = [o for o in overrides if o.startswith("training.rounds")]
    O.prepare_run_dir(_cfg(run_dir, *rounds))
    with pytest.raises(C.ConfigError, match="Only adding members to a one-round run"):
        O.prepare_run_dir(_cfg(run_dir, "members.extra={kind: classifier}", *overrides))


def test_prepare_run_dir_refuses_a_removed_member(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    O.prepare_run_dir(_cfg(run_dir, "members.extra={kind: classifier}"))
    with pytest.raises(C.ConfigError, match=r"members\.extra: \{.*\} -> None"):
        O.prepare_run_dir(_cfg(run_dir))


def test_first_diff_names_the_first_differing_key_path() -> None:
    a = {"data": {"x": 1}, "members": {"a": {"lr": 1, "seed": 0}, "b": {"lr": 2}}}
    b = {"data": {"x": 1}, "members": {"a": {"lr": 1, "seed": 5}, "b": {"lr": 3}}}
    assert O._first_diff(a, b) == "members.a.seed: 0 -> 5"  # sorted keys: a before b
    assert O._first_diff({"m": {}}, {"m": {"new": 1}}) == "m.new: None -> 1"
    assert O._first_diff(1, 2) == ": 1 -> 2"


# ---------------------------------------------------------------------------------- _grow


def test_grow_reopens_a_finished_run_and_drops_the_old_ensembles_targets(tmp_path: Path) -> None:
    members = {"classifier": {"checkpoint": "/ckpt/c", "export": "/exp/c", "stopped": False}}
    state = RunState(rounds_completed=1, members=dict(members), rounds=[{"round": 1}],
                     history={"classifier": [{"step": 1, "loss": 1.0}]},
                     distill={"done": True})
    state.save(tmp_path)
    targets = tmp_path / D.cache_path("ab" * 32)
    targets.parent.mkdir(parents=True)
    targets.write_bytes(b"old")
    O._grow(tmp_path, state, ["extra"])
    saved = RunState.load(tmp_path)
    assert saved.rounds_completed == 0 and saved.rounds == [] and saved.distill is None
    assert saved.members == members and saved.history == state.history  # old members stay
    assert not targets.exists()


def test_grow_leaves_an_unfinished_run_alone(tmp_path: Path) -> None:
    state = RunState(round_done={"1": {"classifier": True}})
    O._grow(tmp_path, state, ["extra"])
    assert not (tmp_path / "state.json").exists()
    assert state.round_done == {"1": {"classifier": True}}


# ----------------------------------------------------------------------- _jobs / student_job


def _jobs(cfg: C.RunConfig, name: str, r: int, state: RunState | None = None):
    return O._jobs(cfg, name, r, state or RunState(), splits_ref="SPLITS", guidance_ref="GUIDE",
                   teacher_ckpt=None)


def test_first_round_runs_every_stage_in_order(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "training.rounds=3", "training.guidance.mutual=0.5",
               "members.classifier.stages=[{name: mlm, epochs: 0.5}, {name: finetune, epochs: 2}]",
               "members.classifier.seed=11", "members.classifier.max_length=20")
    jobs = _jobs(cfg, "classifier", 1)
    assert [j.stage.name for j in jobs] == ["mlm", "finetune"]
    assert [j.stage.epochs for j in jobs] == [0.5, 2.0]
    # the last stage repeats every round: its schedule spans all rounds; earlier ones run once
    assert [(j.repeats, j.repeat) for j in jobs] == [(1, 1), (3, 1)]
    for j in jobs:
        assert j.round == 1
        assert (j.splits, j.guidance) == ("SPLITS", "GUIDE")
        assert j.init_checkpoint is None and not j.resume_optimizer
        assert j.weights.from_ensemble == 0.0  # no previous round to learn from yet
    # what every job of the member shares travels once, in its spec
    spec = O.member_spec(cfg, "classifier", _splits(), board="board")
    assert (spec.name, spec.num_labels, spec.seed, spec.max_length) == ("classifier", 3, 11, 20)
    assert spec.member is cfg.members["classifier"] and spec.progress_actor == "board"
    assert spec.class_intensity == _splits().class_intensity()


def test_later_rounds_repeat_the_last_stage_from_the_members_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "training.rounds=3", "training.guidance.mutual=0.5",
               "members.classifier.stages=[{name: mlm}, {name: finetune}]")
    state = RunState(members={"classifier": {"checkpoint": str(tmp_path / "ckpt")}})
    (job,) = _jobs(cfg, "classifier", 2, state)
    assert job.stage.name == "finetune" and (job.repeats, job.repeat) == (3, 2)
    assert job.init_checkpoint.path == str(tmp_path / "ckpt") and job.resume_optimizer
    assert job.weights.from_ensemble == 0.5  # guidance is on from round 2
    spec = O.member_spec(cfg, "classifier", _splits())
    assert spec.seed == cfg.training.seed  # no seed of its own
    assert spec.max_length == cfg.data.max_length


def test_a_resumed_first_round_starts_only_its_first_stage_from_the_checkpoint(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "members.classifier.stages=[{name: mlm}, {name: finetune}]")
    state = RunState(members={"classifier": {"checkpoint": str(tmp_path / "ckpt")}})
    first, second = _jobs(cfg, "classifier", 1, state)
    assert first.init_checkpoint.path == str(tmp_path / "ckpt")
    assert second.init_checkpoint is None  # the runner chains it to the first stage's result


def test_jobs_give_the_regressor_one_output_and_the_student_its_distill_stage(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path)
    (reg,) = _jobs(cfg, "regressor", 1)
    assert O.member_spec(cfg, "regressor", _splits()).num_labels == 1
    assert reg.stage.name == "finetune"
    (student,) = _jobs(cfg, "student", 1)
    assert O.member_spec(cfg, "student", _splits()).num_labels == 3
    assert student.stage.name == "distill"
    assert student.weights.distill_alpha == 0.5 and student.weights.distill_temperature == 2.0


def test_student_job_distils_the_ensemble_over_train_and_corpus(ray_local, tmp_path: Path) -> None:
    import ray

    cfg = _cfg(tmp_path, "distill={student: student, epochs: 2.5, alpha: 0.7, temperature: 3.0}")
    splits, corpus = _splits(), ["extra one", "extra two"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(splits.texts["train"]) + len(corpus))
    assert cfg.distill is not None
    job = O.student_job(cfg.members["student"], splits, corpus, probs, cfg.distill, round_=2)
    assert job.stage.name == "distill" and job.stage.epochs == 2.5
    assert (job.round, job.repeats, job.repeat) == (2, 1, 1)
    assert (job.weights.distill_alpha, job.weights.distill_temperature) == (0.7, 3.0)
    assert job.weights.from_ensemble == 0.0 and job.weights.from_regressor == 0.0
    student_splits = ray.get(job.splits)
    assert student_splits.texts["train"] == splits.texts["train"] + corpus
    # corpus texts are labelled with the ensemble's class; the labelled texts keep their own
    np.testing.assert_array_equal(student_splits.labels["train"][-2:], probs[-2:].argmax(axis=1))
    np.testing.assert_array_equal(student_splits.labels["train"][:-2], splits.labels["train"])
    teacher = ray.get(job.guidance)["teacher_logits"]
    assert teacher.shape == probs.shape
    np.testing.assert_allclose(np.exp(teacher), probs, rtol=1e-5)  # log-probabilities
