"""Joint training losses of several helper servers: MEL (subset-sum), DML (mutual KL) and the
sub-network distillation of cooperative learning.

Sources: MEL -- Gudipaty et al. 2025, arXiv 2506.20094 (docs/methods.md §5; authors' code
umassos/iobt25-demo). DML -- Zhang et al. 2018, arXiv 1706.00384, eq. (10) (docs/methods.md §6).
Cooperative learning -- arXiv 2312.08532 (docs/methods.md §6; its exact formulas and
temperature were not available, the choices made are in :func:`sfsl_distillation_loss`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def mel_combiner_loss(combiners, feats: dict[int, torch.Tensor], y: torch.Tensor,
                      subsets: Sequence[Sequence[int]], weight: float) -> torch.Tensor:
    """The combiner part of MEL's loss: ``sum_A weight * CE(h_A([f_s(x) for s in A]), y)``.

    Args:
        combiners: :class:`servers.models.Combiners`. feats: server -> trunk features ``(B, F)``
            (leaf tensors with ``requires_grad`` so the gradient can go back to each server).
        y: ``(B,)`` labels. subsets: the subsets A (each >= 2 servers) to train. weight: lambda_A.

    The full MEL loss adds each server's standalone term ``lambda_s * CE(h_s(f_s(x)), y)``,
    computed on the server itself (:meth:`servers.helper.HelperServer.backward_batch`). Equal
    weights (lambda = 1) were best in the authors' sweep. Returns a scalar (0 without subsets).
    """
    total = torch.zeros(())
    for a in subsets:
        total = total + weight * F.cross_entropy(combiners(feats, a), y)
    return total


def dml_loss(logits: torch.Tensor, y: torch.Tensor, peer_probs: torch.Tensor) -> torch.Tensor:
    """Deep Mutual Learning loss of one peer: ``CE(p_k, y) + 1/(K-1) sum_l KL(p_l || p_k)``.

    Args:
        logits: this peer's logits ``(B, C)``. y: ``(B,)``. peer_probs: the other ``K-1`` peers'
            softmax outputs ``(K-1, B, C)``, treated as constants (no temperature, as in the paper).

    Returns:
        A scalar (batch mean).
    """
    logp = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(logp, y)
    if peer_probs.numel() == 0:
        return ce
    # KL(p_l || p_k) = sum_c p_l (log p_l - log p_k); batch mean, averaged over the peers.
    kl = (peer_probs * (torch.log(peer_probs.clamp_min(1e-12)) - logp.unsqueeze(0))).sum(-1).mean(-1)
    return ce + kl.mean()


def sfsl_distillation_loss(sub_logits: Sequence[torch.Tensor], teacher_logits: torch.Tensor, y: torch.Tensor,
                           fractions: Sequence[float], temperature: float) -> torch.Tensor:
    """Cooperative learning's sub-network term with the Scaling Factor Sensitive Loss (SFSL) weights.

    ``sum_d (1 / f_d) * [CE(z_d, y) + T^2 KL(softmax(t / T) || softmax(z_d / T))]`` over the
    sub-networks ``d`` (depth fraction ``f_d < 1``), where ``t`` is the full network's logits
    (the teacher, treated as a constant).

    Source: arXiv 2312.08532 (Teammates distil into their own shallower sub-networks; SFSL divides
    a sub-network's loss by its scaling factor). Choices where the paper's formulas were not
    available: Hinton et al.'s ``T^2``-scaled KL at temperature ``T`` (``servers.coop.temperature``;
    3 as in ONE), plus the label cross-entropy (so an untrained teacher early on cannot pull the
    exits away from the labels); every exit is trained at every step (the paper samples one
    scaling factor per epoch; with a small MLP every depth costs little).

    Args:
        sub_logits: the sub-networks' logits, each ``(B, K)``. teacher_logits: ``(B, K)``.
        y: ``(B,)``. fractions: ``f_d`` in (0, 1] per sub-network. temperature: ``T > 0``.

    Returns:
        A scalar (0 without sub-networks).

    Raises:
        ValueError: ``len(fractions) != len(sub_logits)`` or a fraction outside (0, 1].
    """
    if len(fractions) != len(sub_logits):
        raise ValueError(f"{len(sub_logits)} sub-networks but {len(fractions)} depth fractions")
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"depth fractions must be in (0, 1], got {list(fractions)}")
    t = float(temperature)
    teacher = torch.softmax(teacher_logits.detach() / t, dim=1)
    total = torch.zeros((), device=teacher_logits.device)
    for z, f in zip(sub_logits, fractions):
        kd = F.kl_div(F.log_softmax(z / t, dim=1), teacher, reduction="batchmean") * t * t
        total = total + (F.cross_entropy(z, y) + kd) / f
    return total
