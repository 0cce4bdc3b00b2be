"""The EMA ("momentum") teacher every ALBEF model keeps: frozen ``<name>_m`` copies of some online submodules,
updated as ``theta_m <- m * theta_m + (1 - m) * theta`` with two foreach kernels per step, and run under autocast
with its Linear/Conv weights cast once per teacher pass (:meth:`MomentumMixin.momentum_weights`)."""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn


class MomentumMixin:
    """Mixed into an ``nn.Module`` that has ``self.cfg.momentum``. Call :meth:`add_momentum_copies` once the online
    submodules exist; the copies are named ``<name>_m`` (the original checkpoints' key prefixes)."""

    momentum_names: Tuple[str, ...] = ()
    # Under autocast, run the momentum copies with their Linear/Conv weights pre-cast (see momentum_weights)
    precast_momentum = True

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

    @contextlib.contextmanager
    def momentum_weights(self, names: Optional[Sequence[str]] = None) -> Iterator[None]:
        """Run the momentum copies ``names`` (default: all) inside this context. Under autocast, the weights and
        biases of their Linear and Conv layers are swapped for copies in the autocast dtype, refreshed from the
        float32 weights on entry by one foreach copy: the values autocast's own casts give (round to nearest even),
        so the outputs are bit for bit the same, but without one cast per layer and call (autocast's cast cache
        keeps only weights that require grad, so the frozen teacher's ~370 weights at the base size were cast again
        at every use: a quarter of the step's casts on a GPU). Outside autocast (or with ``precast_momentum``
        False) nothing changes. The float32 weights stay the parameters: the EMA, the optimizer and checkpoints
        see only them, and the copies are refreshed at every entry, so they are never stale."""
        names = self.momentum_names if names is None else tuple(names)
        device_type = self._momentum_device_type()
        if not (self.precast_momentum and names and torch.is_autocast_enabled(device_type)):
            yield
            return
        plan = self._precast_plan(names, torch.get_autocast_dtype(device_type))
        with torch.no_grad():
            torch._foreach_copy_(plan.low, plan.src)
        for m, k, low in plan.slots:
            m._parameters[k] = low
        try:
            yield
        finally:
            for m, k, p in plan.restore:
                m._parameters[k] = p

    def _momentum_device_type(self) -> str:
        first = next(iter(getattr(self, self.momentum_names[0] + "_m").parameters()), None) \
            if self.momentum_names else None
        return first.device.type if first is not None else "cpu"

    def _precast_plan(self, names: Tuple[str, ...], dtype: torch.dtype) -> "_PrecastPlan":
        """The cached plan of :meth:`momentum_weights`; rebuilt (all plans, so no copy outlives its parameter)
        when a layer's parameter was replaced (``load_state_dict(assign=True)``) or moved to another device."""
        plans: Dict[tuple, _PrecastPlan] = self.__dict__.setdefault("_precast_plans", {})  # never saved
        plan = plans.get((names, dtype))
        if plan is None or not plan.current():
            if plan is not None:
                plans.clear()
            pool = {id(p): low for plan_ in plans.values() for p, low in zip(plan_.src, plan_.low)}
            layers = [m for n in names for m in getattr(self, n + "_m").modules() if isinstance(m, _AUTOCAST_WEIGHTED)]
            plan = plans[(names, dtype)] = _PrecastPlan(layers, dtype, pool)
        return plan


# Layers whose weights autocast casts to its low precision at every call
_AUTOCAST_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _PrecastPlan:
    """Which parameters of which layers :meth:`MomentumMixin.momentum_weights` swaps, and their low-precision copies
    (one per parameter, also when layers share it; shared with other plans through ``pool``)."""

    def __init__(self, layers: Sequence[nn.Module], dtype: torch.dtype, pool: Dict[int, nn.Parameter]):
        self.restore = [(m, k, p) for m in layers for k, p in m._parameters.items()
                        if p is not None and p.is_floating_point() and p.dtype != torch.float64]
        own: Dict[int, Tuple[nn.Parameter, nn.Parameter]] = {}
        for _, _, p in self.restore:
            if id(p) not in own:
                low = pool.get(id(p))
                if low is None or low.dtype != dtype or low.device != p.device:
                    low = nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False)
                own[id(p)] = (p, low)
        self.src = [p for p, _ in own.values()]
        self.low = [low for _, low in own.values()]
        self.slots = [(m, k, own[id(p)][1]) for m, k, p in self.restore]

    def current(self) -> bool:
        """Every layer still holds the parameter the plan was made for, on the device of its copy."""
        return all(m._parameters.get(k) is p for m, k, p in self.restore) and \
            all(p.device == low.device for p, low in zip(self.src[:1], self.low[:1]))
