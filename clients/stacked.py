"""Hand-written gradients for many stacked legacy models of one architecture, for the batched build.

:func:`sim.core.training.train_stacked` trains M same-shaped models at once through ``vmap`` and
autograd. For :class:`sim.core.zoo.Conv1DNet` (MNIST-1D fleets) that costs most of a large build:
``vmap`` turns each convolution into a grouped convolution of M groups of a few channels, and its
backward is slow on CPUs. :func:`conv1d_net_grads` computes the same gradient as explicit batched
matrix products: each convolution is patches ``(M, B*L_out, C*k)`` times weights, its backward two
more products and ``k`` strided additions, in chunks of :data:`CHUNK` models that stay in cache. The
numbers equal autograd's up to float rounding (tests/test_fleet.py). Building 10,000 MNIST-1D
legacy models took 157.2 s through ``vmap``, 75.4 s with these gradients (median of 3; one thread
each; benchmarks/README.md). Changing this arithmetic needs a new :data:`CACHE_TAG`, so that no
fleet built by the old one is reused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

CHUNK = 250
"""Models per chunk. Measured, the whole 10,000-device MNIST-1D build on two threads (groups of
2,500; single runs): chunks of 125: 54.7 s; 250: 50.8, 51.8, 52.9 s; 500: 49.6, 55.2, 58.5 s; 1,000: 66.1 s."""

CACHE_TAG = "stacked-v1"
"""Part of the fleet cache key of batched builds that use these gradients (:func:`clients.legacy.build_fleet`)."""

Grads = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _conv_forward(xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv1DNet's convolution (stride 2, padding 1) on a channels-last input already padded by one
    zero on each side, ``xp: (M, B, L + 2, C)``, with ``w: (M, H, C, k)``, ``b: (M, H)``. Returns
    ``(M, B, L_out, H)`` and the patches ``(M, B*L_out, C*k)`` the backward needs."""
    m, bsz, _, c = xp.shape
    k = w.shape[-1]
    cols = xp.unfold(2, k, 2)  # (M, B, L_out, C, k), a view
    l_out = cols.shape[2]
    cols = cols.reshape(m, bsz * l_out, c * k)
    out = torch.baddbmm(b.unsqueeze(1), cols, w.reshape(m, w.shape[1], c * k).transpose(1, 2))
    return out.view(m, bsz, l_out, -1), cols


def _relu_padded(z: torch.Tensor) -> torch.Tensor:
    """ReLU of ``z: (M, B, L, H)`` written into a zero-padded ``(M, B, L + 2, H)`` (the next convolution's input)."""
    out = z.new_zeros(z.shape[0], z.shape[1], z.shape[2] + 2, z.shape[3])
    torch.clamp_min(z, 0, out=out[:, :, 1:-1])
    return out


def _conv_backward(grad: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, length: int,
                   need_input: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_conv_forward` given ``grad: (M, B, L_out, H)``: the input's
    ``(M, B, length, C)`` (None unless ``need_input``), the weight's ``(M, H, C, k)``, the bias's ``(M, H)``."""
    m, bsz, l_out, h = grad.shape
    c, k = w.shape[2], w.shape[3]
    g = grad.reshape(m, bsz * l_out, h)
    gw = torch.bmm(g.transpose(1, 2), cols).view_as(w)
    gb = g.sum(1)
    if not need_input:
        return None, gw, gb
    gcols = torch.bmm(g, w.reshape(m, h, c * k)).view(m, bsz, l_out, c, k)
    gx = grad.new_zeros(m, bsz, length + 2, c)  # padded; output j reads inputs 2j .. 2j+k-1
    for j in range(k):
        gx[:, :, j:j + 2 * l_out - 1:2, :] += gcols[..., j]
    return gx[:, :, 1:length + 1, :], gw, gb


def _chunk_grads(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    m, bsz = y.shape
    a = F.pad(x.reshape(m, bsz, -1, x.shape[-1]).transpose(2, 3), (0, 0, 1, 1))  # (M, B, W + 2, C*H)
    lengths, pre, patches = [], [], []  # per layer: input length (unpadded), pre-activation, patches
    for i in (0, 2, 4):
        lengths.append(a.shape[2] - 2)
        z, cols = _conv_forward(a, p[f"features.{i}.weight"], p[f"features.{i}.bias"])
        pre.append(z)
        patches.append(cols)
        a = _relu_padded(z) if i < 4 else z.clamp_min(0)
    length, hidden = a.shape[2], a.shape[3]
    num_classes = p["head.bias"].shape[1]
    # The head's input is torch's flatten of (B, H, L): feature h*L + l. Here a is (B, L, H).
    wh = p["head.weight"].view(m, num_classes, hidden, length).transpose(2, 3).reshape(m, num_classes, -1)
    feats = a.reshape(m, bsz, -1)
    logits = torch.baddbmm(p["head.bias"].unsqueeze(1), feats, wh.transpose(1, 2))  # (M, B, K)
    g = logits.softmax(-1)
    g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
    g /= bsz  # d(mean cross-entropy)/d(logits), per model
    grads = {"head.bias": g.sum(1)}
    gwh = torch.bmm(g.transpose(1, 2), feats).view(m, num_classes, length, hidden)
    grads["head.weight"] = gwh.transpose(2, 3).reshape(m, num_classes, -1)
    grad = torch.bmm(g, wh).view(m, bsz, length, hidden)
    for layer in (2, 1, 0):
        grad = torch.ops.aten.threshold_backward(grad, pre[layer], 0.0)  # ReLU's backward
        grad, grads[f"features.{2 * layer}.weight"], grads[f"features.{2 * layer}.bias"] = _conv_backward(
            grad, patches[layer], p[f"features.{2 * layer}.weight"], lengths[layer], layer > 0)
    return grads


@torch.no_grad()
def conv1d_net_grads(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the sum over M :class:`sim.core.zoo.Conv1DNet` models of each one's mean
    cross-entropy on its own batch (so model i's slice is model i's own gradient).

    Args:
        params: the models' stacked parameters (``torch.func.stack_module_state`` names), e.g.
            ``features.0.weight: (M, H, C*H_in, 5)``, ``head.weight: (M, K, H*L)``.
        x: ``(M, B, C, H_in, W)`` inputs. y: ``(M, B)`` int64 labels.

    Returns:
        ``{name: (M, ...)}``, one gradient per parameter, in the parameters' shapes.
    """
    out: dict[str, torch.Tensor] = {name: torch.empty_like(v) for name, v in params.items()}
    for s in range(0, len(y), CHUNK):
        chunk = _chunk_grads({name: v[s:s + CHUNK] for name, v in params.items()}, x[s:s + CHUNK], y[s:s + CHUNK])
        for name, g in chunk.items():
            out[name][s:s + CHUNK] = g
    return out


STACKED_GRADS: dict[str, Grads] = {"cnn1d": conv1d_net_grads}
"""Architectures with hand-written stacked gradients; the others train through ``vmap`` and autograd."""
