"""Model and optimizer state as flat dicts of NumPy arrays (what messages and checkpoints carry).

Names are ``prefix/name`` paths; :func:`prefixed` and :func:`sub` add and remove a prefix, and
:func:`stack_states` keeps many same-shaped per-device states as a few stacked arrays.
"""
from __future__ import annotations

import numpy as np
import torch


def sub(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries under ``prefix/``, with the prefix removed."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}



def prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``arrays`` under ``prefix/``."""
    return {f"{prefix}/{k}": v for k, v in arrays.items()}



def stack_states(states: dict[int, dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    """Many small same-shaped states (one per device) as a few stacked arrays, for :func:`save`.

    States with the same names, shapes and dtypes form a group ``g``: ``{prefix}/{g}/devices``
    ``(n,)`` and, per name, ``{prefix}/{g}/{name}`` ``(n, *shape)``. A thousand devices' rejectors
    are a handful of arrays instead of thousands of zip entries (the checkpoint is written every
    round). :func:`unstack_states` inverts it.
    """
    groups: dict[tuple, list[int]] = {}
    for d in sorted(states):
        sig = tuple((k, v.shape, v.dtype.str) for k, v in sorted(states[d].items()))
        groups.setdefault(sig, []).append(d)
    out: dict[str, np.ndarray] = {}
    for g, (sig, devices) in enumerate(groups.items()):
        out[f"{prefix}/{g}/devices"] = np.asarray(devices, dtype=np.int64)
        for name, _, _ in sig:
            out[f"{prefix}/{g}/{name}"] = np.stack([states[d][name] for d in devices])
    return out



def unstack_states(arrays: dict[str, np.ndarray], prefix: str) -> dict[int, dict[str, np.ndarray]]:
    """Invert :func:`stack_states`: ``{device: {name: array}}`` (arrays are views of the stacks)."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, v in sub(arrays, prefix).items():
        g, _, name = key.partition("/")
        groups.setdefault(g, {})[name] = v
    out: dict[int, dict[str, np.ndarray]] = {}
    for g in groups.values():
        devices = g.pop("devices")
        for i, d in enumerate(devices.tolist()):
            out[int(d)] = {name: v[i] for name, v in g.items()}
    return out



def optimizer_arrays(opt: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The tensors of an optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq)."""
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{idx}.{k}"] = (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)).copy()
    return out



def load_optimizer(opt: torch.optim.Optimizer, arrays: dict[str, np.ndarray]) -> None:
    """Restore :func:`optimizer_arrays` into ``opt`` (its hyperparameters are kept as constructed)."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in arrays.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = torch.from_numpy(np.array(v))
    sd["state"] = state
    opt.load_state_dict(sd)
