"""The one minibatch training loop every trained part of the simulation uses.

Legacy pretraining, rejector updates and helper-server updates differ only in their loss,
so they share :func:`train_minibatch` and pass the loss as a function of a batch.
:func:`train_stacked` runs the same schedule for many same-shaped models at once (the legacy
fleet's pretraining: a thousand small models are a few batched steps, not a thousand loops).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from sim.core.optim import Adam


def train_minibatch(
    params: Sequence[torch.nn.Parameter] | torch.optim.Optimizer,
    tensors: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    seed: int,
) -> float:
    """Run ``epochs`` shuffled minibatch passes of Adam (or a given optimizer) over ``tensors``.

    Args:
        params: parameters to optimise (a fresh Adam with ``lr`` is made), or an optimizer to
            keep using (its state survives across calls, e.g. a long-lived helper server).
        tensors: aligned tensors, each with the sample dimension first, shape ``(N, ...)``.
        loss_fn: called as ``loss_fn(*batch)`` with the batch slices; returns a scalar mean loss.
        epochs, batch_size: passes over the data and samples per step.
        seed: seeds the shuffling order, so the result does not depend on global RNG state.

    Returns:
        The mean loss of the last epoch (``nan`` when there is no data).

    Raises:
        ValueError: tensors of different lengths.
    """
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError("train_minibatch: tensors must all have the same first dimension")
    if n == 0:
        return float("nan")
    opt = params if isinstance(params, torch.optim.Optimizer) else Adam(list(params), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(*(t[idx] for t in tensors))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / count
    return last


def train_stacked(models: Sequence[torch.nn.Module], xs: torch.Tensor, ys: torch.Tensor, *, epochs: int,
                  batch_size: int, lr: float, seeds: Sequence[int],
                  grads: Callable[..., dict[str, torch.Tensor]] | None = None) -> None:
    """Train M models of one architecture with cross-entropy, all at once, in place.

    Model i gets exactly :func:`train_minibatch`'s schedule on ``(xs[i], ys[i])`` with seed
    ``seeds[i]`` (the same shuffling order and the same Adam steps): the models' parameters are
    stacked (``torch.func.stack_module_state``), the forward pass is ``vmap`` of
    ``functional_call``, the loss is the sum of the M per-model mean losses (so each model's slice
    of the gradient is its own gradient) and one Adam, elementwise, updates every slice as M
    separate Adams would. Results agree with the one-by-one loop up to float rounding.

    Args:
        models: M modules with identical parameter shapes. xs: ``(M, n, ...)``. ys: ``(M, n)`` int64.
        epochs, batch_size, lr: as :func:`train_minibatch`. seeds: M shuffling seeds.
        grads: hand-written gradients for this architecture instead of autograd, called as
            ``grads(params, x, y)`` with the stacked parameters (``{name: (M, ...)}``), a batch
            ``x: (M, B, ...)``, ``y: (M, B)``; returns the gradient of the same summed loss,
            ``{name: (M, ...)}`` (e.g. :func:`clients.stacked.conv1d_net_grads`).

    Raises:
        ValueError: ``len(models)``, ``len(xs)``, ``len(ys)`` and ``len(seeds)`` differ.
    """
    from torch.func import functional_call, stack_module_state

    m, n = len(models), int(xs.shape[1]) if xs.ndim > 1 else 0
    if not (len(xs) == len(ys) == len(seeds) == m):
        raise ValueError(f"train_stacked: {m} models, {len(xs)} inputs, {len(ys)} label sets, {len(seeds)} seeds")
    if m == 0 or n == 0:
        return
    params, buffers = stack_module_state(list(models))
    base = models[0]

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    forward = torch.vmap(one)
    opt = Adam(list(params.values()), lr=lr)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    detached = {name: p.detach() for name, p in params.items()}  # the same storage: Adam's updates show
    rows = torch.arange(m)[:, None]
    for _ in range(epochs):
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (M, n)
        for start in range(0, n, batch_size):
            idx = orders[:, start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            if grads is None:
                logits = forward(params, buffers, xs[rows, idx])  # (M, B, K)
                per_model = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys[rows, idx].flatten(),
                                                              reduction="none").view(m, -1).mean(1)
                per_model.sum().backward()
            else:
                for name, g in grads(detached, xs[rows, idx], ys[rows, idx]).items():
                    params[name].grad = g
            opt.step()
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][i])


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits of ``model`` on ``x: (N, ...)`` in eval mode, batched; returns ``(N, K)``."""
    model.eval()
    if len(x) == 0:
        return torch.empty(0)
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
