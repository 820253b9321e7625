"""ensemble.tuning.search without running an experiment: the search space, its checks, the
schedulers and search algorithms a config asks for, and the logger callbacks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import sample

from ensemble import config as C
from ensemble.tuning import search as S

REPO = Path(__file__).resolve().parents[3]
TUNE_TINY = REPO / "configs" / "tune_tiny.yaml"


def _cfg(tmp_path: Path, *overrides: str, space: dict | None = None) -> C.RunConfig:
    """configs/tune_tiny.yaml, its `tune.space` extended by ``space`` (keys with dots in them
    can't be reached by a dotted override)."""
    raw = yaml.safe_load(TUNE_TINY.read_text())
    raw["tune"]["space"].update(space or {})
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return C.load(path, [f"output_dir={tmp_path / 'out'}", *overrides])


# ---------------------------------------------------------------------------- sample_space


def test_sample_space_turns_each_entry_into_its_distribution() -> None:
    space = S.sample_space({
        "a": C.TuneSpace(kind="choice", values=[1, 2, 3]),
        "b": C.TuneSpace(kind="uniform", low=0.2, high=0.4),
        "c": C.TuneSpace(kind="loguniform", low=1e-4, high=1e-2),
        "d": C.TuneSpace(kind="randint", low=2, high=5),
    })
    assert list(space) == ["a", "b", "c", "d"]
    assert isinstance(space["a"], sample.Categorical) and space["a"].categories == [1, 2, 3]
    assert isinstance(space["b"], sample.Float) and (space["b"].lower, space["b"].upper) == (0.2,
                                                                                          0.4)
    assert isinstance(space["c"].get_sampler(), sample.Float._LogUniform)
    assert isinstance(space["d"], sample.Integer)
    draws = {k: d.sample(size=200, random_state=0) for k, d in space.items()}
    assert set(draws["a"]) == {1, 2, 3}
    assert all(0.2 <= x <= 0.4 for x in draws["b"])
    assert all(1e-4 <= x <= 1e-2 for x in draws["c"])
    assert sum(x < 1e-3 for x in draws["c"]) > 60  # log-uniform: half the draws below 1e-3
    assert {int(x) for x in draws["d"]} == {2, 3, 4}  # randint's high is exclusive


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (C.TuneSpace(kind="choice"), r"tune\.space\.k: kind=choice needs `values: \[\.\.\.\]`"),
        (C.TuneSpace(kind="loguniform", low=0.0, high=1.0), r"tune\.space\.k: .*low > 0"),
    ],
)
def test_sample_space_names_the_entry_and_the_fix(entry: C.TuneSpace, message: str) -> None:
    with pytest.raises(C.ConfigError, match=message):
        S.sample_space({"k": entry})


# ----------------------------------------------------------------------------- check_space


def test_check_space_accepts_the_shipped_tune_config(tmp_path: Path) -> None:
    S.check_space(_cfg(tmp_path))


def test_check_space_needs_a_space_and_shows_one(tmp_path: Path) -> None:
    cfg = C.load(REPO / "configs" / "tiny.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(C.ConfigError, match=r"tune\.space is empty; add e\.g\. "
                                            r"tune\.space\.training\.guidance\.mutual"):
        S.check_space(cfg)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"training.guidance.mutal": {"kind": "uniform"}},
         r"unknown config key 'training\.guidance\.mutal'.*Did you mean.*'mutual'"),
        ({"training.guidance.mutual": {"kind": "uniform", "low": -1, "high": 1}},
         r"training\.guidance\.mutual=-1\.0 must be >= 0"),
        ({"members.classifier.scheduler": {"kind": "choice", "values": ["bogus", "linear"]}},
         r"bad value for 'members\.classifier\.scheduler'"),
    ],
    ids=["typo", "low_out_of_range", "bad_first_choice"],
)
def test_check_space_rejects_a_key_or_value_the_config_would_reject(
    tmp_path: Path, space: dict, message: str
) -> None:
    with pytest.raises(C.ConfigError, match=message):
        S.check_space(_cfg(tmp_path, space=space))


def test_check_space_accepts_randint_over_an_integer_key(tmp_path: Path) -> None:
    space = {"members.classifier.micro_batch_size": {"kind": "randint", "low": 8, "high": 33}}
    S.check_space(_cfg(tmp_path, space=space))


def test_check_space_rejects_a_range_whose_top_the_config_rejects(tmp_path: Path) -> None:
    space = {"members.classifier.warmup_ratio": {"kind": "uniform", "low": 0.0, "high": 1.5}}
    with pytest.raises(C.ConfigError, match=r"warmup_ratio=1\.5 must be in \[0, 1\)"):
        S.check_space(_cfg(tmp_path, space=space))


def test_run_tune_refuses_a_pbt_population_that_cannot_train_together(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.max_concurrent_trials=2")
    with pytest.raises(C.ConfigError, match=r"set tune\.max_concurrent_trials=4 \(= num_samples\)"):
        S.run_tune(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -------------------------------------------------------------------------- make_scheduler


def test_pbt_scheduler_is_the_synchronous_pbt_with_the_restore_fix(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.perturbation_interval=2", "tune.resample_probability=0.4")
    space = S.sample_space(cfg.tune.space)
    scheduler = S.make_scheduler(cfg, space)
    assert type(scheduler) is S.SynchPBT and isinstance(scheduler, PopulationBasedTraining)
    assert scheduler._synch and scheduler._time_attr == "training_iteration"
    assert scheduler._perturbation_interval == 2
    assert scheduler._quantile_fraction == cfg.tune.quantile_fraction == 0.5
    assert scheduler._resample_probability == 0.4
    assert scheduler._hyperparam_mutations == space


def test_pb2_scheduler_bounds_the_continuous_keys(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from ray.tune.schedulers.pb2 import PB2

    choice = {"kind": "choice", "values": ["linear", "cosine"]}
    cfg = _cfg(tmp_path, "tune.scheduler=pb2", space={"members.classifier.scheduler": choice})
    scheduler = S.make_scheduler(cfg, S.sample_space(cfg.tune.space))
    assert isinstance(scheduler, PB2) and scheduler._synch
    assert scheduler._hyperparam_bounds == {  # PB2 models numbers: the choice is left out
        "training.guidance.classifier_from_regressor": [0.0, 1.0],
        "training.guidance.regressor_from_classifier": [0.0, 1.0],
        "members.classifier.lr": [1e-4, 1e-2],
    }


def test_asha_scheduler_stops_trials_by_round(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tune.scheduler=asha", "training.rounds=4")
    scheduler = S.make_scheduler(cfg, S.sample_space(cfg.tune.space))
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler._time_attr == "training_iteration" and scheduler._max_t == 4


@pytest.mark.parametrize("name", ["random", "grid", "optuna"])
def test_other_searches_use_tunes_default_scheduler(tmp_path: Path, name: str) -> None:
    cfg = _cfg(tmp_path, f"tune.scheduler={name}")
    assert S.make_scheduler(cfg, S.sample_space(cfg.tune.space)) is None


def test_fix_restored_pbt_gives_a_synchronous_pbt_the_fix(tmp_path: Path) -> None:
    def trainable(config):  # never run
        return None

    for synch in (True, False):
        pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                      hyperparam_mutations={"x": tune.uniform(0, 1)}, synch=synch)
        tuner = tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
                           tune_config=tune.TuneConfig(metric="m", mode="max", scheduler=pbt),
                           run_config=tune.RunConfig(name=f"s{synch}", storage_path=str(tmp_path)))
        S._fix_restored_pbt(tuner)
        assert (type(pbt) is S.SynchPBT) == synch  # an asynchronous PBT never waits: left alone


# ------------------------------------------------------------------ make_search_alg, callbacks


def test_search_alg_is_optuna_only_when_asked(tmp_path: Path) -> None:
    for name in ("pbt", "pb2", "asha", "random", "grid"):
        assert S.make_search_alg(_cfg(tmp_path, f"tune.scheduler={name}")) is None


def test_optuna_search_is_seeded_from_the_config(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    search = S.make_search_alg(_cfg(tmp_path, "tune.scheduler=optuna", "tune.seed=7"))
    assert isinstance(search, OptunaSearch) and search._seed == 7


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_without_optuna_names_the_install(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match=r"tune\.scheduler=optuna needs `pip install optuna`"):
        S.make_search_alg(_cfg(tmp_path, "tune.scheduler=optuna"))


def test_callbacks_add_mlflow_only_when_a_tracking_uri_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert S.callbacks(_cfg(tmp_path)) == []
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    (callback,) = S.callbacks(_cfg(tmp_path))
    assert isinstance(callback, MLflowLoggerCallback)
    assert callback.experiment_name == "tune_tiny"
