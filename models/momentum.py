"""The EMA ("momentum") teacher every ALBEF model keeps: frozen ``<name>_m`` copies of some online submodules,
updated as ``theta_m <- m * theta_m + (1 - m) * theta`` with two foreach kernels per step."""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple

import torch
from torch import nn


class MomentumMixin:
    """Mixed into an ``nn.Module`` that has ``self.cfg.momentum``. Call :meth:`add_momentum_copies` once the online
    submodules exist; the copies are named ``<name>_m`` (the original checkpoints' key prefixes)."""

    momentum_names: Tuple[str, ...] = ()

    def add_momentum_copies(self, names: Sequence[str]) -> None:
        self.momentum_names = tuple(names)
        for name in names:
            mom = copy.deepcopy(getattr(self, name))  # deepcopy keeps tied/shared parameters tied in the copy
            for p in mom.parameters():
                p.requires_grad_(False)
            setattr(self, name + "_m", mom)

    def model_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(getattr(self, n), getattr(self, n + "_m")) for n in self.momentum_names]

    def momentum_parameters(self) -> List[nn.Parameter]:
        return [p for _, m in self.model_pairs() for p in m.parameters()]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Make every momentum parameter equal to its online parameter (after loading new online weights)."""
        for online, mom in self.model_pairs():
            for p, p_m in zip(online.parameters(), mom.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """One EMA step for all momentum parameters (a no-op for a model without momentum copies)."""
        mom = self.momentum_parameters()
        if not mom:
            return
        m = self.cfg.momentum
        online = [p for o, _ in self.model_pairs() for p in o.parameters()]
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, online, alpha=1.0 - m)
