"""The neutral names both sides of models/ share: the conditioning dict, the config stand-in, the velocity
callable, the output tap and the network dtype/device helpers.

The families (`models/families/`) import `student`, `teacher` and `text_encoders` to build their models; those
three import only this module, never a family (tests/test_import_boundaries.py checks the one-way rule).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Cond = dict[str, torch.Tensor]
# The run config (trainer.config.Config); models/ never imports the trainer, so it is only named here.
Config = Any
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class OutputTap(nn.Module):
    """Stands in for an output module the student removed from the trunk: records the call's inputs and
    returns zeros of the shape the rest of the forward expects (the transformer's own output is discarded)."""

    def __init__(self, out_features: int | None):
        super().__init__()
        self.out_features = out_features
        self.captured: tuple[torch.Tensor, ...] | None = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.captured = args
        x = args[0]
        if self.out_features is None:
            return x
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def pop(self) -> tuple[torch.Tensor, ...]:
        if self.captured is None:
            raise RuntimeError("OutputTap: the trunk forward did not reach the removed output layer")
        out, self.captured = self.captured, None
        return out


def network_device(network: nn.Module) -> torch.device:
    """Where the network's weights live: its inputs are made or moved there."""
    for p in network.parameters():
        return p.device
    return torch.device("cpu")


def network_dtype(network: nn.Module) -> torch.dtype:
    for p in network.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
