"""Learning-to-Defer surrogate losses and decision rules (docs/methods.md §3).

The device's model outputs ``K + S`` logits ``g``: K class logits, then one deferral logit per
helper server (expert) j. ``expert_ok (N, S)`` is 1 where expert j's prediction equals the label.
Unavailable experts (down, cut off) are masked: their logits are left out of every softmax and
never chosen (``available: (S,)`` bool).

Sources:
- Mozannar & Sontag 2020, "Consistent Estimators for Learning to Defer to an Expert"
  (arXiv 2006.01862), eq. (3)-(4): the cross-entropy surrogate with alpha and its cost-sensitive form.
- Verma & Nalisnick 2022, "Calibrated Learning to Defer with One-vs-All Classifiers"
  (arXiv 2202.03673), eq. (5): the one-vs-all surrogate, ``phi(z) = softplus(-z)``.
- Verma, Barrejon & Nalisnick 2023, "Learning to Defer to Multiple Experts" (arXiv 2210.16955),
  section 3: one deferral logit per expert, both forms.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from strategies.l2h_losses import multi_server_rejector_loss


def _full_mask(num_classes: int, available: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(num_classes, dtype=torch.bool), available.bool()])


def ce_loss(logits: torch.Tensor, y: torch.Tensor, expert_ok: torch.Tensor, available: torch.Tensor,
            alpha: float = 1.0) -> torch.Tensor:
    """Mozannar-Sontag cross-entropy, with Verma et al. 2023's one term per expert.

    ``L = -w(x, y) * log softmax_y(g) - sum_j 1[M_j = y] * log softmax_{K+j}(g)`` with
    ``w = alpha`` if some available expert is right, else 1 (S = 1: exactly MS eq. 3; alpha = 1 is
    consistent for the 0-1 deferral loss, which has no deferral price).

    Args:
        logits: ``(N, K+S)``. y: ``(N,)`` int64. expert_ok: ``(N, S)`` float. available: ``(S,)`` bool.

    Returns:
        Scalar batch mean.
    """
    k = logits.shape[1] - expert_ok.shape[1]
    mask = _full_mask(k, available)
    logp = F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    ok = expert_ok * available.float()
    w = torch.where(ok.sum(1) > 0, torch.full_like(ok[:, 0], float(alpha)), torch.ones_like(ok[:, 0]))
    defer_logp = logp[:, k:].masked_fill(~available.bool(), 0.0)
    return (-(w * logp.gather(1, y[:, None])[:, 0]) - (ok * defer_logp).sum(1)).mean()


def l2d_costs(y: torch.Tensor, expert_ok: torch.Tensor, num_classes: int, c_e: Sequence[float], c_1: float
              ) -> torch.Tensor:
    """Per-sample cost of each action ``(N, K+S)``: predicting class k costs ``1[k != y]``; deferring
    to expert j costs ``c_e[j] + c_1 * 1[M_j != y]`` (the L2H pricing, docs/methods.md §1)."""
    cls = 1.0 - F.one_hot(y, num_classes).float()
    ex = torch.tensor([float(c) for c in c_e])[None, :] + c_1 * (1.0 - expert_ok)
    return torch.cat([cls, ex], dim=1)


def ce_cost_loss(logits: torch.Tensor, costs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Cost-sensitive cross-entropy, Mozannar & Sontag 2020 eq. (4):
    ``L = -sum_i (max_j c(j) - c(i)) * log softmax_i(g)`` over the K classes and available experts.

    With ``c_e = 0, c_1 = 1`` it equals :func:`ce_loss` with alpha = 1. Its minimiser's argmax is
    the action of least expected cost (the Bayes rule with deferral prices).

    Args:
        logits, costs: ``(N, K+S)`` (costs from :func:`l2d_costs`). available: ``(S,)`` bool.
    """
    k = logits.shape[1] - available.shape[0]
    return multi_server_rejector_loss(logits, costs, _full_mask(k, available))


def ova_loss(logits: torch.Tensor, y: torch.Tensor, expert_ok: torch.Tensor, available: torch.Tensor
             ) -> torch.Tensor:
    """One-vs-all surrogate (Verma & Nalisnick 2022 eq. 5; one term per expert as in Verma et al. 2023):
    ``phi(g_y) + sum_{k != y} phi(-g_k) + sum_j [phi(-g_{K+j}) + 1[M_j = y] (phi(g_{K+j}) - phi(-g_{K+j}))]``,
    ``phi(z) = softplus(-z)``, over the available experts. ``sigmoid(g_{K+j})`` estimates
    P(expert j correct | x) and ``sigmoid(g_k)`` estimates P(Y = k | x).
    """
    k = logits.shape[1] - expert_ok.shape[1]
    cls, dfr = logits[:, :k], logits[:, k:]
    onehot = F.one_hot(y, k).float()
    cls_term = (onehot * F.softplus(-cls) + (1 - onehot) * F.softplus(cls)).sum(1)
    # phi(-g) + 1[ok] (phi(g) - phi(-g)) = ok * softplus(-g) + (1 - ok) * softplus(g)
    ex = expert_ok * F.softplus(-dfr) + (1 - expert_ok) * F.softplus(dfr)
    return (cls_term + (ex * available.float()).sum(1)).mean()


@torch.no_grad()
def decide(logits: torch.Tensor, available: torch.Tensor, loss: str, c_e: Sequence[float], c_1: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decisions of an L2D model.

    Softmax forms (``ce``, ``ce_cost``): argmax over the K classes and the available experts
    (unavailable experts' logits set to -inf: never chosen). ``ova``: plug-in Bayes rule with the
    calibrated probabilities, ``keep cost = 1 - max_k sigmoid(g_k)``, ``defer-to-j cost = c_e[j] +
    c_1 * (1 - sigmoid(g_{K+j}))``, least cost wins.

    Args:
        logits: ``(N, K+S)``. available: ``(S,)`` bool. loss: ``ce | ce_cost | ova``.

    Returns:
        ``pred (N,)`` the classifier's class, ``expert (N,)`` the best available expert (-1 when none
        is available), ``score (N,)`` the deferral score: the sample is deferred to ``expert`` iff
        ``score > 0``; higher is deferred first (-1e9 when no expert is available).
    """
    s = available.shape[0]
    k = logits.shape[1] - s
    pred = logits[:, :k].argmax(1)
    if not bool(available.any()):
        return pred, torch.full_like(pred, -1), torch.full((len(logits),), -1e9)
    avail = available.bool()
    if loss == "ova":
        keep_cost = 1.0 - torch.sigmoid(logits[:, :k]).max(1).values
        defer_cost = torch.tensor([float(c) for c in c_e])[None, :] + c_1 * (1 - torch.sigmoid(logits[:, k:]))
        defer_cost = defer_cost.masked_fill(~avail, float("inf"))
        best, j = defer_cost.min(1)
        score = keep_cost - best
    else:
        d = logits[:, k:].masked_fill(~avail, float("-inf"))
        best, j = d.max(1)
        score = best - logits[:, :k].max(1).values
    return pred, j, score
