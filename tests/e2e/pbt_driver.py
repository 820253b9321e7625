"""A synchronous-PBT experiment with a numpy trainable, run or restored in its own process.

    python tests/e2e/pbt_driver.py STORAGE MARKERS fresh
    python tests/e2e/pbt_driver.py STORAGE MARKERS restore --fix | --no-fix

`test_pbt_restore.py` SIGKILLs a `fresh` run (with its Ray) mid-experiment and restores copies
of what it left. The scheduler is Ray's own `PopulationBasedTraining(synch=True)`, as an
experiment saved before `ensemble.tuning.search.SynchPBT` existed would hold; `--fix` applies
`_fix_restored_pbt`, the restore path `ensemble tune` takes. Each trial touches
``MARKERS/<trial>-<iteration>`` as it reports, so the test sees how far trials got. While the
file ``HOLD`` (beside MARKERS) exists, a trial that has reported iteration `HOLD_AFTER` touches
``HOLD.d/<trial>`` and waits, so the kill finds every trial checkpointed at the same iteration.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ITERATIONS = 4
HOLD_AFTER = 2
TRIALS = 3
NODE_IP = "127.0.0.13"


def trainable(config: dict) -> None:
    from ray import tune

    ctx = tune.get_context()
    markers = Path(config["markers"])
    start, value = 0, 0.0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / "state.json").read_text())
        start, value = saved["iteration"], saved["value"]
    hold = markers.with_name("HOLD")
    for i in range(start + 1, ITERATIONS + 1):
        if i == HOLD_AFTER + 1 and hold.exists():
            held = hold.with_suffix(".d")
            held.mkdir(exist_ok=True)
            (held / ctx.get_trial_id()).touch()
            while hold.exists():
                time.sleep(0.2)
        value += config["lr"]
        time.sleep(config["pause_s"])
        # before the report: synchronous PBT may pause (stop) the trial inside `tune.report`
        (markers / f"{ctx.get_trial_id()}-{i}").touch()
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"iteration": i, "value": value}))
            tune.report({"score": value, "step": i}, checkpoint=tune.Checkpoint.from_directory(d))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("storage")
    ap.add_argument("markers")
    ap.add_argument("mode", choices=("fresh", "restore"))
    ap.add_argument("--fix", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from ensemble.tuning.search import _fix_restored_pbt

    ray.init(num_cpus=2, _node_ip_address=NODE_IP, include_dashboard=False)
    path = Path(args.storage) / "pbt"
    if args.mode == "fresh":
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,
            hyperparam_mutations={"lr": tune.uniform(0.1, 1.0)},
            synch=True,
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.5}),
            param_space={
                "lr": tune.uniform(0.1, 1.0),
                "markers": args.markers,
                "pause_s": 0.5,
            },
            tune_config=tune.TuneConfig(
                metric="score", mode="max", num_samples=TRIALS, scheduler=scheduler
            ),
            run_config=tune.RunConfig(name="pbt", storage_path=args.storage),
        )
    else:
        tuner = tune.Tuner.restore(
            str(path),
            trainable=tune.with_resources(trainable, {"cpu": 0.5}),
            resume_unfinished=True,
        )
        if args.fix:
            _fix_restored_pbt(tuner)
    results = tuner.fit()
    steps = sorted(int(r.metrics.get("step", 0)) for r in results)
    print(json.dumps({"steps": steps, "errors": len(results.errors)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
