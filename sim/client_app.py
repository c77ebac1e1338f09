"""The Flower ClientApp: a node simulating one or more legacy devices.

A node finds its devices from ``context.node_config["partition-id"]`` and the device ids each
message lists (``config.devices``; :mod:`sim.core.nodes` says which node hosts which devices). What a
worker process needs to build a device -- the memory-mapped prepared dataset, the fleet's
legacy models on disk, the method's and the servers' config -- is named in a
:class:`sim.core.device_spec.DeviceSpec` carried by each message (JSON text in ``config.spec``);
the method (:class:`strategies.method.DeviceMethod`) and built devices are cached per worker
process (legacy outputs are computed once: the models are frozen). Each device's rejector lives in
the node's ``context.state`` (key ``rejector/<device>``) between rounds. Each message's config also
says which helper servers are up and which devices are cut off or drop out this round (fault
injection, a :class:`sim.core.faults.NodeFaults` in ``config.faults``); a dropped-out device is
left out of the node's reply (the strategy counts it as a failed device), its node's other devices
answer.

A reply carries, per answering device ``d``, ``info/<d>`` (a MetricRecord) and, when it has one,
``rejector/<d>`` (its trained part), plus one ``samples`` ArrayRecord: the per-sample arrays of
all its answering devices concatenated in device order, with a ``device`` column.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.device import Device
from clients.legacy import legacy_file, load_legacy, model_index
from servers.view import PoolView
from sim.core.data import device_data, group_ranks, load_prepared
from sim.core.device_spec import DeviceSpec
from sim.core.faults import NodeFaults
from sim.core.nodes import hosted
from sim.core.schemas import resolve
from strategies.method import DeviceMethod, RoundContext

_WORKER: dict[str, Any] = {}
_SPECS: dict[str, DeviceSpec] = {}


def _runtime(spec: DeviceSpec) -> dict[str, Any]:
    """Per-worker-process cache for one run (keyed by the run's spec key): the prepared data, the
    method, built devices, legacy models, learner modules and the servers' view."""
    if _WORKER.get("key") != spec.key:
        torch.set_num_threads(spec.torch_threads)
        _WORKER.clear()
        device_cls = resolve(spec.strategy.device, "strategy.device", DeviceMethod)
        device_method = device_cls(spec.strategy, spec.servers, spec.seed, spec.num_classes)
        _WORKER.update(key=spec.key, prep=load_prepared(spec.data_path), devices={}, learners={},
                       view=None, method=device_method, legacy={},
                       ranks=group_ranks(spec.groups),
                       model_of=model_index(spec.groups, spec.group_cfgs) if spec.legacy_models else None)
    return _WORKER


def legacy_model(spec: DeviceSpec, device_id: int) -> torch.nn.Module:
    """The frozen legacy model ``device_id`` runs, loaded once per worker and file: a product line's
    devices share one module (it is never trained, so sharing is safe); a ``per_device`` fleet's
    device has its own file in the fleet's entry."""
    rt = _runtime(spec)
    group = spec.group_cfgs[spec.groups[device_id]]
    if rt["model_of"] is not None:
        path = spec.legacy_models[int(rt["model_of"][device_id])]
    else:
        path = spec.fleet_path / legacy_file(device_id)
    model = rt["legacy"].get(path)
    if model is None:
        model = rt["legacy"][path] = load_legacy(path, group, spec.in_shape, spec.num_classes)
        if rt["model_of"] is None:  # one module per device: not worth keeping beyond the device itself
            rt["legacy"].pop(path)
    return model


def get_device(spec: DeviceSpec, device_id: int) -> Device:
    """Device ``device_id`` of the run ``spec`` describes: its data splits, legacy model and legacy
    outputs, built once per worker process and kept (the legacy models are frozen)."""
    rt = _runtime(spec)
    dev = rt["devices"].get(device_id)
    if dev is None:
        group_index = spec.groups[device_id]
        data = device_data(rt["prep"], device_id, spec.group_cfgs[group_index], spec.seed, int(rt["ranks"][device_id]))
        dev = rt["devices"][device_id] = Device.create(device_id, data, legacy_model(spec, device_id),
                                                       spec.temperatures[group_index])
    return dev


def get_view(spec: DeviceSpec, arrays: ArrayRecord) -> PoolView:
    """The servers' networks with the received weights (modules reused per worker)."""
    rt = _runtime(spec)
    if rt["view"] is None:
        rt["view"] = PoolView(spec.servers, spec.in_shape, spec.num_classes)
    return rt["view"].load({k: arrays[k].numpy() for k in arrays.keys()})


def _learner(spec: DeviceSpec, device: Device, msg: Message, context: Context, create: bool
             ) -> torch.nn.Module | None:
    """The device's trained part (its rejector; for L2D its classifier + deferral model).

    Its state is the node's context (``rejector/<device>``), updated by what the message brings:
    a state to restore after a resume (``rejector/<device>``), then its federation group's
    average (``federated/<key>``, the key in the ConfigRecord ``federated``; it replaces the shared
    weights and keeps the device's own ``local_*`` buffers). A device with neither state nor
    message has a new one (``create``) or None. The module holding the state is reused per worker
    and device (loading a state into an existing module is a copy, building one is not).
    """
    rt = _runtime(spec)
    method: DeviceMethod = rt["method"]
    key = f"rejector/{device.device_id}"
    updates = [msg.content[key]] if key in msg.content else []
    fed = msg.content["federated"] if "federated" in msg.content else {}  # device -> its group's key
    if str(device.device_id) in fed:
        updates.append(msg.content[f"federated/{fed[str(device.device_id)]}"])
    modules = rt["learners"]
    if key not in context.state and not updates:
        learner = method.new_learner(device) if create else None
    else:
        learner = modules.get(device.device_id)
        if learner is None:
            learner = method.new_learner(device)
        state = learner.state_dict() if key not in context.state else context.state[key].to_torch_state_dict()
        for rec in updates:
            state.update(rec.to_torch_state_dict())
        learner.load_state_dict(state)
        if updates:
            context.state[key] = ArrayRecord(torch_state_dict=learner.state_dict())
    if learner is not None:
        modules[device.device_id] = learner
    return learner


class DeviceDropout(RuntimeError):
    """Injected device dropout: the device does not answer this round; its node's others do."""


def _faults(faults: NodeFaults, pid: int) -> list[int]:
    """This device's reachable servers this round; raises :class:`DeviceDropout` if it drops out."""
    if pid in faults.dropout:
        raise DeviceDropout(f"device {pid} dropped out (injected failure)")
    return faults.reachable(pid)


def message_spec(msg: Message) -> DeviceSpec:
    """The run's device-runtime spec carried by a message (JSON text, parsed once per worker and run:
    :meth:`DeviceSpec.from_json`, the one place a node reads it)."""
    text = str(msg.content["config"]["spec"])
    spec = _SPECS.get(text)
    if spec is None:
        _SPECS.clear()
        spec = _SPECS[text] = DeviceSpec.from_json(text)
    return spec


def message_devices(spec: DeviceSpec, msg: Message, context: Context) -> list[int]:
    """The devices a message asks this node to work for (``config.devices``).

    Raises:
        ValueError: a listed device is not one this node hosts (a strategy/engine mismatch).
    """
    node = int(context.node_config["partition-id"])
    devices = [int(d) for d in msg.content["config"]["devices"]]
    own = hosted(node, spec.devices_per_node, len(spec.groups))
    stray = [d for d in devices if d not in own]
    if stray:
        raise ValueError(f"node {node} hosts devices {own.start}..{own.stop - 1}, was sent device {stray[0]}")
    return devices


DeviceWork = Callable[[DeviceSpec, Device, Message, Context, list[int]],
                      tuple[dict[str, np.ndarray], dict[str, Any], torch.nn.Module | None]]


def _node_reply(msg: Message, context: Context, work: DeviceWork) -> Message:
    """Run ``work`` for each device the message lists and pack one reply (see module docstring).

    ``work(spec, device, msg, context, reachable)`` returns the device's per-sample arrays (same
    keys for every device), its info metrics and its trained part (or None). Injected dropouts
    skip the device; any other error fails the whole node's reply, as Flower reports it.
    """
    spec = message_spec(msg)
    content = RecordDict()
    parts: list[dict[str, np.ndarray]] = []
    devices = message_devices(spec, msg, context)
    faults = NodeFaults.from_json(str(msg.content["config"]["faults"]))
    for d in devices:
        try:
            reachable = _faults(faults, d)
        except DeviceDropout:
            continue
        device = get_device(spec, d)
        rows, info, learner = work(spec, device, msg, context, reachable)
        parts.append({"device": np.full(len(next(iter(rows.values()))), d, dtype=np.int64), **rows})
        content[f"info/{d}"] = MetricRecord({"device": d, **info})
        if learner is not None:
            content[f"rejector/{d}"] = context.state[f"rejector/{d}"] = ArrayRecord(
                torch_state_dict=learner.state_dict())
    if parts:
        content["samples"] = ArrayRecord({k: Array(np.ascontiguousarray(np.concatenate([p[k] for p in parts])))
                                          for k in parts[0]})
    return Message(content, reply_to=msg)


app = ClientApp()
"""The ClientApp of every node. Module-level, so Ray pickles it by reference (a few bytes per
message) instead of by value; what a run needs travels in each message's ``config.spec``
(:class:`sim.core.device_spec.DeviceSpec`)."""


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The handshake: the node answers with its ``partition_id``."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": MetricRecord({"partition_id": pid})}), reply_to=msg)


def _train_device(spec: DeviceSpec, device: Device, msg: Message, context: Context, reachable: list[int]
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any], torch.nn.Module | None]:
    """One device's training round: the samples it sends (deferred + explored) and its metrics."""
    view = get_view(spec, msg.content["server"])
    ctx = RoundContext(device, _learner(spec, device, msg, context, create=True), reachable,
                       int(msg.content["config"]["round"]), view)
    res = _runtime(spec)["method"].train(ctx)
    send = res.defer | res.explore
    d = device.data
    rows = {"ids": d.ids_rejector[send], "x": d.x_rejector[send], "y": d.y_rejector[send],
            "route": res.route[send], "explore": res.explore[send]}
    return rows, {"num_examples": len(res.defer), **res.metrics}, ctx.learner


def _evaluate_device(spec: DeviceSpec, device: Device, msg: Message, context: Context, reachable: list[int]
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any], None]:
    """One device's evaluation: its per-sample decisions on its test split (``DEVICE_FIELDS`` + x)."""
    ctx = RoundContext(device, _learner(spec, device, msg, context, create=False), reachable,
                       int(msg.content["config"]["round"]))
    res = _runtime(spec)["method"].evaluate(ctx)
    return res.columns(), {"num_examples": len(res.y)}, None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training round for the devices ``msg`` lists: each trains its part and sends samples."""
    return _node_reply(msg, context, _train_device)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """An evaluation for the devices ``msg`` lists: their per-sample decisions on their test splits."""
    return _node_reply(msg, context, _evaluate_device)
