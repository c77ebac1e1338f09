"""Learning-to-Help rejector losses (the rejector's half of the stage-switching surrogate).

Notation (docs/methods.md): legacy model m, helper server e, rejector logits ``r: (N, 2)`` with
index 0 = keep LOCAL and 1 = DEFER, ``psi = softmax(r)``. Costs: ``cost0 = 1[m(x) != y]`` (keep),
``cost1 = c_e + c_1 * 1[e(x) != y]`` (defer). The server's indicators come from the current
(or, asynchronously, a stale) server and carry no gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WEIGHT_VARIANTS = ("shifted", "paper", "repo")


def l2h_weights(m_wrong: torch.Tensor, e_wrong: torch.Tensor, c_e: float, c_1: float, variant: str = "shifted"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights ``(w0, w1)`` of the weighted 2-class cross-entropy, each ``(N,)``.

    Source: Wu, Li, Dong, Sathyavageeswaran, Sarwate, "Learning to Help in Multi-Class
    Settings", ICLR 2025 (arXiv 2501.13810), stage-switching surrogate; docs/methods.md §1.

    Variants:
        ``shifted`` (default): ``w_j = max(cost0, cost1) - cost_j`` -- non-negative, and the
            minimiser defers iff ``E[cost0|x] > E[cost1|x]``, the Bayes rule.
        ``paper``: ``w0 = 1[m == y]``, ``w1 = 1 - c_e - c_1*1[e != y]`` (the authors' later
            script); consistent, but ``w1 < 0`` when ``c_e + c_1 > 1``, and the loss is then
            unbounded below.
        ``repo``: ``w0 = 1[m == y]``, ``w1 = 1 - c_e + c_1*1[e != y]`` (repo
            YuWuOfRutgers/L2H_multi, train_edgenet.py): defers *more* when the server is wrong.
        The sources give only ``w1`` for the last two; ``w0 = 1 - cost0`` is our reading, the one
        that makes ``paper`` consistent (``w1 - w0 = cost0 - cost1``).

    Args:
        m_wrong, e_wrong: ``(N,)`` 0/1 float indicators of legacy / server errors.
        c_e, c_1: costs (>= 0).

    Raises:
        ValueError: unknown variant.
    """
    cost0 = m_wrong
    cost1 = c_e + c_1 * e_wrong
    if variant == "shifted":
        top = torch.maximum(cost0, cost1)
        return top - cost0, top - cost1
    if variant == "paper":
        return 1.0 - m_wrong, 1.0 - c_e - c_1 * e_wrong
    if variant == "repo":
        return 1.0 - m_wrong, 1.0 - c_e + c_1 * e_wrong
    raise ValueError(f"unknown L2H weight variant {variant!r}: choose one of {', '.join(WEIGHT_VARIANTS)}")


def multiclass_rejector_loss(logits: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Mean weighted 2-class cross-entropy ``-w0*log psi_0 - w1*log psi_1`` over the batch.

    Args:
        logits: rejector logits ``(N, 2)``; w0, w1: ``(N,)`` weights from :func:`l2h_weights`.
    """
    logp = F.log_softmax(logits, dim=1)
    return -(w0 * logp[:, 0] + w1 * logp[:, 1]).mean()


def binary_alpha(c_e: float, c_1: float, beta: float, p: float) -> float:
    """``alpha = (beta/2) * (c_e + 2*sqrt((p - c_e)(c_1 + c_e - p))) / p``.

    Source: Wu & Sarwate 2024, "Learning To Help: Training Models to Assist Legacy Devices"
    (arXiv 2409.16253); docs/methods.md §2. Chosen so the surrogate's decision boundary matches
    the Bayes rule where ``P(m wrong|x) = p``.

    Raises:
        ValueError: ``p <= c_e`` or ``p >= c_1 + c_e`` (the square root is undefined).
    """
    if not (c_e < p < c_1 + c_e):
        raise ValueError(f"the binary L2H surrogate needs c_e < p < c_1 + c_e; got c_e={c_e}, c_1={c_1}, "
                         f"p={p}: set strategy.binary_p between them or use strategy.surrogate=multiclass")
    return (beta / 2.0) * (c_e + 2.0 * math.sqrt((p - c_e) * (c_1 + c_e - p))) / p


def binary_rejector_loss(logits: torch.Tensor, m_wrong: torch.Tensor, e_margin: torch.Tensor, c_e: float,
                         c_1: float, beta: float, alpha: float) -> torch.Tensor:
    """Mean binary L2H surrogate over the batch, with the server fixed (stage-switching).

    ``L_S = c_1*exp(beta/2*(-e*y - r)) + c_e*exp(-r) + 1[m*y <= 0]*exp(alpha*r)``
    (Wu & Sarwate 2024, arXiv 2409.16253; docs/methods.md §2), with the real-valued rejector
    ``r = logit_0 - logit_1`` (``r > 0`` keeps the sample local) and ``e*y`` the server's signed
    margin ``(2*P_e(y) - 1)`` in (-1, 1) (the authors' ``2*sigmoid - 1`` squashing).

    Args:
        logits: ``(N, 2)`` rejector logits. m_wrong: ``(N,)`` 0/1. e_margin: ``(N,)`` ``e(x)*y``.
    """
    r = (logits[:, 0] - logits[:, 1]).clamp(-30.0, 30.0)
    loss = c_1 * torch.exp(beta / 2.0 * (-e_margin - r)) + c_e * torch.exp(-r) + m_wrong * torch.exp(alpha * r)
    return loss.mean()


def l01_cost(defer: torch.Tensor, m_wrong: torch.Tensor, e_wrong: torch.Tensor, c_e: float, c_1: float
             ) -> torch.Tensor:
    """Per-sample 0-1 L2H cost ``1[r=0]*1[m!=y] + 1[r=1]*(c_e + c_1*1[e!=y])`` (docs/methods.md §1), ``(N,)``."""
    defer = defer.float()
    return (1 - defer) * m_wrong + defer * (c_e + c_1 * e_wrong)


def multi_server_rejector_loss(logits: torch.Tensor, costs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Cost-sensitive cross-entropy over the options ``[keep local, defer to server 0, ..., S-1]``.

    ``L = -sum_j (max_{j' avail} cost_j' - cost_j) * log softmax_j(r)``, the softmax and the max
    taken over the available options only. Source: the cost-sensitive multi-action surrogate of
    Mozannar & Sontag 2020 (arXiv 2006.01862; docs/methods.md §3) with the multiple-expert
    form of Verma, Barrejon & Nalisnick 2023 (arXiv 2210.16955), adapted to L2H: the actions
    are LOCAL (cost ``1[m(x) != y]``) and each helper server s (cost ``c_e[s] + c_1*1[e_s(x) != y]``).
    Its minimiser picks the option of least expected cost; with one server it is exactly the
    ``shifted`` 2-class L2H loss. Unavailable servers are masked out of the softmax, so the
    rejector never learns (or at decision time, :func:`masked_decision`, picks) them.

    Args:
        logits: ``(N, 1+S)``. costs: ``(N, 1+S)`` per-sample cost of each option.
        available: ``(1+S,)`` bool, option 0 (local) always True.

    Returns:
        Scalar batch mean.
    """
    big = torch.finfo(logits.dtype).max
    masked_costs = costs.masked_fill(~available, -big)
    top = masked_costs.max(dim=1, keepdim=True).values
    w = (top - costs).masked_fill(~available, 0.0)
    logp = F.log_softmax(logits.masked_fill(~available, float("-inf")), dim=1).masked_fill(~available, 0.0)
    return -(w * logp).sum(1).mean()


def masked_decision(logits: torch.Tensor, available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision among the available options and the deferral score.

    Args:
        logits: rejector logits ``(N, 1+S)`` (``(N, 2)`` for one defer output). available:
            ``(1+S,)`` bool (option 0, local, always True).

    Returns:
        ``choice (N,)`` (0 = keep local, j >= 1 = option j) and ``score (N,)`` = 1 - psi_local
        over the available options (0 when no server is available).
    """
    masked = logits.masked_fill(~available, float("-inf"))
    psi = torch.softmax(masked, dim=1)
    return masked.argmax(1), 1.0 - psi[:, 0]
