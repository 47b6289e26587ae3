"""An exponential moving average of a network's weights, updated after every optimizer step.

The average is what training validates and saves: it is the last few hundred steps' weights
smoothed, which generalises better than the last step's (the noise of the final mini-batches
averages out) and makes the choice of the best epoch less of a lottery. BatchNorm running
statistics are averaged like the weights; integer buffers are copied.

The decay ramps up as (1 + n) / (10 + n) towards `decay` (as in TensorFlow's and timm's EMA),
so a run of a few dozen steps averages over a few steps, not over its random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Create it after the network has its final device and memory format."""

    def __init__(self, net: nn.Module, decay: float, updates: int = 0):
        self.decay, self.updates = float(decay), int(updates)
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        mine = self.module.state_dict()  # its tensors are the module's own: updated in place, never replaced
        self._float_keys = [k for k, v in mine.items() if v.dtype.is_floating_point]
        self._other_keys = [k for k, v in mine.items() if not v.dtype.is_floating_point]
        self._floats, self._others = [mine[k] for k in self._float_keys], [mine[k] for k in self._other_keys]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        src = net.state_dict(keep_vars=True)
        torch._foreach_lerp_(self._floats, [src[k].detach() for k in self._float_keys], 1 - self.current_decay())
        for mine, k in zip(self._others, self._other_keys):
            mine.copy_(src[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
