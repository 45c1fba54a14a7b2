#!/usr/bin/env python3
"""torchvision ResNet reference fixtures for diffuse-synth's FedCADO classifiers.

    .venv/bin/python testdata/gen/diffuse_synth_resnet_ref.py gen           # rewrite the files below
    .venv/bin/python testdata/gen/diffuse_synth_resnet_ref.py gen --check   # regenerate to a temp dir, compare

A full-width ResNet-18 is 45 MB, so the checked-in nets are narrow: torchvision's own
ResNet class, BasicBlock / Bottleneck, _make_layer and forward, with the stem and the four
stages built at widths (4, 8, 8, 16) (resnet18) and (2, 4, 4, 8) (resnet50) instead of
(64, 128, 256, 512) by a subclass that only replaces the constructor. The state_dict names
and the structure (block counts, strides, downsample branches) are exactly resnet18's and
resnet50's.

Writes into testdata/diffuse-synth/:
- resnet18-narrow.safetensors, resnet50-narrow.safetensors: state_dicts (random weights, every
  parameter and BN running stat re-drawn, 5 classes; num_batches_tracked dropped).
- resnet.safetensors: `input` [2,3,36,36], and per net `<net>.logits` (eval mode),
  `<net>.bn_loss` (sum over every BatchNorm2d of ||running_var - var||_2 + ||running_mean -
  mean||_2 of its input, biased variance over N,H,W: FedCADO's DeepInversionHook) and
  `<net>.loss` = CE(logits, class 2) (mean over the batch) + 0.1 bn_loss and `<net>.grad` =
  d loss / d input.
- resnet-keys.json: for torchvision's full-size resnet18, resnet34 and resnet50 (1000 classes),
  every state_dict name with its shape, and the number of BatchNorm2d layers.

Needs torch and torchvision (testdata/gen/requirements.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffuse_synth_ref as base  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "diffuse-synth"
NUM_CLASSES = 5
TARGET = 2
BN_WEIGHT = 0.1


class NarrowResNet(ResNet):
    """torchvision's ResNet with narrower stages; everything but the widths is torchvision's."""

    def __init__(self, block, layers, widths, num_classes):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)


# block, blocks per stage, stage widths (Bottleneck stages output 4x their width)
NETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], (4, 8, 8, 16)),
    "resnet50": (Bottleneck, [3, 4, 6, 3], (2, 4, 4, 8)),
}


def randomise(net, gen):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # BN scale
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def gen_narrow(out: Path):
    gen = torch.Generator().manual_seed(1808)
    x0 = torch.randn((2, 3, 36, 36), generator=gen)
    ref = {"input": x0}
    for name, (block, layers, widths) in NETS.items():
        net = NarrowResNet(block, layers, widths, NUM_CLASSES)
        randomise(net, gen)
        net.eval()
        sd = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(sd, str(out / f"{name}-narrow.safetensors"))
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        stats = base.bn_stat_terms(bns)
        x = x0.clone().requires_grad_(True)
        logits = net(x)
        bn = sum(stats)
        loss = F.cross_entropy(logits, torch.tensor([TARGET, TARGET])) + BN_WEIGHT * bn
        loss.backward()
        ref[f"{name}.logits"] = logits.detach()
        ref[f"{name}.bn_loss"] = bn.detach().reshape(1)
        ref[f"{name}.loss"] = loss.detach().reshape(1)
        ref[f"{name}.grad"] = x.grad.detach()
        print(f"{name}: {len(bns)} BN layers, {sum(v.numel() for v in sd.values())} numbers")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "resnet.safetensors"),
              metadata={"class": str(TARGET), "bn_weight": str(BN_WEIGHT)})


def gen_keys(out: Path):
    keys = {}
    for name in ("resnet18", "resnet34", "resnet50"):
        net = getattr(torchvision.models, name)(weights=None)
        sd = net.state_dict()
        keys[name] = {
            "bn_layers": sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()),
            "shapes": {k: list(v.shape) for k, v in sd.items()},
        }
    (out / "resnet-keys.json").write_text(json.dumps(keys, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    base.cli([gen_narrow, gen_keys])
