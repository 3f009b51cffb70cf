"""Tiny vision nets covering every channel-tying pattern FastNAS handles, with random (non-trivial) weights.

Each builder returns a model in eval mode whose BatchNorm statistics and affine parameters are random, so a
wrongly sliced tensor changes the outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """Stem, two residual blocks (one with a 1x1 downsample), flatten of a 4x4 map straight into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.b1 = nn.Sequential(conv_bn(32, 48), nn.Conv2d(48, 32, 3, 1, 1), nn.BatchNorm2d(32))
        self.b2 = nn.Sequential(conv_bn(32, 64, stride=2), nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 1, 2), nn.BatchNorm2d(64))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(64 * 16, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.b2(x) + self.down(x))
        x = self.pool(x).view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Dense(nn.Module):
    """Concatenation: two branches and the input are concatenated; a 1x1 conv reads the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.a = conv_bn(32, 48)
        self.b = conv_bn(32, 64, k=1)
        self.mix = conv_bn(32 + 48 + 64, 64, k=1)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.a(x), x, self.b(x)], dim=1)
        return self.head(self.mix(x).mean((2, 3)))


class Mobile(nn.Module):
    """Inverted residual with a depthwise conv, a squeeze-excitation gate, and a grouped conv (fixed)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.expand = conv_bn(32, 96, k=1)
        self.dw = conv_bn(96, 96, groups=96)
        self.se_reduce = nn.Conv2d(96, 16, 1)
        self.se_expand = nn.Conv2d(16, 96, 1)
        self.project = nn.Sequential(nn.Conv2d(96, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.grouped = nn.Conv2d(32, 64, 3, 1, 1, groups=4)
        self.head = nn.Linear(64, 7)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(self.expand(x))
        h = h * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        x = x + self.project(h)
        return self.head(F.adaptive_avg_pool2d(self.grouped(x), 1).flatten(1))


class Norms(nn.Module):
    """GroupNorm (whole groups pruned), a channels-last block with LayerNorm, Linear and a layer-scale vector
    (ConvNeXt style, through permute), and an MLP head with LayerNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1)
        self.gn = nn.GroupNorm(8, 64)
        self.dw = nn.Conv2d(64, 64, 7, 1, 3, groups=64)
        self.ln = nn.LayerNorm(64)
        self.pw1 = nn.Linear(64, 128)
        self.pw2 = nn.Linear(128, 64)
        self.gamma = nn.Parameter(torch.rand(64) + 0.5)
        self.head_in = nn.Linear(64, 96)
        self.head_ln = nn.LayerNorm(96)
        self.head = nn.Linear(96, 4)

    def forward(self, x):
        x = F.gelu(self.gn(self.stem(x)))
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.ln(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        h = self.head_ln(F.gelu(self.head_in(x.mean((2, 3)))))
        return self.head(h)


class Blocked(nn.Module):
    """Channels that reach ops FastNAS must not prune: tensor indexing, a matmul, and the output."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 64)
        self.b = conv_bn(3, 64)
        self.c = conv_bn(64, 64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        first = a[:, 0:1]                        # indexing the channels of a fixes them
        gram = torch.matmul(b.flatten(2), b.flatten(2).transpose(1, 2))  # [N, 64, 64]: b is fixed
        c = self.c(b)                            # c is free
        return self.fc(c.mean((2, 3))) + first.mean() + gram.mean()


class WithLeaf(nn.Module):
    """Data-dependent control flow fx cannot trace (inside `gate`)."""

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 64)
        self.gate = WithLeaf.Gate()
        self.b = conv_bn(64, 64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.b(self.gate(self.a(x))).mean((2, 3)))


NETS = {"residual": Residual, "dense": Dense, "mobile": Mobile, "norms": Norms}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(NETS[name](), seed)


def images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
