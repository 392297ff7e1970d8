"""LPIPS (Zhang et al., CVPR 2018), computed only from weights already on disk.

LPIPS compares deep features of two images: each of AlexNet's five ReLU outputs is unit-normalised over
channels, the squared difference is weighted per channel by a learned 1x1 layer, averaged over space and
summed over layers. It needs two files that gradleak never downloads:

* the AlexNet backbone in torchvision's layout (``alexnet-owt-7be5be79.pth``, keys ``features.N.weight``),
* LPIPS's linear layers v0.1 for AlexNet (``alex.pth`` from the ``lpips`` package, keys
  ``linK.model.1.weight``).

They are looked for in ``$GRADLEAK_LPIPS_DIR`` (both files), then the backbone in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``) and the linear layers inside
an installed ``lpips`` package. When either is missing, :func:`lpips_status` says which, and results carry
that reason instead of a number. The backbone is written out here (torchvision is not used); grey images
are repeated to three channels and images under 32 px a side are enlarged bilinearly to 32 px first.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LINEAR_FILE = "alex.pth"
ENV = "GRADLEAK_LPIPS_DIR"
LPIPS_VARIANT = ("LPIPS v0.1, AlexNet backbone (Zhang et al. 2018), grey repeated to 3 channels, "
                 "lower is more similar, per image then averaged")

# torchvision AlexNet ``features``: (index, in, out, kernel, stride, padding); max-pools after 0, 3 and 12.
_CONVS = [(0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
          (10, 256, 256, 3, 1, 1)]
_CHANNELS = [64, 192, 384, 256, 256]


def _candidates() -> tuple[list[Path], list[Path]]:
    backbone, linear = [], []
    if os.environ.get(ENV):
        d = Path(os.environ[ENV])
        backbone.append(d / BACKBONE_FILE)
        linear.append(d / LINEAR_FILE)
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    backbone.append(torch_home / "hub" / "checkpoints" / BACKBONE_FILE)
    try:  # the lpips package ships its linear layers; importing it needs torchvision, so only look
        import importlib.util
        spec = importlib.util.find_spec("lpips")
        if spec is not None and spec.origin:
            linear.append(Path(spec.origin).parent / "weights" / "v0.1" / LINEAR_FILE)
    except (ImportError, ValueError):
        pass
    return backbone, linear


def find_weights() -> tuple[Path | None, Path | None]:
    backbone, linear = _candidates()
    b = next((p for p in backbone if p.is_file()), None)
    l_ = next((p for p in linear if p.is_file()), None)
    return b, l_


def lpips_status() -> str | None:
    """None when LPIPS can be computed, otherwise why not (one line)."""
    b, l_ = find_weights()
    missing = []
    if b is None:
        missing.append(f"AlexNet backbone {BACKBONE_FILE}")
    if l_ is None:
        missing.append(f"LPIPS linear layers {LINEAR_FILE}")
    if missing:
        return (f"not computed: {' and '.join(missing)} not on disk (gradleak never downloads weights; put them "
                f"in ${ENV})")
    return None


class LPIPS(nn.Module):
    """LPIPS with the AlexNet backbone, built from two state dicts (see module docstring)."""

    def __init__(self, backbone_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor]):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        for conv, (idx, *_rest) in zip(self.convs, _CONVS):
            conv.weight.data.copy_(backbone_state[f"features.{idx}.weight"])
            conv.bias.data.copy_(backbone_state[f"features.{idx}.bias"])
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(linear_state[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            out.append(x)
            if k in (0, 1):
                x = F.max_pool2d(x, 3, 2)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of N x C x H x W images in [0, 1]."""
        def prep(x):
            x = x.float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if min(x.shape[-2:]) < 32:
                x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            return ((2 * x - 1) - self.shift) / self.scale

        fa, fb = self._features(prep(a)), self._features(prep(b))
        total = torch.zeros(a.shape[0])
        for lin, x, y in zip(self.lins, fa, fb):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((x - y) ** 2).mean(dim=(1, 2, 3))
        return total


@lru_cache(maxsize=2)
def _load(backbone: str, linear: str) -> LPIPS:
    return LPIPS(torch.load(backbone, map_location="cpu", weights_only=True),
                 torch.load(linear, map_location="cpu", weights_only=True))


def lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Per-image LPIPS, or None when the weights are not on disk (see :func:`lpips_status`)."""
    bpath, lpath = find_weights()
    if bpath is None or lpath is None:
        return None
    return _load(str(bpath), str(lpath))(a.detach().cpu(), b.detach().cpu())
