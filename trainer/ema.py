"""Power EMA ("karras" EMA, PIFLOW.md §5): beta_t = (1 - 1/t)^(gamma + 1), t = step + 1 - start.

The shadow copy mirrors what each rank holds: under ZeRO-3 a parameter's local partition is `p.ds_tensor`
(so the EMA is sharded exactly like the parameters, no gather); otherwise the whole tensor. Before `start`
the EMA follows the weights (beta = 0). Rollouts, evaluation and export run inside `ema.applied()`.

`master` (optional) returns the fp32 master copy of a parameter's local partition (the DeepSpeed engine's
`local_master`): with bf16 weights the EMA then averages the optimiser's fp32 values, not bf16 roundings.
Under ZeRO-3, `applied()` writes the partitions and every rank must enter it together. A parameter ZeRO-3
re-gathers for each forward sees the write by itself; one the engine keeps gathered (`ds_persist`, the
trainables of `train.trainable_comm: per_step`) is stale until `refresh` (the engine's `refresh_gathered`)
re-gathers it, which `applied()` calls after writing the EMA weights in and after writing the live ones back.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns for parameter `p` (ZeRO-3 partition or the full tensor)."""
    ds_tensor = getattr(p, "ds_tensor", None)
    return ds_tensor if ds_tensor is not None else p.data


def power_ema_beta(step: int, gamma: float, start: int) -> float:
    t = step + 1 - start
    if t <= 1:
        return 0.0
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class PowerEMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], gamma: float = 7.0, start: int = 0,
                 master: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None,
                 refresh: Optional[Callable[[], None]] = None):
        self.params = [p for p in params if p.requires_grad]
        self.gamma = gamma
        self.start = start
        self._source = master if master is not None else _local
        if refresh is None and any(getattr(p, "ds_persist", False) for p in self.params):
            raise ValueError("PowerEMA: these parameters are kept gathered (ZeRO-3 ds_persist): pass "
                             "refresh=engine.refresh_gathered, or a forward inside applied() runs the live weights")
        self._refresh = refresh or (lambda: None)
        self.shadow = [self._source(p).detach().clone().float() for p in self.params]  # fp32, local shards

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Fold the current weights in after optimiser step `step` (0-based). Returns the beta used."""
        beta = power_ema_beta(step, self.gamma, self.start)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(self._source(p).float().view_as(s), 1.0 - beta)
        return beta

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the live parameters (restored on exit)."""
        backup = [_local(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            _local(p).copy_(s.to(_local(p).dtype).view_as(_local(p)))
        self._refresh()
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                _local(p).copy_(b)
            self._refresh()

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "start": self.start, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(sd['shadow'])} tensors, the model has {len(self.shadow)}")
        for s, src in zip(self.shadow, sd["shadow"]):
            if s.shape != src.shape:
                raise ValueError(f"EMA shard shape {tuple(src.shape)} does not match {tuple(s.shape)}")
            s.copy_(src)
        self.gamma, self.start = sd["gamma"], sd["start"]
