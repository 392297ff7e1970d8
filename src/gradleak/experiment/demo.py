"""``gradleak demo``: a curious server reconstructs four synthetic chest radiographs from one FedSGD update,
once without obfuscation and once under each of three common defences (QSGD, top-k, Gaussian noise)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from . import config
from .run import new_folder, run_experiment

DEMO: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "data": {"source": "phantoms", "size": 64},
    "capture": {"arch": "lenet5", "batch_size": 4, "labels_known": False,
                "protocol": {"algorithm": "fedsgd"}},
    "attack": {"name": "inverting_gradients", "settings": {"iterations": 200, "restarts": 2}},
}

#: (folder, obfuscation list, what the row says). The same images, model and attack seed in every cell.
OBFUSCATIONS: list[tuple[str, list[dict[str, Any]], str]] = [
    ("none", [], "none"),
    ("qsgd", [{"name": "qsgd", "levels": 16}], "qsgd, 16 levels (max-norm)"),
    ("topk", [{"name": "topk", "keep": 0.1}], "topk, keep 10 %"),
    ("gaussian", [{"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.001}],
     "gaussian, clip 1, sigma 0.001"),
]


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'obfuscation':<30} {'PSNR (dB)':>9}  {'SSIM':>6}  {'bits/update':>12}  {'vs 32-bit':>9}  threat model"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<30} {r['psnr']:>9.2f}  {r['ssim']:>6.3f}  {r['bits']:>12,d}  "
                     f"{r['ratio']:>8.1f}x  {r['threat']}")
    return "\n".join(lines)


def _threat(tm: dict[str, Any]) -> str:
    known = tm.get("obfuscation_known")
    obf = "no obfuscation" if known is None else ("obfuscation known" if known else "obfuscation unknown to attack")
    return f"labels {tm['labels']}, {obf}, BN: {tm['bn_statistics']}"


def demo(out_root: Path = Path("experiments"), iterations: int | None = None, quiet: bool = False) -> Path:
    """Run the demo cells into ``out_root/demo-<timestamp>/<obfuscation>/`` and print one row per cell."""
    root = new_folder(Path(out_root), "demo")
    root.mkdir(parents=True)
    settings = {**DEMO["attack"]["settings"], **({"iterations": iterations} if iterations is not None else {})}
    print("gradleak demo: a curious server attacks one FedSGD update of 4 synthetic chest radiographs")
    print(f"(64 px, LeNet-5 at random initialisation, labels inferred from the update), Inverting Gradients "
          f"with {settings['iterations']} iterations x {settings['restarts']} restarts, once per obfuscation\n")
    rows = []
    for folder, obfuscation, label in OBFUSCATIONS:
        user = copy.deepcopy(DEMO)
        user["name"] = f"demo-{folder}"
        user["output_dir"] = str(root)
        user["capture"]["obfuscation"] = obfuscation
        user["attack"]["settings"] = settings
        cfg = config.from_dict(user, source="demo")
        if not quiet:
            print(f"--- {label}")
        cell, metrics = run_experiment(cfg, echo=None if quiet else print, progress=not quiet, folder=root / folder)
        dense = 32 * _entries(cell)
        rows.append({"label": label, "psnr": metrics["psnr"], "ssim": metrics["ssim"], "bits": int(metrics["bits"]),
                     "ratio": dense / max(1, int(metrics["bits"])), "threat": _threat(metrics["threat_model"]),
                     "label_accuracy": metrics.get("label_accuracy")})
    print("\nInverting Gradients on the same 4 images under each obfuscation (mean over images):")
    print(table(rows))
    print("PSNR: data range 1, mean over images; SSIM: Gaussian window sigma=1.5, 11x11 (Wang et al. 2004); "
          "reconstructions paired to originals by Hungarian matching on MSE")
    print("bits/update: what one client sends (32 bits per entry unobfuscated; QSGD: the paper's Elias code; "
          "top-k: values + indices)")
    print(f"\nfiles: {root}/<obfuscation>/ (reconstruction.png: originals above reconstructions; metrics.json; "
          "config.yaml; observation.pt)")
    return root


def _entries(cell: Path) -> int:
    from .. import observation

    return sum(int(v.numel()) for v in observation.load(cell / "observation.pt").update.values())
