"""Cross-fitted server labels (``strategy.server_labels=crossfit``): the fold copies of a helper server.

Cross-fitting (Chernozhukov, Chetverikov, Demirer, Duflo, Hansen, Newey, Robins 2018,
"Double/debiased machine learning for treatment and structural parameters", The Econometrics
Journal 21(1), C1-C68, Definition 3.1 "DML1"/"DML2"): split the sample into K folds; the nuisance
model used on fold j is fitted on the other K-1 folds only, so every sample's plug-in value comes
from a model that never saw it. Here the nuisance is the server's error on a sample (the label the
rejector learns from): every helper server trains K copies next to its production network, copy j
on its replay buffer minus the samples of fold j, and a device labels sample i with copy
``fold_of(i)``. The production network still trains on the whole buffer and answers the deferred
test samples, so no data is withheld from it and no label is older than the round.

- :func:`fold_of`: a sample's fold, a seeded hash of its global sample id (the same on every
  device, in every round, on the servers and on the devices).
- :class:`FoldCopies`: the K copies one server holds (networks, Adam states), their training and
  their checkpoint arrays.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sim.core.arrays import load_optimizer, optimizer_arrays, prefixed, sub
from sim.core.optim import Adam
from sim.core.seeding import derive_seed, mix64
from sim.core.training import train_minibatch

_MASK64 = (1 << 64) - 1


def fold_of(ids: np.ndarray, seed: int, folds: int) -> np.ndarray:
    """The fold of each global sample id: ``(N,)`` int64 in ``0 .. folds - 1``.

    A seeded hash, so a sample's fold is fixed across rounds, devices and processes and the folds
    are balanced in expectation (each id lands in each fold with probability 1/K). The hash is
    SplitMix64's finaliser (Steele, Lea, Flood 2014, "Fast splittable pseudorandom number
    generators", OOPSLA; constants of Vigna's ``splitmix64.c``) of ``id XOR key(seed)``.

    Args:
        ids: ``(N,)`` non-negative integer sample ids. seed: the run seed. folds: K >= 2.

    Raises:
        ValueError: ``folds < 2`` or a negative id.
    """
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids.min() < 0:
        raise ValueError("sample ids must be >= 0")
    key = np.uint64(derive_seed(seed, "crossfit-folds") & _MASK64)
    z = mix64(ids.astype(np.uint64) ^ key)
    return (z % np.uint64(folds)).astype(np.int64)


class FoldCopies:
    """The K fold copies of one helper server: copy j trains on the server's buffer minus fold j.

    Each copy starts from the production network's initial weights (a deep copy made right after
    it is built, so the copies differ from it only by the data they see) and keeps its own Adam
    state across rounds, as the production network does.

    Args:
        model: the production network, just initialised (copied, not shared). folds: K >= 2.
        lr: Adam's learning rate (``servers.lr``). seed: the run seed. index: the server index.
    """

    def __init__(self, model: torch.nn.Module, folds: int, lr: float, seed: int, index: int):
        if folds < 2:
            raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
        self.seed, self.index, self.lr = seed, index, lr
        self.models = [copy.deepcopy(model) for _ in range(folds)]
        self.opts = [Adam(m.parameters(), lr=lr) for m in self.models]

    def __len__(self) -> int:
        return len(self.models)

    def fit(self, ids: np.ndarray, x: torch.Tensor, y: torch.Tensor, server_round: int, epochs: int,
            batch_size: int) -> list[float]:
        """Train every copy ``epochs`` passes (cross-entropy) over the buffer rows outside its fold.

        Args:
            ids: ``(N,)`` the buffer's global sample ids. x: ``(N, C, H, W)``. y: ``(N,)`` classes.

        Returns:
            Each copy's last-epoch mean loss (NaN for a copy with no row to train on).
        """
        fold = torch.from_numpy(fold_of(ids, self.seed, len(self.models))).to(x.device)
        losses = []
        for j, (model, opt) in enumerate(zip(self.models, self.opts)):
            keep = fold != j
            model.train()
            losses.append(train_minibatch(opt, (x[keep], y[keep]), _cross_entropy(model), epochs=epochs,
                                          batch_size=batch_size,
                                          seed=derive_seed(self.seed, "server-fit-fold", self.index, j, server_round)))
            model.eval()
        return losses

    def weights(self) -> dict[str, np.ndarray]:
        """Every copy's ``state_dict`` as NumPy arrays, keyed ``fold{j}:<param>`` (what devices receive)."""
        return {f"fold{j}:{k}": v.detach().cpu().numpy().copy()
                for j, m in enumerate(self.models) for k, v in m.state_dict().items()}

    def state(self, with_optimizer: bool) -> dict[str, np.ndarray]:
        """Checkpoint arrays: ``fold{j}/net.<param>`` (and ``fold{j}/opt/...`` with the optimizer)."""
        out: dict[str, np.ndarray] = {}
        for j, (m, opt) in enumerate(zip(self.models, self.opts)):
            part = {f"net.{k}": v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}
            if with_optimizer:
                part.update(prefixed("opt", optimizer_arrays(opt)))
            out.update(prefixed(f"fold{j}", part))
        return out

    def load_state(self, state: dict[str, np.ndarray], fallback: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state`'s arrays (the optimizers start afresh unless ``fold{j}/opt`` is given).

        A state without fold copies (a start state installed into the server, e.g. L2D's fixed
        experts) starts every copy from ``fallback()``, the production network's new weights.

        Raises:
            ValueError: the state holds some fold copies but not all K.
        """
        parts = [sub(state, f"fold{j}") for j in range(len(self.models))]
        present = [bool(p) for p in parts]
        if any(present) and not all(present):
            raise ValueError(f"a server state with {sum(present)} of {len(self.models)} fold copies")
        for m, p in zip(self.models, parts):
            sd = {k[4:]: torch.from_numpy(np.array(v)) for k, v in p.items() if k.startswith("net.")} if p \
                else fallback()
            m.load_state_dict(sd)
        self.opts = [Adam(m.parameters(), lr=self.lr) for m in self.models]
        for opt, p in zip(self.opts, parts):
            if sub(p, "opt"):
                load_optimizer(opt, sub(p, "opt"))


def _cross_entropy(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda xb, yb: F.cross_entropy(model(xb), yb)
