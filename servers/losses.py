"""Joint training losses of several helper servers: MEL (subset-sum) and DML (mutual KL).

Sources: MEL -- Gudipaty et al. 2025, arXiv 2506.20094 (METHODS.md section 5; authors' code
umassos/iobt25-demo). DML -- Zhang et al. 2018, arXiv 1706.00384, eq. (10) (METHODS.md section 6).
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
