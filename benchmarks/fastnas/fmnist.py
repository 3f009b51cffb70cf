"""Fashion-MNIST, offline: the data, two pretrained CNNs (ResNet-style, MobileNetV2-style) and their training.

The data is Debian's `dataset-fashion-mnist` (idx.gz files). `scripts/setup_env.sh` installs it, or unpacks the
package into `.data/` where apt cannot install. The networks are defined here (torchvision does not import with
the CPU torch of this stack) in torchvision's style: BasicBlock ResNet with a 1x1 conv + BN downsample, and
MobileNetV2 inverted residuals with depthwise convolutions and ReLU6. `python benchmarks/fastnas/fmnist.py`
trains both (a few minutes each on 2 CPU cores) and writes `weights/<name>.pt`, which the slow test tier and the
benchmark load; the weights are committed so nobody has to retrain.

    train, test = load_fmnist()                         # (images [N, 1, 28, 28] float, labels [N] int64)
    model = pretrained("resnet")                         # eval mode, weights from weights/resnet.pt
    accuracy(model, batches(*test, 512))
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WEIGHTS = HERE / "weights"
DATA_DIRS = (Path("/usr/share/datasets/fashion-mnist"), REPO / ".data/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ----------------------------------------------------------------------------------------------- data
def data_dir() -> Path:
    for d in DATA_DIRS:
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise FileNotFoundError("Fashion-MNIST not found: run scripts/setup_env.sh (apt package dataset-fashion-mnist), "
                            f"looked in {', '.join(map(str, DATA_DIRS))}")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist() -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)); images normalised, [N, 1, 28, 28] float32."""
    d = data_dir()

    def split(prefix: str):
        images = torch.from_numpy(_idx(d / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div_(255)
        labels = torch.from_numpy(_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        return ((images - MEAN) / STD).unsqueeze(1), labels

    return split("train"), split("t10k")


def batches(images: torch.Tensor, labels: torch.Tensor, size: int, shuffle_seed: int = -1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A list of (images, labels) batches; shuffled with `shuffle_seed` >= 0."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(shuffle_seed)) if shuffle_seed >= 0 else torch.arange(len(images))
    return [(images[order[i:i + size]], labels[order[i:i + size]]) for i in range(0, len(images), size)]


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy (0..1) over (images, labels) batches; the model is put in eval mode."""
    model.eval()
    correct = total = 0
    for x, y in data:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


# --------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """A torchvision-style BasicBlock ResNet for 1x28x28 images (ResNet-10 layout by default)."""

    def __init__(self, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """A torchvision-style MobileNetV2 for 1x28x28 images: (expansion, channels, blocks, stride) stages."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, setting=SETTING, stem: int = 32, last: int = 320, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        features = [nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True))]
        cin = stem
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


MODELS = {"resnet": ResNet, "mobilenetv2": MobileNetV2}


def pretrained(name: str) -> nn.Module:
    """The committed Fashion-MNIST weights of `name` ("resnet" or "mobilenetv2"), in eval mode."""
    model = MODELS[name]()
    path = WEIGHTS / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python benchmarks/fastnas/fmnist.py --train {name}")
    model.load_state_dict({k: v.float() for k, v in torch.load(path, map_location="cpu").items()})
    return model.eval()


# ------------------------------------------------------------------------------------------- training
def fit(model: nn.Module, train: List[Tuple[torch.Tensor, torch.Tensor]], epochs: float, lr: float = 0.05,
        teacher: nn.Module = None, kd_weight: float = 0.5, log_every: int = 100, label: str = "") -> nn.Module:
    """SGD (momentum 0.9, nesterov, cosine LR, weight decay 5e-5) over `train` batches for `epochs` (fractions
    allowed); with `teacher`, the loss mixes cross-entropy and KL to the teacher's logits (`kd_weight`)."""
    steps = max(1, int(round(epochs * len(train))))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    if teacher is not None:
        teacher.eval()
    start = time.time()
    for step in range(steps):
        x, y = train[step % len(train)]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                target = F.log_softmax(teacher(x), -1)
            kd = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
            loss = (1 - kd_weight) * loss + kd_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            rate = (step + 1) / (time.time() - start)
            print(f"{label} step {step + 1}/{steps}  loss {loss.item():.3f}  {rate:.1f} it/s  "
                  f"ETA {(steps - step - 1) / rate:.0f} s", flush=True)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load_fmnist()
    test = batches(xte, yte, 1000)
    WEIGHTS.mkdir(exist_ok=True)
    for name in args.train:
        torch.manual_seed(0)
        model = MODELS[name]()
        start = time.time()
        fit(model, batches(xtr, ytr, args.batch_size, shuffle_seed=0), args.epochs, label=name)
        acc = accuracy(model, test)
        print(f"{name}: test accuracy {acc:.4f} after {args.epochs} epochs, {time.time() - start:.0f} s", flush=True)
        tmp = WEIGHTS / f".{name}.pt.tmp"
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, WEIGHTS / f"{name}.pt")


if __name__ == "__main__":
    sys.exit(main())
