"""ensemble.rundir: the run's state.json (RunState)."""

from __future__ import annotations

import pytest

from ensemble.rundir import RunState


def test_run_state_round_trips_and_refuses_unknown_keys(tmp_path):
    assert RunState.load(tmp_path) == RunState()  # no state.json yet: a fresh run
    state = RunState(rounds_completed=1, members={"clf": {"checkpoint": "c", "export": "e",
                                                          "stopped": False}},
                     round_done={"1": {"clf": True}}, distill={"done": True})
    state.save(tmp_path)
    assert RunState.load(tmp_path) == state
    (tmp_path / "state.json").write_text('{"rounds_completed": 1, "iteration": 3}')
    with pytest.raises(ValueError, match=r"unknown keys \['iteration'\].*new output_dir"):
        RunState.load(tmp_path)
