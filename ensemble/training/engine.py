"""The Engine protocol and its two implementations: plain PyTorch and DeepSpeed ZeRO.

The training loop only ever sees an `Engine`. DeepSpeed is imported in this file alone. Both
engines take the same optimizer and LR schedule (built here from the member's settings), so a
ZeRO-0 run and a ZeRO-2/3 run follow the same trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class OptimSettings:
    """What the engine needs from a member's config (plain values, no config object)."""

    lr: float
    weight_decay: float = 0.01
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06
    total_steps: int = 100  # optimizer steps over the member's whole schedule
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    zero_stage: int = 0
    precision: str = "fp32"
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    model: nn.Module

    def __call__(self, **inputs: Tensor) -> Any: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None: ...

    def lr(self) -> float: ...

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None: ...

    def load(self, directory: str | Path) -> dict[str, Any]: ...

    def full_state_dict(self) -> dict[str, Tensor] | None: ...


def lr_lambda(scheduler: str, warmup: int, total: int):
    """Multiplier of each param group's base LR at optimizer step `s` (warmup then decay)."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return fn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    lr: float = 1.0,
    unfreeze_step: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups keyed by (decay, LR scale, unfreeze step).

    No decay on biases/norms. `lr_scale` gives layer-wise LR decay; `unfreeze_step` the optimizer
    step from which a parameter trains (gradual unfreezing). Every parameter stays in the
    optimizer with requires_grad on: a frozen group just has LR 0 until its step, which works the
    same under every ZeRO stage (DeepSpeed partitions only what it sees at initialisation).
    """
    groups: dict[tuple[float, float, int], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        decay = 0.0 if param.ndim < 2 or "norm" in name.lower() else weight_decay
        scale = (lr_scale or {}).get(name, 1.0)
        start = (unfreeze_step or {}).get(name, 0)
        groups.setdefault((decay, scale, start), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr": lr * scale, "unfreeze_step": start}
        for (decay, scale, start), params in groups.items()
    ]


def build_optimizer(model: nn.Module, s: OptimSettings, lr_scale: dict[str, float] | None = None,
                    unfreeze_step: dict[str, int] | None = None):
    groups = param_groups(model, s.weight_decay, lr_scale, s.lr, unfreeze_step)
    starts = [g.pop("unfreeze_step") for g in groups]
    opt = torch.optim.AdamW(groups, lr=s.lr)
    warmup = int(s.warmup_ratio * s.total_steps)
    base = lr_lambda(s.scheduler, warmup, s.total_steps)
    lambdas = [_gated(base, start) for start in starts]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def _gated(base, start: int):
    return lambda step: base(step) if step >= start else 0.0


class TorchEngine:
    """Plain PyTorch: AdamW + LambdaLR, gradient accumulation, clipping. CPU unit tests use it."""

    def __init__(
        self,
        model: nn.Module,
        s: OptimSettings,
        lr_scale: dict[str, float] | None = None,
        unfreeze_step: dict[str, int] | None = None,
    ):
        self.model = model
        self.settings = s
        self.optimizer, self.scheduler = build_optimizer(model, s, lr_scale, unfreeze_step)
        self._micro = 0

    def __call__(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def backward(self, loss: Tensor) -> None:
        (loss / self.settings.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.settings.grad_accum:
            return
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[-1])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "micro": self._micro,
                "client_state": client_state,
            },
            Path(directory) / "torch_engine.pt",
        )

    def load(self, directory: str | Path) -> dict[str, Any]:
        state = torch.load(Path(directory) / "torch_engine.pt", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro"]
        return state["client_state"]

    def full_state_dict(self) -> dict[str, Tensor] | None:
        return self.model.state_dict()


def deepspeed_config(s: OptimSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings (`deepspeed_extra` is merged on top)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch_size * s.grad_accum * world_size,
        "gradient_clipping": s.max_grad_norm,
        "zero_optimization": {"stage": s.zero_stage},
        "bf16": {"enabled": s.precision == "bf16"},
        "fp16": {"enabled": s.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if s.zero_stage == 3:
        # gather the full weights on save so an exported member is complete on rank 0
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return _deep_merge(cfg, s.deepspeed_extra)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO stage 0-3) driven through the Engine protocol.

    The optimizer and schedule are ours (torch AdamW + LambdaLR, handed to DeepSpeed as client
    objects) so that per-group LRs (layer-wise decay) survive; ZeRO partitions their state.
    """

    def __init__(
        self,
        model: nn.Module,
        s: OptimSettings,
        world_size: int,
        lr_scale: dict[str, float] | None = None,
        unfreeze_step: dict[str, int] | None = None,
    ):
        import deepspeed

        self.settings = s
        optimizer, scheduler = build_optimizer(model, s, lr_scale, unfreeze_step)
        self.config = deepspeed_config(s, world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        self.model = self.engine.module
        if world_size == 1 and s.zero_stage == 0:
            # one rank has nothing to average with: skip the flatten / all-reduce / unflatten pass
            # DeepSpeed runs after every backward (~4% of a MiniLM step on CPU; see
            # benchmarks/train_throughput.py). ZeRO 1-3 route gradients through that path.
            self.engine.enable_backward_allreduce = False

    def __call__(self, **inputs: Tensor) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # applies the optimizer only at accumulation boundaries

    def lr(self) -> float:
        return float(self.engine.get_lr()[-1])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        # every rank writes its own shard; rank 0 also writes the "latest" tag
        self.engine.save_checkpoint(str(directory), tag="ckpt", client_state=client_state)

    def load(self, directory: str | Path) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(str(directory), tag="ckpt")
        if client_state is None:
            raise RuntimeError(f"no DeepSpeed checkpoint found in {directory}")
        return client_state

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Complete weights on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
        if self.settings.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if state is None:
                return None
            return {k: v.float() for k, v in state.items()}
        return self.model.state_dict()


def make_engine(
    model: nn.Module,
    s: OptimSettings,
    backend: str = "deepspeed",
    world_size: int = 1,
    lr_scale: dict[str, float] | None = None,
    unfreeze_step: dict[str, int] | None = None,
) -> Engine:
    """Build the engine that the training loop drives.

    Args:
        model: the member.
        s: optimizer, schedule, batch and DeepSpeed settings.
        backend: "deepspeed" (ZeRO stage from `s`) or "torch" (plain loop, unit tests).
        world_size: data-parallel workers (sets DeepSpeed's global batch size).
        lr_scale: per-parameter LR multiplier (layer-wise decay).
        unfreeze_step: per-parameter optimizer step from which it trains.
    """
    if backend == "torch":
        return TorchEngine(model, s, lr_scale, unfreeze_step)
    if backend == "deepspeed":
        return DeepSpeedEngine(model, s, world_size, lr_scale, unfreeze_step)
    raise ValueError(f"unknown engine backend {backend!r}; use 'torch' or 'deepspeed'")
