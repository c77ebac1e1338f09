"""A device's view of the helper servers: the copies of their networks it received this round.

The pool broadcasts the up servers' weights (``s{i}.<param>``), with ``server_labels=crossfit``
their fold copies' (``fold{j}:s{i}.<param>``, :mod:`servers.crossfit`) and, for MEL, the combiner
heads (``comb.<param>``) -- the current ones or, asynchronously, a copy S rounds old. A device uses
them to know what each routing option would answer on its rejector-training split (the server
errors its rejector loss needs); the answers it gets at test time come from the live pool.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from servers.models import Combiners, make_server_net
from sim.core.config import ServersConfig


class PoolView:
    """Server networks built once per worker process and loaded with each round's weights.

    Args:
        servers_cfg: the ``servers`` config. in_shape: ``(C, H, W)``. num_classes: K.
    """

    def __init__(self, servers_cfg: ServersConfig, in_shape: Sequence[int], num_classes: int):
        self.cfg, self.in_shape, self.num_classes = servers_cfg, tuple(in_shape), num_classes
        self.nets: dict[int, torch.nn.Module] = {}
        self.combiners: Combiners | None = None
        self.present: list[int] = []
        self.folds: list[PoolView] = []  # crossfit: fold j's copies of the servers (empty otherwise)
        self._fold_views: dict[int, PoolView] = {}  # built once, reloaded every round

    def load(self, arrays: dict[str, np.ndarray]) -> "PoolView":
        """Load a broadcast (``{"s0.trunk.1.weight": ..., "fold1:s0.trunk.1.weight": ...,
        "comb.heads.0+1.weight": ...}``): the fold copies go to :attr:`folds` (``folds[j]``: a view of
        fold j's copies; empty without them)."""
        per: dict[int, dict[str, torch.Tensor]] = {}
        comb: dict[str, torch.Tensor] = {}
        fold_arrays: dict[int, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            fold, sep, name = k.partition(":")
            if sep:
                fold_arrays.setdefault(int(fold[4:]), {})[name] = v
                continue
            head, _, rest = k.partition(".")
            if head == "comb":
                comb[rest] = torch.from_numpy(np.asarray(v))
            else:
                per.setdefault(int(head[1:]), {})[rest] = torch.from_numpy(np.asarray(v))
        for s, sd in per.items():
            if s not in self.nets:
                self.nets[s] = make_server_net(self.cfg, self.in_shape, self.num_classes, s)
            self.nets[s].load_state_dict(sd)
            self.nets[s].eval()
        self.present = sorted(per)
        if comb:
            if self.combiners is None:
                with torch.random.fork_rng(devices=[]):  # reading widths of absent servers draws nothing that counts
                    dims = [self.nets[s].feature_dim if s in self.nets
                            else make_server_net(self.cfg, self.in_shape, self.num_classes, s).feature_dim
                            for s in range(self.cfg.count)]
                self.combiners = Combiners(self.cfg.count, dims, self.num_classes)
            self.combiners.load_state_dict(comb)
        else:
            self.combiners = None
        for j in fold_arrays:
            if j not in self._fold_views:
                self._fold_views[j] = PoolView(self.cfg, self.in_shape, self.num_classes)
        self.folds = [self._fold_views[j].load(fold_arrays[j]) for j in sorted(fold_arrays)]
        return self

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, servers: Sequence[int]
                ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Trunk features ``(N, F)`` and logits ``(N, K)`` of each of ``servers`` on ``x``."""
        feats, logits = {}, {}
        for s in servers:
            f = self.nets[s].trunk(x)
            feats[s], logits[s] = f, self.nets[s].head(f)
        return feats, logits
