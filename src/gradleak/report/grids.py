"""The report's image grids: the originals, the blind baseline and the reconstruction under each defence,
image above image, each image at least :data:`TILE` px on screen. Returned as plain rows (a title, a note
and the picture as a data URI) for the template."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..experiment.store import read_metrics
from .plots import data_uri, image_png
from .summary import Group, fmt, mean

#: Size of one image in the report's grids, in CSS pixels (never shrunk by the page).
TILE = 128

Pair = tuple[str, str]  # (setting label, attack)
Sample = dict[Pair, tuple[Path, Path]]  # the (result folder, truth file) of each pair that attacked a sample


def _truth_path(folder: Path, row: dict[str, Any]) -> Path | None:
    """The truth file of a result folder: its own ``truth.npz`` (experiments, sweep cells) or the file
    ``gradleak attack --truth`` read (recorded in metrics.json)."""
    if (folder / "truth.npz").is_file():
        return folder / "truth.npz"
    t = row.get("_truth")
    for cand in ([Path(t), folder / t] if t else []):
        if cand.is_file():
            return cand
    return None


def _picture(images, alt: str, pad: int = 3) -> dict[str, Any]:
    from ..figures.images import grid

    pic = grid([images], tile=TILE, pad=pad)
    w, h = pic.size
    return {"alt": alt, "width": w, "height": h, "src": data_uri(image_png(pic))}


def _samples(groups: list[Group]) -> tuple[dict[str, Sample], list[tuple[str, str, Path]]]:
    """The attacked samples (truth files) with the pairs that attacked them, and the reconstructions whose
    truth file is gone (setting label, attack, folder)."""
    by_sample: dict[str, Sample] = OrderedDict()
    unpaired: list[tuple[str, str, Path]] = []
    for g in groups:
        for attack, rows in g.by_attack.items():
            for r in rows:
                folder = Path(r.get("_folder", ""))
                if not (folder / "reconstruction.npz").is_file():
                    continue
                t = _truth_path(folder, r)
                if t is None:
                    unpaired.append((g.label, attack, folder))
                    continue
                with np.load(t) as z:
                    key = json.dumps([z["indices"].tolist() if "indices" in z else [],
                                      r.get("config", {}).get("data"), str(t) if "indices" not in z else ""],
                                     default=str)
                by_sample.setdefault(key, {}).setdefault((g.label, attack), (folder, t))
    return by_sample, unpaired


def _unpaired_rows(unpaired: list[tuple[str, str, Path]], max_images: int) -> list[dict[str, Any]]:
    import torch

    out = []
    for label, attack, folder in unpaired:
        with np.load(folder / "reconstruction.npz") as z:
            rec = torch.from_numpy(z["images"])[:max_images]
        out.append({"title": label, "note": attack,
                    "picture": _picture(rec, f"reconstruction under {label} by {attack}")})
    return out


def _choose(by_sample: dict[str, Sample], max_images: int) -> list[Sample]:
    """The samples every pair attacked, up to ``max_images`` images."""
    most = max(len(v) for v in by_sample.values())
    chosen, count = [], 0
    for v in by_sample.values():
        if len(v) == most and count < max_images:
            chosen.append(v)
            with np.load(next(iter(v.values()))[1]) as z:
                count += len(z["images"])
    return chosen


def _originals_row(chosen: list[Sample], max_images: int) -> tuple[dict[str, Any], int]:
    import torch

    originals, pids = [], []
    for v in chosen:
        with np.load(next(iter(v.values()))[1]) as z:
            originals.append(torch.from_numpy(z["images"]))
            pids += [str(p) for p in z["patient_ids"]] if "patient_ids" in z else [""] * len(z["images"])
    images = torch.cat(originals)[:max_images]
    return ({"title": "Originals", "note": "patients " + ", ".join(pids[:max_images]),
             "picture": _picture(images, "original images")}, len(images))


def _baseline_row(chosen: list[Sample], n0: int, max_images: int) -> dict[str, Any] | None:
    """The blind baseline, the guess without the update, as scored against the originals shown."""
    import torch

    images, ps, ss = [], [], []
    for v in chosen:
        folder, _ = next(iter(v.values()))
        m = read_metrics(folder / "metrics.json")
        if not (folder / "baseline.npz").is_file() or not isinstance(m.get("baseline"), dict):
            return None
        with np.load(folder / "baseline.npz") as z:
            mean_img = torch.from_numpy(z["mean_image"])
        k = int(m.get("num_images") or len(m.get("per_image") or []))
        images.append(mean_img.expand(k, *mean_img.shape[1:]))
        ps += [p.get("baseline_psnr") for p in m.get("per_image", [])]
        ss += [p.get("baseline_ssim") for p in m.get("per_image", [])]
    aux = (read_metrics(next(iter(chosen[0].values()))[0] / "metrics.json").get("baseline") or {}).get(
        "auxiliary_data") or {}
    what = (f"the mean of {aux['images']} auxiliary images of patients not attacked" if aux.get("images")
            else "the mean auxiliary image")
    psnr, ssim = mean(ps[:n0]), mean(ss[:n0])
    return {"title": "Blind baseline",
            "note": (f"the attacker's guess without the update: {what}; PSNR {fmt(psnr, '.1f')} dB, SSIM "
                     f"{fmt(ssim)} against these originals"),
            "picture": _picture(torch.cat(images)[:max_images], "blind baseline")}


def _reconstruction_row(chosen: list[Sample], pair: Pair, max_images: int) -> dict[str, Any]:
    """One pair's reconstructions, each paired with its original, and their mean scores."""
    import torch

    label, attack = pair
    recs, ps, ss, gs = [], [], [], []
    for v in chosen:
        folder, _ = v[pair]
        m = read_metrics(folder / "metrics.json")
        perm = [p["paired_reconstruction"] for p in m["per_image"]]
        with np.load(folder / "reconstruction.npz") as z:
            recs.append(torch.from_numpy(z["images"])[perm])
        ps += [p["psnr"] for p in m["per_image"]]
        ss += [p["ssim"] for p in m["per_image"]]
        gs += [p.get("gain_ssim") for p in m["per_image"]]
    rec = torch.cat(recs)[:max_images]
    n = len(rec)
    psnr, ssim, gain = mean(ps[:n]), mean(ss[:n]), mean(gs[:n])
    return {"title": label,
            "note": (f"{attack}: PSNR {fmt(psnr, '.1f')} dB, SSIM {fmt(ssim)}"
                     + (f" ({gain:+.2f} over the blind baseline)" if gain is not None else "") + f" on these {n}"),
            "picture": _picture(rec, f"reconstruction under {label} by {attack}")}


def image_grids(groups: list[Group], max_images: int = 8) -> dict[str, Any]:
    """``kind``: ``paired`` (originals, baseline, reconstructions), ``unpaired`` (the truth file has moved:
    reconstructions alone) or ``none``; ``rows``: each with a ``title``, a ``note`` and a ``picture``."""
    by_sample, unpaired = _samples(groups)
    if not by_sample:
        return {"kind": "unpaired" if unpaired else "none", "rows": _unpaired_rows(unpaired, max_images)}
    chosen = _choose(by_sample, max_images)
    originals, n0 = _originals_row(chosen, max_images)
    baseline = _baseline_row(chosen, n0, max_images)
    rows = [originals] + ([baseline] if baseline else [])
    rows += [_reconstruction_row(chosen, pair, max_images) for pair in chosen[0]]
    return {"kind": "paired", "rows": rows}
