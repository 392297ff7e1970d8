"""Writing what an attack produced: reconstruction arrays, the picture, metrics. Every file atomically."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..attacks import Reconstruction
from ..capture import Truth
from ..files import atomic_path, write_text  # write_text: re-exported for the experiment layer
from ..metrics import score
from ..metrics.baseline import with_baseline
from ..figures.images import grid, save_png


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


def versions() -> dict[str, str]:
    import numpy
    import scipy
    return {"gradleak": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": platform.python_version()}


#: What metrics.json says about the attack's budget (from ``Reconstruction.summary()``).
BUDGET_KEYS = ("iterations", "seconds", "seconds_per_iteration", "converged", "pipeline")


def budget(summary: dict[str, Any]) -> dict[str, Any]:
    """The attack's budget and whether its loss had stopped falling, from ``Reconstruction.summary()``."""
    settings = summary.get("settings") or {}
    out = {k: summary.get(k) for k in BUDGET_KEYS}
    out["iteration_limit"] = settings.get("iterations")
    out["time_budget"] = settings.get("time_budget")
    out["restarts"] = settings.get("restarts")
    return out


def write_reconstruction(out: Path, rec: Reconstruction, truth: Truth | None = None,
                         extra: dict[str, Any] | None = None, guesses: dict[str, torch.Tensor] | None = None,
                         reference: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write ``reconstruction.npz``, ``reconstruction.png``, ``attack.json`` and, with truth, ``metrics.json``.

    When the attack's output was post-processed, ``reconstruction.npz`` also holds
    ``images_without_postprocessing``, the picture gets a row for them (originals, without, with), and
    ``metrics.json`` scores both (``without_postprocessing`` holds the second set). With ``guesses`` (the
    blind baseline of :mod:`gradleak.metrics.baseline`, drawn from the auxiliary data ``reference``
    describes) ``metrics.json`` also holds ``baseline`` and ``gain_over_baseline``, and ``baseline.npz``
    the guesses. ``metrics.json`` always records the attack's ``budget`` and whether it ``converged``.
    Returns the metrics (or None without truth).
    """
    out.mkdir(parents=True, exist_ok=True)
    raw = rec.extras.get("without_postprocessing")
    arrays = {"images": rec.images.numpy().astype(np.float32), "labels": rec.labels.numpy().astype(np.int64)}
    if raw is not None:
        arrays["images_without_postprocessing"] = raw.numpy().astype(np.float32)
    with atomic_path(out / "reconstruction.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    if guesses is not None:
        with atomic_path(out / "baseline.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, **{k: v.numpy().astype(np.float32) for k, v in guesses.items()})
    metrics = None
    if truth is not None:
        metrics = score(truth.images, truth.labels, rec.images, rec.labels)
        perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
        for p, pid, name in zip(metrics["per_image"], truth.patient_ids, truth.names):
            p["patient_id"], p["name"] = pid, name
        rows = [truth.images]
        if raw is not None:
            raw_metrics = score(truth.images, truth.labels, raw, rec.labels)
            rows.append(raw[[p["paired_reconstruction"] for p in raw_metrics["per_image"]]])
            metrics["without_postprocessing"] = {k: raw_metrics[k] for k in ("psnr", "ssim", "mse", "per_image")}
        rows.append(rec.images[perm])
        if guesses is not None:
            metrics = with_baseline(metrics, truth.images, guesses)
            metrics["baseline"]["auxiliary_data"] = reference or {}
            rows.append(guesses["mean_image"].expand_as(truth.images))
        picture = grid(rows)
    else:
        picture = grid([raw, rec.images] if raw is not None else [rec.images])
    save_png(picture, out / "reconstruction.png")
    summary = {**rec.summary(), "versions": versions(), **(extra or {})}
    write_json(out / "attack.json", summary)
    if metrics is not None:
        if guesses is None:
            metrics["baseline"] = None
            metrics["baseline_note"] = "no auxiliary data: the blind baseline was not measured"
        metrics = {**metrics, "threat_model": rec.threat_model, "attack": rec.attack,
                   "budget": budget(summary), "converged": summary.get("converged"),
                   **{k: v for k, v in (extra or {}).items() if k in ("bits", "obfuscation", "protocol", "truth",
                                                                       "prior", "observation", "model",
                                                                       "data_description")}}
        write_json(out / "metrics.json", metrics)
    return metrics
