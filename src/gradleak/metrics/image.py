"""Image similarity: PSNR, the standard SSIM and MS-SSIM adapted to small images.

SSIM here is the standard Gaussian-window SSIM of Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5 (truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population (not sample) covariances, the SSIM
map averaged over the positions where the whole window fits inside the image. It equals
``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``. It is *not* ROG's single-window SSIM nor CW-SSIM.
Multi-channel images are averaged over channels, as skimage's ``channel_axis`` does.

MS-SSIM is Wang, Simoncelli and Bovik's multi-scale SSIM (Asilomar 2003): the contrast-structure term at
each of M scales (halving by 2x2 average pooling between scales) and the full SSIM at the coarsest,
combined as a product with exponents ``weights``; negative terms are clipped to 0 as in the reference
implementations (``pytorch_msssim``). The standard form has M = 5, an 11x11 Gaussian window with sigma 1.5
and weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), which needs images of more than 160 px a side.
Chest X-rays attacked here are often 32-64 px, so :func:`ms_ssim_config` adapts the form to the image: it
keeps the 11x11 window and takes as many scales (at most 5) as leave the coarsest scale at least a
window wide; when that gives fewer than 3 scales it uses a 7x7 window with sigma 1.0 instead; the
weights are the first M standard weights renormalised to sum to 1. Every result names the form it used
(e.g. 64 px: 3 scales, 11x11 window).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

PSNR_VARIANT = "PSNR, data range 1 (images in [0, 1]), per image then averaged; capped at 100 dB for identical images"
SSIM_VARIANT = "SSIM, standard Gaussian window (Wang et al. 2004; sigma 1.5, 11x11, K1 0.01, K2 0.03), per image then averaged"

PSNR_CAP_DB = 100.0

#: The standard MS-SSIM exponents (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of N x C x H x W tensors (or one C x H x W / H x W image)."""
    a, b = _as_batch(a), _as_batch(b)
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    out = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP_DB).float()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64,
                     size: int | None = None) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5) if size is None else size // 2
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of N x 1 x H x W."""
    k = w.numel()
    x = F.conv2d(x, w.view(1, 1, 1, k))
    return F.conv2d(x, w.view(1, 1, k, 1))


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, win: torch.Tensor, data_range: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term of (N*C) x 1 x H x W float64 images."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, win), _filter(b, win)
    saa = _filter(a * a, win) - mu_a ** 2
    sbb = _filter(b * b, win) - mu_b ** 2
    sab = _filter(a * b, win) - mu_a * mu_b
    cs = (2 * sab + c2) / (saa + sbb + c2)
    s = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs
    return s.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image standard SSIM (see module docstring) of N x C x H x W tensors."""
    a, b = _as_batch(a).double(), _as_batch(b).double()
    n, c, h, w_ = a.shape
    win = _gaussian_window(sigma)
    if min(h, w_) < win.numel():
        raise ValueError(f"SSIM needs images of at least {win.numel()} px a side, got {h}x{w_}")
    s, _ = _ssim_terms(a.reshape(n * c, 1, h, w_), b.reshape(n * c, 1, h, w_), win, data_range)
    return s.view(n, c).mean(1).float()


def ms_ssim_config(side: int) -> dict:
    """The MS-SSIM form used for images whose smaller side is ``side`` px (see module docstring)."""
    side = int(side)
    for window, sigma in ((11, 1.5), (7, 1.0)):
        scales = 0
        while scales < len(MS_SSIM_WEIGHTS) and side // (2 ** scales) >= window:
            scales += 1
        if scales >= 3 or window == 7:
            break
    if scales < 1:
        raise ValueError(f"MS-SSIM needs images of at least 7 px a side, got {side}")
    w = MS_SSIM_WEIGHTS[:scales]
    return {"scales": scales, "window": window, "sigma": sigma,
            "weights": [x / sum(w) for x in w]}


def ms_ssim_variant(side: int) -> str:
    c = ms_ssim_config(side)
    return (f"MS-SSIM (Wang et al. 2003) adapted to {side} px: {c['scales']} scale(s), "
            f"{c['window']}x{c['window']} Gaussian window sigma {c['sigma']}, first {c['scales']} standard "
            f"weights renormalised, per image then averaged")


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, *, scales: int | None = None,
            window: int | None = None, sigma: float | None = None,
            weights: list[float] | tuple[float, ...] | None = None) -> torch.Tensor:
    """Per-image MS-SSIM of N x C x H x W tensors.

    Without arguments the form is chosen from the image size by :func:`ms_ssim_config`. Passing
    ``weights`` (one per scale), ``window`` and ``sigma`` gives any other form, e.g. the standard
    5-scale one: ``ms_ssim(a, b, weights=MS_SSIM_WEIGHTS, window=11, sigma=1.5)``.
    """
    a, b = _as_batch(a).double(), _as_batch(b).double()
    n, c, h, w_ = a.shape
    auto = ms_ssim_config(min(h, w_))
    if weights is None:
        weights = auto["weights"] if scales is None else [x / sum(MS_SSIM_WEIGHTS[:scales])
                                                          for x in MS_SSIM_WEIGHTS[:scales]]
    window = window or (auto["window"] if scales is None else 11)
    sigma = sigma or (auto["sigma"] if scales is None else 1.5)
    levels = len(weights)
    if min(h, w_) // (2 ** (levels - 1)) < window:
        raise ValueError(f"MS-SSIM with {levels} scales and a {window} px window needs images of at least "
                         f"{window * 2 ** (levels - 1)} px a side, got {h}x{w_}")
    win = _gaussian_window(sigma, size=window)
    x, y = a.reshape(n * c, 1, h, w_), b.reshape(n * c, 1, h, w_)
    terms = []
    for level in range(levels):
        s, cs = _ssim_terms(x, y, win, data_range)
        if level < levels - 1:
            terms.append(cs.clamp_min(0))
            pad = [x.shape[-2] % 2, x.shape[-1] % 2]
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
    terms.append(s.clamp_min(0))
    wt = torch.tensor(list(weights), dtype=torch.float64).view(-1, 1)
    out = torch.prod(torch.stack(terms) ** wt, dim=0)
    return out.view(n, c).mean(1).float()


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

