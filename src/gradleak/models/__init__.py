"""Victim networks and the registry that builds them from an Observation's ``model`` header."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..validation import unknown_name
from .base import VictimNet
from .convnet import ConvNet
from .lenet import LeNet5, LeNetZhu
from .mlp import MLP
from .resnet import ResNet18

_REGISTRY: dict[str, Callable[..., VictimNet]] = {
    "lenet5": LeNet5,
    "lenet_zhu": LeNetZhu,
    "mlp": MLP,
    "convnet": ConvNet,
    "resnet18": lambda **kw: ResNet18(batch_norm=True, **kw),
    "resnet18_nobn": lambda **kw: ResNet18(batch_norm=False, **kw),
}

ARCHS = tuple(_REGISTRY)

#: Size constraints: lenet5 pools twice, so sizes must be multiples of 4.
_MIN_SIZE = {"lenet5": 4, "lenet_zhu": 4, "mlp": 1, "convnet": 8, "resnet18": 8, "resnet18_nobn": 8}


def _check(arch: str, image_size: int) -> None:
    if arch not in _REGISTRY:
        raise unknown_name("model arch", arch, ARCHS)
    if image_size < _MIN_SIZE[arch]:
        raise UserError(f"image_size {image_size} is too small for {arch} (minimum {_MIN_SIZE[arch]})")
    if arch == "lenet5" and image_size % 4:
        raise UserError(f"lenet5 needs an image_size divisible by 4, got {image_size}")


def build(arch: str, num_classes: int = 2, in_channels: int = 1, image_size: int = 64, *,
          seed: int | None = None, options: dict[str, Any] | None = None,
          mean=None, std=None) -> VictimNet:
    """Build a victim network.

    ``seed`` makes the initialisation reproducible without touching the global RNG (the weights are
    drawn inside a forked RNG state). ``options`` are arch-specific (e.g. ``width`` for convnet).
    """
    _check(arch, int(image_size))
    kwargs = dict(num_classes=int(num_classes), in_channels=int(in_channels),
                  image_size=int(image_size), mean=mean, std=std, **(options or {}))
    if seed is None:
        return _REGISTRY[arch](**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _REGISTRY[arch](**kwargs)


def build_from_header(header: dict, data: dict | None = None) -> VictimNet:
    """Build the network an Observation's ``model`` header describes (weights are loaded separately)."""
    data = data or {}
    return build(header["arch"], header["num_classes"], header["in_channels"], header["image_size"],
                 options=header.get("options") or None, mean=data.get("mean"), std=data.get("std"))


def parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["ARCHS", "VictimNet", "build", "build_from_header", "parameter_names", "has_batch_norm"]
