"""The model architectures shared by the devices' legacy models and the helper servers (the zoo).

Every model maps images ``x: (B, C, H, W)`` float32 in [0, 1] to class logits ``(B, K)``;
1-D signals are ``(B, 1, 1, W)`` (``logreg`` and ``mlp`` flatten them, ``cnn1d`` convolves along W).
:func:`build_model` makes one by its ``Arch`` name; :func:`split_model` splits one into trunk and head
(a helper server's network, :class:`servers.models.ServerNet`).
"""
from __future__ import annotations

import torch
from torch import nn

from sim.core.errors import ConfigError


class LogReg(nn.Module):
    """Multinomial logistic regression on the flattened image."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        self.fc = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """One-hidden-layer ReLU perceptron on the flattened image."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 64):
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (``hidden`` and ``2*hidden`` channels), global average pool, linear head.

    Works for any input size >= 4x4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR/SVHN).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 16):
        super().__init__()
        c, _, _ = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, 2 * hidden, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(2 * hidden * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def conv1d_length(w: int) -> int:
    """Output length of :class:`Conv1DNet`'s three convolutions on a length-``w`` signal:
    ``L_out = floor((L_in + 2*padding - kernel) / stride) + 1`` (kernels 5, 3, 3; stride 2; padding 1)."""
    for kernel in (5, 3, 3):
        w = (w + 2 - kernel) // 2 + 1
    return w


class Conv1DNet(nn.Module):
    """A 1-D CNN for signals: MNIST-1D's ConvBase (Greydanus & Kobak 2020, arXiv 2011.14439; the
    authors' reference code ``notebooks/models.py``), with ``hidden`` channels (theirs: 25).

    conv1d(C*H -> hidden, k5, s2, p1) -> conv1d(hidden -> hidden, k3, s2, p1) -> conv1d(hidden ->
    hidden, k3, s2, p1), ReLU after each, flatten, linear. Inputs ``(B, C, H, W)`` are convolved
    along W, their C*H rows as input channels (1-D signals: ``(B, 1, 1, W)``, one channel).
    Shapes: ``x (B, C, H, W) -> features (B, hidden * L) -> logits (B, K)``, ``L =``
    :func:`conv1d_length` ``(W)`` (5 for W = 40). Works for any W >= 8.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 25):
        super().__init__()
        c, h, w = in_shape
        self.rows = nn.Flatten(1, 2)  # (B, C, H, W) -> (B, C*H, W)
        self.features = nn.Sequential(
            nn.Conv1d(c * h, hidden, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(hidden * conv1d_length(w), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.rows(x)).flatten(1))


ZOO = {"logreg": LogReg, "mlp": MLP, "cnn": SmallCNN, "cnn1d": Conv1DNet}


def check_input(arch: str, in_shape: tuple[int, ...], key: str = "arch") -> None:
    """Refuse an architecture that cannot run on inputs of shape ``in_shape = (C, H, W)``.

    ``cnn`` (2-D, 2x2 max pooling) needs H, W >= 2; ``cnn1d`` needs W >= 8 (:class:`Conv1DNet`).

    Raises:
        ConfigError: one line naming ``key`` (e.g. ``fleet.groups.2.arch``), the shape and the fix.
    """
    c, h, w = (int(v) for v in in_shape)
    if arch == "cnn" and (h < 2 or w < 2):
        what = "1-D signals" if h == 1 else "inputs"
        raise ConfigError(f"{key}=cnn is a 2-D CNN and needs inputs at least 2x2 pixels, but these {what} are "
                          f"(C, H, W)=({c}, {h}, {w}): use {key}=cnn1d (a 1-D CNN), mlp or logreg")
    if arch == "cnn1d" and w < 8:
        raise ConfigError(f"{key}=cnn1d needs signals at least 8 samples long (W >= 8), but the inputs are "
                          f"(C, H, W)=({c}, {h}, {w}): use {key}=mlp or logreg")


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 32) -> nn.Module:
    """Build a model of the zoo.

    Args:
        arch: ``logreg`` | ``mlp`` | ``cnn`` | ``cnn1d``.
        in_shape: ``(C, H, W)`` of the inputs (1-D signals: ``(C, 1, W)``).
        num_classes: K, the number of output logits.
        hidden: MLP hidden width / CNN base channel count / CNN-1D channels (ignored by ``logreg``).

    Raises:
        ValueError: unknown ``arch``.
        ConfigError: ``arch`` cannot run on ``in_shape`` (:func:`check_input`; a 2-D ``cnn`` on 1-D signals).
    """
    if arch not in ZOO:
        raise ValueError(f"unknown model arch {arch!r}: choose one of {', '.join(ZOO)}")
    check_input(arch, in_shape)
    if arch == "logreg":
        return LogReg(in_shape, num_classes)
    return ZOO[arch](in_shape, num_classes, hidden=hidden)


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a zoo model into ``(trunk, head)``: ``head(trunk(x)) == model(x)``.

    Raises:
        TypeError: a model the zoo does not make.
    """
    if isinstance(model, MLP):
        return model.net[:-1], model.net[-1]
    if isinstance(model, SmallCNN):
        return nn.Sequential(model.features, nn.Flatten()), model.head
    if isinstance(model, LogReg):
        return nn.Flatten(), model.fc
    if isinstance(model, Conv1DNet):
        return nn.Sequential(model.rows, model.features, nn.Flatten()), model.head
    raise TypeError(f"cannot split a {type(model).__name__} into trunk and head")
