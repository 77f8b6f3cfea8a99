"""Image classifiers for 32x32 RGB input: a feature extractor followed by a linear head.

Every model takes float32 (N, 3, 32, 32) pixels in [0, 1] and normalises them itself,
so raw pixels, including samples drawn from pixel-space granular balls, go straight in.
The split into ``features`` and ``head`` is what the grbfl strategy relies on: the
extractor is averaged across devices, the head is retrained on pooled embeddings.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor, nn

MODEL_NAMES = ("cnn", "resnet18")

# CIFAR-10 training-set channel statistics. Fixed constants rather than statistics of
# each device's data, so that every node feeds its model the same transformation.
PIXEL_MEAN = (0.4914, 0.4822, 0.4465)
PIXEL_STD = (0.2470, 0.2435, 0.2616)

# Widths of the default CNN's four convolution stages; the last is the embedding size.
CNN_WIDTHS = (32, 64, 128, 256)


class GrbflNet(nn.Module):
    """Base class: ``forward(x) = head(features(x))``."""

    embedding_dim: int
    head: nn.Linear
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: constants are no part of the state that devices exchange.
        mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] to roughly zero mean and unit variance per channel."""
        return (x - self.pixel_mean) / self.pixel_std

    def features(self, x: Tensor) -> Tensor:
        """Embeddings (N, embedding_dim) of pixels (N, 3, 32, 32) in [0, 1]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_pool_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, 2x2 max-pool, batch norm, ReLU.

    Pooling before the normalisation does the same job on a quarter of the values; on
    two CPU cores it makes a training step about a fifth faster than the usual order.
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(GrbflNet):
    """Four convolution stages (32x32 down to 4x4), global max-pool, linear head.

    About 0.4 M parameters. Sized so that one epoch over 50,000 CIFAR-10 images takes
    well under a minute on two x86 cores, and a few times that on a Raspberry Pi 5.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = CNN_WIDTHS) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.body = nn.Sequential(
            _conv_pool_bn(3, w1),  # 16x16
            _conv_pool_bn(w1, w2),  # 8x8
            _conv_pool_bn(w2, w3),  # 4x4
            _conv_bn(w3, w4),  # 4x4
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.embedding_dim = w4
        self.head = nn.Linear(w4, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.normalise(x))


class ResNet18(GrbflNet):
    """torchvision's ResNet-18 for 32x32 input: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        self.embedding_dim = net.fc.in_features
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.backbone = net
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out: Tensor = self.backbone(self.normalise(x))
        return out


def _initialise(model: nn.Module, seed: int) -> None:
    """Set every parameter from a private generator seeded with seed.

    Module constructors draw from torch's global generator, which other threads may be
    using at the same moment; re-drawing everything from a private one makes the
    weights a function of the seed alone.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=gen
                )
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                # PyTorch's own default for linear layers, drawn from gen.
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.bias.uniform_(-bound, bound, generator=gen)


def build_model(name: str, num_classes: int, seed: int = 0) -> GrbflNet:
    """A freshly initialised model, identical for the same name, classes and seed.

    ValueError for an unknown name or a class count below 1.
    """
    if name not in MODEL_NAMES:
        allowed = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; allowed: {allowed}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    model: GrbflNet = SmallCNN(num_classes) if name == "cnn" else ResNet18(num_classes)
    _initialise(model, seed)
    return model


def head_keys(model: nn.Module) -> set[str]:
    """state_dict keys that belong to the classifier head (prefix ``head.``)."""
    return {key for key in model.state_dict() if key.startswith("head.")}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
