"""Image similarity: PSNR and the standard SSIM.

SSIM here is the standard Gaussian-window SSIM of Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5 (truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population (not sample) covariances, the SSIM
map averaged over the positions where the whole window fits inside the image. It equals
``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``. It is *not* ROG's single-window SSIM nor CW-SSIM.
Multi-channel images are averaged over channels, as skimage's ``channel_axis`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_VARIANT = "PSNR, data range 1 (images in [0, 1]), per image then averaged; capped at 100 dB for identical images"
SSIM_VARIANT = "SSIM, standard Gaussian window (Wang et al. 2004; sigma 1.5, 11x11, K1 0.01, K2 0.03), per image then averaged"

PSNR_CAP_DB = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of N x C x H x W tensors (or one C x H x W / H x W image)."""
    a, b = _as_batch(a), _as_batch(b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP_DB).float()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of N x 1 x H x W."""
    k = w.numel()
    x = F.conv2d(x, w.view(1, 1, 1, k))
    return F.conv2d(x, w.view(1, 1, k, 1))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image standard SSIM (see module docstring) of N x C x H x W tensors."""
    a, b = _as_batch(a).double(), _as_batch(b).double()
    n, c, h, w_ = a.shape
    win = _gaussian_window(sigma)
    if min(h, w_) < win.numel():
        raise ValueError(f"SSIM needs images of at least {win.numel()} px a side, got {h}x{w_}")
    a = a.reshape(n * c, 1, h, w_)
    b = b.reshape(n * c, 1, h, w_)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, win), _filter(b, win)
    saa = _filter(a * a, win) - mu_a ** 2
    sbb = _filter(b * b, win) - mu_b ** 2
    sab = _filter(a * b, win) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1).view(n, c).mean(1).float()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _as_batch(a), _as_batch(b)
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1).float()


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    return x


def summarize(values: torch.Tensor) -> dict[str, float]:
    v = [float(x) for x in values]
    mean = sum(v) / len(v) if v else math.nan
    return {"mean": mean, "min": min(v) if v else math.nan, "max": max(v) if v else math.nan}
