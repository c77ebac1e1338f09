"""The ClientApp's handlers, called directly with built Messages (no simulation engine)."""
import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict, ConfigRecord

import json

from flwr.app import Array, ArrayRecord

from servers.helper import HelperServer
from sim.client_app import app
from sim.core.config import plain
from sim.core.data import device_data
from strategies.base import DEVICE_FIELDS
from tests.conftest import fleet_for, prepare_for, small_cfg


@pytest.fixture(scope="module")
def setup(shared_cache):
    cache = shared_cache  # the small fleet other tests build too (built once per suite)
    cfg = small_cfg()
    prep = prepare_for(cfg, cache)
    fleet = fleet_for(cfg, prep, cache)
    spec = {"key": "test", "data_path": str(prep.path), "fleet_path": str(fleet.path), "groups": fleet.groups,
            "legacy_models": [str(p) for p in fleet.models], "temperatures": fleet.temperature.tolist(),
            "group_cfgs": [plain(g) for g in fleet.group_cfgs], "in_shape": list(prep.in_shape), "num_classes": prep.num_classes,
            "seed": 0, "strategy": plain(cfg.strategy), "servers": plain(cfg.servers), "torch_threads": 1,
            "devices_per_node": 1}
    server = HelperServer(cfg.servers, prep.in_shape, prep.num_classes, seed=0)
    return cfg, prep, fleet, spec, server


def message(kind, content, node=7):
    # What Flower's ServerApp runtime sets before a strategy builds messages.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    return Message(content=content, dst_node_id=node, message_type=kind)


def content(server, spec, devices, up=(0,), dropout=()):
    """A round's message content as the L2H strategy builds it: the servers' weights, the faults
    and the node's devices."""
    weights = ArrayRecord({f"s0.{k}": Array(v) for k, v in server.weights().items()})
    faults = json.dumps({"up": list(up), "partition": [], "dropout": list(dropout)})
    return RecordDict({"server": weights,
                       "config": ConfigRecord({"round": 1, "spec": json.dumps(spec), "faults": faults,
                                               "devices": [int(d) for d in devices]})})


def ctx(pid):
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def test_query_returns_partition_id(setup):
    reply = app(message(MessageType.QUERY, RecordDict()), ctx(2))
    assert not reply.has_error() and reply.content["info"]["partition_id"] == 2


def test_train_defers_samples_of_its_rejector_split_and_keeps_rejector_in_state(setup):
    cfg, prep, fleet, spec, server = setup
    context = ctx(1)
    reply = app(message(MessageType.TRAIN, content(server, spec, [1])), context)
    assert not reply.has_error(), reply.error
    s = reply.content["samples"]
    ids, x, y, explore, route = (s[k].numpy() for k in ("ids", "x", "y", "explore", "route"))
    assert (route == 0).all()  # one server, learned routing: every deferred sample names server 0
    data = device_data(prep, 1, fleet.group_cfgs[fleet.groups[1]], 0)
    assert set(ids.tolist()) <= set(data.ids_rejector.tolist())
    pos = {int(i): j for j, i in enumerate(data.ids_rejector)}
    for i, xi, yi in zip(ids, x, y):  # the sample sent is the device's (sensor-degraded) sample
        assert np.array_equal(xi, data.x_rejector[pos[int(i)]]) and yi == data.y_rejector[pos[int(i)]]
    assert reply.content["info/1"]["device"] == 1 and (s["device"].numpy() == 1).all()
    # a cold (untrained) server is wrong almost always: the rejector learns to keep, only exploration is sent
    assert explore.mean() > 0.5
    assert "rejector/1" in context.state and "rejector/1" in reply.content
    # the stored rejector is what evaluation uses
    ev = app(message(MessageType.EVALUATE, content(server, spec, [1])), context)
    rec = {f: ev.content["samples"][f].numpy() for f in DEVICE_FIELDS + ("x",)}
    assert all(len(rec[f]) == len(data.y_test) for f in DEVICE_FIELDS)
    assert np.array_equal(rec["y"], data.y_test) and (rec["device"] == 1).all()
    assert np.array_equal(rec["x"], data.x_test)  # the pool answers the device's own (degraded) samples
    assert ((rec["score"] > 0.5) == rec["defer"]).all()


def test_device_that_reaches_no_server_keeps_everything(setup):
    cfg, prep, fleet, spec, server = setup
    context = ctx(2)
    reply = app(message(MessageType.TRAIN, content(server, spec, [2], up=())), context)
    assert not reply.has_error() and len(reply.content["samples"]["ids"].numpy()) == 0
    ev = app(message(MessageType.EVALUATE, content(server, spec, [2], up=())), context)
    assert not ev.content["samples"]["defer"].numpy().any()


def test_node_of_several_devices_answers_for_each_and_skips_a_dropped_out_one(setup):
    """A node hosting devices 2 and 3 (devices_per_node=2): device 2 drops out, device 3 answers
    exactly as it would on a node of its own; the worker process keeps running."""
    cfg, prep, fleet, spec, server = setup
    pair = {**spec, "devices_per_node": 2, "key": "pair"}
    reply = app(message(MessageType.TRAIN, content(server, pair, [2, 3], dropout=(2,))), ctx(1))
    assert not reply.has_error(), reply.error
    assert "info/3" in reply.content and "info/2" not in reply.content
    assert (reply.content["samples"]["device"].numpy() == 3).all()
    alone = app(message(MessageType.TRAIN, content(server, spec, [3])), ctx(3))
    for k in ("ids", "x", "y", "route", "explore"):
        assert np.array_equal(reply.content["samples"][k].numpy(), alone.content["samples"][k].numpy())
    assert np.array_equal(reply.content["rejector/3"]["net.0.weight"].numpy(),
                          alone.content["rejector/3"]["net.0.weight"].numpy())
    # both answer when neither drops out; rows in device order
    both = app(message(MessageType.EVALUATE, content(server, pair, [2, 3])), ctx(1))
    dev = both.content["samples"]["device"].numpy()
    assert set(dev.tolist()) == {2, 3} and (np.diff(dev) >= 0).all()


def test_device_sent_to_a_node_that_does_not_host_it_fails_the_reply(setup):
    cfg, prep, fleet, spec, server = setup
    with pytest.raises(ValueError, match="node 0 hosts devices 0..0, was sent device 2"):
        app(message(MessageType.TRAIN, content(server, spec, [2])), ctx(0))


def test_untrained_device_keeps_everything_local(setup):
    cfg, prep, fleet, spec, server = setup
    ev = app(message(MessageType.EVALUATE, content(server, spec, [3])), ctx(3))
    assert not ev.content["samples"]["defer"].numpy().any()


def test_malformed_message_raises_in_the_handler(setup):
    """Flower turns a handler exception into an error reply; the strategy counts those (see e2e)."""
    faults = json.dumps({"up": [0], "partition": [], "dropout": []})
    bad = RecordDict({"config": ConfigRecord({"round": 1, "spec": json.dumps(setup[3]), "faults": faults,
                                              "devices": [0]})})
    with pytest.raises(KeyError):
        app(message(MessageType.TRAIN, bad), ctx(0))


def test_device_spec_reads_back_what_the_server_writes(setup):
    """The message's ``config.spec`` text is a :class:`DeviceSpec`'s JSON, field for field."""
    from sim.core.device_spec import DeviceSpec

    spec = setup[3]
    typed = DeviceSpec.from_json(json.dumps(spec))
    assert typed.groups == tuple(spec["groups"]) and typed.strategy.device == spec["strategy"]["device"]
    assert json.loads(typed.to_json()) == json.loads(json.dumps(spec))


@pytest.mark.parametrize("change, key", [({"seed": None}, "seed"), ({"colour": 1}, "colour")])
def test_device_spec_with_a_missing_or_unknown_key_fails_in_one_line_naming_it(setup, change, key):
    from sim.core.device_spec import DeviceSpec

    spec = {k: v for k, v in {**setup[3], **change}.items() if v is not None}
    with pytest.raises(ValueError, match=f"device spec: (missing|unknown) key '{key}'") as err:
        DeviceSpec.from_json(json.dumps(spec))
    assert "\n" not in str(err.value)


def test_node_faults_read_back_what_the_strategy_writes_and_name_a_missing_key():
    """``config.faults``: a device cut off from a server by a partition cuts still reaches the others."""
    from sim.core.faults import NodeFaults, RoundFaults
    from strategies.pool_strategy import faults_config

    text = faults_config(RoundFaults(round=1, partition=[[[1, 2], [0]]], dropout=[3]), [0, 1], final=False)
    faults = NodeFaults.from_json(text)
    assert faults.reachable(1) == [1] and faults.reachable(0) == [0, 1] and faults.dropout == (3,)
    assert NodeFaults.from_json(faults_config(RoundFaults(round=1, dropout=[3]), [0], final=True)).dropout == ()
    with pytest.raises(ValueError, match="node faults: missing key 'dropout'"):
        NodeFaults.from_json(json.dumps({"up": [0], "partition": []}))
