"""A finished run in this process: `Ensemble.from_run(run_dir).predict(texts)`, no server, no Ray.

The answers are the server's (`POST /predict`): the same member forward passes (`LoadedMember`,
which the Serve member deployments run too), the same `Combination` read from the manifest
(method, weights, ``params.temperatures``, the regressor's sharpness), the same combination
(`cascade.ensemble_answer`, or the cascade's `hard_examples` + `cascade_answer` when the run's
``serve.cascade`` is on) and the same response bodies (`schemas.predictions`).

`prediction_row` flattens one `Prediction` into the columns `ensemble predict` writes.

Pure module: no Ray (`tests/unit/test_imports.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.combination import Combination, member_probs
from ensemble.config import ServeConfig
from ensemble.rundir import Manifest
from ensemble.serving.cascade import (
    Answer,
    cascade_answer,
    ensemble_answer,
    hard_examples,
    student_of,
)
from ensemble.serving.schemas import CombinerSettings, Prediction, PredictRequest, predictions

__all__ = ["Ensemble", "LoadedMember", "prediction_row"]

logger = logging.getLogger(__name__)


class LoadedMember:
    """One member's exported model in this process: texts in, probabilities or intensities out."""

    def __init__(self, run_dir: str, name: str, num_threads: int = 1, gpu: bool = False) -> None:
        import torch  # imported here: a combiner without a cascade never needs torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        manifest = Manifest.load(run_dir)
        entry = manifest.members[name]
        path = manifest.member_path(run_dir, name)
        torch.set_num_threads(max(1, num_threads))
        self._torch = torch
        if gpu and not torch.cuda.is_available():
            raise RuntimeError(
                f"member {name} asked for a GPU (serve.num_gpus > 0) but CUDA is "
                "not available in its replica; set serve.num_gpus=0"
            )
        self.device = "cuda" if gpu else "cpu"
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        self._model = model.eval().to(self.device)
        self._regressor = entry.kind == "regressor"
        self._max_length = entry.max_length
        logger.info("member %s loaded from %s on %s", name, path, self.device)

    def __call__(self, texts: list[str], chunk_size: int = 0) -> np.ndarray:
        """(B, C) probabilities, or (B,) intensities for the regressor, in the order of `texts`.

        The texts run shortest first, ``chunk_size`` per forward pass, so a pass pads to its own
        longest text, not the whole batch's (0: the whole batch in one pass).
        """
        from ensemble.training.loop import encode, predict_logits

        ids = encode(self._tokenizer, texts, self._max_length)
        logits = predict_logits(
            self._model, ids, self._tokenizer.pad_token_id, chunk_size or max(len(ids), 1),
            self.device,
        )  # fmt: skip
        if self._regressor:
            return logits[:, 0]  # (B,)
        return self._torch.softmax(self._torch.from_numpy(logits), dim=-1).numpy()  # (B, C)


def combiner_for(
    run_dir: str | os.PathLike, method: str | None = None, **serve: Any
) -> tuple[CombinerSettings, Combination, ServeConfig]:
    """What a fresh `ensemble serve RUN_DIR` would combine with: settings, combination, config.

    Args:
        run_dir: the run directory.
        method: override of the manifest's combine method (``--method``).
        **serve: `ServeConfig` overrides, e.g. ``cascade=False`` or ``forward_chunk_size=0``.

    Raises:
        FileNotFoundError: without a manifest. ValueError: for bad settings.
    """
    from ensemble.serving.settings import combiner_settings, serve_config_for

    cfg = serve_config_for(run_dir, serve)
    manifest = Manifest.load(run_dir)
    settings = combiner_settings(run_dir, manifest, cfg, method)
    return settings, manifest.combination(settings.method), cfg


class Ensemble:
    """Every member of a finished run, loaded here; `predict` answers like ``POST /predict``.

    Members run one after another in this process, in batches of ``serve.max_batch_size`` texts
    and forward passes of ``serve.forward_chunk_size``, as a member replica runs a request.
    So a request the server runs as one batch gets bit-identical answers here; other
    groupings differ by float rounding only (padding).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        members: dict[str, LoadedMember],
        spec: Combination,
        settings: CombinerSettings,
        batch_size: int = 16,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.members = members
        self.spec = spec
        self.settings = settings
        self.batch_size = batch_size

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        method: str | None = None,
        num_threads: int = 1,
        gpu: bool = False,
        **serve: Any,
    ) -> Ensemble:
        """Load a finished run's members and combiner, as `ensemble serve` would.

        Args:
            run_dir: the run directory (``manifest.json``, ``members/*/export``).
            method: override of the manifest's combine method.
            num_threads: torch intra-op threads.
            gpu: run the members on CUDA.
            **serve: `ServeConfig` overrides of the run's ``serve`` section, e.g.
                ``cascade=True`` or ``max_batch_size=64``.

        Raises:
            FileNotFoundError: if ``run_dir`` holds no finished run.
            ValueError: for an inconsistent combiner or bad settings.
        """
        settings, spec, cfg = combiner_for(run_dir, method, **serve)
        names = spec.served if settings.cascade else list(spec.members)
        members = {n: LoadedMember(str(run_dir), n, num_threads=num_threads, gpu=gpu)
                   for n in names}
        return cls(run_dir, members, spec, settings, batch_size=cfg.max_batch_size)

    def member_outputs(
        self, texts: Sequence[str], names: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Each member's raw output: (B, C) probabilities, or (B,) intensities (regressor)."""
        chunk = self.settings.forward_chunk_size
        size = self.batch_size
        return {
            n: np.concatenate(
                [self.members[n](list(texts[i : i + size]), chunk)
                 for i in range(0, len(texts), size)]
            )
            for n in (self.spec.members if names is None else names)
        }

    def answer(self, texts: Sequence[str]) -> Answer:
        """The combined answer for ``texts``: the ensemble's, or the cascade's when it is on."""
        if not self.settings.cascade:
            return ensemble_answer(self.member_outputs(texts), self.spec)
        student = student_of(self.spec)
        first = self.member_outputs(texts, [student])[student]  # (B, C)
        hard = hard_examples(  # on the student's vote: temperature-scaled, as fitted
            member_probs(self.spec, student, first),
            self.settings.cascade_threshold,  # type: ignore[arg-type]
            self.settings.cascade_confidence,
        )
        rest = {}
        if hard.size:
            others = [n for n in self.spec.members if n != student]
            rest = self.member_outputs([texts[i] for i in hard], others)
        return cascade_answer(self.spec, first, hard, rest)

    def predict(self, texts: str | Sequence[str], return_members: bool = False) -> list[Prediction]:
        """One `Prediction` per text, the fields of ``POST /predict``'s ``predictions``.

        Args:
            texts: a text or a list of texts (non-empty strings, as the server requires).
            return_members: add every member's view of each text (``members``).

        Raises:
            pydantic.ValidationError (a ValueError): for no texts or an empty one.
        """
        request = PredictRequest.model_validate(
            {"text": texts} if isinstance(texts, str) else {"texts": list(texts)}
        )
        return predictions(self.answer(request.as_list()), self.spec, return_members)


def prediction_row(prediction: Prediction) -> dict[str, Any]:
    """One `Prediction` as flat columns: ``label``, ``probs.<label>``, ``members.<m>.label`` ...

    The names are the JSON paths of ``POST /predict``'s fields, joined by dots; ``members``
    appears only when it was asked for. ``degraded`` and ``members_used`` are left out: offline
    every member answers every text.
    """
    data = prediction.model_dump(exclude={"degraded", "members_used"})
    if data["members"] is None:
        del data["members"]
    return _flatten(data)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
