"""``gradleak demo``: a curious server reconstructs four synthetic chest radiographs from one FedSGD update."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config
from .run import run_experiment

DEMO: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "data": {"source": "phantoms", "size": 64},
    "capture": {"arch": "lenet5", "batch_size": 4, "labels_known": False,
                "protocol": {"algorithm": "fedsgd"}},
    "attack": {"name": "inverting_gradients", "settings": {"iterations": 400, "restarts": 2}},
}


def table(metrics: dict[str, Any]) -> str:
    rows = [f"{'image':>5}  {'patient':<10} {'PSNR (dB)':>9}  {'SSIM':>6}"]
    for p in metrics["per_image"]:
        rows.append(f"{p['index']:>5}  {p.get('patient_id', ''):<10} {p['psnr']:>9.2f}  {p['ssim']:>6.3f}")
    rows.append(f"{'mean':>5}  {'':<10} {metrics['psnr']:>9.2f}  {metrics['ssim']:>6.3f}")
    return "\n".join(rows)


def demo(out_root: Path = Path("experiments"), iterations: int | None = None, quiet: bool = False) -> Path:
    user = {**DEMO, "output_dir": str(out_root)}
    if iterations is not None:
        user["attack"] = {**DEMO["attack"], "settings": {**DEMO["attack"]["settings"], "iterations": iterations}}
    cfg = config.from_dict(user, source="demo")
    print("gradleak demo: a curious server attacks one FedSGD update of 4 synthetic chest radiographs")
    print("(64 px, LeNet-5 at random initialisation, no obfuscation, labels inferred from the update)\n")
    folder, metrics = run_experiment(cfg, echo=None if quiet else print, progress=not quiet)
    tm = metrics["threat_model"]
    print("\nInverting Gradients, threat model: labels " + str(tm["labels"]) + ", obfuscation none, "
          + f"BatchNorm statistics: {tm['bn_statistics']}")
    print(table(metrics))
    print(f"label accuracy {metrics.get('label_accuracy', float('nan')):.2f}")
    print("PSNR: " + metrics["metric_variants"]["psnr"])
    print("SSIM: " + metrics["metric_variants"]["ssim"])
    print(f"\nfiles: {folder}/ (reconstruction.png: originals above reconstructions; metrics.json; config.yaml)")
    return folder
