"""The Flower ClientApp (one legacy device per node) and ServerApp (runs a FleetStrategy).

A ClientApp handler finds its device by ``context.node_config["partition-id"]``. What a worker
process needs to build a device -- the memory-mapped prepared dataset, the fleet's legacy
models on disk -- is named in a small JSON ``spec`` carried by each message, and built devices
are cached per worker process (legacy outputs are computed once: the models are frozen). The
rejector lives in ``context.state`` between rounds. Each message's config also says which
helper servers are up and which devices are cut off or drop out this round (fault injection);
a dropped-out device's handler raises, which Flower turns into an error reply.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from clients.device import Device
from clients.legacy import load_legacy
from servers.view import PoolView
from sim.failures import cut_off
from sim.data import device_data, load_prepared
from strategies.registry import device_side

_WORKER: dict[str, Any] = {}
_SPECS: dict[str, dict[str, Any]] = {}


def _runtime(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-worker-process cache for one run (keyed by the run's spec key)."""
    if _WORKER.get("key") != spec["key"]:
        torch.set_num_threads(int(spec["torch_threads"]))
        _WORKER.clear()
        _WORKER.update(key=spec["key"], prep=load_prepared(Path(spec["data_path"])), devices={}, view=None)
    return _WORKER


def get_device(spec: dict[str, Any], device_id: int) -> Device:
    rt = _runtime(spec)
    dev = rt["devices"].get(device_id)
    if dev is None:
        group = spec["group_cfgs"][spec["groups"][device_id]]
        data = device_data(rt["prep"], device_id, group, spec["seed"])
        legacy = load_legacy(Path(spec["fleet_path"]), device_id, group, spec["in_shape"], spec["num_classes"])
        dev = rt["devices"][device_id] = Device.create(device_id, data, legacy)
    return dev


def get_view(spec: dict[str, Any], arrays: ArrayRecord) -> PoolView:
    """The servers' networks with the received weights (modules reused per worker)."""
    rt = _runtime(spec)
    if rt["view"] is None:
        rt["view"] = PoolView(spec["servers"], spec["in_shape"], spec["num_classes"])
    return rt["view"].load({k: arrays[k].numpy() for k in arrays.keys()})


def _learner(spec: dict[str, Any], device: Device, msg: Message, context: Context, create: bool
             ) -> torch.nn.Module | None:
    """The device's trained part (its rejector; for L2D its classifier + deferral model): from the
    message (a resumed run hands it back; FedAvg sends the group's average), else from its
    context, else a new one (``create``) or None."""
    method = device_side(spec["strategy"]["name"])
    if "rejector" in msg.content:
        context.state["rejector"] = msg.content["rejector"]
    if "rejector" not in context.state:
        return method.new_learner(device, spec) if create else None
    return method.load_learner(device, spec, context.state["rejector"].to_torch_state_dict())


class DeviceDropout(RuntimeError):
    """Injected device dropout: the handler fails, Flower sends an error reply, the worker lives on."""


def _faults(msg: Message, pid: int) -> list[int]:
    """This device's reachable servers this round; raises :class:`DeviceDropout` if it drops out."""
    faults = json.loads(str(msg.content["config"]["faults"]))
    if pid in faults["dropout"]:
        raise DeviceDropout(f"device {pid} dropped out (injected failure)")
    cut = cut_off(faults["partition"], pid)
    return [s for s in faults["up"] if s not in cut]


def _arrays(d: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in d.items()})


def message_spec(msg: Message) -> dict[str, Any]:
    """The run's device-runtime spec carried by a message (JSON string, parsed once per worker)."""
    text = str(msg.content["config"]["spec"])
    spec = _SPECS.get(text)
    if spec is None:
        _SPECS.clear()
        spec = _SPECS[text] = json.loads(text)
    return spec


app = ClientApp()
"""The ClientApp of every device. Module-level, so Ray pickles it by reference (a few bytes per
message) instead of by value; what a run needs travels in each message's ``config.spec``:
``key``, ``data_path``, ``fleet_path``, ``groups``, ``group_cfgs``, ``in_shape``,
``num_classes``, ``seed``, ``strategy``, ``servers``, ``torch_threads``."""


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": MetricRecord({"partition_id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    spec = message_spec(msg)
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["round"])
    reachable = _faults(msg, pid)
    device = get_device(spec, pid)
    view = get_view(spec, msg.content["server"])
    learner = _learner(spec, device, msg, context, create=True)
    method = device_side(spec["strategy"]["name"])
    defer, route, explore, metrics = method.client_train(device, learner, view, reachable, spec["strategy"],
                                                         spec["servers"], spec["num_classes"], rnd, spec["seed"])
    send = defer | explore
    d = device.data
    samples = _arrays({"ids": d.ids_rejector[send], "x": d.x_rejector[send], "y": d.y_rejector[send],
                       "route": route[send], "explore": explore[send]})
    info = MetricRecord({"device": pid, "num_examples": len(defer), **metrics})
    content = RecordDict({"samples": samples, "info": info})
    if learner is not None:
        content["rejector"] = context.state["rejector"] = ArrayRecord(torch_state_dict=learner.state_dict())
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    spec = message_spec(msg)
    pid = int(context.node_config["partition-id"])
    reachable = _faults(msg, pid)
    device = get_device(spec, pid)
    learner = _learner(spec, device, msg, context, create=False)
    rec = device_side(spec["strategy"]["name"]).client_evaluate(device, learner, reachable, spec["strategy"],
                                                                spec["servers"], spec["seed"])
    info = MetricRecord({"device": pid, "num_examples": len(rec["y"])})
    return Message(RecordDict({"samples": _arrays(rec), "info": info}), reply_to=msg)


def make_server_app(run: Callable[[Grid], None]) -> ServerApp:
    """A ServerApp whose main calls ``run(grid)`` (the runner holds the strategy and results)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid)

    return app
