"""TensorBoard and MLflow (sim/tracking.py): per-round scalars under their group tags, the composed config as
hyperparameters, and an MLflow run in a local store read back with MLflow's own client."""
import sys

import pytest

from sim.core.errors import ConfigError
from sim.tracking import flat_params, round_scalars


def test_round_scalars_are_grouped_by_system_servers_and_resilience():
    record = {"round": 3, "system_accuracy": 0.9, "defer_rate": 0.2, "server_accuracy": 0.85, "l01_cost": 0.1,
              "rejector_loss": float("nan"), "server_loss": None, "load": [5, 7], "availability": [1, 0],
              "failovers": {"subset": 2, "legacy": 0}, "train_errors": 1, "elapsed_s": 3.0}
    assert round_scalars(record) == {
        "system/system_accuracy": 0.9, "system/defer_rate": 0.2, "system/l01_cost": 0.1,
        "servers/server_accuracy": 0.85, "servers/load/0": 5.0, "servers/load/1": 7.0,
        "servers/availability/0": 1.0, "servers/availability/1": 0.0, "resilience/servers_down": 1.0,
        "resilience/failovers/subset": 2.0, "resilience/failovers/legacy": 0.0, "resilience/train_errors": 1.0}


def test_hyperparameters_are_the_flattened_config_with_text_for_lists_and_none():
    flat = flat_params({"strategy": {"c_e": 0.1, "name": "l2h", "tau": None}, "servers": {"c_e": [0.1, 0.2]},
                        "sim": {"plots": True}})
    assert flat == {"strategy.c_e": 0.1, "strategy.name": "l2h", "strategy.tau": "none", "servers.c_e": "[0.1, 0.2]",
                    "sim.plots": True}


@pytest.mark.parametrize("switch,package,message", [
    ("sim.mlflow", "mlflow", r'^sim\.mlflow=true needs MLflow: pip install -e "\.\[mlflow\]"'),
    ("sim.tensorboard", "tensorboard",
     r"^sim\.tensorboard=true needs the tensorboard package: pip install tensorboard"),
])
def test_a_tracker_without_its_package_is_one_line_before_anything_runs(monkeypatch, tmp_path, switch, package,
                                                                        message):
    """The command line's check of every job (python -m sim.run prints it as `error: ...`, exit 2)."""
    from sim.cli import precheck

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: find_spec and import both fail
    with pytest.raises(ConfigError, match=message) as err:
        precheck(["fleet.num_clients=4", f"{switch}=true", f"sim.mlflow_dir={tmp_path}"])
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # no store was made


def test_a_sweep_running_jobs_at_once_has_its_mlflow_store_made_before_them(monkeypatch, tmp_path):
    """Jobs at once would otherwise create the SQLite database together."""
    from sim import tracking
    from sim.cli import precheck

    made = []
    monkeypatch.setattr(tracking, "open_store", lambda d, verbose=False: made.append(d))
    sweep = ["-m", "seed=0,1", "sim.mlflow=true", f"sim.mlflow_dir={tmp_path}"]
    assert precheck([*sweep, "sim.sweep_parallel=1"]) == 1 and made == []  # one job at a time: each opens it
    assert precheck([*sweep, "sim.sweep_parallel=2"]) == 2 and made == [str(tmp_path)]


class Stop(KeyboardInterrupt):
    """Ctrl-C after round 1's checkpoint."""


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, shared_cache):
    """A run with TensorBoard and MLflow, stopped after round 1 (Ctrl-C), then resumed to its end."""
    pytest.importorskip("mlflow", reason='MLflow is the optional extra ".[mlflow]" (in ".[dev]")')
    from rich.console import Console

    from sim.pipeline import Federation, simulate
    from tests.conftest import small_cfg

    tmp = tmp_path_factory.mktemp("tracked")
    over = {"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "sim.plots": "true",
            "sim.tensorboard": "true", "sim.mlflow": "true", "sim.mlflow_dir": str(tmp / "mlruns"),
            "strategy.c_e": 0.2}
    save = Federation.save_checkpoint

    def save_then_stop(self, record, final):
        save(self, record, final)
        if int(record["round"]) == 1:
            raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Federation, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            simulate(small_cfg(**over), tmp / "run", console=Console(quiet=True))
    from mlflow.tracking import MlflowClient

    from sim.tracking import EXPERIMENT, store_uri

    client = MlflowClient(tracking_uri=store_uri(tmp / "mlruns"))
    (stopped,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    summary = simulate(small_cfg(**over, **{"sim.resume": str(tmp / "run")}), tmp / "unused",
                       console=Console(quiet=True))
    return {"dir": tmp / "run", "store": tmp / "mlruns", "summary": summary, "stopped": stopped, "client": client}


@pytest.mark.slow
def test_tensorboard_has_every_round_once_under_its_group_and_the_hparams(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    s = tracked["summary"]
    acc = EventAccumulator(str(tracked["dir"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"system/system_accuracy", "system/defer_rate", "servers/server_accuracy", "servers/load/0",
            "servers/availability/0", "resilience/servers_down"} <= tags
    sysacc = acc.Scalars("system/system_accuracy")
    assert [e.step for e in sysacc] == [1, 2]  # round 1 before the stop, round 2 after the resume
    assert sysacc[-1].value == pytest.approx(s["system_accuracy"])
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["strategy.c_e"].number_value == pytest.approx(0.2)
    assert start.hparams["strategy.name"].string_value == "l2h"
    assert acc.Scalars("hparams/system_accuracy")[0].value == pytest.approx(s["system_accuracy"])


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_and_figures_and_the_resume_continued_it(tracked):
    client, s, run_dir = tracked["client"], tracked["summary"], tracked["dir"]
    assert (tracked["store"] / "mlflow.db").is_file()
    assert tracked["stopped"].info.status == "KILLED"  # the stop ended it, not left RUNNING
    (run,) = client.search_runs([tracked["stopped"].info.experiment_id])  # one run: the resume continued it
    assert run.info.run_id == tracked["stopped"].info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.params["strategy.c_e"] == "0.2" and run.data.params["fleet.num_clients"] == "4"
    history = client.get_metric_history(run.info.run_id, "system/system_accuracy")
    assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(s["system_accuracy"])
    assert run.data.metrics["final/system_accuracy"] == pytest.approx(s["system_accuracy"])
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/rounds.png", "figures/rounds.pdf", "figures/accuracy_vs_defer_rate.png"} <= figures
    assert not any("resilience" in f for f in figures)  # a run without failures has no resilience figures
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "clients.csv", "figures"}


def sweep_job(tmp_path, subdir):
    """A job's directory in a sweep (Hydra's multirun.yaml in the sweep directory), as Hydra makes it from
    ``hydra.sweep.subdir`` = ``N_<overrides>``: an override value's ``/`` makes nested directories."""
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / subdir).mkdir(parents=True, exist_ok=True)
    return sweep / subdir


def test_a_sweep_jobs_run_name_is_its_overrides_without_slashes_and_unique(tmp_path):
    from sim.tracking import RUN_NAME_MAX, run_name

    jobs = [sweep_job(tmp_path, f"{i}_seed={i},sim.mlflow=true,sim.mlflow_dir=runs/mlruns") for i in range(2)]
    assert [j.name for j in jobs] == ["mlruns", "mlruns"]  # what named the MLflow runs before: every job alike
    assert [run_name(j) for j in jobs] == ["0_seed=0,sim.mlflow=true,sim.mlflow_dir=runs_mlruns",
                                           "1_seed=1,sim.mlflow=true,sim.mlflow_dir=runs_mlruns"]
    odd = sweep_job(tmp_path, "2_data.path=/data/my file.npz,servers.c_e=[0.05,0.1]")
    assert run_name(odd) == "2_data.path=_data_my_file.npz,servers.c_e=[0.05,0.1]"
    assert run_name(tmp_path / "outputs" / "2026-01-01" / "10-00-00") == "10-00-00"  # one run: its directory

    long = [sweep_job(tmp_path, f"{i}_strategy.rejector.hidden=64,{'x' * 200}/{'y' * 100}{i}") for i in (3, 4)]
    names = [run_name(j) for j in long]
    assert all(len(n) <= RUN_NAME_MAX and "/" not in n for n in names)
    assert names[0].startswith("3_strategy.rejector.hidden=64,xxx") and names[1].startswith("4_")
    assert len(set(names)) == 2


def test_mlflow_keeps_the_safe_run_name_of_each_sweep_job(tmp_path):
    """Read back with MLflow's client: each job of the sweep its own name, none with ``/``."""
    pytest.importorskip("mlflow", reason='MLflow is the optional extra ".[mlflow]" (in ".[dev]")')
    from types import SimpleNamespace

    from sim.tracking import MlflowRun, open_store

    store = tmp_path / "mlruns"
    cfg = SimpleNamespace(sim=SimpleNamespace(mlflow_dir=str(store), verbose=False, resume=None))
    dirs = [sweep_job(tmp_path, f"{i}_data.path=/data/x{i}.npz,sim.mlflow_dir=runs/mlruns") for i in range(2)]
    for d in dirs:
        MlflowRun(cfg, d, {"seed": 0}).end("FINISHED")
    client, exp_id = open_store(str(store))
    runs = {r.data.tags["run_dir"]: r.info.run_name for r in client.search_runs([exp_id])}
    assert runs == {str(dirs[0].resolve()): "0_data.path=_data_x0.npz,sim.mlflow_dir=runs_mlruns",
                    str(dirs[1].resolve()): "1_data.path=_data_x1.npz,sim.mlflow_dir=runs_mlruns"}
