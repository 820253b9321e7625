"""Python client of the ensemble's HTTP API (no Ray needed).

    with EnsembleClient("http://127.0.0.1:8000") as client:
        for p in client.predict(["a gripping film", "dull"]):
            print(p.label, p.confidence, p.intensity)

Every call is bounded by a timeout; HTTP errors raise `EnsembleHTTPError` carrying the server's
message, so a 413 says which limit was exceeded and how to fix the request. `predict_in_parts`
sends a batch larger than the server's ``serve.max_texts`` as several requests.

Every route is free of side effects, so a request that meets a replica dying under it (500), a
gateway error (502/504), a 503 while replicas restart, or a refused connection is sent again, up
to ``retries`` times, after the server's ``Retry-After`` or a short backoff. With two combiner
replicas (``serve.combiner_replicas: 2``) this is what turns the few requests in flight on a
killed replica into answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel, TypeAdapter

from ensemble.serving.schemas import (
    HealthResponse,
    InfoResponse,
    MemberOutput,
    Prediction,
    PredictResponse,
    StatsResponse,
)

__all__ = [
    "EnsembleClient",
    "EnsembleConnectionError",
    "EnsembleError",
    "EnsembleHTTPError",
    "EnsembleTimeout",
    "print_predictions",
]

logger = logging.getLogger(__name__)

RETRY_STATUSES = (500, 502, 503, 504)


class EnsembleError(RuntimeError):
    """Any failure talking to the ensemble server."""


class EnsembleHTTPError(EnsembleError):
    """The server answered with a 4xx/5xx status; ``message`` is its explanation."""

    def __init__(self, status_code: int, message: str, url: str) -> None:
        self.status_code = status_code
        self.message = message
        kind = "bad request" if status_code < 500 else "server error"
        super().__init__(f"{kind} {status_code} from {url}: {message}")


class EnsembleTimeout(EnsembleError):
    """No answer within the client's timeout."""


class EnsembleConnectionError(EnsembleError):
    """The server could not be reached."""


class EnsembleClient:
    """Typed, synchronous client of ``ensemble serve``.

    Args:
        url: the server URL including any route prefix, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds for connecting and for each response.
        retries: times a request is sent again after a 500/502/503/504 or a refused
            connection (never after a timeout or a 4xx); 0 sends each request once.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0,
                 retries: int = 2) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        if timeout <= 0:
            raise ValueError(f"timeout={timeout} must be > 0 seconds")
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._http = httpx.Client(base_url=self.url + "/", timeout=timeout)

    def predict(self, texts: str | Sequence[str], return_members: bool = False) -> list[Prediction]:
        """Predictions for one text or a batch, in input order.

        Raises:
            EnsembleHTTPError: on 4xx (bad input, limits) or 5xx (e.g. 503 while a replica
                restarts); EnsembleTimeout; EnsembleConnectionError.
        """
        return self.predict_response(texts, return_members).predictions

    def predict_response(
        self, texts: str | Sequence[str], return_members: bool = False
    ) -> PredictResponse:
        """Like `predict` but the whole body (method and settings revision included)."""
        body: dict[str, Any] = {"return_members": return_members}
        body["text" if isinstance(texts, str) else "texts"] = (
            texts if isinstance(texts, str) else list(texts)
        )
        return self._request("POST", "predict", PredictResponse, json=body)

    def predict_in_parts(
        self, texts: Sequence[str], return_members: bool = False, max_texts: int | None = None
    ) -> PredictResponse:
        """Predictions for a batch of any size: requests of at most ``max_texts`` texts, sent in
        order, their predictions concatenated in input order.

        Args:
            texts: the texts, in order.
            return_members: include every member's output.
            max_texts: texts per request; default the server's ``serve.max_texts`` (``GET /info``).

        Returns:
            One body: every prediction, with the method and revision of the last request (a
            live update between two requests is logged as a warning).

        Raises:
            ValueError: for ``max_texts < 1``; EnsembleHTTPError and the other client errors as
                `predict`, e.g. 413 for a text longer than ``serve.max_text_chars``.
        """
        texts = list(texts)
        if max_texts is None:
            max_texts = int(self.info().limits["max_texts"])
        if max_texts < 1:
            raise ValueError(f"max_texts={max_texts} must be >= 1")
        parts = [
            self.predict_response(texts[i : i + max_texts], return_members)
            for i in range(0, len(texts), max_texts)
        ] or [self.predict_response(texts, return_members)]  # no texts: the server's 422
        revisions = {p.revision for p in parts}
        if len(revisions) > 1:
            logger.warning(
                "the server's settings changed while %d requests were answered (revisions %s): "
                "the predictions mix them", len(parts), sorted(revisions),
            )
        predictions = [pred for part in parts for pred in part.predictions]
        return parts[-1].model_copy(update={"predictions": predictions})

    def predict_member(self, name: str, texts: Sequence[str]) -> list[MemberOutput]:
        """One member's outputs alone (no combination)."""
        adapter = TypeAdapter(list[MemberOutput])
        raw = self._request("POST", f"members/{name}/predict", None, json={"texts": list(texts)})
        return adapter.validate_python(raw)

    def info(self) -> InfoResponse:
        return self._request("GET", "info", InfoResponse)

    def stats(self) -> StatsResponse:
        return self._request("GET", "stats", StatsResponse)

    def health(self, deep: bool = False) -> HealthResponse:
        """``GET /healthz``; ``deep`` pings every member (raises on 503)."""
        return self._request("GET", "healthz", HealthResponse, params={"deep": str(deep).lower()})

    def _request(self, method: str, path: str, model: type[BaseModel] | None, **kw: Any) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TimeoutException as err:
                raise EnsembleTimeout(
                    f"no answer from {self.url}/{path} within {self.timeout:g}s "
                    f"({type(err).__name__}); the server may be overloaded or restarting, or "
                    "raise the timeout"
                ) from None
            except httpx.TransportError as err:
                if last:
                    raise EnsembleConnectionError(
                        f"cannot reach {self.url}: {err}; is `ensemble serve RUN_DIR` running "
                        "there?"
                    ) from None
                time.sleep(_backoff(attempt, None))
                continue
            if resp.status_code in RETRY_STATUSES and not last:
                logger.info("%s /%s: %d, sending it again", method, path, resp.status_code)
                time.sleep(_backoff(attempt, resp.headers.get("retry-after")))
                continue
            break
        if resp.status_code >= 400:
            raise EnsembleHTTPError(resp.status_code, _detail(resp), f"{self.url}/{path}")
        data = resp.json()
        return model.model_validate(data) if model is not None else data

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EnsembleClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds before attempt ``attempt + 1``: the server's Retry-After (capped at 10 s) or
    0.2 s doubled per attempt."""
    try:
        return min(10.0, max(0.0, float(retry_after)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.2 * 2**attempt


def _detail(resp: httpx.Response) -> str:
    """The server's error message (FastAPI's ``detail``), else the raw body."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's default validation format
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    return str(detail) if detail else (resp.text.strip()[:500] or resp.reason_phrase)


def print_predictions(
    texts: Sequence[str], predictions: Sequence[Prediction], members: bool = False
) -> None:
    """Print predictions as a rich table (CLI output)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ensemble predictions")
    for col in ("text", "label", "confidence", "intensity", "disagreement", "answered by"):
        table.add_column(col, overflow="fold")
    for text, p in zip(texts, predictions, strict=True):
        short = text if len(text) <= 60 else text[:57] + "..."
        dis = "-" if p.disagreement is None else f"{p.disagreement:.2f}"
        table.add_row(
            short, p.label, f"{p.confidence:.3f}", f"{p.intensity:.3f}", dis, p.answered_by
        )
        for name, m in (p.members or {}).items() if members else ():
            table.add_row(
                f"  └ {name} ({m.kind})",
                m.label,
                f"{m.confidence:.3f}",
                f"{m.intensity:.3f}",
                "",
                "",
                style="dim",
            )
    Console().print(table)
