"""Joint training in rounds on Ray: train members -> exchange predictions -> evaluate -> publish.

One `MemberRunner` actor owns each member. In a round it runs the member's stage jobs, each a Ray
Train `TorchTrainer` with DeepSpeed, exports the result and predicts on train/dev/test. The
predictions come back through Ray's object store and become the next round's guidance for the
other members (soft labels, intensities, teacher logits, the ensemble's soft vote). After every
round the run directory gets `rounds.json`, `state.json` and the manifest, so a re-run of the same
command resumes at the last completed round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ensemble import config as C
from ensemble import distill as D
from ensemble import evaluate as E
from ensemble import guidance as G
from ensemble import tracking
from ensemble.combination import Combination
from ensemble.data import Splits, load_splits
from ensemble.losses import LossWeights
from ensemble.progress import LiveView, start_board
from ensemble.raystart import init_ray
from ensemble.rundir import RunState, atomic_write_json, atomic_write_text
from ensemble.runner import MemberRunner
from ensemble.training import stages as S
from ensemble.training.job import MemberSpec, StageJob

logger = logging.getLogger(__name__)


def check_config(cfg: C.RunConfig) -> None:
    """Cross-field checks that need more than one dataclass (stage orders, teachers)."""
    problems: list[str] = []
    for name, member in cfg.members.items():
        problems += S.validate(name, member)
    if problems:
        raise C.ConfigError("; ".join(problems))


def _fingerprint(d: dict[str, Any]) -> dict[str, Any]:
    """What a resumed (or grown) run must keep: its data, its members and the seed they train
    with when they have none of their own (it also seeds the combiner's fit)."""
    return {"data": d.get("data"), "members": d.get("members"),
            "training.seed": (d.get("training") or {}).get("seed")}


def prepare_run_dir(cfg: C.RunConfig) -> tuple[Path, list[str]]:
    """Create the run directory, or check that an existing one holds the same run (to resume).

    A finished one-round run may also grow: a config that keeps its data and every member as
    they were and adds members trains only the added ones (see `_grow`).

    Returns:
        The run directory and the members added to the run found there (usually none).
    """
    run_dir = Path(cfg.output_dir).resolve()
    saved = run_dir / "config.yaml"
    added: list[str] = []
    if saved.is_file():
        old = C.to_dict(C.load(saved))
        new = C.to_dict(cfg)
        if _fingerprint(old) != _fingerprint(new):
            added = _added_members(old, new)
            if not added:
                diff = _first_diff(_fingerprint(old), _fingerprint(new))
                raise C.ConfigError(
                    f"{run_dir} holds a run with different data/members/seed ({diff}); pass a new "
                    "output_dir (or delete the old run) to start over. Only adding members to a "
                    "one-round run, with the others and the data unchanged, continues a run"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, C.to_yaml(cfg))
    return run_dir, added


def _added_members(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The members `new` adds to the one-round run `old` while keeping its data and members."""
    one_round = old["training"]["rounds"] == new["training"]["rounds"] == 1
    before, after = old.get("members") or {}, new.get("members") or {}
    kept = {k: v for k, v in _fingerprint(old).items() if k != "members"}
    if (not one_round or kept != {k: v for k, v in _fingerprint(new).items() if k != "members"}
            or not before.keys() < after.keys() or any(before[n] != after[n] for n in before)):
        return []
    return [n for n in after if n not in before]


def _grow(run_dir: Path, state: RunState, added: list[str]) -> None:
    """Reopen a finished one-round run so that its next round trains only the `added` members.

    The old members count as done for round 1 (they predict from their exports); the round
    table, the ensemble distillation and its cached targets belong to the old ensemble and go.
    """
    if not state.rounds_completed:
        return  # an unfinished round 1 already trains every member not done yet
    print(f"adding {', '.join(added)} to {run_dir}; its other members keep their weights",
          flush=True)
    state.rounds_completed = 0
    state.rounds = []
    state.distill = None
    for path in (run_dir / D.CACHE).glob("targets-*.npz"):
        path.unlink()
    state.save(run_dir)


def _first_diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_diff(a.get(key), b.get(key), f"{path}.{key}".lstrip("."))
    return f"{path}: {a!r} -> {b!r}"


def _jobs(cfg: C.RunConfig, name: str, r: int, state: RunState, splits_ref: Any,
          guidance_ref: Any, teacher_ckpt: Any) -> list[StageJob]:
    """Member ``name``'s stage jobs in round ``r``: every stage in round 1, the last one after."""
    plan = S.plan(cfg.members[name])
    last = len(plan) - 1
    indices = list(range(len(plan))) if r == 1 else [last]
    prev = state.members.get(name, {}).get("checkpoint")
    return [
        StageJob(
            stage=plan[i], round=r, repeats=1 if i < last else cfg.training.rounds,
            repeat=1 if i < last else r, splits=splits_ref, guidance=guidance_ref,
            weights=G.loss_weights(cfg, name, available=r > 1),
            init_checkpoint=ray.train.Checkpoint(prev) if prev and i == indices[0] else None,
            resume_optimizer=r > 1, teacher_checkpoint=teacher_ckpt,
        )
        for i in indices
    ]


def member_spec(cfg: C.RunConfig, name: str, splits: Splits,
                board: str | None = None) -> MemberSpec:
    """Member ``name`` of ``cfg`` as its runner and every one of its jobs see it."""
    member = cfg.members[name]
    return MemberSpec(
        name=name, member=member, num_labels=_num_outputs(member, splits),
        class_intensity=splits.class_intensity(), max_length=cfg.max_length(name),
        seed=member.seed if member.seed is not None else cfg.training.seed,
        log_every=cfg.training.log_every, progress_actor=board,
    )


def _num_outputs(member: C.MemberConfig, splits: Splits) -> int:
    return 1 if member.kind == "regressor" else splits.num_labels()


def member_runners(cfg: C.RunConfig, run_dir: Path, splits: Splits,
                   board: str | None = None) -> dict[str, Any]:
    """One `MemberRunner` actor per member of ``cfg``, on this node."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    storage = cfg.ray.storage_path or str(run_dir / "ray")
    return {
        name: MemberRunner.options(num_cpus=0, scheduling_strategy=here).remote(
            member_spec(cfg, name, splits, board), str(run_dir), storage,
            cfg.training.max_failures, cfg.training.eval_batch_size)
        for name in cfg.members
    }


def ensemble_targets(run_dir: Path, runners: dict[str, Any], kinds: dict[str, str],
                     spec: Combination, splits: Splits, corpus: list[str],
                     ) -> tuple[np.ndarray, str]:
    """The published ensemble's probabilities on train + corpus, cached in the run directory.

    The members (``runners``, `MemberRunner` actors holding their exports) predict the texts
    through Ray once; later calls for the same texts read them from ``RUN_DIR/distill/``.
    """
    key = D.texts_key(splits.texts["train"] + corpus)
    probs = D.load_cached(run_dir, key)
    if probs is not None:
        print(f"ensemble targets reused from {run_dir / D.cache_path(key)}", flush=True)
        return probs, key
    print(f"the {len(runners)} members predict {len(splits.texts['train']) + len(corpus)} texts "
          "for the ensemble's targets", flush=True)
    ref = ray.put(D.prediction_splits(splits, corpus))
    futures = {n: r.predict.remote(ref, True) for n, r in runners.items()}
    train = {n: ray.get(f)["outputs"]["train"] for n, f in futures.items()}
    probs = D.ensemble_probs(train, kinds, spec)
    D.save(run_dir, key, probs)
    return probs, key


def student_job(member: C.MemberConfig, splits: Splits, corpus: list[str], probs: np.ndarray,
                d: C.DistillConfig, round_: int, init_checkpoint: Any = None,
                teacher_checkpoint: Any = None) -> StageJob:
    """The one training job that distils the ensemble's ``probs`` into the student ``member``:
    its last stage, for the distillation's epochs."""
    return StageJob(
        stage=dataclasses.replace(S.plan(member)[-1], epochs=d.epochs), round=round_, repeats=1,
        repeat=1,
        splits=ray.put(D.training_splits(splits, corpus, probs)),
        guidance=ray.put({"teacher_logits": D.teacher_logits(probs)}),
        weights=LossWeights(distill_alpha=d.alpha, distill_temperature=d.temperature),
        init_checkpoint=init_checkpoint, teacher_checkpoint=teacher_checkpoint,
    )


class JointRun:
    """A joint-training run, one round at a time (the CLI loops; a Tune trial reports per round).

    Ray must be initialised. Resumes from `run_dir/state.json` when it exists.
    """

    def __init__(self, cfg: C.RunConfig, run_dir: Path, splits: Splits, progress: bool = True):
        self.cfg, self.run_dir, self.splits, self.progress = cfg, run_dir, splits, progress
        self.state = RunState.load(run_dir)
        self.kinds = {n: m.kind for n, m in cfg.members.items()}
        self.splits_ref = ray.put(splits)
        self.board_name = f"progress-{uuid.uuid4().hex[:8]}"
        self.board = start_board(self.board_name)
        self.runners = member_runners(cfg, run_dir, splits, self.board_name)
        self.outputs: dict[str, dict[str, np.ndarray]] = {}
        if self.state.rounds_completed:
            ray.get([self.runners[n].export_from.remote(m["checkpoint"])
                     for n, m in self.state.members.items()])
            needs_train = self.state.rounds_completed < cfg.training.rounds
            refs = {n: r.predict.remote(self.splits_ref, needs_train)
                    for n, r in self.runners.items()}
            self.outputs = {n: ray.get(ref)["outputs"] for n, ref in refs.items()}

    @property
    def rounds_completed(self) -> int:
        return int(self.state.rounds_completed)

    def done(self) -> bool:
        return self.rounds_completed >= self.cfg.training.rounds

    def run_round(self) -> dict[str, Any]:
        """Train the next round; returns its row of dev metrics (also saved to rounds.json)."""
        self.outputs = self._train_round(self.rounds_completed + 1)
        return self.state.rounds[-1]

    def _train_round(self, r: int) -> dict[str, dict[str, np.ndarray]]:
        """Train every member for round r; in round 1 a student starts once its teacher is done."""
        cfg, state, runners, outputs = self.cfg, self.state, self.runners, self.outputs
        splits, splits_ref, kinds, run_dir = self.splits, self.splits_ref, self.kinds, self.run_dir
        rounds = cfg.training.rounds
        done = state.round_done.get(str(r), {})
        guidance_refs = G.build(cfg, splits, kinds, outputs) if outputs else {}
        new_outputs: dict[str, dict[str, np.ndarray]] = {}

        def stopped(name: str) -> bool:  # early stopping ended its training in an earlier round
            return bool(state.members.get(name, {}).get("stopped"))

        skip = {n for n in cfg.members if n in done or stopped(n)}

        def submit(name: str) -> Any:
            needs_train = r < rounds or any(kinds[s] == "student" for s in cfg.members
                                            if cfg.members[s].teacher == name and r == 1)
            if name in skip:
                return runners[name].predict.remote(splits_ref, needs_train)
            teacher = cfg.members[name].teacher
            g_ref = guidance_refs.get(name)
            if teacher and teacher not in outputs and teacher in new_outputs:
                g_ref = G.teacher_only(new_outputs[teacher]["train"])
            teacher_ckpt = (ray.train.Checkpoint(state.members[teacher]["checkpoint"])
                            if teacher and r == 1 else None)
            jobs = _jobs(cfg, name, r, state, splits_ref, g_ref, teacher_ckpt)
            return runners[name].run_round.remote(jobs, needs_train)

        # round 1: a student distils from its teacher's trained weights and logits of this round
        waiting = {n: cfg.members[n].teacher for n in cfg.members
                   if kinds[n] == "student" and r == 1}

        def record(name: str, result: dict[str, Any]) -> dict[str, Any]:
            new_outputs[name] = result["outputs"]
            if name not in skip:
                state.members[name] = {"checkpoint": result["checkpoint"],
                                       "export": result["export"],
                                       "stopped": bool(result.get("stopped"))}
                state.history.setdefault(name, []).extend(result["history"])
                state.member_info[name] = result["info"]
                done[name] = True
                state.round_done[str(r)] = done
                state.save(run_dir)
            ready = [s for s, t in waiting.items() if t == name]
            for s in ready:
                del waiting[s]
            return {s: submit(s) for s in ready}

        futures = {name: submit(name) for name in cfg.members if name not in waiting}
        view = LiveView(self.board, f"round {r}/{rounds}", enabled=self.progress)
        view.wait(futures, on_done=record)
        if waiting:  # config checks make this unreachable: every student's teacher is a member
            raise RuntimeError(f"students {sorted(waiting)} never got their teacher's round")
        new_outputs = {n: new_outputs[n] for n in cfg.members}  # config order, not finishing order
        row = _round_row(cfg, r, splits, kinds, new_outputs, state)
        state.rounds.append(row)
        state.rounds_completed = r
        state.save(run_dir)
        atomic_write_json(run_dir / "rounds.json", state.rounds)
        from ensemble.publish import print_round

        print_round(row)
        return new_outputs

    def distill(self) -> None:
        """Train `distill.student` on the published ensemble's calibrated probabilities.

        The members predict the training texts (and the corpus) through Ray once; the targets
        are cached in the run directory and reused on resume, and a finished distillation is
        not redone. Records the student's dev KL to the ensemble before and after.
        """
        from ensemble import combine
        from ensemble.publish import fit_combiner

        d, cfg, splits = self.cfg.distill, self.cfg, self.splits
        if d is None or (self.state.distill or {}).get("done"):
            return
        name = d.student
        corpus = D.held_out_corpus(D.read_corpus(cfg), splits)
        dev = {n: o["dev"] for n, o in self.outputs.items()}
        spec = fit_combiner(
            combine.to_probs(dev, self.kinds), self.kinds, splits, cfg.training.seed,
            cfg.training.regressor_vote, cfg.training.combiner, cfg.training.combiner_select,
            cfg.training.calibrate,
        )
        probs, key = ensemble_targets(self.run_dir, self.runners, self.kinds, spec, splits, corpus)
        dev_ensemble = D.ensemble_probs(dev, self.kinds, spec)
        before = D.mean_kl(dev_ensemble, combine.softmax(dev[name]))
        job = student_job(
            cfg.members[name], splits, corpus, probs, d, self.rounds_completed + 1,
            init_checkpoint=ray.train.Checkpoint(self.state.members[name]["checkpoint"]),
        )
        print(f"distilling the ensemble into {name}: {len(probs)} texts "
              f"({len(corpus)} from the corpus), up to {d.epochs:g} epochs", flush=True)
        result = ray.get(self.runners[name].run_round.remote([job], False))
        self.outputs[name] = result["outputs"]
        after = D.mean_kl(dev_ensemble, combine.softmax(result["outputs"]["dev"]))
        self.state.members[name] = {"checkpoint": result["checkpoint"],
                                    "export": result["export"],
                                    "stopped": bool(result.get("stopped"))}
        self.state.history.setdefault(name, []).extend(result["history"])
        self.state.member_info[name] = result["info"]
        self.state.distill = {"done": True, "texts": len(probs), "corpus_texts": len(corpus),
                              "dev_kl_to_ensemble_before": before,
                              "dev_kl_to_ensemble_after": after,
                              "targets": str(D.cache_path(key))}
        self.state.save(self.run_dir)
        print(f"{name}: dev KL to the ensemble {before:.4f} -> {after:.4f}", flush=True)

    def publish(self, wall_s: float):
        from ensemble.publish import publish

        return publish(self.cfg, self.run_dir, self.splits, self.kinds, self.outputs, self.state,
                       wall_s=wall_s)

    def close(self) -> None:
        for actor in [self.board, *self.runners.values()]:
            ray.kill(actor)


def train(cfg: C.RunConfig, address: str | None = None, verbose: bool = False,
          progress: bool = True) -> Path:
    """Train every member for `training.rounds` rounds and write the run directory.

    Args:
        cfg: the validated run config.
        address: Ray cluster to join; None starts a local Ray on `ray.node_ip_address`.
        verbose: forward worker logs to the driver.
        progress: show the live progress table.

    Returns:
        The run directory (holding manifest.json, metrics.json, exported members, plots).
    """
    check_config(cfg)
    start = time.time()
    run_dir, added = prepare_run_dir(cfg)
    splits = load_splits(cfg.data)  # bad data fails here, before Ray starts
    state = RunState.load(run_dir)
    if added:
        _grow(run_dir, state, added)
    if state.rounds_completed >= cfg.training.rounds and (run_dir / "manifest.json").is_file():
        print(f"{run_dir} already holds {state.rounds_completed} completed round(s)", flush=True)
        return run_dir
    init_ray(cfg.ray, address, verbose)
    run = JointRun(cfg, run_dir, splits, progress)
    tracker = tracking.start(cfg, run_dir)  # MLflow (MLFLOW_TRACKING_URI) and TensorBoard
    status = "FAILED"
    try:
        if run.rounds_completed:
            print(f"resuming {run_dir} after round {run.rounds_completed}", flush=True)
        while not run.done():
            tracker.log_round(run.run_round(), run.state.history)
        run.distill()
        run.publish(wall_s=time.time() - start)
        tracker.log_published(run_dir)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        run.close()
        tracker.close(status)
    return run_dir


def _round_row(cfg, r, splits, kinds, outputs, state) -> dict[str, Any]:
    dev = G.to_probs({n: o["dev"] for n, o in outputs.items()}, kinds)
    sharpness = G.regressor_sharpness(cfg, splits, kinds, outputs)
    temperatures = G.member_temperatures(cfg, splits, kinds, outputs)
    rows = E.evaluate_split(dev, kinds, splits.labels["dev"],
                            splits.intensity["dev"] if splits.intensity else None,
                            splits.label_names, splits.class_intensity(), splits.intensity_edges(),
                            sharpness=sharpness, temperatures=temperatures)
    stages = {n: state.member_info.get(n, {}).get("stages", []) for n in outputs}
    return {"round": r, "dev": E.compact(rows), "stages": stages, "regressor_sharpness": sharpness,
            "temperatures": temperatures}
