"""A member's forward pass in length-sorted chunks equals one padded pass, in input order."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.serving.app import LoadedMember
from ensemble.testing import make_run_dir

TEXTS = [
    "a long , winding and ultimately rewarding film about memory , loss and the sea",
    "bad",
    "not good at all",
    "one of the year 's best",
    "the plot is thin but the actors carry it with charm and wit",
    "meh",
    "an utter mess",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"), n_dev=20)


@pytest.mark.parametrize("name", ["teacher", "regressor"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_chunked_pass_matches_one_pass(run_dir, name, chunk):
    member = LoadedMember(str(run_dir), name)
    whole = member(TEXTS, chunk_size=0)
    chunked = member(TEXTS, chunk_size=chunk)
    assert chunked.shape == whole.shape == ((7,) if name == "regressor" else (7, 5))
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    # each row is its own text's answer, not a neighbour's after the sort
    alone = np.stack([member([t])[0] for t in TEXTS])
    np.testing.assert_allclose(chunked, alone, atol=1e-5)
    assert not np.allclose(whole[0], whole[1], atol=1e-4)  # the rows differ, so order matters
