"""Several devices per Flower node: the layout, and that it changes no number a run produces."""
import json

import pytest

from sim.core.nodes import by_node, devices_per_node, hosted, node_of, num_nodes
from tests.conftest import small_cfg


def test_automatic_layout_keeps_the_fleet_within_max_nodes():
    assert devices_per_node(10, None, 100) == 1
    assert devices_per_node(1000, None, 100) == 10
    assert devices_per_node(1001, None, 100) == 11 and num_nodes(1001, 11) == 91
    assert devices_per_node(5, 3, 100) == 3 and devices_per_node(5, 9, 100) == 5  # never more than the fleet
    for n, k in ((1000, 10), (7, 3), (5, 5)):
        blocks = [list(hosted(j, k, n)) for j in range(num_nodes(n, k))]
        assert sum(blocks, []) == list(range(n))  # contiguous blocks cover every device exactly once
        assert all(node_of(d, k) == j for j, b in enumerate(blocks) for d in b)
    assert by_node([7, 0, 4, 3], 3) == {0: [0], 1: [3, 4], 2: [7]}


@pytest.mark.parametrize("bad", [dict(num_clients=0, setting=None, max_nodes=10),
                                 dict(num_clients=5, setting=0, max_nodes=10),
                                 dict(num_clients=5, setting=None, max_nodes=0)])
def test_bad_layout_is_a_value_error(bad):
    with pytest.raises(ValueError):
        devices_per_node(**bad)


@pytest.mark.parametrize("key", ["sim.devices_per_node", "sim.max_nodes"])
def test_bad_layout_config_is_a_one_line_error_naming_the_key(key):
    from sim.core.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
        small_cfg(**{key: 0})
    assert "\n" not in str(exc.value)


def _run(tmp_path, name, cache, **over):
    from sim.run import simulate

    cfg = small_cfg(**{"fleet.num_clients": 5, "sim.num_rounds": 3, "sim.backend": "inprocess",
                       "sim.cache_dir": str(cache), **over})
    simulate(cfg, tmp_path / name)
    rounds = [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"}
              for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return (tmp_path / name / "summary.json").read_text(), rounds


@pytest.mark.parametrize("over", [
    # partial participation + dropouts: a node answers for its devices that did not drop out
    {"sim.fraction_train": 0.6, "failures": "device_dropout", "failures.dropout.fraction": 0.4,
     "failures.reference": "false"},
    # L2D with FedAvg: each device of a node gets its architecture group's average in the message
    {"strategy": "l2d", "strategy.rejector.federation": "fedavg", "strategy.rejector.federate_by": "fleet"},
], ids=["l2h-dropout", "l2d-fedavg"])
@pytest.mark.slow
def test_devices_per_node_changes_no_result(tmp_path, over, shared_cache):
    cache = shared_cache
    one = _run(tmp_path, "one", cache, **{"sim.devices_per_node": 1, **over})
    three = _run(tmp_path, "three", cache, **{"sim.devices_per_node": 3, **over})
    assert one == three
    if "failures" in over:
        assert sum(r["train_errors"] + r["eval_errors"] for r in one[1]) > 0  # dropouts happened and were counted
