"""What a run writes besides its metrics: the partition picture and the optional TensorBoard log."""
import pytest

pytestmark = pytest.mark.slow


def test_partition_picture_and_tensorboard_scalars(tmp_path, shared_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sim.run import simulate
    from tests.conftest import small_cfg

    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "sim.num_rounds": 3,
                       "sim.plots": "true", "sim.tensorboard": "true", "data.partition.name": "dirichlet"})
    s = simulate(cfg, tmp_path / "run")
    for ext in ("png", "pdf"):
        assert (tmp_path / "run" / f"partition.{ext}").stat().st_size > 5_000
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])  # grouped by prefix (sim/tracking.py)
    assert {"system/system_accuracy", "system/defer_rate", "system/l01_cost", "system/legacy_accuracy",
            "servers/server_accuracy"} <= tags
    sysacc = acc.Scalars("system/system_accuracy")
    assert [e.step for e in sysacc] == [1, 2, 3]
    assert sysacc[-1].value == pytest.approx(s["system_accuracy"])
