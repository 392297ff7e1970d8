"""The blind baseline: what an attacker could guess about the images *without* the update.

A reconstruction leaks only what it recovers beyond that guess. The attacker of every threat model here
holds auxiliary images of the same kind (public chest X-rays, the attacked patients excluded), so its best
blind guesses are

* ``mean_image``: the mean of its auxiliary images (a blurry average chest), and
* ``nearest_to_mean``: the auxiliary image nearest (pixel MSE) to that mean -- a real, sharp image of a
  typical chest.

Each guess stands in for every image of the batch and is scored exactly as a reconstruction is (the
same metrics, the same Hungarian pairing, via :func:`gradleak.metrics.score`). ``baseline`` holds the
better of the two guesses metric by metric (the higher PSNR, SSIM and MS-SSIM, the lower MSE), so the
gain over it never flatters the attack. ``gain_over_baseline`` is

* ``psnr_db``: PSNR of the reconstruction minus PSNR of the baseline (dB, means over the images);
* ``ssim``: SSIM of the reconstruction minus SSIM of the baseline;
* ``ssim_skill``: ``(SSIM - baseline SSIM) / (1 - baseline SSIM)``, the share of the gap between the
  blind guess and a perfect reconstruction that the attack closed (1: perfect; 0: no better than the
  guess; negative: worse). Verdicts use this share, because the gap left above a good blind guess is
  small (a mean chest often scores SSIM 0.4 - 0.8 on its own).
"""

from __future__ import annotations

from typing import Any

import torch

GUESSES = ("mean_image", "nearest_to_mean")

VARIANT = ("blind baseline: the attacker's best guess without the update -- the mean of its auxiliary "
           "images, or the auxiliary image nearest to that mean, whichever scores higher (metric by metric); "
           "each guess stands in for every image of the batch and is scored with the same metrics and "
           "pairing as the reconstruction")

GAIN_VARIANT = ("gain over the blind baseline: psnr_db = PSNR - baseline PSNR (dB); ssim = SSIM - baseline "
                "SSIM; ssim_skill = (SSIM - baseline SSIM) / (1 - baseline SSIM), the share of the gap "
                "between the blind guess and a perfect reconstruction that the attack closed")

_HIGHER = ("psnr", "ssim", "ms_ssim")


def blind_guesses(auxiliary: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two blind guesses (each 1 x C x H x W) from auxiliary images N x C x H x W in [0, 1]."""
    aux = auxiliary.detach().cpu().float()
    if aux.ndim != 4 or len(aux) == 0:
        raise ValueError(f"auxiliary images must be a non-empty N x C x H x W tensor, got {tuple(aux.shape)}")
    mean = aux.mean(0, keepdim=True)
    d = ((aux - mean) ** 2).flatten(1).mean(1)
    nearest = aux[int(torch.argmin(d))][None]
    return {"mean_image": mean, "nearest_to_mean": nearest}


def score_guesses(truth_images: torch.Tensor, guesses: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Score each guess (repeated for every image) as a reconstruction, and the better one per metric."""
    from . import score

    truth = truth_images.detach().cpu().float()
    scored = {}
    for name, g in guesses.items():
        if tuple(g.shape[1:]) != tuple(truth.shape[1:]):
            raise ValueError(f"blind guess '{name}' is {tuple(g.shape[1:])} but the images are "
                             f"{tuple(truth.shape[1:])}")
        s = score(truth, None, g.expand_as(truth).contiguous(), None)
        scored[name] = s
    best: dict[str, Any] = {}
    for k in (*_HIGHER, "mse"):
        vals = [s[k] for s in scored.values() if s.get(k) is not None]
        if vals:
            best[k] = max(vals) if k in _HIGHER else min(vals)
    per_image = []
    for i in range(len(truth)):
        row: dict[str, Any] = {}
        for k in (*_HIGHER, "mse"):
            vals = [s["per_image"][i][k] for s in scored.values() if k in s["per_image"][i]]
            if vals:
                row[k] = max(vals) if k in _HIGHER else min(vals)
        per_image.append(row)
    return {"variant": VARIANT, **best, "per_image": per_image,
            "guesses": {n: {k: s[k] for k in (*_HIGHER, "mse")} for n, s in scored.items()}}


def gain(rec: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Gain of scores ``rec`` (``psnr``, ``ssim``) over the baseline ``base``."""
    out: dict[str, Any] = {"psnr_db": None, "ssim": None, "ssim_skill": None}
    if rec.get("psnr") is not None and base.get("psnr") is not None:
        out["psnr_db"] = float(rec["psnr"]) - float(base["psnr"])
    if rec.get("ssim") is not None and base.get("ssim") is not None:
        out["ssim"] = float(rec["ssim"]) - float(base["ssim"])
        out["ssim_skill"] = ssim_skill(float(rec["ssim"]), float(base["ssim"]))
    return out


def ssim_skill(ssim: float, baseline_ssim: float) -> float:
    """``(ssim - baseline) / (1 - baseline)``; a baseline at 1 leaves no headroom (skill 0 unless worse)."""
    head = 1.0 - baseline_ssim
    if head <= 1e-9:
        return 0.0 if ssim >= baseline_ssim else -1.0
    return (ssim - baseline_ssim) / head


def with_baseline(metrics: dict[str, Any], truth_images: torch.Tensor, guesses: dict[str, torch.Tensor]
                  ) -> dict[str, Any]:
    """Add ``baseline`` and ``gain_over_baseline`` to the output of :func:`score` (and to a nested
    ``without_postprocessing`` result), and a baseline/gain pair to each per-image entry."""
    base = score_guesses(truth_images, guesses)
    out = dict(metrics)
    out["baseline"] = base
    out["gain_over_baseline"] = {**gain(out, base), "variant": GAIN_VARIANT}
    for p, b in zip(out.get("per_image", []), base["per_image"]):
        p["baseline_psnr"], p["baseline_ssim"] = b.get("psnr"), b.get("ssim")
        p["gain_psnr_db"] = p["psnr"] - b["psnr"] if b.get("psnr") is not None else None
        p["gain_ssim"] = p["ssim"] - b["ssim"] if b.get("ssim") is not None else None
    raw = out.get("without_postprocessing")
    if isinstance(raw, dict) and "psnr" in raw:
        out["without_postprocessing"] = {**raw, "gain_over_baseline": gain(raw, base)}
    return out


__all__ = ["GUESSES", "VARIANT", "GAIN_VARIANT", "blind_guesses", "score_guesses", "gain", "ssim_skill",
           "with_baseline"]
