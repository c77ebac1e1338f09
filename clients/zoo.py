"""Model zoo shared by legacy clients and helper servers.

Every model maps images ``x: (B, C, H, W)`` float32 in [0, 1] to class logits ``(B, K)``.
"""
from __future__ import annotations

import torch
from torch import nn


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


ZOO = {"logreg": LogReg, "mlp": MLP, "cnn": SmallCNN}


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 32) -> nn.Module:
    """Build a model of the zoo.

    Args:
        arch: ``logreg`` | ``mlp`` | ``cnn``.
        in_shape: ``(C, H, W)`` of the inputs.
        num_classes: K, the number of output logits.
        hidden: MLP hidden width / CNN base channel count (ignored by ``logreg``).

    Raises:
        ValueError: unknown ``arch``.
    """
    if arch not in ZOO:
        raise ValueError(f"unknown model arch {arch!r}: choose one of {', '.join(ZOO)}")
    if arch == "logreg":
        return LogReg(in_shape, num_classes)
    return ZOO[arch](in_shape, num_classes, hidden=hidden)
