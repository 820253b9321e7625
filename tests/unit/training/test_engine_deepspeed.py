"""DeepSpeed with one rank, in a fresh interpreter (its process group must not leak into others).

The same tiny member trained by the TorchEngine and by DeepSpeed at ZeRO-0 and ZeRO-2 (world
size 1, gloo) gives the same losses: the single-rank shortcut that skips DeepSpeed's gradient
all-reduce at ZeRO-0 changes nothing but speed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os, socket
import torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
torch.set_num_threads(1)
import torch.nn.functional as F
from ensemble.models.members import build_member
from ensemble.training.engine import OptimSettings, make_engine
ARCH = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
        "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, 1000, (6, 8, 12), generator=g)
labels = torch.randint(0, 3, (6, 8), generator=g)
out = {}
for name, backend, zero in [("torch", "torch", 0), ("zero0", "deepspeed", 0),
                            ("zero2", "deepspeed", 2)]:
    torch.manual_seed(0)
    model = build_member("default", 3, pretrained=False, arch=ARCH)
    engine = make_engine(model, OptimSettings(lr=1e-3, micro_batch_size=8, total_steps=6,
                                              warmup_ratio=0.0, zero_stage=zero), backend, 1)
    if backend == "deepspeed":
        out[name + "_allreduce"] = engine.engine.enable_backward_allreduce
    losses = []
    for step in range(6):
        logits = engine(input_ids=ids[step], attention_mask=torch.ones_like(ids[step])).logits
        loss = F.cross_entropy(logits, labels[step])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    out[name] = losses
print("RESULT" + json.dumps(out))
"""


def test_single_rank_deepspeed_matches_torch_engine() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    assert out["zero0_allreduce"] is False  # the shortcut is on at ZeRO-0 with one rank
    assert out["zero2_allreduce"] is True  # and left alone where ZeRO needs that path
    assert out["torch"][-1] < out["torch"][0]  # it learns
    np.testing.assert_allclose(out["zero0"], out["torch"], rtol=1e-5)
    np.testing.assert_allclose(out["zero2"], out["torch"], rtol=1e-4)
