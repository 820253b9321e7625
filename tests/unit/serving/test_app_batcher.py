"""FanOutBatcher: concurrent requests share fan-outs; idle requests never wait."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from ensemble.serving.app import FanOutBatcher


@dataclass
class Rows:
    texts: list[str]

    def rows(self, a: int, b: int) -> Rows:
        return Rows(self.texts[a:b])


class Members:
    """Stands in for the member calls: records each fan-out; `gate` holds them until set."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def __call__(self, texts: list[str]):
        self.calls.append(list(texts))
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("member down")
        return Rows([t.upper() for t in texts]), "spec"


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_idle_request_goes_out_at_once():
    async def main():
        members = Members()
        members.gate.set()
        batcher = FanOutBatcher(members, slots=2, max_texts=16)
        answer, spec = await asyncio.wait_for(batcher.submit(["a", "b"]), 1.0)
        assert answer.texts == ["A", "B"] and spec == "spec"
        assert members.calls == [["a", "b"]]

    asyncio.run(main())


def test_requests_that_wait_for_a_slot_share_the_next_fan_out():
    async def main():
        members = Members()
        batcher = FanOutBatcher(members, slots=1, max_texts=5)
        first = asyncio.create_task(batcher.submit(["r0"]))
        await _settle()
        later = [asyncio.create_task(batcher.submit([f"r{i}", f"r{i}x"])) for i in range(1, 5)]
        await _settle()
        assert members.calls == [["r0"]]  # one slot, busy: the others wait
        members.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), 1.0)
        # after r0, the free slot takes r1 and r2 (4 texts; r3 would make 6 > 5), then r3 and r4
        assert members.calls == [["r0"], ["r1", "r1x", "r2", "r2x"], ["r3", "r3x", "r4", "r4x"]]
        assert [r.texts for r, _ in results] == [
            ["R0"],
            *[[f"R{i}", f"R{i}X"] for i in range(1, 5)],
        ]

    asyncio.run(main())


def test_an_error_reaches_every_request_of_its_fan_out_and_the_batcher_recovers():
    async def main():
        members = Members(fail=True)
        batcher = FanOutBatcher(members, slots=1, max_texts=8)
        blocked = asyncio.create_task(batcher.submit(["a"]))
        await _settle()
        waiting = [asyncio.create_task(batcher.submit([t])) for t in "bc"]
        await _settle()
        waiting[0].cancel()  # a client that went away
        members.gate.set()
        for task in (blocked, waiting[1]):
            with pytest.raises(RuntimeError, match="member down"):
                await asyncio.wait_for(task, 1.0)
        members.fail = False
        answer, _ = await asyncio.wait_for(batcher.submit(["d"]), 1.0)
        assert answer.texts == ["D"] and members.calls[-1] == ["d"]

    asyncio.run(main())
