"""Where a device's labels of the servers' errors come from (``strategy.server_labels``).

The L2H surrogate (and CompareConfidence's estimate of P(server right | x)) is minimised in
expectation over the population: the Bayes rule it recovers uses the server's error on samples
the server has *not* trained on. A device's rejector split is also what it sends: once a sample
is in a server's replay buffer, the server's current answer on it is a training answer, nearly
always right for a network that memorises its buffer, and a rejector trained on it learns "defer
whenever the legacy model may be wrong" (docs/methods.md §8). The options:

- ``in_sample``: the current (or stale) servers' answers on every sample of the split -- biased
  for every sample sent before.
- ``prequential``: the answer a sample got when it was first sent, before any server trained on
  it (what a deployed device observes: the server answers, then learns); samples never sent are
  labelled by the current servers, which have not seen them. Stale: an early answer comes from a
  weaker server. ``strategy.label_max_age`` drops labels older than that many rounds.
- ``holdout``: a fixed part of the rejector split (``strategy.holdout``) is never sent to any
  server; the rejector trains on it alone, with the current servers' answers (always
  out-of-sample, never stale), and decides for the rest, which is what gets sent. Half the data.
- ``crossfit``: every server also trains K fold copies, copy j on its buffer minus the samples of
  fold j (:mod:`servers.crossfit`, a seeded function of the global sample id); every row of the
  split is labelled by its fold's copies (out-of-sample and current, no data withheld; K times the
  server compute).

Caveat: with ``data.partition.name=sampled`` devices share images, so a sample this device never
sent may have been sent by another device (under another sample id: with ``crossfit`` it may be in
another fold there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clients.device import Rejector
from servers.crossfit import fold_of
from servers.view import PoolView
from sim.core.config import ServerLabels, ServersConfig, StrategyConfig
from sim.core.seeding import derive_seed
from strategies.records import server_error


@dataclass
class ServerAnswers:
    """The servers' answers on a device's rejector split of ``N`` samples (``S`` servers, ``K`` classes).

    Attributes:
        wrong: ``(N, S)`` 1.0 where server s is wrong, NaN where it was not reachable.
        pool_wrong: ``(N,)`` what a deferred sample gets from the pool: the ensemble's error
            (``routing=all``), else the expected error over the reachable servers.
        pool_probs: ``(N, K)`` the matching class probabilities (the binary surrogate's margin).
    """

    wrong: torch.Tensor
    pool_wrong: torch.Tensor
    pool_probs: torch.Tensor


def current_answers(view: PoolView, x: torch.Tensor, y: torch.Tensor, reach: list[int], servers: ServersConfig
                    ) -> ServerAnswers:
    """The servers' answers, as the device's copy of them gives them now.

    Args:
        view: the servers' networks. x: ``(N, ...)``. y: ``(N,)``. reach: servers to ask (non-empty).
    """
    feats, logits = view.outputs(x, reach)
    wrong = torch.full((len(y), servers.count), float("nan"))
    for s in reach:
        wrong[:, s] = (logits[s].argmax(1) != y).float()
    pool_wrong, pool_probs = server_error(view, feats, logits, y, reach, servers)
    return ServerAnswers(wrong, pool_wrong, pool_probs)


def out_of_fold_answers(view: PoolView, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray, reach: list[int],
                        servers: ServersConfig, seed: int, folds: int) -> ServerAnswers:
    """The servers' answers on each sample from the copies that never trained on it (``crossfit``):
    row i from fold ``fold_of(ids[i])``'s copies of the servers, each copy asked only about its fold.

    Args:
        view: the servers' networks with their fold copies (``view.folds``, K of them). x: ``(N, ...)``.
        y: ``(N,)``. ids: ``(N,)`` the samples' global ids. reach: servers to ask (non-empty).
        seed: the run seed. folds: K.

    Raises:
        ValueError: the view does not hold K fold copies (the pool was built without them).
    """
    if len(view.folds) != folds:
        raise ValueError(f"server_labels=crossfit needs {folds} fold copies of the servers, the devices got "
                         f"{len(view.folds)}")
    which = fold_of(ids, seed, folds)
    wrong = torch.full((len(y), servers.count), float("nan"))
    pool_wrong = torch.full((len(y),), float("nan"))
    pool_probs: torch.Tensor | None = None
    for j in range(folds):
        rows = torch.from_numpy(np.flatnonzero(which == j))
        if not len(rows):
            continue
        part = current_answers(view.folds[j], x[rows], y[rows], reach, servers)
        if pool_probs is None:
            pool_probs = torch.full((len(y), part.pool_probs.shape[1]), float("nan"))
        wrong[rows], pool_wrong[rows], pool_probs[rows] = part.wrong, part.pool_wrong, part.pool_probs
    return ServerAnswers(wrong, pool_wrong, pool_probs if pool_probs is not None else torch.empty(0, 0))


def fold_copies(cfg: StrategyConfig, learns_from_labels: bool) -> int:
    """How many fold copies each helper server trains: ``strategy.crossfit_folds`` for a method that
    learns from the servers' answers with ``server_labels=crossfit``, else 0."""
    return cfg.crossfit_folds if learns_from_labels and cfg.server_labels == ServerLabels.crossfit else 0


def answer_memory(cfg: StrategyConfig, n: int, num_servers: int, num_classes: int) -> tuple[int, int, int] | None:
    """The size of the per-sample answer memory a device's learner keeps (prequential labels only)."""
    return (n, num_servers, num_classes) if cfg.server_labels == ServerLabels.prequential else None


class LabelSource:
    """The labels a device's learner trains on this round (one per method instance).

    Args:
        cfg: the method's config (``server_labels``, ``holdout``, ``label_max_age``). seed: the run seed.
    """

    def __init__(self, cfg: StrategyConfig, seed: int):
        self.mode, self.seed = cfg.server_labels, seed
        self.holdout, self.max_age, self.folds = cfg.holdout, cfg.label_max_age, cfg.crossfit_folds

    def answers(self, view: PoolView, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray, reach: list[int],
                servers: ServersConfig) -> tuple[ServerAnswers, ServerAnswers | None]:
        """The current servers' answers on the split ``x (N, ...)``, ``y (N,)`` (what the pool would
        answer now) and, with ``crossfit``, the out-of-fold ones (:func:`out_of_fold_answers`; None
        otherwise). ``ids (N,)``: the samples' global ids. reach: servers to ask (non-empty)."""
        now = current_answers(view, x, y, reach, servers)
        if self.mode != ServerLabels.crossfit:
            return now, None
        return now, out_of_fold_answers(view, x, y, ids, reach, servers, self.seed, self.folds)

    def held_out(self, n: int, device_id: int) -> np.ndarray:
        """``(n,)`` bool: the samples never sent (``holdout``; all False otherwise). Fixed per device."""
        if self.mode != ServerLabels.holdout:
            return np.zeros(n, dtype=bool)
        k = min(max(int(round(self.holdout * n)), 1), max(n - 1, 1))
        order = np.random.default_rng(derive_seed(self.seed, "holdout", device_id)).permutation(n)
        mask = np.zeros(n, dtype=bool)
        mask[order[:k]] = True
        return mask

    def labels(self, learner: Rejector, now: ServerAnswers, device_id: int, server_round: int,
               out_of_fold: ServerAnswers | None = None) -> tuple[np.ndarray, ServerAnswers]:
        """The rows the learner trains on (``(N,)`` bool) and their answers.

        ``in_sample``: every row, current answers. ``holdout``: the held-out rows, current
        answers. ``prequential``: rows sent before get the answers recorded when they were first
        sent (a server unreachable then: its current answer), rows never sent the current ones;
        recorded answers older than ``label_max_age`` rounds leave the training set.
        ``crossfit``: every row, the ``out_of_fold`` answers (from :meth:`answers`).

        Raises:
            ValueError: ``crossfit`` without ``out_of_fold`` answers.
        """
        n = len(now.pool_wrong)
        if self.mode == ServerLabels.in_sample:
            return np.ones(n, dtype=bool), now
        if self.mode == ServerLabels.crossfit:
            if out_of_fold is None:
                raise ValueError("server_labels=crossfit labels need the out-of-fold answers (LabelSource.answers)")
            return np.ones(n, dtype=bool), out_of_fold
        if self.mode == ServerLabels.holdout:
            return self.held_out(n, device_id), now
        sent_round = learner.local_answer_round
        sent = sent_round > 0
        rows = np.ones(n, dtype=bool)
        if self.max_age is not None:
            rows &= ~(sent & (server_round - sent_round > self.max_age)).numpy()
        old = learner.local_answer_wrong
        wrong = torch.where(sent[:, None] & ~torch.isnan(old), old, now.wrong)
        pool_wrong = torch.where(sent, learner.local_answer_pool_wrong, now.pool_wrong)
        pool_probs = torch.where(sent[:, None], learner.local_answer_pool_probs, now.pool_probs)
        return rows, ServerAnswers(wrong, pool_wrong, pool_probs)

    @torch.no_grad()
    def record(self, learner: Rejector, send: np.ndarray, now: ServerAnswers, server_round: int) -> None:
        """``prequential``: remember the answers of the rows sent for the first time this round
        (``send (N,)`` bool), before any server trains on them."""
        if self.mode != ServerLabels.prequential:
            return
        first = torch.from_numpy(send) & (learner.local_answer_round == 0)
        learner.local_answer_round[first] = server_round
        learner.local_answer_wrong[first] = now.wrong[first]
        learner.local_answer_pool_wrong[first] = now.pool_wrong[first]
        learner.local_answer_pool_probs[first] = now.pool_probs[first]
