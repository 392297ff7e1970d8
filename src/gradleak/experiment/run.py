"""One experiment cell: data -> capture -> Observation file -> attack -> metrics, in one folder.

The attack is run on the Observation *file* it reads back, exactly as ``gradleak attack`` would, so the
cell exercises the same seam as an audit of a real deployment.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import observation
from ..attacks import canonical, run_attack
from ..capture import capture_batch
from ..data import load_dataset
from ..errors import UserError
from ..federated import Protocol
from ..logs import recording
from .config import dump
from .outputs import versions, write_json, write_reconstruction, write_text
from .reference import blind_baseline, measure_reid, reference_summary

log = logging.getLogger(__name__)


def new_folder(root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{name}-{stamp}"
    k = 1
    while folder.exists() or (root / f".{folder.name}.partial").exists():
        k += 1
        folder = root / f"{name}-{stamp}-{k}"
    return folder


def run_cell(cfg: dict[str, Any], folder: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` and write everything into ``folder`` (which must exist). Returns the metrics."""
    cap = cfg["capture"]
    proto = Protocol(**cap["protocol"])
    captured = capture_batch(cfg["data"], protocol=proto, indices=cap["indices"], batch_size=cap["batch_size"],
                             seed=cfg["seed"], size=cfg["data"].get("size"), arch=cap["arch"],
                             num_classes=cap["num_classes"], options=cap["options"], model_state=cap["model_state"],
                             model_seed=cap["model_seed"], labels_known=cap["labels_known"],
                             obfuscations=cap["obfuscation"], mean=cap["mean"], std=cap["std"],
                             where="the config's capture section and data")
    obs, truth, bits, ds = captured.observation, captured.truth, captured.bits, captured.dataset
    idx = truth.indices
    log.info(f"data: {ds.describe().get('source')} ({len(ds)} images), batch {idx}")
    if cap["model_state"]:
        log.info(f"victim model: {cap['model_state']} (after round {obs.meta['model_round']})")
    captured.save(folder / "observation.pt", folder / "truth.npz")
    log.info(f"capture: {obs.model['arch']}, {proto.algorithm}, B={len(idx)}"
        + (f" ({proto.num_clients_averaged} clients averaged)" if proto.num_clients_averaged > 1 else "")
        + ", obfuscation "
        f"{[o['name'] for o in obs.obfuscation] or 'none'}, {bits} bits")

    attack_cfg = cfg["attack"]
    seen = observation.load(folder / "observation.pt")
    name = canonical(attack_cfg["name"])
    prior = None
    if attack_cfg.get("prior"):
        from ..prior import Prior

        prior = Prior.load(attack_cfg["prior"], device=attack_cfg["device"])
        prior.check_images(seen.image_shape)
        prior.check_disjoint(truth.patient_ids)  # the threat model: no attacked patient trained the prior
        log.info(f"post-processing: {prior.name}, {len(prior.patients)} training patients, none attacked here")
    log.info(f"attack: {name} on {attack_cfg['device']}")
    rec = run_attack(name, seen, attack_cfg["settings"], seed=cfg["seed"], device=attack_cfg["device"],
                     progress=progress, postprocess=prior)
    conv = {True: "converged", False: "still improving when the budget ended", None: "too few iterations to "
            "judge convergence"}[rec.converged]
    log.info(f"attack done: {rec.iterations} iterations in {rec.seconds:.1f}s, loss {rec.loss:.4g} ({conv})")
    try:
        guesses, aux = blind_baseline(ds, truth, seed=cfg["seed"])
        log.info(f"blind baseline: mean of {aux['images']} auxiliary images of {aux['patients']} patients "
            f"(the {aux['excluded_patients']} attacked patients excluded)")
    except UserError as e:  # e.g. a data set of the attacked patients only: scored without a baseline
        guesses, aux = None, None
        log.info(f"blind baseline not measured: {e}")
    metrics = write_reconstruction(folder, rec, truth, extra={"bits": bits, "obfuscation": obs.obfuscation,
                                                              "protocol": obs.protocol.header()},
                                   guesses=guesses, reference=aux)
    if "without_postprocessing" in metrics:
        raw = metrics["without_postprocessing"]
        log.info(f"without post-processing: PSNR {raw['psnr']:.2f} dB, SSIM {raw['ssim']:.4f}")
    log.info(f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
        f"label accuracy {metrics.get('label_accuracy', float('nan')):.2f}")
    reference_summary(metrics)
    return metrics


def add_reid(folder: Path, cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Patient re-identification (leave-the-image-out, pixel MSE and SSIM rankings) of a finished cell
    against an identified gallery of its data set; rewrites ``metrics.json`` with ``reid``."""
    import torch

    from ..capture import load_truth

    truth = load_truth(folder / "truth.npz")
    with np.load(folder / "reconstruction.npz") as z:
        rec = torch.from_numpy(z["images"])
    perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
    ds = load_dataset(cfg["data"])
    reid = measure_reid(rec[perm], truth, ds, seed=cfg["seed"])
    metrics = {**metrics, "reid": reid}
    write_json(folder / "metrics.json", metrics)
    s = reid.get("strongest")
    if s:
        log.info(f"patient re-identification (leave-the-image-out, {s['distance']}): top-1 {s['top1_hits']}/{s['n']}, "
            f"top-5 {s.get('top5_hits')}/{s['n']} (chance {reid.get('chance_top1') or 0:.3f} / "
            f"{reid.get('chance_top5') or 0:.3f}); exact image (IIP) {s['iip_hits']}/{s['iip_n']}")
    else:
        log.info(f"patient re-identification: {reid.get('note', 'not measured')}")
    return metrics


def run_experiment(cfg: dict[str, Any], *, progress: bool = True, folder: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run one experiment into ``experiments/<name>-<timestamp>/`` (or ``folder``).

    Files are written into a hidden ``.partial`` folder renamed into place at the end, so a failed run
    leaves nothing behind.
    """
    root = Path(cfg["output_dir"])
    final = folder or new_folder(root, cfg["name"])
    if final.exists():
        raise UserError(f"output folder already exists: {final}")
    partial = final.parent / f".{final.name}.partial"
    partial.mkdir(parents=True, exist_ok=False)
    try:
        with recording() as rec:
            write_text(partial / "config.yaml", dump(cfg))
            metrics = run_cell(cfg, partial, progress=progress)
            metrics = add_reid(partial, cfg, metrics)
        write_json(partial / "versions.json", versions())
        write_text(partial / "log.txt", rec.text())
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final, metrics
