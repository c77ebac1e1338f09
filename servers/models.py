"""Helper-server networks as trunk + standalone head, and the MEL combiner heads.

MEL (Gudipaty et al. 2025, arXiv 2506.20094; docs/methods.md §5) gives each server a trunk
``f_s`` with its own standalone head ``h_s``, and, for every subset ``A`` of two or more servers,
a combiner head ``h_A`` on the concatenated trunk features ``[f_s(x) for s in A]``. Independent
and DML servers use the same network (their heads only); their ensemble is the mean of the
members' softmax outputs.

Cooperative learning (arXiv 2312.08532; docs/methods.md §6) needs networks that can answer at
several depths: :class:`MultiExitNet` is an MLP of ``D`` hidden blocks with an exit head after
each one. :func:`make_server_net` picks the network a pool's ``servers.training`` needs.
"""
from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

import torch
from torch import nn

from sim.core.config import ServersConfig, Training
from sim.core.zoo import build_model, split_model


UNKNOWN_LOGIT = -1.0e4
"""The logit a specialist server gives a class it does not know: ``exp(-1e4)`` is 0 in float32, so
its softmax puts no mass there and it never answers with that class, while the value stays finite
(a KL or a cross-entropy over it never meets ``0 * inf``)."""


class KnownClasses(nn.Module):
    """The head of a server that knows only some classes: ``(B, F) -> (B, K)`` logits, those of the
    unknown classes replaced by :data:`UNKNOWN_LOGIT` (a buffer ``unknown``, 1.0 for each, so the
    devices' copies of the server carry it with its weights)."""

    def __init__(self, head: nn.Module, known: Sequence[int], num_classes: int):
        super().__init__()
        self.head = head
        unknown = torch.ones(num_classes)
        unknown[list(known)] = 0.0
        self.register_buffer("unknown", unknown)
        self.in_features = int(head.in_features)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f).masked_fill(self.unknown.bool(), UNKNOWN_LOGIT)


class ServerNet(nn.Module):
    """A helper server's network: ``trunk: (B, C, H, W) -> (B, F)``, ``head: (B, F) -> (B, K)``.

    Args:
        arch, in_shape, num_classes, hidden: as :func:`sim.core.zoo.build_model`.
        known: the classes it knows (None: all): a specialist's head never answers another class
            (:class:`KnownClasses`).
    """

    def __init__(self, arch: str, in_shape: Sequence[int], num_classes: int, hidden: int,
                 known: Sequence[int] | None = None):
        super().__init__()
        self.trunk, self.head = split_model(build_model(arch, tuple(in_shape), num_classes, hidden=hidden))
        if known is not None:
            self.head = KnownClasses(self.head, known, num_classes)
        self.feature_dim = int(self.head.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def forward_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Trunk features ``(B, F)`` and the logits of every exit (one: the head), ``[(B, K)]``."""
        f = self.trunk(x)
        return f, [self.head(f)]


COOP_LEADER = 0
"""The index of cooperative learning's Leader; every other server of a coop pool is a Teammate."""


def depth_fractions(depth: int) -> list[float]:
    """Depth fraction of each of ``depth`` exits, shallowest first: ``[1/D, 2/D, ..., 1]``."""
    return [(d + 1) / depth for d in range(depth)]


class MultiExitNet(nn.Module):
    """An MLP of ``depth`` hidden blocks (Linear + ReLU, width ``hidden``) with an exit head after each.

    Exit ``d`` (1-based) is the sub-network of depth fraction ``d / depth``; the last exit is the
    full network. ``trunk``/``head`` are the full network's, so the pool and the devices use it
    like a :class:`ServerNet`. Shapes: ``x (B, C, H, W) -> features (B, hidden)``, each exit
    ``(B, K)``.

    Args:
        in_shape: ``(C, H, W)``. num_classes: K. hidden: block width. depth: number of blocks (>= 1).

    Raises:
        ValueError: ``depth < 1``.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: int, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"a multi-exit network needs depth >= 1, got {depth}")
        c, h, w = in_shape
        widths = [c * h * w] + [hidden] * depth
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths, widths[1:]))
        self.exits = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(depth))
        self.feature_dim = hidden

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def fractions(self) -> list[float]:
        """Depth fraction of each exit, ``[1/D, 2/D, ..., 1]``."""
        return depth_fractions(self.depth)

    @property
    def head(self) -> nn.Module:
        return self.exits[-1]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the full network ``(B, hidden)``."""
        return self._features(x)[-1]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, f = [], x.flatten(1)
        for block in self.blocks:
            f = block(f)
            out.append(f)
        return out

    def forward_exits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-network features ``(B, hidden)`` and every exit's logits, shallowest first,
        ``D x (B, K)`` (one pass: exit d reuses blocks 1..d)."""
        feats = self._features(x)
        return feats[-1], [e(f) for e, f in zip(self.exits, feats)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def make_server_net(cfg: ServersConfig, in_shape: Sequence[int], num_classes: int, index: int = 0) -> nn.Module:
    """The network of helper server ``index`` of the ``servers`` config ``cfg``: a
    :class:`MultiExitNet` of ``servers.coop.depth`` blocks for cooperative learning
    (``training=coop``), else a :class:`ServerNet` of ``servers.arch``, of the server's own width
    (``servers.widths``) and known classes (``servers.known_classes``).

    Raises:
        ValueError: ``training=coop`` with an arch other than ``mlp``, or as :class:`ServerNet`.
    """
    if cfg.training == Training.coop:
        if cfg.arch != "mlp":
            raise ValueError(f"servers.training=coop builds multi-exit MLPs: set servers.arch=mlp (got {cfg.arch})")
        return MultiExitNet(in_shape, num_classes, cfg.hidden, cfg.coop.depth)
    return ServerNet(cfg.arch, tuple(in_shape), num_classes, cfg.width(index), cfg.known(index))


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
        num_servers: S. feature_dim: F (trunk output width), one for all or one per server (a tiered
            pool: ``h_A`` then reads ``sum of F_s over A`` features). num_classes: K.

    With S servers there are ``2^S - S - 1`` heads (S=3: 4 heads).
    """

    def __init__(self, num_servers: int, feature_dim: int | Sequence[int], num_classes: int):
        super().__init__()
        dims = [int(feature_dim)] * num_servers if isinstance(feature_dim, int) else [int(d) for d in feature_dim]
        self.heads = nn.ModuleDict({
            subset_key(a): nn.Linear(sum(dims[s] for s in a), num_classes) for a in all_subsets(range(num_servers))
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
