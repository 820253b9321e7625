"""The Ray Serve application: one deployment per member and a combiner behind a FastAPI ingress.

``build_app({"run_dir": ...})`` (import path ``ensemble.serving.app:build_app``) loads the run's
manifest and binds

* ``member_<name>``: loads the member's ``save_pretrained`` export and answers
  ``predict(texts)`` with ``(B, C)`` probabilities, or ``(B,)`` intensities for the regressor.
  Concurrent calls are merged into one forward pass by ``@serve.batch``; ``max_batch_size`` and
  the wait timeout are live settings (``user_config``), and ``max_batch_size=1`` turns batching
  off.
* ``combiner``: the HTTP ingress. It fans a request out to every member at once (the
  ``DeploymentResponse`` objects are awaited together), or one after another in ``sequential``
  mode, and combines the outputs with `ensemble.combine` via `combination.combine_outputs`.
  Concurrent requests share fan-outs (`FanOutBatcher`). Method,
  weights, cascade and limits are its ``user_config``, so `reconfigure` swaps them on the
  running replicas without a restart.

Settings come from `ensemble.serving.settings`; the deployments' options, the Serve config YAML,
deploying and live updates from `ensemble.serving.deploy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from ensemble.combination import Combination, member_probs
from ensemble.inference import LoadedMember
from ensemble.rundir import Manifest
from ensemble.serving import schemas as s
from ensemble.serving.cascade import (
    Answer,
    cascade_answer,
    ensemble_answer,
    hard_examples,
    student_of,
)
from ensemble.serving.deploy import COMBINER, deployments, member_deployment_name
from ensemble.serving.settings import serve_config_for

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


async def _settle(
    names: list[str], call: Callable[[str], Awaitable[Any]], timeout_s: float
) -> dict[str, Any]:
    """``call(name)`` for every name at once: each one's result, or the exception it raised
    instead (`asyncio.TimeoutError` past ``timeout_s``)."""

    async def one(name: str) -> Any:
        return await call(name)

    got = await asyncio.gather(
        *(asyncio.wait_for(one(n), timeout_s) for n in names), return_exceptions=True
    )
    return dict(zip(names, got, strict=True))


def _count_texts(chunks: list[list[str]]) -> int:
    return sum(len(c) for c in chunks)


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


@serve.deployment
class MemberModel:
    """One exported member; batched inference on CPU or GPU."""

    def __init__(self, run_dir: str, name: str, num_threads: int = 1, gpu: bool = False) -> None:
        self._forward = LoadedMember(run_dir, name, num_threads, gpu)
        self._settings = s.MemberSettings()
        self._batch_sizes: Counter[int] = Counter()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._settings = s.MemberSettings.model_validate(user_config)
        self._forward_batch.set_max_batch_size(self._settings.max_batch_size)
        self._forward_batch.set_batch_wait_timeout_s(self._settings.batch_wait_timeout_s)

    async def predict(self, texts: list[str]) -> np.ndarray:
        """(B, C) probabilities, or (B,) intensities for the regressor."""
        size = self._settings.max_batch_size
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        outs = await asyncio.gather(*(self._forward_batch(c) for c in chunks))
        return np.concatenate(outs)

    # Batch size counts texts, not calls; `predict` splits requests larger than a batch.
    # The forward pass runs on the replica's event loop on purpose. `@serve.batch` forms the next
    # batch as soon as the wait timeout passes, even while the previous batch still holds its one
    # concurrent slot (ray/serve/batching.py, `_process_batches`). With the forward pass off the
    # loop, a busy CPU replica therefore queued many small batches behind the running one. Holding
    # the loop lets every request that arrives during a forward pass join the next batch.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_count_texts)
    async def _forward_batch(self, chunks: list[list[str]]) -> list[np.ndarray]:
        flat = [t for chunk in chunks for t in chunk]
        out = self._forward(flat, self._settings.forward_chunk_size)
        self._batch_sizes[len(flat)] += 1
        bounds = np.cumsum([len(c) for c in chunks])[:-1]
        return np.split(out, bounds)

    def ping(self) -> str:
        return "ok"

    def stats(self) -> dict[str, Any]:
        return s.MemberStats(
            pid=os.getpid(),
            replica_id=_replica_id(),
            batches=sum(self._batch_sizes.values()),
            texts=sum(k * v for k, v in self._batch_sizes.items()),
            batch_sizes=dict(self._batch_sizes),
            **self._settings.model_dump(),
        ).model_dump()


class FanOutBatcher:
    """Joins concurrent requests into shared fan-outs, with at most ``slots`` in flight.

    A request goes out at once when a slot is free. Otherwise it waits, and the next free slot
    takes every waiting request, up to ``max_texts`` texts. Idle, nothing waits; busy, the
    batches grow with the load. `serve.batch` instead closes a batch after a fixed wait, even
    when no slot is free, so under load it lined up many small fan-outs.
    """

    def __init__(
        self,
        run: Callable[[list[str]], Awaitable[tuple[Answer, Combination]]],
        slots: int,
        max_texts: int,
    ) -> None:
        self._run = run
        self.slots, self.max_texts = slots, max_texts
        self._waiting: deque[tuple[list[str], asyncio.Future]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, texts: list[str]) -> tuple[Answer, Combination]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._in_flight < self.slots and self._waiting:
            batch = [self._waiting.popleft()]
            size = len(batch[0][0])
            while self._waiting and size + len(self._waiting[0][0]) <= self.max_texts:
                batch.append(self._waiting.popleft())
                size += len(batch[-1][0])
            self._in_flight += 1
            task = asyncio.create_task(self._fan_out(batch))
            self._tasks.add(task)  # a reference, so the task is not collected mid-flight
            task.add_done_callback(self._tasks.discard)

    async def _fan_out(self, batch: list[tuple[list[str], asyncio.Future]]) -> None:
        try:
            answer, spec = await self._run([t for texts, _ in batch for t in texts])
            bounds = np.cumsum([0] + [len(texts) for texts, _ in batch])
            for (_, future), a, b in zip(batch, bounds[:-1], bounds[1:], strict=True):
                if not future.done():  # a client that went away cancelled its future
                    future.set_result((answer.rows(int(a), int(b)), spec))
        except Exception as err:  # every request of the batch gets the error (e.g. a 503)
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
        finally:
            self._in_flight -= 1
            self._pump()


api = FastAPI(
    title="ensemble",
    description="A combined transformer ensemble: classification, intensity, disagreement.",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
    lines = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return JSONResponse({"detail": "; ".join(lines)}, status_code=422)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _revision(settings: s.CombinerSettings) -> str:
    return hashlib.sha1(settings.model_dump_json().encode()).hexdigest()[:12]


@serve.deployment
@serve.ingress(api)
class Combiner:
    """HTTP ingress: validates requests, fans out to the members, combines their outputs."""

    def __init__(self, run_dir: str, members: dict[str, DeploymentHandle]) -> None:
        self._run_dir = run_dir
        self._manifest = Manifest.load(run_dir)
        self._members = members
        self._local: dict[str, LoadedMember] = {}  # the cascade's in-process student
        self._local_texts = 0
        self._base = self._manifest.combination()
        self._settings = s.CombinerSettings()
        self._spec = self._base
        self._requests = 0
        self._reconfigures = 0
        self._fanouts: Counter[int] = Counter()
        self._degraded = 0  # texts answered without every member
        self._failures: Counter[str] = Counter()  # member -> calls it did not answer
        self._batcher = FanOutBatcher(
            self._answer_now, self._settings.max_concurrent_fanouts, self._settings.max_batch_size
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = s.CombinerSettings.model_validate(user_config)
        spec = dataclasses.replace(
            self._base,
            method=settings.method,
            weights=dict(settings.weights),
            params=dict(settings.params),
        )
        if settings.cascade:
            student = student_of(spec)
            if settings.cascade_student_in_combiner and student not in self._local:
                self._local[student] = LoadedMember(self._run_dir, student)
        # swap both at once: a request in flight keeps the pair it started with
        self._settings, self._spec = settings, spec
        self._batcher.slots = settings.max_concurrent_fanouts
        self._batcher.max_texts = settings.max_batch_size
        self._reconfigures += 1
        logger.info("combiner now %s (revision %s)", settings.method, _revision(settings))

    async def _gather(
        self, names: list[str], texts: list[str], sequential: bool
    ) -> dict[str, Any]:
        """Each member's output, or the exception it gave instead (a timeout included)."""
        timeout_s = self._settings.request_timeout_s

        def call(name: str) -> Awaitable[Any]:
            return self._members[name].predict.remote(texts)

        if sequential:  # the baseline the benchmark compares against
            results: dict[str, Any] = {}
            for n in names:
                results.update(await _settle([n], call, timeout_s))
            return results
        return await _settle(names, call, timeout_s)  # all at once

    async def _call(
        self, names: list[str], texts: list[str], sequential: bool = False, need: int = 1
    ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
        """The outputs of the members that answered within request_timeout_s, and the others.

        A member that errs, is gone or is too slow is left out (the answer is degraded). Fewer
        than ``need`` answers is a 503 (a 500 if every failure was an error in member code).
        """
        results = await self._gather(names, texts, sequential)
        outputs = {n: r for n, r in results.items() if not isinstance(r, BaseException)}
        failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
        for n, err in failed.items():
            self._failures[n] += 1
            if isinstance(err, RayTaskError):
                logger.error("member %s failed: %r", n, err.cause)
            else:
                logger.warning("member %s unavailable: %s", n, self._reason(err))
        if len(outputs) >= need:
            return outputs, tuple(failed)
        if failed and all(isinstance(e, RayTaskError) for e in failed.values()):
            cause = next(iter(failed.values())).cause  # type: ignore[attr-defined]
            raise HTTPException(500, f"a member failed: {cause!r}")
        reasons = "; ".join(f"{n}: {self._reason(e)}" for n, e in failed.items())
        raise HTTPException(
            503,
            f"{len(outputs)} of {len(names)} members answered, fewer than serve.min_members "
            f"({need}); unavailable: {reasons}. A replica may be restarting, retry shortly",
            headers={"Retry-After": "1"},
        )

    def _reason(self, err: BaseException) -> str:
        if isinstance(err, asyncio.TimeoutError):
            return f"no answer within {self._settings.request_timeout_s:g}s"
        return type(err).__name__

    async def _answer(self, texts: list[str]) -> tuple[Answer, Combination]:
        if len(texts) >= self._settings.max_batch_size:  # fills a batch alone (or batching off)
            return await self._answer_now(texts)
        return await self._batcher.submit(texts)

    async def _answer_now(self, texts: list[str]) -> tuple[Answer, Combination]:
        settings, spec = self._settings, self._spec  # one consistent pair per request
        self._fanouts[len(texts)] += 1
        answer = await self._combined(settings, spec, texts)
        if answer.missing:
            self._degraded += answer.answered_by.count("ensemble")
        return answer, spec

    async def _combined(
        self, settings: s.CombinerSettings, spec: Combination, texts: list[str]
    ) -> Answer:
        need = settings.min_members
        if not settings.cascade:
            outputs, missing = await self._call(list(spec.members), texts, settings.sequential,
                                                need)
            return ensemble_answer(outputs, spec, missing)
        student = student_of(spec)
        others = [n for n in spec.members if n != student]
        local = self._local.get(student) if settings.cascade_student_in_combiner else None
        if local is not None:  # no hop for the confident majority; off the loop, like a call
            first = await asyncio.to_thread(local, texts, settings.forward_chunk_size)
            self._local_texts += len(texts)
        else:
            got, _ = await self._call([student], texts, need=0)
            if student not in got:  # no student: the others answer every text
                outputs, missing = await self._call(others, texts, settings.sequential, need)
                votes = student in spec.members  # a cascade-only student is not missed
                return ensemble_answer(outputs, spec, (student, *missing) if votes else missing)
            first = got[student]  # (B, C)
        hard = hard_examples(  # on the student's vote: temperature-scaled, as fitted
            member_probs(spec, student, first),
            settings.cascade_threshold,  # type: ignore[arg-type]
            settings.cascade_confidence,
        )
        rest: dict[str, np.ndarray] = {}
        missing: tuple[str, ...] = ()
        if hard.size:  # a voting student's answer counts towards min_members
            rest, missing = await self._call(others, [texts[i] for i in hard],
                                             settings.sequential, need - (student in spec.members))
        return cascade_answer(spec, first, hard, rest, missing)

    @api.post(
        "/predict", response_model=s.PredictResponse, responses={400: {}, 413: {}, 422: {}, 503: {}}
    )
    async def predict(self, body: s.PredictRequest) -> s.PredictResponse:
        """Classify one text or a batch; add `return_members: true` for every member's view."""
        settings = self._settings
        texts = body.as_list()
        try:
            s.check_limits(texts, settings.max_texts, settings.max_text_chars)
        except s.RequestLimitError as err:
            raise HTTPException(413, str(err)) from None
        self._requests += 1
        answer, spec = await self._answer(texts)
        preds = s.predictions(answer, spec, body.return_members)
        return s.PredictResponse(
            predictions=preds, method=settings.method, revision=_revision(settings)
        )

    @api.post("/members/{name}/predict", response_model=list[s.MemberOutput])
    async def predict_member(self, name: str, body: s.PredictRequest) -> list[s.MemberOutput]:
        """One member alone (debugging and per-member load tests)."""
        if name not in self._members:
            raise HTTPException(404, f"no member {name!r}; members are {list(self._members)}")
        texts = body.as_list()
        try:
            s.check_limits(texts, self._settings.max_texts, self._settings.max_text_chars)
        except s.RequestLimitError as err:
            raise HTTPException(413, str(err)) from None
        out = (await self._call([name], texts))[0][name]
        return [s.member_output(name, v, self._spec) for v in out]

    @api.get("/healthz", response_model=s.HealthResponse)
    async def healthz(self, deep: bool = False) -> JSONResponse:
        """Liveness; with `?deep=true` every member is pinged (503 if one does not answer)."""
        if not deep:
            return JSONResponse({"status": "ok"})
        state = {}
        for name, handle in self._members.items():
            try:
                state[name] = await asyncio.wait_for(handle.ping.remote(), timeout=5.0)
            except Exception as err:  # any failure means "not healthy", reported per member
                state[name] = f"unavailable: {type(err).__name__}"
        ok = all(v == "ok" for v in state.values())
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "members": state}, status_code=200 if ok else 503
        )

    @api.get("/info", response_model=s.InfoResponse)
    def info(self) -> s.InfoResponse:
        """Members, combine method and weights, cascade, limits and versions."""
        settings, spec, m = self._settings, self._spec, self._manifest
        cascade_student = spec.student
        versions = {p: _version(p) for p in ("ensemble", "ray", "torch", "transformers")}
        versions.update(manifest=str(m.version), rounds_completed=str(m.rounds_completed))
        return s.InfoResponse(
            name=m.name,
            method=settings.method,
            weights=settings.weights,
            params=sorted(settings.params),
            label_names=m.label_names,
            members={
                n: s.MemberInfo(
                    kind=e.kind,
                    path=e.path,
                    num_labels=e.num_labels,
                    max_length=e.max_length,
                    weight=settings.weights.get(n),
                    params=e.params,
                    votes=n in spec.members,
                )
                for n, e in m.members.items()
            },
            cascade=s.CascadeInfo(
                enabled=settings.cascade,
                threshold=settings.cascade_threshold,
                confidence=settings.cascade_confidence,
                student=cascade_student,
            ),
            sequential=settings.sequential,
            limits={"max_texts": settings.max_texts, "max_text_chars": settings.max_text_chars},
            versions=versions,
            revision=_revision(settings),
        )

    @api.get("/stats", response_model=s.StatsResponse)
    async def stats(self) -> s.StatsResponse:
        """Process ids and batch-size histograms (of one replica per member)."""
        names = list(self._members)
        got = await _settle(names, lambda n: self._members[n].stats.remote(), 5.0)
        answered = {n: v for n, v in got.items() if not isinstance(v, BaseException)}
        combiner = s.CombinerStats(
            pid=os.getpid(),
            replica_id=_replica_id(),
            requests=self._requests,
            reconfigures=self._reconfigures,
            fanout_sizes=dict(self._fanouts),
            local_student_texts=self._local_texts,
            degraded_texts=self._degraded,
            member_failures=dict(self._failures),
            revision=_revision(self._settings),
        )
        return s.StatsResponse(combiner=combiner, members=answered,
                               unavailable=[n for n in names if n not in answered])


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``import_path: ensemble.serving.app:build_app``.

    Args:
        args: ``run_dir`` (required); optional ``method`` and any `ServeConfig` field as an
            override of the run's ``serve`` section; ``members_fingerprint`` is ignored (it is
            there so that new member weights change the app's code version and reload them).

    Returns:
        The bound application (combiner ingress + one deployment per member).

    Raises:
        ValueError: for unknown args or an inconsistent run directory.
    """
    args = dict(args)
    if "run_dir" not in args:
        raise ValueError('build_app needs args {"run_dir": "/path/to/run"}')
    run_dir = os.path.abspath(str(args.pop("run_dir")))
    method = args.pop("method", None)
    args.pop("members_fingerprint", None)
    cfg = serve_config_for(run_dir, args)
    manifest = Manifest.load(run_dir)
    bad = [n for n in manifest.members if not _NAME_RE.match(n)]
    if bad:
        raise ValueError(f"member names {bad} must match {_NAME_RE.pattern} to name deployments")
    options = deployments(run_dir, manifest, cfg, method)
    threads = max(1, round(cfg.num_cpus))
    members = {
        name: MemberModel.options(name=member_deployment_name(name),
                                  **options[member_deployment_name(name)])
        .bind(run_dir, name, threads, cfg.num_gpus > 0)
        for name in manifest.members
    }
    return Combiner.options(name=COMBINER, **options[COMBINER]).bind(run_dir, members)
