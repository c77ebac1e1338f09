"""Helper-server networks as trunk + standalone head, and the MEL combiner heads.

MEL (Gudipaty et al. 2025, arXiv 2506.20094; METHODS.md section 5) gives each server a trunk
``f_s`` with its own standalone head ``h_s``, and, for every subset ``A`` of two or more servers,
a combiner head ``h_A`` on the concatenated trunk features ``[f_s(x) for s in A]``. Independent
and DML servers use the same network (their heads only); their ensemble is the mean of the
members' softmax outputs.
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

import torch
from torch import nn

from clients.zoo import LogReg, MLP, SmallCNN, build_model


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a zoo model into ``(trunk, head)``: ``head(trunk(x)) == model(x)``.

    Raises:
        TypeError: a model the zoo does not make.
    """
    if isinstance(model, MLP):
        return model.net[:-1], model.net[-1]
    if isinstance(model, SmallCNN):
        return nn.Sequential(model.features, nn.Flatten()), model.head
    if isinstance(model, LogReg):
        return nn.Flatten(), model.fc
    raise TypeError(f"cannot split a {type(model).__name__} into trunk and head")


class ServerNet(nn.Module):
    """A helper server's network: ``trunk: (B, C, H, W) -> (B, F)``, ``head: (B, F) -> (B, K)``.

    Args:
        arch, in_shape, num_classes, hidden: as :func:`clients.zoo.build_model`.
    """

    def __init__(self, arch: str, in_shape: Sequence[int], num_classes: int, hidden: int):
        super().__init__()
        self.trunk, self.head = split_model(build_model(arch, tuple(in_shape), num_classes, hidden=hidden))
        self.feature_dim = int(self.head.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def subset_key(subset: Iterable[int]) -> str:
    """Canonical name of a server subset, e.g. ``(2, 0) -> "0+2"``."""
    return "+".join(str(s) for s in sorted(subset))


def all_subsets(servers: Iterable[int], min_size: int = 2) -> list[tuple[int, ...]]:
    """Every subset of ``servers`` with at least ``min_size`` members, smallest first, sorted."""
    s = sorted(servers)
    return [c for k in range(min_size, len(s) + 1) for c in combinations(s, k)]


class Combiners(nn.Module):
    """MEL combiner heads ``h_A: (B, |A|*F) -> (B, K)``, one per subset ``A`` of >= 2 servers.

    Args:
        num_servers: S. feature_dim: F (trunk output width). num_classes: K.

    With S servers there are ``2^S - S - 1`` heads (S=3: 4 heads).
    """

    def __init__(self, num_servers: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({
            subset_key(a): nn.Linear(len(a) * feature_dim, num_classes) for a in all_subsets(range(num_servers))
        })

    def forward(self, feats: dict[int, torch.Tensor], subset: Sequence[int]) -> torch.Tensor:
        """Logits ``(B, K)`` of ``h_A`` on ``cat([feats[s] for s in sorted(A)], 1)``."""
        a = sorted(subset)
        return self.heads[subset_key(a)](torch.cat([feats[s] for s in a], dim=1))


def ensemble_probs(subset: Sequence[int], feats: dict[int, torch.Tensor], logits: dict[int, torch.Tensor],
                   combiners: Combiners | None) -> torch.Tensor:
    """Class probabilities ``(B, K)`` of the ensemble of ``subset``.

    One server: its standalone head. Several: the MEL combiner head ``h_A`` when ``combiners`` is
    given (MEL servers), else the mean of the members' softmax outputs (independent / DML).

    Raises:
        ValueError: an empty subset.
    """
    a = sorted(subset)
    if not a:
        raise ValueError("an ensemble needs at least one server")
    if len(a) == 1:
        return torch.softmax(logits[a[0]], dim=1)
    if combiners is not None:
        return torch.softmax(combiners(feats, a), dim=1)
    return torch.stack([torch.softmax(logits[s], dim=1) for s in a]).mean(0)
