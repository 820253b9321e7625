"""Pydantic bodies of the HTTP API and the live (``user_config``) settings of the deployments.

Pure pydantic: the client imports this module without Ray. Requests use strict types and forbid
unknown fields, so ``{"text": 5}`` or a misspelt ``"return_member"`` fail with a message naming
the field instead of being coerced or ignored.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ensemble import combine
from ensemble.combination import Combination, member_probs
from ensemble.config import ServeConfig
from ensemble.serving.cascade import Answer

_SERVE = ServeConfig()  # the live settings below take their defaults from the one definition

__all__ = [
    "CascadeInfo",
    "CombinerSettings",
    "CombinerStats",
    "HealthResponse",
    "InfoResponse",
    "MemberInfo",
    "MemberOutput",
    "MemberSettings",
    "MemberStats",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "RequestLimitError",
    "StatsResponse",
    "check_limits",
    "member_output",
    "predictions",
]


class RequestLimitError(ValueError):
    """A request that is well-formed but exceeds a configured limit (HTTP 413)."""


class PredictRequest(BaseModel):
    """``POST /predict``: one ``text`` or a batch of ``texts``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(default=None, description="One text to classify.")
    texts: list[str] | None = Field(default=None, description="A batch of texts.")
    return_members: bool = Field(default=False, description="Include every member's output.")

    @model_validator(mode="after")
    def _one_input(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError('give exactly one of "text" (a string) or "texts" (a list of strings)')
        texts = self.as_list()
        if not texts:
            raise ValueError('"texts" is empty; send at least one text')
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(
                f"text(s) at index {empty[:10]} are empty or whitespace; send real text"
            )
        return self

    def as_list(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


def check_limits(texts: list[str], max_texts: int, max_text_chars: int) -> None:
    """Reject batches or texts above the configured limits.

    Args:
        texts: the request's texts.
        max_texts: most texts per request (``serve.max_texts``).
        max_text_chars: most characters per text (``serve.max_text_chars``).

    Raises:
        RequestLimitError: naming the limit and the fix.
    """
    if len(texts) > max_texts:
        raise RequestLimitError(
            f"{len(texts)} texts in one request; the limit is {max_texts} (serve.max_texts). "
            "Split the batch into smaller requests"
        )
    long = [i for i, t in enumerate(texts) if len(t) > max_text_chars]
    if long:
        raise RequestLimitError(
            f"text(s) at index {long[:10]} exceed {max_text_chars} characters "
            "(serve.max_text_chars); shorten or split them"
        )


class MemberOutput(BaseModel):
    """One member's view of one text."""

    kind: str
    label: str
    probs: dict[str, float]  # the regressor's are its (one-hot or soft) bin vote
    intensity: float  # regressor: its output; others: expected intensity under their probs
    confidence: float


class Prediction(BaseModel):
    """The served answer for one text."""

    label: str
    label_id: int
    probs: dict[str, float]
    intensity: float
    confidence: float
    disagreement: float | None = Field(
        description="Fraction of members off the plurality class; null when the student "
        "answered alone (cascade)."
    )
    answered_by: Literal["ensemble", "student"] = "ensemble"
    degraded: bool = Field(
        False, description="Some members did not answer in time; the others' combination "
        "answered (see members_used)."
    )
    members_used: list[str] = Field(
        default_factory=list, description="The members whose outputs make this answer."
    )
    members: dict[str, MemberOutput] | None = None


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    method: str
    revision: str = Field(description="Hash of the live combiner settings (changes on update).")


class MemberInfo(BaseModel):
    kind: str
    path: str
    num_labels: int
    max_length: int
    weight: float | None
    params: int = 0
    votes: bool = True  # False for a cascade-only student: it answers first, never votes


class CascadeInfo(BaseModel):
    enabled: bool
    threshold: float | None
    confidence: str
    student: str | None


class InfoResponse(BaseModel):
    name: str
    method: str
    weights: dict[str, float]
    params: list[str] = Field(description="Names of the method's fitted parameters.")
    label_names: list[str]
    members: dict[str, MemberInfo]
    cascade: CascadeInfo
    sequential: bool
    limits: dict[str, int]
    versions: dict[str, str]
    revision: str


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    members: dict[str, str] | None = None


class MemberStats(BaseModel):
    pid: int
    replica_id: str
    batches: int
    texts: int
    batch_sizes: dict[int, int] = Field(description="forward-pass size -> how many passes")
    max_batch_size: int
    batch_wait_timeout_s: float
    forward_chunk_size: int


class CombinerStats(BaseModel):
    pid: int
    replica_id: str
    requests: int
    reconfigures: int
    fanout_sizes: dict[int, int] = Field(description="texts per member fan-out -> how many")
    local_student_texts: int = Field(0, description="texts the in-combiner student answered")
    degraded_texts: int = Field(0, description="texts answered without every member")
    member_failures: dict[str, int] = Field(
        default_factory=dict, description="member -> calls it did not answer (error or timeout)"
    )
    revision: str


class StatsResponse(BaseModel):
    combiner: CombinerStats
    members: dict[str, MemberStats]
    unavailable: list[str] = Field(default_factory=list, description="members that did not "
                                   "answer the stats call")


class MemberSettings(BaseModel):
    """Live settings of a member deployment (its ``user_config``); defaults: `ServeConfig`'s."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(_SERVE.max_batch_size, ge=1,
                                description="Texts per forward pass; 1 = no batching.")
    batch_wait_timeout_s: float = Field(_SERVE.batch_wait_timeout_s, ge=0.0)
    forward_chunk_size: int = Field(
        _SERVE.forward_chunk_size, ge=0,
        description="A batch runs shortest text first, this many per pass; 0 = one pass."
    )


class CombinerSettings(BaseModel):
    """Live settings of the combiner (its ``user_config``): what `--update` pushes. The serving
    settings among them default to `ServeConfig`'s; ``cascade_confidence`` is the measure that
    ``auto`` resolved to."""

    model_config = ConfigDict(extra="forbid")

    method: str = "soft_vote"
    weights: dict[str, float] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    cascade: bool = _SERVE.cascade
    cascade_threshold: float | None = _SERVE.cascade_threshold
    cascade_confidence: Literal["margin", "max_prob"] = Field(
        "margin", description="Student confidence the threshold applies to: top-1 minus top-2 "
        "probability (margin) or top-1 (max_prob)."
    )
    # the cascade's first stage runs a copy of the student inside the combiner (no member hop)
    cascade_student_in_combiner: bool = _SERVE.cascade_student_in_combiner
    sequential: bool = _SERVE.sequential
    max_texts: int = Field(_SERVE.max_texts, ge=1)
    max_text_chars: int = Field(_SERVE.max_text_chars, ge=1)
    request_timeout_s: float = Field(_SERVE.request_timeout_s, gt=0.0)
    min_members: int = Field(
        _SERVE.min_members, ge=1,
        description="Fewest members whose answers make a (degraded) answer; below it, 503."
    )
    # requests are batched here too, so N concurrent requests fan out once with N texts
    max_batch_size: int = Field(_SERVE.max_batch_size, ge=1,
                                description="Texts per fan-out; 1 = no batching.")
    max_concurrent_fanouts: int = Field(
        _SERVE.max_concurrent_fanouts, ge=1,
        description="Batched fan-outs in flight; more requests wait and join the next."
    )
    forward_chunk_size: int = Field(
        _SERVE.forward_chunk_size, ge=0,
        description="The cascade's in-combiner student: texts per forward pass."
    )

    @model_validator(mode="after")
    def _cascade_has_threshold(self) -> CombinerSettings:
        if self.cascade and self.cascade_threshold is None:
            raise ValueError(
                "cascade is on but no cascade_threshold is known; set serve.cascade_threshold or "
                "save predictions/dev.npz so it can be fitted"
            )
        return self


def member_output(name: str, value: np.ndarray, spec: Combination) -> MemberOutput:
    """Member ``name``'s output for one text: (C,) probabilities, or a scalar for the regressor.

    The probabilities shown are the member's vote (`combination.member_probs`): temperature-scaled,
    or the regressor's binned intensity.
    """
    kind = spec.kind(name)
    probs = member_probs(spec, name, np.asarray(value, dtype=np.float64)[None])[0]  # (C,)
    if kind == "regressor":
        intensity = float(value)
    else:
        intensity = float(combine.expected_intensity(probs[None], spec.class_intensity)[0])
    return MemberOutput(
        kind=kind,
        label=spec.label_names[int(probs.argmax())],
        probs=dict(zip(spec.label_names, probs.tolist(), strict=True)),
        intensity=intensity,
        confidence=float(probs.max()),
    )


def predictions(answer: Answer, spec: Combination, return_members: bool) -> list[Prediction]:
    """The response bodies for an `Answer`; member outputs only where the member was asked."""
    comb, out = answer.combined, []
    student = spec.student
    used = [n for n in spec.members if n not in answer.missing]
    for i, by in enumerate(answer.answered_by):
        members = None
        if return_members:
            members = {
                n: member_output(n, v[i], spec)
                for n, v in answer.outputs.items()
                if not np.isnan(v[i]).any()
            }
        label_id = int(comb.label_ids[i])
        out.append(
            Prediction(
                label=spec.label_names[label_id],
                label_id=label_id,
                probs=dict(zip(spec.label_names, comb.probs[i].tolist(), strict=True)),
                intensity=float(comb.intensity[i]),
                confidence=float(comb.confidence[i]),
                disagreement=None if by == "student" else float(comb.disagreement[i]),
                answered_by=by,  # type: ignore[arg-type]
                degraded=by == "ensemble" and bool(answer.missing),
                members_used=[student] if by == "student" else used,  # type: ignore[list-item]
                members=members,
            )
        )
    return out
