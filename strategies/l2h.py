"""Learning to Help (L2H): fixed legacy client, trained helper server and per-device rejector.

Source: Wu, Li, Dong, Sathyavageeswaran, Sarwate, "Learning to Help in Multi-Class Settings",
ICLR 2025 (arXiv 2501.13810); binary case: Wu & Sarwate 2024 (arXiv 2409.16253).

One round (DESIGN.md):
1. :class:`L2HStrategy.configure_train` carries out the round's faults on the server pool,
   and sends sampled devices the up servers' weights -- the current ones (synchronous,
   ``staleness=1``) or a copy refreshed every S rounds (asynchronous) -- and which servers are up.
2. :func:`client_train` (on the device) computes the legacy model's and each routing option's
   errors on its rejector split, trains the rejector with the stage-switching surrogate
   (:mod:`strategies.l2h_losses`; with ``servers.routing=learned`` and several servers, one defer
   output per server and per-server costs), and returns the samples it now defers (with the
   server it chose) plus an exploration fraction of the ones it keeps.
3. :class:`L2HStrategy.aggregate_train` hands them to the pool, which routes them and trains the
   servers (cross-entropy: the server half of the stage-switching surrogate; or MEL / DML).
4. Evaluation: each device decides on its test split (:func:`client_evaluate`); the pool answers
   the deferred samples with failover; metrics are pooled in :mod:`strategies.base`.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.device import Device, Rejector
from servers.models import ensemble_probs
from servers.pool import ServerPool
from servers.view import PoolView
from sim.checkpoint import stack_states
from sim.failures import RoundFaults
from sim.schema import routing_of
from sim.training import derive_seed, train_minibatch
from strategies import bounded
from strategies.base import FleetStrategy, resumable
from strategies.l2h_losses import (binary_alpha, binary_rejector_loss, l2h_weights, masked_decision,
                                   multi_server_rejector_loss, multiclass_rejector_loss)


def resolve_surrogate(name: str, num_classes: int) -> str:
    """``auto`` -> ``binary`` for 2-class data, else ``multiclass``."""
    if name == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    if name == "binary" and num_classes != 2:
        raise ValueError(f"strategy.surrogate=binary needs 2-class data, the dataset has {num_classes} classes")
    return name


def num_options(servers_cfg: dict[str, Any]) -> int:
    """Rejector outputs: ``1 + S`` for learned routing over S > 1 servers, else 2 (local, defer)."""
    count = int(servers_cfg["count"])
    return 1 + count if routing_of(servers_cfg) == "learned" and count > 1 else 2


def server_costs(servers_cfg: dict[str, Any], c_e: float) -> list[float]:
    """Per-server deferral price ``c_e[s]``: ``servers.c_e`` when set, else ``strategy.c_e`` for all."""
    per = servers_cfg.get("c_e")
    return [float(v) for v in per] if per else [float(c_e)] * int(servers_cfg["count"])


def availability_mask(servers_cfg: dict[str, Any], reachable: list[int]) -> torch.Tensor:
    """Which rejector options are available: ``(num_options,)`` bool, option 0 (local) always."""
    n = num_options(servers_cfg)
    if n == 2:
        return torch.tensor([True, bool(reachable)])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[0] = True
    mask[[1 + s for s in reachable]] = True
    return mask


def server_error(feats_s: dict[int, torch.Tensor], logits: dict[int, torch.Tensor], y: torch.Tensor,
                 reach: list[int], view: PoolView, servers_cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a deferred sample gets from the reachable servers: ``e_wrong (N,)`` (1 if the answer is
    wrong; the expected error over the servers when the pool picks one) and ``probs (N, K)``.

    ``routing=all`` (MEL, ensembles): the ensemble's answer. Otherwise (one server, or a server
    the pool chooses): the mean over the reachable servers.
    """
    if routing_of(servers_cfg) == "all":
        probs = ensemble_probs(reach, feats_s, logits, view.combiners)
        return (probs.argmax(1) != y).float(), probs
    probs = torch.stack([torch.softmax(logits[s], 1) for s in reach]).mean(0)
    return torch.stack([(logits[s].argmax(1) != y).float() for s in reach]).mean(0), probs


def client_train(device: Device, rejector: Rejector, view: PoolView, reachable: list[int], hp: dict[str, Any],
                 servers_cfg: dict[str, Any], num_classes: int, server_round: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One device's L2H update: train its rejector against the (possibly stale) servers it can reach.

    Args:
        device: the device (data, frozen legacy model). rejector: trained in place.
        view: the servers' networks as received this round. reachable: servers this device can
            reach this round (up, not cut off). hp: the ``strategy`` config. servers_cfg: the
            ``servers`` config. num_classes: K. server_round, seed: for seeding.

    Returns:
        ``defer: (N,)`` bool (decisions on the rejector split), ``route: (N,)`` int (the server a
        learned rejector chose, -1 otherwise), ``explore: (N,)`` bool (kept samples also sent),
        and metrics.
    """
    feats = device.features("rejector", hp["rejector"]["inputs"])
    y = torch.from_numpy(device.data.y_rejector)
    m_wrong = (device.legacy_rejector.argmax(1) != y).float()
    reach = [s for s in reachable if s in view.present]
    avail = availability_mask(servers_cfg, reach)
    c_e, c_1 = float(hp["c_e"]), float(hp["c_1"])
    prices = server_costs(servers_cfg, c_e)
    x = torch.from_numpy(device.data.x_rejector)
    e_err = float("nan")
    if not reach:
        loss = float("nan")  # nothing to defer to: the rejector is left as it is
    else:
        feats_s, logits = view.outputs(x, reach)
        wrong = {s: (logits[s].argmax(1) != y).float() for s in reach}
        if num_options(servers_cfg) > 2:
            costs = torch.zeros(len(y), num_options(servers_cfg))
            costs[:, 0] = m_wrong
            for s in reach:
                costs[:, 1 + s] = prices[s] + c_1 * wrong[s]
            e_err = float(torch.stack([wrong[s] for s in reach]).mean())
            tensors = (feats, costs)

            def loss_fn(f, c):
                return multi_server_rejector_loss(rejector(f), c, avail)
        else:
            e_wrong, probs = server_error(feats_s, logits, y, reach, view, servers_cfg)
            c_defer = float(np.mean([prices[s] for s in reach]))
            e_err = float(e_wrong.mean())
            if resolve_surrogate(hp["surrogate"], num_classes) == "multiclass":
                w0, w1 = l2h_weights(m_wrong, e_wrong, c_defer, c_1, hp["weights"])
                tensors = (feats, w0, w1)

                def loss_fn(f, a, b):
                    return multiclass_rejector_loss(rejector(f), a, b)
            else:
                alpha = binary_alpha(c_defer, c_1, float(hp["binary_beta"]), float(hp["binary_p"]))
                margin = 2.0 * probs.gather(1, y[:, None])[:, 0] - 1.0
                tensors = (feats, m_wrong, margin)

                def loss_fn(f, mw, em):
                    return binary_rejector_loss(rejector(f), mw, em, c_defer, c_1, float(hp["binary_beta"]), alpha)

        cal = calibration_split(hp, len(y), seed, device.device_id, server_round)
        rh = hp["rejector"]
        rejector.train()
        loss = train_minibatch(rejector.parameters(), tuple(t[~cal] for t in tensors), loss_fn,
                               epochs=int(rh["epochs"]), batch_size=int(rh["batch_size"]), lr=float(rh["lr"]),
                               seed=derive_seed(seed, "rejector", device.device_id, server_round))
        if cal.any():
            fit_bound(rejector, feats[cal], avail, servers_cfg, hp)
    defer, route = decide(rejector, feats, avail, servers_cfg)
    defer = bound_decisions(rejector, feats, defer, avail, hp, seed, device.device_id, server_round, "train")
    rng = np.random.default_rng(derive_seed(seed, "explore", device.device_id, server_round))
    explore = (~defer) & (rng.random(len(defer)) < float(hp["explore"])) & bool(reach)
    metrics = {"rejector_loss": loss, "train_defer_rate": float(defer.mean()),
               "train_legacy_error": float(m_wrong.mean()), "train_server_error": e_err}
    return defer, route, explore, metrics


def calibration_split(hp: dict[str, Any], n: int, seed: int, device_id: int, server_round: int) -> np.ndarray:
    """``(n,)`` bool: the calibration samples held out of the rejector split when a reject-rate
    bound is set (``strategy.max_defer_rate``), else all False."""
    if hp.get("max_defer_rate") is None or n < 2:
        return np.zeros(n, dtype=bool)
    rng = np.random.default_rng(derive_seed(seed, "calibration", device_id, server_round))
    return bounded.calibration_mask(n, float(hp["calibration"]), rng)


@torch.no_grad()
def fit_bound(rejector: torch.nn.Module, feats_cal: torch.Tensor, avail: torch.Tensor, servers_cfg: dict[str, Any],
              hp: dict[str, Any]) -> None:
    """Fit the reject-rate bound ``(t, rho)`` on the calibration features ``(M, D)`` into ``rejector.bound``."""
    rejector.eval()
    _, score = masked_decision(rejector(feats_cal), avail)
    defer, _ = decide(rejector, feats_cal, avail, servers_cfg)
    t, rho = bounded.fit(score.numpy(), defer, float(hp["max_defer_rate"]))
    rejector.bound.copy_(torch.tensor([t, rho]))


@torch.no_grad()
def bound_decisions(rejector: torch.nn.Module, feats: torch.Tensor, defer: np.ndarray, avail: torch.Tensor,
                    hp: dict[str, Any], seed: int, device_id: int, server_round: int, split: str) -> np.ndarray:
    """The rejector's decisions ``(N,)`` after the reject-rate bound (unchanged when none is set)."""
    if hp.get("max_defer_rate") is None:
        return defer
    rejector.eval()
    _, score = masked_decision(rejector(feats), avail)
    rng = np.random.default_rng(derive_seed(seed, "bound", device_id, server_round, split))
    return bounded.apply(score.numpy(), defer, rejector.bound, hp, rng)


@torch.no_grad()
def decide(rejector: Rejector, feats: torch.Tensor, avail: torch.Tensor, servers_cfg: dict[str, Any]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Masked decisions: ``defer (N,)`` bool and ``route (N,)`` (learned routing: the best available
    server by the rejector's logits, whether or not the sample is deferred; -1 otherwise)."""
    rejector.eval()
    logits = rejector(feats)
    choice, _ = masked_decision(logits, avail)
    defer = (choice > 0).numpy()
    route = np.full(len(feats), -1, dtype=np.int64)
    if num_options(servers_cfg) > 2 and bool(avail[1:].any()):
        server_logits = logits[:, 1:].masked_fill(~avail[1:], float("-inf"))
        route = server_logits.argmax(1).numpy().astype(np.int64)
    elif routing_of(servers_cfg) == "learned" and bool(avail[1]):
        route = np.zeros(len(feats), dtype=np.int64)
    return defer, route


@torch.no_grad()
def client_evaluate(device: Device, rejector: Rejector | None, reachable: list[int], hp: dict[str, Any],
                    servers_cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """The device's decisions on its test split; the pool answers the deferred samples.

    A device whose rejector has never been trained (not yet sampled) keeps every sample local
    (score 0): a deployed device does not defer before it has learned to.

    Returns:
        Per-sample arrays ``(N_test,)``: ``device``, ``y``, ``m_pred``, ``m_conf``, ``score``
        (1 - psi_local over the available options), ``defer``, ``route``, and ``x`` (the samples,
        ``(N_test, C, H, W)``, which the pool answers).
    """
    x = device.data.x_test
    probs = torch.softmax(device.legacy_test, 1)
    avail = availability_mask(servers_cfg, reachable)
    if rejector is None:
        score = torch.zeros(len(x))
        defer, route = np.zeros(len(x), dtype=bool), np.full(len(x), -1, dtype=np.int64)
    else:
        rejector.eval()
        feats = device.features("test", hp["rejector"]["inputs"])
        _, score = masked_decision(rejector(feats), avail)
        defer, route = decide(rejector, feats, avail, servers_cfg)
        defer = bound_decisions(rejector, feats, defer, avail, hp, seed, device.device_id, 0, "test")
    return test_record(device, probs, score.numpy(), defer, route)


def test_record(device: Device, probs: torch.Tensor, score: np.ndarray, defer: np.ndarray, route: np.ndarray
                ) -> dict[str, np.ndarray]:
    """A device's evaluation record on its test split (every strategy returns this shape).

    Args:
        probs: ``(N_test, K)`` the local model's softmax. score, defer, route: ``(N_test,)``.
    """
    x = device.data.x_test
    return {
        "device": np.full(len(x), device.device_id, dtype=np.int64),
        "y": device.data.y_test.astype(np.int64),
        "m_pred": probs.argmax(1).numpy().astype(np.int64),
        "score": np.asarray(score, dtype=np.float32),
        "m_conf": probs.max(1).values.numpy().astype(np.float32),
        "defer": defer,
        "route": route,
        "x": x,
    }


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays by name (decoded once)."""
    return {k: record[k].numpy() for k in record.keys()}


def faults_config(faults: RoundFaults, up: list[int], final: bool) -> str:
    """What devices learn of this round's faults (JSON in the message config): the servers up,
    the network partition, and which devices drop out (none in the final evaluation, so the final
    metrics always cover every device's test samples)."""
    return json.dumps({"up": up, "partition": faults.partition, "dropout": [] if final else faults.dropout})


class L2HStrategy(FleetStrategy):
    """The ServerApp side of L2H with a pool of helper servers (Flower Message-API Strategy).

    Args:
        cfg: run config (plain dict). pool: the helper servers. schedule: the failure schedule
        (one :class:`RoundFaults` per round). on_round: round-record callback.
    """

    def __init__(self, cfg: dict[str, Any], pool: ServerPool, schedule: list[RoundFaults], on_round):
        super().__init__(cfg, on_round)
        self.pool = pool
        self.schedule = schedule
        self.staleness = int(cfg["strategy"]["staleness"])
        self.stale: ArrayRecord | None = None
        self.faults_json = "{}"
        # Each device's latest rejector state (for checkpoints), as arrays: converted once on receipt.
        self.rejectors: dict[int, dict[str, np.ndarray]] = {}

    def config(self, server_round: int) -> ConfigRecord:
        rec = super().config(server_round)
        rec["faults"] = self.faults_json
        return rec

    @resumable
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        faults = self.schedule[server_round - 1]
        up = self.pool.begin_round(faults)
        self.faults_json = faults_config(faults, up, final=False)
        # Asynchronous training: the copy the rejectors train against is refreshed every S rounds.
        if self.stale is None or (server_round - 1) % self.staleness == 0:
            self.stale = ArrayRecord({k: Array(v) for k, v in self.pool.snapshot().items()})
        devices = self.sample(server_round, float(self.cfg["sim"]["fraction_train"]), "train")
        content = RecordDict({"server": self.stale, "config": self.config(server_round)})
        return self.messages(grid, devices, MessageType.TRAIN, content, server_round)

    @resumable
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = self.collect(replies)
        batches = []
        losses = []
        for dev in got.devices:  # sorted by device: routing and buffers never depend on arrival order
            rows = got.rows(dev)
            if len(rows.get("ids", ())):
                b = {k: rows[k] for k in ("ids", "x", "y", "route", "explore")}
                b["explore"] = b["explore"].astype(bool)
                b["device"] = dev
                batches.append(b)
            losses.append(float(got.info[dev]["rejector_loss"]))
            if dev in got.learners:
                self.rejectors[dev] = record_arrays(got.learners[dev])
        sent = int(sum(len(b["ids"]) for b in batches))
        explored = int(sum(b["explore"].sum() for b in batches))
        fit = self.pool.train(server_round, batches)
        self.pool.end_round()
        finite = [v for v in losses if np.isfinite(v)]
        self.train_record = {
            "train_devices": len(got.devices), "train_errors": got.errors, "samples_sent": sent,
            "samples_deferred": sent - explored, "samples_explored": explored,
            "rejector_loss": float(np.mean(finite)) if finite else float("nan"), **fit,
            "train_load": self.pool.load.tolist(),
        }
        return None, MetricRecord({"samples_sent": sent, "train_errors": got.errors})

    def eval_content(self, server_round: int, arrays: ArrayRecord) -> RecordDict:
        faults = self.schedule[server_round - 1]
        self.faults_json = faults_config(faults, self.pool.up, final=server_round == self.num_rounds)
        self.pool.begin_eval()
        return RecordDict({"config": self.config(server_round)})

    def answer(self, server_round: int, pooled: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
        """The pool answers the test samples (with failover); returns per-round server metrics."""
        out = self.pool.answer(server_round, x, pooled["device"], pooled["route"], pooled["defer"], pooled["m_pred"])
        pooled.update(e_pred=out["e_pred"], served=out["served"])
        return {
            "availability": self.pool.availability(),
            "load": self.pool.load.tolist(),
            "failovers": {k: int(v) for k, v in sorted(self.pool.failovers.items())},
            "servers_dead": sorted(self.pool.dead),
            # coop: each Teammate's serving depth fraction this round (drops under load / cost pressure)
            **({"serve_depth": {str(k): v for k, v in self.pool.depth.items()}} if self.pool.depth else {}),
        }

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The strategy's part of a checkpoint: every device's latest rejector and the stale server
        copy devices train against (``staleness > 1``)."""
        arrays: dict[str, np.ndarray] = stack_states(self.rejectors, "rejectors")
        if self.stale is not None:
            arrays.update({f"stale/{k}": self.stale[k].numpy() for k in self.stale.keys()})
        return arrays, {"rejectors": sorted(self.rejectors), "stale": self.stale is not None}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], finished_round: int) -> None:
        """Continue after ``finished_round``: devices get their rejectors back with their next message."""
        from sim.checkpoint import CheckpointError, sub, unstack_states

        self.offset = finished_round
        states = unstack_states(arrays, "rejectors")
        if sorted(states) != sorted(int(d) for d in meta["rejectors"]):
            raise CheckpointError("the checkpoint's device states are missing or in an older format; "
                                  "start the run again without sim.resume")
        for d, st in states.items():
            self.rejectors[d] = st
            self.restore_pending[d] = ArrayRecord({k: Array(np.array(v)) for k, v in st.items()})
        if meta["stale"]:
            self.stale = ArrayRecord({k: Array(np.array(v)) for k, v in sub(arrays, "stale").items()})


def new_learner(device: Device, spec: dict[str, Any]) -> Rejector:
    """A new rejector for ``device``: ``num_options`` outputs, seeded per device."""
    hp = spec["strategy"]["rejector"]
    return device.new_rejector(hp["inputs"], int(hp["hidden"]), spec["seed"], num_options(spec["servers"]))


def load_learner(device: Device, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> Rejector:
    """The rejector with a saved ``state_dict``."""
    rejector = new_learner(device, spec)
    rejector.load_state_dict(state)
    return rejector
