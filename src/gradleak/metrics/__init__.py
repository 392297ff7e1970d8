"""Where ground truth meets a reconstruction: image similarity, pairing and label accuracy."""

from __future__ import annotations

from typing import Any

import torch

from .image import (MS_SSIM_WEIGHTS, PSNR_VARIANT, SSIM_VARIANT, ms_ssim, ms_ssim_config, ms_ssim_variant, mse,
                    psnr, ssim)
from .lpips import LPIPS_VARIANT, lpips, lpips_status
from .matching import pair_by_mse


def score(truth_images: torch.Tensor, truth_labels: torch.Tensor | None, rec_images: torch.Tensor,
          rec_labels: torch.Tensor | None) -> dict[str, Any]:
    """Pair reconstructions to originals (Hungarian on MSE) and score each pair.

    Label accuracy compares the multiset of labels (order-free), since an attack recovers a batch's
    labels without knowing which image carries which. MS-SSIM uses the form adapted to the image size
    (named in ``metric_variants``); LPIPS is a number only when its weights are on disk, otherwise
    ``lpips`` is None and ``lpips_note`` says why.
    """
    truth_images = truth_images.detach().cpu().float()
    rec_images = rec_images.detach().cpu().float()
    if truth_images.shape != rec_images.shape:
        raise ValueError(f"truth has shape {tuple(truth_images.shape)}, reconstruction {tuple(rec_images.shape)}")
    perm = pair_by_mse(truth_images, rec_images) if len(truth_images) > 1 else [0]
    paired = rec_images[perm]
    p, s, m = psnr(truth_images, paired), ssim(truth_images, paired), mse(truth_images, paired)
    side = min(truth_images.shape[-2:])
    ms = ms_ssim(truth_images, paired)
    lp = lpips(truth_images, paired)
    out: dict[str, Any] = {
        "metric_variants": {"psnr": PSNR_VARIANT, "ssim": SSIM_VARIANT, "ms_ssim": ms_ssim_variant(side),
                            "lpips": LPIPS_VARIANT,
                            "pairing": "Hungarian matching of reconstructions to originals on MSE"},
        "num_images": int(len(truth_images)),
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "ms_ssim": float(ms.mean()),
        "lpips": float(lp.mean()) if lp is not None else None,
        "mse": float(m.mean()),
        "per_image": [{"index": i, "paired_reconstruction": perm[i], "psnr": float(p[i]),
                       "ssim": float(s[i]), "ms_ssim": float(ms[i]), "mse": float(m[i]),
                       **({"lpips": float(lp[i])} if lp is not None else {})} for i in range(len(perm))],
    }
    if lp is None:
        out["lpips_note"] = lpips_status()
    if truth_labels is not None and rec_labels is not None:
        t = sorted(int(x) for x in truth_labels)
        r = sorted(int(x) for x in rec_labels)
        # multiset overlap / batch size
        from collections import Counter
        ct, cr = Counter(t), Counter(r)
        out["label_accuracy"] = sum(min(ct[k], cr[k]) for k in ct) / max(1, len(t))
    return out


__all__ = ["psnr", "ssim", "ms_ssim", "ms_ssim_config", "ms_ssim_variant", "mse", "lpips", "lpips_status",
           "pair_by_mse", "score", "PSNR_VARIANT", "SSIM_VARIANT", "LPIPS_VARIANT", "MS_SSIM_WEIGHTS"]
