"""MTCNN's three networks: facenet-pytorch's layers and its weights (the .pt files in its wheel), without
importing facenet-pytorch.

Importing facenet_pytorch imports torchvision, and torchvision torch._dynamo: 1.5 s in every process that
detects (each scoring actor, each Serve replica, each preprocessing actor), where building the networks from
here takes a tenth of that. The layers keep facenet's names, so its state dicts load as they are; the tests
check that the answers equal facenet's own modules'.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def facenet_weights(name: str) -> dict:
    """facenet-pytorch's state dict `name` (pnet, rnet or onet), found without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError("facenet-pytorch is not installed: its wheel holds MTCNN's weights (`make install` installs it)")
    return torch.load(Path(spec.origin).parent / "data" / f"{name}.pt", map_location="cpu", weights_only=True)


class PNet(nn.Module):
    """The proposal network, fully convolutional: (n, 3, h, w) -> box offsets (n, 4, h', w'), face probabilities (n, 2, h', w')."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """The refinement network: (n, 3, 24, 24) -> box offsets (n, 4), face probabilities (n, 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2, self.pool2 = nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()  # facenet's (Caffe's) flattening order
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """The output network: (n, 3, 48, 48) -> box offsets (n, 4), landmarks (n, 10: five x then five y, shares
    of the box), face probabilities (n, 2)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2, self.pool2 = nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3, self.pool3 = nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool2(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x))))))
        x = self.prelu4(self.conv4(self.pool3(self.prelu3(self.conv3(x))))).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


@dataclass(frozen=True)
class Mtcnn:
    """The three networks with facenet-pytorch's pretrained weights, in eval mode."""

    pnet: PNet
    rnet: RNet
    onet: ONet

    @classmethod
    def pretrained(cls, device: str = "cpu") -> "Mtcnn":
        networks = []
        for name, network in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
            network.load_state_dict(facenet_weights(name))
            networks.append(network.eval().requires_grad_(False).to(device))
        return cls(*networks)
