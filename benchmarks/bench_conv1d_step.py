"""One training step of M stacked 1-D CNN legacy models: vmap + autograd vs the hand-written gradients.

The step of the 10,000-device MNIST-1D legacy build (groups of 2,500 ``Conv1DNet`` models, 20
samples each, ``hidden=25``): forward and backward of the summed per-model mean cross-entropy, as
:func:`sim.core.training.train_stacked` runs it, through ``vmap`` and autograd and through
:func:`clients.stacked.conv1d_net_grads`. Also a quick measure of a machine's speed for this work
(benchmarks/README.md compares two machines with it). Prints the median of ``--repeats`` steps.

Usage:
    python benchmarks/bench_conv1d_step.py                  # 2,500 models, one thread
    python benchmarks/bench_conv1d_step.py --models 500 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.stacked import conv1d_net_grads  # noqa: E402
from sim.core.zoo import Conv1DNet  # noqa: E402


def median_s(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2500)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6)
    ns = ap.parse_args()
    from torch.func import functional_call, stack_module_state

    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    models = [Conv1DNet((1, 1, 40), 10, hidden=ns.hidden) for _ in range(ns.models)]
    params, buffers = stack_module_state(models)
    x, y = torch.randn(ns.models, ns.samples, 1, 1, 40), torch.randint(0, 10, (ns.models, ns.samples))
    forward = torch.vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)))

    def autograd_step() -> None:
        for p in params.values():
            p.grad = None
        logits = forward(params, buffers, x)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(
            ns.models, -1).mean(1).sum().backward()

    detached = {k: v.detach() for k, v in params.items()}
    autograd_step()
    worst = max(float((conv1d_net_grads(detached, x, y)[k] - p.grad).abs().max()) for k, p in params.items())
    print(f"{ns.models} models x {ns.samples} samples, hidden {ns.hidden}, {ns.threads} thread(s); "
          f"largest gradient difference {worst:.1e}")
    print(f"vmap + autograd step: median {median_s(autograd_step, ns.repeats):.3f} s")
    print(f"hand-written step:    median {median_s(lambda: conv1d_net_grads(detached, x, y), ns.repeats):.3f} s")


if __name__ == "__main__":
    main()
