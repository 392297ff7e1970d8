"""Prior gain benchmark: ROG with vs. without the learned post-processing prior on real chest X-rays.

Data: the Kaggle chest X-ray train split (``../shared/data/chest_xray``), 64 px. The split's patients are
divided in two: ``--images`` attacked images, one per patient, drawn with a fixed seed; the priors train
on up to ``--train-images`` images of the OTHER patients (``gradleak.prior.train_prior`` with the attacked
patients as its exclusion list). The script proves the disjointness: it reads the patient list back from
each prior file's header and checks that no attacked patient is in it (and stops otherwise).

Victim: ``lenet5`` at random initialisation (seed 0), one client, FedSGD on B = 1, the update obfuscated as
listed. Attack: ROG (bicubic decoder, latent 16 x 16), ``--iterations`` steps, one restart, labels NOT given
(inferred by iDLG), obfuscation known to the attacker (obfuscation-aware objective), no BatchNorm.
Each prior is applied to ROG's output exactly as ``gradleak attack --prior`` does
(``gradleak.attacks.apply_postprocessing``).

Two priors per obfuscation are compared:

- **default**: one prior for every defence, trained with the built-in degradation settings;
- **calibrated** (the attacker knows the obfuscation): its degradation fitted to ROG outputs for
  ``--calibrate`` auxiliary images (other patients again) captured exactly as the attacked observation
  (``gradleak.experiment.calibrate.calibrate_like``, what ``gradleak prior train --calibrate-like OBS`` does).

Metrics: PSNR (data range 1) and SSIM (Gaussian window, sigma 1.5, 11 x 11), means over the attacked images;
gain = with prior − without.

    python benchmarks/prior_gain.py            # the default run (about 25 minutes on 2 shared cores)
    python benchmarks/prior_gain.py --quick    # a smoke run (fewer images, steps and iterations)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradleak.attacks import apply_postprocessing, run_attack  # noqa: E402
from gradleak.capture import capture  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.experiment.outputs import write_json  # noqa: E402
from gradleak.federated import Protocol  # noqa: E402
from gradleak.metrics import score  # noqa: E402
from gradleak.experiment.calibrate import calibrate_like  # noqa: E402
from gradleak.prior import DEFAULT_DEGRADATION, Prior, train_prior  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402

OBFUSCATIONS: dict[str, tuple[str, list[dict]]] = {
    "none": ("none", []),
    "qsgd16": ("QSGD 16 levels", [{"name": "qsgd", "levels": 16}]),
    "topk1": ("top-k 1 %", [{"name": "topk", "keep": 0.01}]),
    "gaussian": ("Gaussian noise (clip 1, σ 0.01)", [{"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.01}]),
}
SEED = 0


def _dataset(path: str, size: int):
    return load_dataset({"source": "kaggle", "path": path, "split": "train", "size": size})


def draw_attacked(patient_ids: list[str], count: int, seed: int = SEED) -> list[int]:
    """``count`` images of distinct patients, drawn with ``seed`` (the first image of each patient)."""
    first: dict[str, int] = {}
    for i, p in enumerate(patient_ids):
        first.setdefault(p, i)
    order = sorted(first)
    perm = np.random.default_rng(seed).permutation(len(order))[:count]
    return sorted(first[order[j]] for j in perm)


def attack_one(task: tuple) -> dict:
    """Capture one image's update under one obfuscation and run ROG on it (in a worker process)."""
    data, size, obf, index, iterations = task
    torch.set_num_threads(1)
    ds = _dataset(data, size)
    obs = _observe(ds, obf, index)
    t = time.perf_counter()
    rec = run_attack("rog", obs, {"iterations": iterations, "restarts": 1}, seed=SEED, progress=False)
    return {"obf": obf, "index": index, "rec": rec, "seconds": time.perf_counter() - t}


def _observe(ds, obf: str, index: int):
    b = ds.batch([index])
    obs, _ = capture(b.images, b.labels, arch="lenet5", protocol=Protocol(), num_classes=2, model_seed=0,
                     labels_known=False, obfuscations=OBFUSCATIONS[obf][1], obfuscation_seed=SEED)
    return obs


def prior_for(task: tuple) -> dict:
    """Calibrate (for ``obf``; None: the built-in settings) and train one prior (in a worker process)."""
    data, size, obf, index, attacked_patients, k, iterations, train_kw, path = task
    torch.set_num_threads(1)
    ds = _dataset(data, size)
    t = time.perf_counter()
    degradation, calibration = dict(DEFAULT_DEGRADATION), None
    if obf is not None:
        fit = calibrate_like(_observe(ds, obf, index), ds, exclude_patients=attacked_patients, images=k,
                             attack_settings={"iterations": iterations}, seed=SEED + 1)
        degradation, calibration = fit["degradation"], fit["calibration"]
    if not Path(path).exists():
        train_prior(ds, path, size=size, exclude_patients=attacked_patients, degradation=degradation,
                    calibration=calibration, seed=SEED, progress=False, **train_kw)
    return {"obf": obf, "path": path, "degradation": degradation, "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ROG with vs. without the learned prior on real chest X-rays.")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"),
                   help="Kaggle chest X-ray folder (default ../shared/data/chest_xray); the train split is used")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=3, help="attacked images (one per patient) per obfuscation")
    p.add_argument("--train-images", type=int, default=2000, help="prior training images (other patients)")
    p.add_argument("--steps", type=int, default=1500, help="prior training steps")
    p.add_argument("--width", type=int, default=16, help="prior network width")
    p.add_argument("--loss", choices=["l1", "l2"], default="l2", help="prior training loss")
    p.add_argument("--iterations", type=int, default=100, help="ROG iterations per attack (and calibration attack)")
    p.add_argument("--calibrate", type=int, default=4, metavar="K",
                   help="auxiliary images per obfuscation for the calibrated priors (0: default prior only)")
    p.add_argument("--obfuscations", nargs="+", default=list(OBFUSCATIONS), choices=list(OBFUSCATIONS))
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--prior-dir", default=None, help="folder for the prior files (default: a temporary one); "
                   "files already there are reused when their header passes the disjointness check")
    p.add_argument("--json", default=None, help="write the per-image results here")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 images, 300 steps, 40 iterations, "
                   "none and top-k only, 1 calibration image")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.steps, a.iterations, a.train_images, a.calibrate = 2, 300, 40, 600, min(a.calibrate, 1)
        a.obfuscations = [o for o in a.obfuscations if o in ("none", "topk1")] or a.obfuscations
    if not Path(a.data).is_dir():
        print(f"chest X-ray folder not found: {a.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = _dataset(a.data, a.size)
    attacked = draw_attacked(ds.patient_ids, a.images)
    attacked_patients = sorted({ds.patient_ids[i] for i in attacked})
    print(f"attacked: {len(attacked)} images of {len(attacked_patients)} patients of the train split "
          f"(indices {attacked})")
    tmp = None
    if a.prior_dir:
        prior_dir = Path(a.prior_dir)
        prior_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="prior_gain_")
        prior_dir = Path(tmp.name)
    train_kw = {"limit": a.train_images, "steps": a.steps, "width": a.width, "loss": a.loss}
    tag = f"{a.size}px_w{a.width}_{a.steps}_{a.loss}_n{a.train_images}"
    kinds = [None] + ([o for o in a.obfuscations] if a.calibrate else [])
    pool = ProcessPoolExecutor(max_workers=a.workers)
    # the priors (calibration attacks + training) first: they are the long tasks
    prior_futures = [pool.submit(prior_for, (a.data, a.size, o, attacked[0], attacked_patients, a.calibrate,
                                             a.iterations, train_kw,
                                             str(prior_dir / f"{o or 'default'}_k{a.calibrate}_{tag}.safetensors")))
                     for o in kinds]
    futures = [pool.submit(attack_one, (a.data, a.size, o, i, a.iterations)) for o in a.obfuscations
               for i in attacked]
    priors = {}
    for f in prior_futures:
        r = f.result()
        prior = Prior.load(r["path"])
        trained = set(prior.patients)
        overlap = trained & set(attacked_patients)
        cal = prior.header["training"].get("calibration")
        print(f"prior {r['obf'] or 'default'}: {prior.header['training']['num_images']} images of {len(trained)} "
              f"patients ({r['seconds']:.0f}s); patients shared with the attacked ones: {len(overlap)}; "
              f"degradation {r['degradation']}"
              + (f"; calibrated on {cal['images']} images of other patients" if cal else ""), flush=True)
        prior.check_disjoint(attacked_patients)
        assert not overlap
        if cal:
            assert not set(cal["patients"]) & set(attacked_patients)
        priors[r["obf"]] = prior

    results = []
    for f in futures:
        r = f.result()
        truth = ds.batch([r["index"]])
        row = {"obf": r["obf"], "index": r["index"], "patient": truth.patient_ids[0], "attack_s": r["seconds"]}
        for kind, prior in (("default", priors[None]), ("calibrated", priors.get(r["obf"]))):
            if prior is None:
                continue
            rec = apply_postprocessing(dataclasses.replace(r["rec"], extras=dict(r["rec"].extras),
                                                           threat_model=dict(r["rec"].threat_model)), prior)
            m_raw = score(truth.images, truth.labels, rec.extras["without_postprocessing"], rec.labels)
            m = score(truth.images, truth.labels, rec.images, rec.labels)
            row.update({"psnr_raw": m_raw["psnr"], "ssim_raw": m_raw["ssim"], f"psnr_{kind}": m["psnr"],
                        f"ssim_{kind}": m["ssim"]})
        results.append(row)
        print(f"  {r['obf']:<9} image {r['index']:>5}: PSNR {row['psnr_raw']:.2f} -> default "
              f"{row['psnr_default']:.2f}" + (f", calibrated {row['psnr_calibrated']:.2f}" if "psnr_calibrated" in row
                                               else "") + " dB", flush=True)
    pool.shutdown()
    if a.json:
        write_json(Path(a.json), {"args": vars(a), "results": results,
                                  "degradation": {k or "default": v.header["degradation"] for k, v in priors.items()}})

    print(f"\nROG with vs. without the learned prior: {a.size} px chest X-rays (Kaggle train split), lenet5 "
          f"(random init), FedSGD B = 1, labels inferred (iDLG), obfuscation known to the attacker, "
          f"{a.iterations} ROG iterations, 1 restart; priors (width {a.width}, {a.steps} steps, {a.loss.upper()} "
          f"loss) trained on up to {a.train_images} images of other patients; calibrated priors fitted on "
          f"{a.calibrate} auxiliary images each. Means over {len(attacked)} images. PSNR in dB (data range 1); "
          f"SSIM Gaussian window σ 1.5.\n")
    print("| obfuscation | PSNR without | default prior | gain | calibrated prior | gain | SSIM without | "
          "SSIM calibrated | SSIM gain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in a.obfuscations:
        rs = [r for r in results if r["obf"] == o]
        pr, pd = np.mean([r["psnr_raw"] for r in rs]), np.mean([r["psnr_default"] for r in rs])
        sr = np.mean([r["ssim_raw"] for r in rs])
        if "psnr_calibrated" in rs[0]:
            pc, sc = np.mean([r["psnr_calibrated"] for r in rs]), np.mean([r["ssim_calibrated"] for r in rs])
            cal = f"{pc:.2f} | {pc - pr:+.2f} | {sr:.3f} | {sc:.3f} | {sc - sr:+.3f}"
        else:
            cal = f"– | – | {sr:.3f} | – | –"
        print(f"| {OBFUSCATIONS[o][0]} | {pr:.2f} | {pd:.2f} | {pd - pr:+.2f} | {cal} |")
    print(f"\n(total {time.perf_counter() - t0:.0f}s on a shared machine)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "prior_gain.py"))
