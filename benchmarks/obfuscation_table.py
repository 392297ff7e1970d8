"""Inverting Gradients under each obfuscation, on real chest X-rays: PSNR, SSIM and bits per update.

One FedSGD update of 4 images from the Kaggle train split in ../shared/data (64 px, lenet5 at random
initialisation, labels inferred by the attack) is captured once with the real CLI; each defence is then
applied to that observation with ``gradleak obfuscate`` (same clean update, seed 0) and attacked with
``gradleak attack`` (the default Inverting Gradients preset with a fixed iteration count). Prints a
Markdown table. The attack does not use its knowledge of the obfuscation (plain IG).

    python benchmarks/obfuscation_table.py ITERATIONS [--out DIR] [--seed S] [--restarts R]

Metrics: PSNR (data range 1) and SSIM (Gaussian window sigma=1.5, 11x11), mean over the 4 images after
Hungarian pairing; bits/update as gradleak's obfuscations report it (32 bits/entry unobfuscated, QSGD's
Elias code, top-k values + indices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"

DEFENCES = [
    ("none", []),
    ("qsgd 16 levels", ["qsgd:levels=16"]),
    ("qsgd 4 levels", ["qsgd:levels=4"]),
    ("uniform 8-bit", ["uniform:bits=8"]),
    ("sign", ["sign"]),
    ("topk 10 %", ["topk:keep=0.1"]),
    ("topk 1 %", ["topk:keep=0.01"]),
    ("gaussian, relative sigma0=0.1 (NVFlare)", ["relative_gaussian:sigma0=0.1"]),
]


def gradleak(*args: object) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "gradleak.cli", *map(str, args)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"gradleak {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("iterations", type=int, help="Inverting Gradients iterations per defence")
    ap.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="batch choice, obfuscation and attack seed")
    ap.add_argument("--restarts", type=int, default=None, help="override the preset's restarts")
    a = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA} (see ../shared/data/README.md)")
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="obfuscation_table."))
    work.mkdir(parents=True, exist_ok=True)
    obs = work / "capture" / "obs.pt"
    truth = work / "capture" / "truth.npz"
    gradleak("capture", "--data", f"kaggle:{DATA},split=train", "--size", 64, "--batch-size", 4,
             "--seed", a.seed, "--arch", "lenet5", "--algorithm", "fedsgd", "--out", obs)
    rows = []
    for label, specs in DEFENCES:
        slug = label.split(",")[0].replace(" ", "_").replace("%", "pct")
        target = obs
        if specs:
            target = work / slug / "obs.pt"
            args = [x for s in specs for x in ("--spec", s)]
            gradleak("obfuscate", "--observation", obs, *args, "--out", target, "--seed", a.seed)
        extra = ["--restarts", a.restarts] if a.restarts else []
        t0 = time.perf_counter()
        gradleak("attack", "--observation", target, "--attack", "inverting_gradients", "--out", work / slug / "ig",
                 "--truth", truth, "--iterations", a.iterations, "--seed", a.seed, "--quiet", *extra)
        seconds = time.perf_counter() - t0
        m = json.loads((work / slug / "ig" / "metrics.json").read_text())
        import torch
        raw = torch.load(target, weights_only=True)
        entries = sum(v.numel() for v in raw["update"].values())
        bits = raw["obfuscation"][-1]["update_bits"] if raw["obfuscation"] else 32 * entries
        rows.append((label, m["psnr"], m["ssim"], bits, bits / entries, m.get("label_accuracy"), seconds,
                     m["threat_model"]))
        print(f"{label}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f} ({seconds:.0f}s)", file=sys.stderr)
    restarts = a.restarts or "preset (4)"
    print(f"Inverting Gradients ({a.iterations} iterations, restarts {restarts}, seed {a.seed}) on 4 Kaggle "
          f"train X-rays, 64 px, lenet5 random init, FedSGD, B=4; labels inferred (count-based); attack not "
          f"told the obfuscation; no BatchNorm.\n")
    print("| obfuscation | PSNR (dB) | SSIM | bits/update | bits/entry | label acc. |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, psnr, ssim, bits, per, acc, _, _ in rows:
        print(f"| {label} | {psnr:.2f} | {ssim:.3f} | {bits:,} | {per:.3f} | "
              f"{'' if acc is None else f'{acc:.2f}'} |")
    print(f"\nfiles: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
