"""Ray Tune glue: trials are joint-training runs that report after every round.

Each trial is a function trainable that runs `JointRun` round by round. After a round it reports
the dev metrics with a checkpoint holding the run's state and every member's latest checkpoint
(DeepSpeed shards + export). Population Based Training exploits at those round boundaries: a weak
trial restarts from a strong trial's checkpoint with perturbed weights and continues from the
donor's round. (Train V2: no `Tuner(trainer)`; the trial builds its own TorchTrainers.)
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

from ensemble import config as C
from ensemble.data import Splits, load_splits
from ensemble.rundir import RunState, atomic_write_text
from ensemble.tuning.report import trial_metrics, write_report

logger = logging.getLogger(__name__)


def sample_space(space: dict[str, C.TuneSpace]) -> dict[str, Any]:
    """`tune.space` entries -> Tune distributions, keyed by dotted config key."""
    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.kind == "choice":
            if not s.values:
                raise C.ConfigError(f"tune.space.{key}: kind=choice needs `values: [...]`")
            out[key] = tune.choice(list(s.values))
        elif s.kind == "uniform":
            out[key] = tune.uniform(s.low, s.high)
        elif s.kind == "loguniform":
            if s.low <= 0:
                raise C.ConfigError(f"tune.space.{key}: loguniform needs low > 0")
            out[key] = tune.loguniform(s.low, s.high)
        else:
            out[key] = tune.randint(int(s.low), int(s.high))
    return out


def check_space(cfg: C.RunConfig) -> None:
    """Every searched key must be a real config key (so a typo fails before any trial starts)."""
    if not cfg.tune.space:
        raise C.ConfigError(
            "tune.space is empty; add e.g. "
            "tune.space.training.guidance.mutual: {kind: uniform, low: 0, high: 1}"
        )
    # both ends of every range (and every choice): a top a key rejects fails here, not in a trial
    for probe in (_ends(cfg.tune.space, first=True), _ends(cfg.tune.space, first=False)):
        C.replace(cfg, probe)


def _ends(space: dict[str, C.TuneSpace], first: bool) -> dict[str, Any]:
    """Each key's first (or last) value: a choice's, or a range's low (or highest) end."""
    out: dict[str, Any] = {}
    for key, s in space.items():
        if s.kind == "choice" and s.values:
            out[key] = s.values[0] if first else s.values[-1]
        elif s.kind == "randint":  # draws ints in [low, high)
            out[key] = int(s.low) if first else max(int(s.low), int(s.high) - 1)
        else:
            out[key] = s.low if first else s.high
    return out


def _save_checkpoint(run_dir: Path, state: RunState) -> tune.Checkpoint:
    """A self-contained checkpoint: state.json + each member's latest Ray Train checkpoint."""
    tmp = Path(tempfile.mkdtemp(prefix="tune-ckpt-"))
    copied = copy.deepcopy(state)
    copied.saved_by_trial = tune.get_context().get_trial_id()
    for name, member in copied.members.items():
        shutil.copytree(member["checkpoint"], tmp / "members" / name)
        member["checkpoint"] = f"members/{name}"  # relative: resolved on restore
    copied.save(tmp)
    return tune.Checkpoint.from_directory(str(tmp))


def _restore_checkpoint(checkpoint: tune.Checkpoint, run_dir: Path) -> None:
    """Lay a (possibly donor's) checkpoint out as this trial's run state."""
    target = run_dir / "restored"
    if target.exists():
        shutil.rmtree(target)
    with checkpoint.as_directory() as d:
        shutil.copytree(d, target)
    state = RunState.load(target)
    for member in state.members.values():
        member["checkpoint"] = str(target / member["checkpoint"])
    state.round_done = {}
    state.restored_from_round = state.rounds_completed
    state.restored_from_trial = state.saved_by_trial
    state.trial_id = tune.get_context().get_trial_id()
    state.save(run_dir)


def joint_trial(config: dict[str, Any], base: C.RunConfig, splits: Splits) -> None:
    """Tune function trainable: one joint-training run, reported after every round."""
    import time

    from ensemble.orchestrate import JointRun

    start = time.time()
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    cfg = C.replace(base, {**config, "output_dir": str(run_dir)})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", C.to_yaml(cfg))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        _restore_checkpoint(checkpoint, run_dir)
    run = JointRun(cfg, run_dir, splits, progress=False)
    run.state.trial_id = tune.get_context().get_trial_id()
    try:
        while not run.done():
            row = run.run_round()
            metrics = trial_metrics(row)
            metrics["restored_from_round"] = run.state.restored_from_round
            metrics["restored_from_trial"] = run.state.restored_from_trial or ""
            metrics["trial_id"] = tune.get_context().get_trial_id()
            last = run.done()
            if last:
                manifest = run.publish(wall_s=time.time() - start)
                for name, values in manifest.metrics.items():
                    for key, value in values.items():
                        metrics[f"{name.replace('/', '_')}_test_{key}"] = value
            tune.report(metrics, checkpoint=_save_checkpoint(run_dir, run.state))
    finally:
        run.close()


class SynchPBT(PopulationBasedTraining):
    """Ray's synchronous PBT with its restore deadlock fixed.

    After `Tuner.restore`, PBT's `_next_perturbation_sync` restarts from its constructor value
    while the trials resume at a later iteration. At the first sync it is then set to the
    trials' current time, and `choose_trial_to_run` only resumes trials *below* that, so every
    trial stays PAUSED forever (ray-project/ray#48616). Once every live trial has reached the
    sync point, the next one must lie ahead of all of them.
    """

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        times = [self._trial_state[t].last_train_time
                 for t in tune_controller.get_live_trials() if t in self._trial_state]
        if self._synch and times and min(times) >= self._next_perturbation_sync:
            self._next_perturbation_sync = max(times) + self._perturbation_interval
        return decision


def _fix_restored_pbt(tuner: tune.Tuner) -> None:
    """Give a restored experiment's synchronous PBT the fix of `SynchPBT` (the scheduler comes
    back unpickled as it was saved, possibly as Ray's own class)."""
    internal = getattr(tuner, "_local_tuner", None)
    scheduler = getattr(getattr(internal, "_tune_config", None), "scheduler", None)
    if type(scheduler) is PopulationBasedTraining and scheduler._synch:
        scheduler.__class__ = SynchPBT


def make_scheduler(cfg: C.RunConfig, space: dict[str, Any]):
    t = cfg.tune
    if t.scheduler == "pbt":
        return SynchPBT(
            time_attr="training_iteration",
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations=space,
            quantile_fraction=t.quantile_fraction,
            resample_probability=t.resample_probability,
            synch=True,
        )
    if t.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2

        bounds = {k: [s.low, s.high] for k, s in t.space.items() if s.kind != "choice"}
        return PB2(
            time_attr="training_iteration",
            perturbation_interval=t.perturbation_interval,
            hyperparam_bounds=bounds,
            quantile_fraction=t.quantile_fraction,
            synch=True,
        )
    if t.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.training.rounds,
            grace_period=1,
            reduction_factor=2,
        )
    return None


def make_search_alg(cfg: C.RunConfig):
    if cfg.tune.scheduler != "optuna":
        return None
    import importlib.util

    # Ray's module imports without optuna and fails only when OptunaSearch is built
    if importlib.util.find_spec("optuna") is None:
        raise C.ConfigError("tune.scheduler=optuna needs `pip install optuna`")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.tune.seed)


def callbacks(cfg: C.RunConfig) -> list[Any]:
    """Tune's CSV/JSON/TensorBoard loggers are on by default; MLflow joins when configured."""
    import os

    from ensemble.tracking import package_available

    out: list[Any] = []
    # Ray's integration module imports without mlflow and fails only when the callback starts
    if os.environ.get("MLFLOW_TRACKING_URI") and package_available(
        "mlflow", "MLFLOW_TRACKING_URI is set"
    ):
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(experiment_name=cfg.name))
    return out


def run_tune(cfg: C.RunConfig, resume: bool = True) -> Path:
    """Run (or resume) the experiment; returns the experiment's output directory."""
    from ensemble.orchestrate import check_config

    check_config(cfg)
    check_space(cfg)
    if (
        cfg.tune.scheduler in ("pbt", "pb2")
        and cfg.tune.max_concurrent_trials < cfg.tune.num_samples
    ):
        raise C.ConfigError(
            f"tune.scheduler={cfg.tune.scheduler} exploits within a population that trains "
            f"together: set tune.max_concurrent_trials={cfg.tune.num_samples} (= num_samples) "
            "and shrink members' cpus_per_worker so the population fits"
        )
    out_dir = Path(cfg.output_dir).resolve()
    exp_path = out_dir / "tune" / cfg.name
    splits = load_splits(cfg.data)
    space = sample_space(cfg.tune.space)
    metric = cfg.tune.metric
    trainable = tune.with_resources(
        tune.with_parameters(joint_trial, base=cfg, splits=splits), {"cpu": cfg.tune.cpus_per_trial}
    )
    if resume and tune.Tuner.can_restore(str(exp_path)):
        print(f"resuming the Tune experiment at {exp_path}", flush=True)
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_errored=True)
        _fix_restored_pbt(tuner)
    else:
        scheduler = make_scheduler(cfg, space)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=cfg.tune.mode,
                scheduler=scheduler,
                search_alg=make_search_alg(cfg),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=str(out_dir / "tune"),
                callbacks=callbacks(cfg),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=1,
            ),
        )
    results = tuner.fit()
    write_report(cfg, results, metric, exp_path, out_dir)
    return out_dir
