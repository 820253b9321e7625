"""A live view of every member's step, loss and throughput while the round trains.

Rank 0 of each member's Ray Train job pushes its latest point to one small named actor; the driver
polls it and redraws a table (rich Live on a terminal, a log line every few seconds otherwise).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table

logger = logging.getLogger(__name__)
NAMESPACE = "ensemble"


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.points: dict[str, dict[str, Any]] = {}

    def update(self, member: str, point: dict[str, Any]) -> None:
        self.points[member] = {**point, "time": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.points)


def start_board(name: str):
    return ProgressBoard.options(name=name, namespace=NAMESPACE).remote()


def get_board(name: str | None):
    """The named board, or None (progress is best effort; training never waits on it)."""
    if not name:
        return None
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def table(points: dict[str, dict[str, Any]], status: dict[str, str], title: str) -> Table:
    t = Table(title=title)
    for col in ("member", "status", "stage", "step", "progress", "loss", "lr", "samples/s"):
        t.add_column(col, justify="left" if col in ("member", "status", "stage") else "right")
    for member in sorted(status):
        p = points.get(member, {})
        t.add_row(
            member,
            status[member],
            str(p.get("stage", "-")),
            str(p.get("step", "-")),
            f"{100 * p['progress']:.0f}%" if "progress" in p else "-",
            f"{p['loss']:.4f}" if "loss" in p else "-",
            f"{p['lr']:.2e}" if "lr" in p else "-",
            f"{p['samples_per_s']:.1f}" if p.get("samples_per_s") else "-",
        )
    return t


class LiveView:
    """Redraws the board while `wait` blocks on the round's futures."""

    def __init__(self, board, title: str, enabled: bool = True, log_every_s: float = 15.0):
        self.board = board
        self.title = title
        self.enabled = enabled
        self.log_every_s = log_every_s
        self.tty = sys.stdout.isatty()

    def wait(
        self,
        futures: dict[str, Any],
        poll_s: float = 1.0,
        on_done: Callable[[str, Any], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Block until every future is done; returns name -> result (raises the first error).

        `on_done(name, result)` runs as each result arrives and may return more futures
        ({name: ref}) to wait on, so dependent work starts as soon as what it needs is there.
        """
        status = {name: "running" for name in futures}
        pending = {ref: name for name, ref in futures.items()}
        results: dict[str, Any] = {}
        live = Live(console=Console(), refresh_per_second=2) if self.enabled and self.tty else None
        last_log = 0.0
        if live:
            live.start()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
                for ref in done:
                    name = pending.pop(ref)
                    results[name] = ray.get(ref)
                    status[name] = "done"
                    for more, more_ref in (on_done(name, results[name]) if on_done else {}).items():
                        pending[more_ref] = more
                        status[more] = "running"
                points = self._points()
                if live:
                    live.update(table(points, status, self.title))
                elif self.enabled and time.time() - last_log > self.log_every_s:
                    last_log = time.time()
                    logger.info("%s\n%s", self.title, _plain(table(points, status, self.title)))
        finally:
            if live:
                live.stop()
        return results

    def _points(self) -> dict[str, dict[str, Any]]:
        if self.board is None:
            return {}
        try:
            return ray.get(self.board.snapshot.remote(), timeout=5)
        except Exception:  # the view is cosmetic; never fail training over it
            return {}


def _plain(t: Table) -> str:
    console = Console(record=True, width=110, file=open("/dev/null", "w"))
    console.print(t)
    return console.export_text()
