"""Centralised accuracies of the zoo's models on MNIST-1D, next to the paper's.

MNIST-1D (Greydanus & Kobak 2020, arXiv 2011.14439) reports logistic regression 32%, MLP 68% and
CNN 94% test accuracy on its 4000 / 1000 split. This study trains this project's ``logreg``,
``mlp`` (one hidden layer of 100; the paper's MLP has two, 100-100 with a residual) and ``cnn1d``
(the paper's ConvBase, 25 channels) from :mod:`sim.core.zoo`, for each of ``--seeds`` (model
initialisation and batch order), and prints mean +- std:

* ``benchmark``: the simulator's data, read by its own loader
  (:func:`sim.core.sources.load_source` with the ``data=mnist1d`` config and
  ``data.num_samples=5000``: the paper's samples, z-scored by the package), first 4000 rows for
  training, last 1000 for testing, with the paper's recipe (Adam lr 1e-2, batch 100, 6000 steps =
  150 epochs; our batches are shuffled, theirs cyclic);
* ``old: min-max [0, 1]``: the same samples rescaled affinely into [0, 1] by the minimum and
  maximum over the whole set, computed here: what the simulator fed its models before it kept
  the package's z-scored values (2026-12-02), for comparison;
* ``larger train set``: the simulator's data with ``data.num_samples=25000`` (20000 / 5000), 6000 steps;
* ``fleet:<group>``: the legacy groups of ``configs/fleet/mnist1d.yaml`` (the settings of the
  composed ``data=mnist1d`` config) on the training-set size a device of the default 10-device
  ``data=mnist1d`` fleet pretrains on, through the group's sensor (the simulator's
  :func:`sim.core.data.degrade`, clipping as the simulator does for this source: not at all, the
  noise is in the z-scored data's units; test samples through the same sensor), with the fleet's
  pretraining recipe (Adam ``lr``, batch 32, ``epochs``); and ``fleet:server``: the helper
  server's ``cnn1d`` on as many samples as the fleet's rejector splits hold, at ``servers.lr``
  and batch size, 50 epochs (in a run it trains ``servers.epochs`` passes a round over a growing
  buffer).

Runs go to ``--workers`` processes (one torch thread each). Usage:
    python benchmarks/study_mnist1d_models.py                 # 3 seeds, 4 to 8 minutes on 2 cores
    python benchmarks/study_mnist1d_models.py --seeds 0 --out /tmp/m1d
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {"logreg": "32", "mlp": "68", "cnn1d": "94"}
"""Test accuracy (%) on the 4000 / 1000 split reported by the paper (arXiv 2011.14439, Table 1 /
README: logistic regression, MLP, CNN)."""
HIDDEN = {"logreg": 1, "mlp": 100, "cnn1d": 25}
PAPER_RECIPE = {"lr": 1e-2, "batch_size": 100, "steps": 6000}


def fleet_settings() -> tuple[list[dict], dict, int]:
    """The legacy groups, the servers and ``data.num_samples`` of the default ``data=mnist1d`` run,
    with the pretraining size of one of its devices (the data config's legacy share of N / devices)."""
    from sim.cli import compose_checked

    cfg = compose_checked(["data=mnist1d"])
    per_device = cfg.data.num_samples // cfg.fleet.num_clients
    legacy, rejector = round(cfg.data.split.legacy * per_device), round(cfg.data.split.rejector * per_device)
    groups = [{"name": g.name, "arch": str(g.arch), "hidden": int(g.hidden), "n": max(1, round(g.pretrain_fraction
               * legacy)), "downsample": int(g.downsample), "noise_std": float(g.noise_std), "lr": float(g.lr),
               "epochs": int(g.epochs), "batch_size": 32} for g in cfg.fleet.groups]
    sv = cfg.servers
    server = {"name": "server", "arch": str(sv.arch), "hidden": int(sv.hidden), "n": rejector * cfg.fleet.num_clients,
              "downsample": 1, "noise_std": 0.0, "lr": float(sv.lr), "epochs": 50, "batch_size": int(sv.batch_size)}
    return groups, server, int(cfg.data.num_samples)


@functools.cache
def load(num_samples: int, scaling: str = "simulator"):
    """MNIST-1D ``x (N, 1, 1, 40)`` float32, ``y (N,)``, generated once per worker process.

    ``scaling="simulator"``: as the simulator reads them (``load_source`` of a ``data=mnist1d``
    config: the package's z-scored values); ``"minmax"``: those rescaled into [0, 1] by the min and
    max over the whole set, what the simulator used to do.
    """
    import numpy as np

    from sim.core.config import DataConfig, DataSource
    from sim.core.sources import load_source

    x, y = load_source(DataConfig(name="mnist1d", source=DataSource.mnist1d, num_samples=num_samples))
    if scaling == "minmax":
        lo, hi = float(x.min()), float(x.max())
        x = np.ascontiguousarray((x - lo) / (hi - lo), dtype=np.float32)
    elif scaling != "simulator":
        raise ValueError(f"scaling={scaling!r}")
    return x, y


def sensor_clip() -> bool:
    """Whether the simulator clips a ``data=mnist1d`` device's noisy samples into [0, 1]
    (``sim.core.data.device_data``: ``clip=prepared.bounded``, only for sources in ``BOUNDED``)."""
    from sim.core.config import DataSource
    from sim.core.sources import BOUNDED

    return DataSource.mnist1d in BOUNDED


def train_eval(job: dict) -> dict:
    """Train one model (``job``: setting, arch, hidden, seed, data, sizes, sensor, recipe) and test it.

    Returns the job with ``acc`` (test accuracy) and ``seconds`` added.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sim.core.zoo import build_model
    from sim.core.data import degrade
    from sim.core.training import train_minibatch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    x, y = load(job["num_samples"], job.get("scaling", "simulator"))
    n_train = int(0.8 * len(y))
    rng = np.random.default_rng(1000 + job["seed"])
    pick = np.sort(rng.permutation(n_train)[:job["n"]]) if job["n"] < n_train else np.arange(n_train)
    sensor = (job["downsample"], job["noise_std"])
    clip = sensor_clip()  # False: MNIST-1D is z-scored, unbounded
    x_tr = degrade(x[pick], *sensor, seed=2000 + job["seed"], clip=clip)
    x_te = degrade(x[n_train:], *sensor, seed=3000 + job["seed"], clip=clip)
    torch.manual_seed(job["seed"])
    model = build_model(job["arch"], (1, 1, 40), 10, hidden=job["hidden"])
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y[pick])
    train_minibatch(model.parameters(), (xt, yt), lambda a, b: F.cross_entropy(model(a), b), epochs=job["epochs"],
                    batch_size=job["batch_size"], lr=job["lr"], seed=job["seed"])
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(1).numpy()
    return {**job, "acc": float((pred == y[n_train:]).mean()), "seconds": time.perf_counter() - t0}


def make_jobs(seeds: list[int]) -> list[dict]:
    """Every (setting, model, seed) run of the study, the longest first."""
    groups, server, _ = fleet_settings()
    jobs = []
    for seed in seeds:
        for arch in ("cnn1d", "mlp", "logreg"):
            base = {"arch": arch, "hidden": HIDDEN[arch], "seed": seed, "downsample": 1, "noise_std": 0.0,
                    "lr": PAPER_RECIPE["lr"], "batch_size": PAPER_RECIPE["batch_size"]}
            jobs.append({**base, "setting": "benchmark", "num_samples": 5000, "n": 4000, "epochs": 150})
            jobs.append({**base, "setting": "old: min-max [0, 1]", "num_samples": 5000, "n": 4000, "epochs": 150,
                         "scaling": "minmax"})
            jobs.append({**base, "setting": "larger train set", "num_samples": 25000, "n": 20000, "epochs": 30})
        for g in groups + [server]:
            jobs.append({**g, "setting": f"fleet:{g['name']}", "seed": seed, "num_samples": 5000})
    return sorted(jobs, key=lambda j: -(j["n"] * j["epochs"] * (20 if j["arch"] == "cnn1d" else 1)))


def summarise(results: list[dict]) -> list[dict]:
    """One row per (setting, model): mean and std of the test accuracy (%) over seeds, seconds per run."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        rows.setdefault((r["setting"], r["arch"]), []).append(r)
    out = []
    for (setting, arch), rs in rows.items():
        accs = [100 * r["acc"] for r in rs]
        r0 = rs[0]
        out.append({"setting": setting, "arch": arch, "hidden": r0["hidden"], "n_train": r0["n"],
                    "sensor": f"downsample {r0['downsample']}, noise {r0['noise_std']:g}",
                    "recipe": f"Adam {r0['lr']:g}, batch {r0['batch_size']}, {r0['epochs']} epochs",
                    "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seeds": len(accs), "accs": accs, "paper": PAPER[arch] if setting == "benchmark" else "",
                    "seconds": statistics.mean(r["seconds"] for r in rs)})
    order = {"benchmark": 0, "old: min-max [0, 1]": 1, "larger train set": 2}
    return sorted(out, key=lambda r: (order.get(r["setting"], 3), r["setting"], ["logreg", "mlp", "cnn1d"].index(
        r["arch"])))


def table(rows: list[dict]) -> str:
    lines = ["| setting | model | train samples | sensor | recipe | test acc % (mean +- std) | paper % | s/run |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        model = r["arch"] if r["arch"] == "logreg" else f"{r['arch']} ({r['hidden']})"
        lines.append(f"| {r['setting']} | {model} | {r['n_train']} | {r['sensor']} | {r['recipe']} | "
                     f"{r['mean']:.1f} +- {r['std']:.1f} | {r['paper']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ns = ap.parse_args()
    t0 = time.perf_counter()
    jobs = make_jobs(ns.seeds)
    with ProcessPoolExecutor(ns.workers) as pool:
        results = list(pool.map(train_eval, jobs))
    rows = summarise(results)
    wall = time.perf_counter() - t0
    print(table(rows))
    print(f"\n{len(jobs)} runs, {wall:.0f} s wall on {ns.workers} workers")
    write_results(ns.out, rows, results, wall, ns.workers)


def write_results(out: Path, rows: list[dict], results: list[dict], wall: float, workers: int) -> None:
    """``mnist1d_models.json`` (every run) and ``mnist1d_models.md`` (the table, the command, the machine)."""
    import platform

    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist1d_models.json").write_text(json.dumps({"rows": rows, "runs": results, "wall_s": wall}, indent=1))
    command = " ".join(["python", "benchmarks/study_mnist1d_models.py", *sys.argv[1:]])
    head = (f"# MNIST-1D: the zoo's models, centralised, next to the paper's\n\n"
            f"`{command}` ({len(results)} runs, {wall:.0f} s wall on {workers} worker processes; torch "
            f"{torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}). Paper: Greydanus & Kobak, "
            f"arXiv 2011.14439 (logistic regression 32%, MLP 68%, CNN 94% on the 4000 / 1000 split). Settings: "
            f"this script's docstring; inputs are the simulator's (`load_source`, z-scored) except in the "
            f"`old: min-max [0, 1]` rows. Test accuracy in %, mean +- std over seeds; s/run: seconds per run, data "
            f"generation included, with {workers} runs sharing the machine.\n\n")
    (out / "mnist1d_models.md").write_text(head + table(rows) + "\n")


if __name__ == "__main__":
    main()
