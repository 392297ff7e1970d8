"""Where ground truth meets a reconstruction: image similarity, pairing and label accuracy."""

from __future__ import annotations

from typing import Any

import torch

from .image import PSNR_VARIANT, SSIM_VARIANT, mse, psnr, ssim
from .matching import pair_by_mse


def score(truth_images: torch.Tensor, truth_labels: torch.Tensor | None, rec_images: torch.Tensor,
          rec_labels: torch.Tensor | None) -> dict[str, Any]:
    """Pair reconstructions to originals (Hungarian on MSE) and score each pair.

    Label accuracy compares the multiset of labels (order-free), since an attack recovers a batch's
    labels without knowing which image carries which.
    """
    truth_images = truth_images.detach().cpu().float()
    rec_images = rec_images.detach().cpu().float()
    if truth_images.shape != rec_images.shape:
        raise ValueError(f"truth has shape {tuple(truth_images.shape)}, reconstruction {tuple(rec_images.shape)}")
    perm = pair_by_mse(truth_images, rec_images) if len(truth_images) > 1 else [0]
    paired = rec_images[perm]
    p, s, m = psnr(truth_images, paired), ssim(truth_images, paired), mse(truth_images, paired)
    out: dict[str, Any] = {
        "metric_variants": {"psnr": PSNR_VARIANT, "ssim": SSIM_VARIANT,
                            "pairing": "Hungarian matching of reconstructions to originals on MSE"},
        "num_images": int(len(truth_images)),
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "mse": float(m.mean()),
        "per_image": [{"index": i, "paired_reconstruction": perm[i], "psnr": float(p[i]),
                       "ssim": float(s[i]), "mse": float(m[i])} for i in range(len(perm))],
    }
    if truth_labels is not None and rec_labels is not None:
        t = sorted(int(x) for x in truth_labels)
        r = sorted(int(x) for x in rec_labels)
        # multiset overlap / batch size
        from collections import Counter
        ct, cr = Counter(t), Counter(r)
        out["label_accuracy"] = sum(min(ct[k], cr[k]) for k in ct) / max(1, len(t))
    return out


__all__ = ["psnr", "ssim", "mse", "pair_by_mse", "score", "PSNR_VARIANT", "SSIM_VARIANT"]
