"""The degradation model the prior learns to undo: what ROG's latent decoding and gradient matching produce.

A clean image ``x`` (N x 1 x H x W in [0, 1]) becomes a training input in four steps, each drawn per
image from an explicit generator (the drift is applied to the latent before its error, so the error's
size is absolute, as measured on real outputs; decoding is linear, so the order does not matter for the
drift itself):

1. **latent decoding** — the least-squares latent of side H / ``scale_factor`` (the latent whose bicubic
   decoding is closest to ``x``), decoded by ROG's bicubic upsampling: what a perfect match would give.
   Real ROG outputs are 2.5–3.5 dB closer to this projection than to the area-downsampled latent;
2. **latent error** — Gaussian noise of standard deviation up to ``latent_noise`` added to the latent
   before decoding: gradient matching under quantisation, sparsification or noise gets the latent pixels
   wrong independently, which after bicubic decoding shows as smooth blotches at the latent scale;
3. **contrast/brightness drift** — ``a * (x - mean) + mean + b`` with ``a`` drawn uniformly from
   ``[1 - contrast, 1 + min(contrast, 0.1)]`` for half of the images and from the mild
   ``1 ± min(contrast, 0.1)`` for the other half, and ``|b| <= brightness``: the matching objective is nearly
   blind to global offset, and under gradient noise ROG keeps the structure but loses most of the
   contrast (``a`` of 0.05 to 0.15 measured on real outputs);
4. **pixel noise** — Gaussian noise up to ``pixel_noise`` after decoding, then clamping to [0, 1] (the
   attack's box constraint), which saturates bright and dark regions.

:func:`calibrate` estimates (2)-(4) from pairs of real attack outputs and their originals.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

#: Calibrated (:func:`calibrate`, 90 % quantiles, rounded up) on ROG outputs for real 64 px chest X-rays
#: under none, QSGD 16, top-k 1 % and Gaussian noise (clip 1, sigma 0.01), 100 iterations.
DEFAULT_DEGRADATION: dict[str, Any] = {
    "scale_factor": 4,
    "latent_noise": 0.06,
    "contrast": 0.95,
    "brightness": 0.08,
    "pixel_noise": 0.02,
}


#: For the outputs of ``auto``'s linear-layer leak (feature inversion with a smoothness prior), where the
#: images err by smooth blotches of a few pixels and keep their contrast: :func:`calibrate` at half the
#: image side, medians over the images, fitted to the leak stage's outputs on the leakage benchmark's
#: tune draw (real 64 px X-rays, ``lenet5``; B = 4 under QSGD 4, relative noise σ0 = 1 and FedAvg with 5
#: local steps, B = 8 under σ0 = 1; four of the nine outputs came from a variant of the separation that
#: was not kept, which projected the inputs on the update's leading directions). A prior trained on them (squared error, 1500 steps, width 16) moved
#: those outputs by +0.4 to +1.8 dB (from 17.7 to 29.7 dB, blind guesses 17.5 to 18.8 dB; 60 s at B = 4,
#: 240 s at B = 8); one fitted the same way at ROG's quarter
#: side and 90 % quantiles moved them by -1.7 to +0.9 dB (it sharpened too hard what was already close).
LEAK_DEGRADATION: dict[str, Any] = {
    "scale_factor": 2,
    "latent_noise": 0.055,
    "contrast": 0.09,
    "brightness": 0.01,
    "pixel_noise": 0.02,
}
#: The degradation a prior for each attack's outputs starts from (``gradleak prior train --for-attack``).
FOR_ATTACK: dict[str, dict[str, Any]] = {"rog": DEFAULT_DEGRADATION, "auto": LEAK_DEGRADATION}


def check_degradation(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` merged over the defaults; ValueError for unknown keys or out-of-range values."""
    unknown = set(d) - set(DEFAULT_DEGRADATION)
    if unknown:
        raise ValueError(f"unknown degradation setting(s): {', '.join(sorted(unknown))}")
    out = {**DEFAULT_DEGRADATION, **d}
    out["scale_factor"] = int(out["scale_factor"])
    if out["scale_factor"] < 1:
        raise ValueError(f"scale_factor must be >= 1, got {out['scale_factor']}")
    for k in ("latent_noise", "contrast", "brightness", "pixel_noise"):
        out[k] = float(out[k])
        if not out[k] >= 0 or (k == "contrast" and out[k] > 1):
            raise ValueError(f"degradation '{k}' must be >= 0 (contrast <= 1), got {out[k]}")
    return out


def _uniform(n: int, high: float, generator: torch.Generator, low: float = 0.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=generator)


def decode(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ROG's decoder: bicubic upsampling of the latent to ``size``."""
    return F.interpolate(latent, size=size, mode="bicubic", align_corners=False)


@lru_cache(maxsize=32)
def _decoder_matrices(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bicubic upsampling of a length-``m`` signal to length ``n`` as an ``n x m`` matrix, and its
    pseudo-inverse."""
    eye = torch.eye(m, dtype=torch.float64).view(m, 1, 1, m)
    up = F.interpolate(eye, size=(1, n), mode="bicubic", align_corners=False).view(m, n).T.contiguous()
    return up.float(), torch.linalg.pinv(up).float()


def latent_of(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """The least-squares latent (side / ``scale_factor``) whose bicubic decoding is closest to ``x``."""
    h, w = x.shape[-2:]
    lh, lw = max(1, h // scale_factor), max(1, w // scale_factor)
    if (lh, lw) == (h, w):
        return x.clone()
    _, ph = _decoder_matrices(h, lh)
    _, pw = _decoder_matrices(w, lw)
    return ph @ x @ pw.T


def project(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """The perfect decoding of ``x``: its least-squares latent, bicubic-upsampled (not clamped)."""
    return decode(latent_of(x, scale_factor), tuple(x.shape[-2:]))


def degrade(x: torch.Tensor, settings: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """A degraded copy of the clean images ``x`` (see the module text); deterministic given ``generator``."""
    s = check_degradation(settings)
    n, c, h, w = x.shape
    latent = latent_of(x, s["scale_factor"])
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    mild = min(s["contrast"], 0.1)
    a_strong = _uniform(n, 1 + mild, generator, max(0.0, 1 - s["contrast"]))
    a_mild = _uniform(n, 1 + mild, generator, 1 - mild)
    a = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, a_mild, a_strong)
    b = _uniform(n, s["brightness"], generator, -s["brightness"])
    latent = a * (latent - mean) + mean + b
    latent = latent + _uniform(n, s["latent_noise"], generator) * torch.randn(latent.shape, generator=generator)
    y = decode(latent, (h, w))
    y = y + _uniform(n, s["pixel_noise"], generator) * torch.randn(y.shape, generator=generator)
    return y.clamp(0.0, 1.0)


def calibrate(clean: torch.Tensor, attacked: torch.Tensor, scale_factor: int = 4,
              quantile: float = 0.9) -> dict[str, Any]:
    """Degradation settings that cover real attack outputs ``attacked`` of the originals ``clean``.

    Per image: the gain/offset drift (least-squares fit of ``attacked`` on the perfect decoding
    :func:`project`), the
    latent error (standard deviation of the area-downsampled residual after removing the drift) and the
    pixel error (standard deviation of what the latent error leaves). Each setting is the ``quantile`` of
    its per-image values, so the prior trains on degradations at least as strong as most real ones.
    """
    h, w = clean.shape[-2:]
    lh, lw = max(1, h // scale_factor), max(1, w // scale_factor)
    perfect = project(clean, scale_factor).clamp(0, 1)
    lat, con, bri, pix = [], [], [], []
    for p, y, x in zip(perfect, attacked, clean):
        p, y = p.flatten().double(), y.flatten().double()
        pc = p - p.mean()
        a = float((pc * (y - y.mean())).sum() / pc.pow(2).sum().clamp_min(1e-12))
        b = float(y.mean() - p.mean())
        con.append(abs(a - 1.0))
        bri.append(abs(b))
        r = (y - (a * pc + p.mean() + b)).view(1, 1, h, w).float()
        rl = F.adaptive_avg_pool2d(r, (lh, lw))
        lat.append(float(rl.std()))
        pix.append(float((r - decode(rl, (h, w))).std()))
    q = lambda v: float(torch.tensor(v).quantile(quantile)) if len(v) > 1 else float(v[0])  # noqa: E731
    # the model's contrast range ends at losing all of it (a = 0): a fit of a < 0 or a > 2 is capped there
    return {"scale_factor": int(scale_factor), "latent_noise": round(q(lat), 4),
            "contrast": round(min(q(con), 1.0), 4),
            "brightness": round(q(bri), 4), "pixel_noise": round(q(pix), 4)}
