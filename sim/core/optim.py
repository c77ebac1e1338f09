"""Adam, as ``torch.optim.Adam`` computes it, without importing ``torch._dynamo``.

``torch.optim.Optimizer`` wraps ``add_param_group``, ``zero_grad``, ``state_dict``,
``load_state_dict`` (``torch._disable_dynamo``) and ``Adam.step`` (``_use_grad_for_differentiable``)
in decorators that import ``torch._dynamo`` on their first call, to keep ``torch.compile`` from tracing
them. Nothing here is compiled, and that import costs every process that trains about 2 s of CPU
(measured on this 2-core machine: 1.5-2.1 s idle, 3.5 s under load): the driver, each Flower device
worker, each helper-server actor, in every run. :class:`Adam` calls the undecorated torch functions
(``functools.wraps`` keeps them as ``__wrapped__``), so the arithmetic is torch's own, bit for bit
(tests/test_optim.py), in eager mode exactly what the decorators would run.

If a torch release drops ``__wrapped__``, the decorated methods are used (correct, only slower) and
tests/test_optim.py fails, saying so.

Source: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 1 (torch's
implementation, unchanged).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def undecorated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` without its torch decorator (its ``__wrapped__``), or ``fn`` itself if it has none."""
    return getattr(fn, "__wrapped__", fn)


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments, state and ``state_dict``) whose methods skip torch's
    ``torch._dynamo`` decorators. ``step`` runs under ``torch.no_grad()``, as the decorator does for a
    non-differentiable optimizer (the only kind this project makes)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if self.defaults.get("differentiable"):
            raise ValueError("sim.core.optim.Adam: differentiable=True is not supported; use torch.optim.Adam")
        with torch.no_grad():
            return undecorated(torch.optim.Adam.step)(self, closure)
