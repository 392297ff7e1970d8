"""Prior gain benchmark: ROG with vs. without the learned post-processing prior on real chest X-rays.

Data: the Kaggle chest X-ray train split (``../shared/data/chest_xray``), 64 px. The split's patients are
divided in two: ``--images`` attacked images, one per patient, drawn with a fixed seed; the prior trains on
up to ``--train-images`` images of the OTHER patients (``gradleak.prior.train_prior`` with the attacked
patients as its exclusion list). The script proves the disjointness: it reads the patient list back from
the prior file's header and checks that no attacked patient is in it (and stops otherwise).

Victim: ``lenet5`` at random initialisation (seed 0), one client, FedSGD on B = 1, the update obfuscated as
listed. Attack: ROG (bicubic decoder, latent 16 x 16), ``--iterations`` steps, one restart, labels NOT given
(inferred by iDLG), obfuscation known to the attacker (obfuscation-aware objective), no BatchNorm.
The prior is applied to ROG's output exactly as ``gradleak attack --prior`` does
(``gradleak.attacks.apply_postprocessing``).

Metrics: PSNR (data range 1) and SSIM (Gaussian window, sigma 1.5, 11 x 11), means over the attacked images;
gain = with prior − without.

With ``--calibrate K`` the degradation model is first calibrated on ROG outputs for K images of the
prior's own training patients under each obfuscation (``gradleak.prior.calibrate``); by default the
built-in degradation settings are used.

    python benchmarks/prior_gain.py            # the default run (about 20 minutes on 2 shared cores)
    python benchmarks/prior_gain.py --quick    # a smoke run (fewer images, steps and iterations)
"""

from __future__ import annotations

import argparse
import os
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
from gradleak.prior import DEFAULT_DEGRADATION, Prior, calibrate, train_prior  # noqa: E402

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
    b = ds.batch([index])
    obs, bits = capture(b.images, b.labels, arch="lenet5", protocol=Protocol(), num_classes=2, model_seed=0,
                        labels_known=False, obfuscations=OBFUSCATIONS[obf][1], obfuscation_seed=SEED)
    t = time.perf_counter()
    rec = run_attack("rog", obs, {"iterations": iterations, "restarts": 1}, seed=SEED, progress=False)
    return {"obf": obf, "index": index, "rec": rec, "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ROG with vs. without the learned prior on real chest X-rays.")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"),
                   help="Kaggle chest X-ray folder (default ../shared/data/chest_xray); the train split is used")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=3, help="attacked images (one per patient) per obfuscation")
    p.add_argument("--train-images", type=int, default=2000, help="prior training images (other patients)")
    p.add_argument("--steps", type=int, default=1500, help="prior training steps")
    p.add_argument("--iterations", type=int, default=100, help="ROG iterations per attack")
    p.add_argument("--calibrate", type=int, default=0, metavar="K",
                   help="calibrate the degradation on ROG outputs of K prior-training images per obfuscation")
    p.add_argument("--obfuscations", nargs="+", default=list(OBFUSCATIONS), choices=list(OBFUSCATIONS))
    p.add_argument("--workers", type=int, default=2, help="attack worker processes")
    p.add_argument("--prior", default=None, help="prior file to write (default: a temporary file); reused "
                   "when it exists and its header passes the disjointness check")
    p.add_argument("--json", default=None, help="write the per-image results here")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 images, 300 steps, 40 iterations, "
                   "none and top-k only")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.steps, a.iterations, a.train_images = 2, 300, 40, 600
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

    pool = ProcessPoolExecutor(max_workers=a.workers)
    degradation = dict(DEFAULT_DEGRADATION)
    if a.calibrate:
        from gradleak.prior import select_images

        aux = select_images(ds.patient_ids, attacked_patients, limit=a.calibrate, seed=SEED + 1)[:a.calibrate]
        assert not {ds.patient_ids[i] for i in aux} & set(attacked_patients)
        outs = list(pool.map(attack_one, [(a.data, a.size, o, i, a.iterations) for o in a.obfuscations
                                          for i in aux]))
        per_obf = {}
        for o in a.obfuscations:
            recs = [r["rec"] for r in outs if r["obf"] == o]
            per_obf[o] = calibrate(ds.load(aux), torch.cat([r.images for r in recs]))
            print(f"calibration on {len(aux)} auxiliary images, {o}: {per_obf[o]}")
        for k in ("latent_noise", "contrast", "brightness", "pixel_noise"):
            degradation[k] = max(v[k] for v in per_obf.values())
        print(f"degradation (max over obfuscations): {degradation}")

    # the attacks do not depend on the prior: run them while the prior trains
    futures = [pool.submit(attack_one, (a.data, a.size, o, i, a.iterations)) for o in a.obfuscations
               for i in attacked]
    prior_path = Path(a.prior) if a.prior else Path(os.environ.get("TMPDIR", "/tmp")) / f"prior_gain_{os.getpid()}.safetensors"
    t1 = time.perf_counter()
    if not prior_path.exists():
        train_prior(ds, prior_path, size=a.size, exclude_patients=attacked_patients, limit=a.train_images,
                    degradation=degradation, steps=a.steps, seed=SEED, progress=False,
                    echo=print)
    train_s = time.perf_counter() - t1
    prior = Prior.load(prior_path)
    # proof of disjointness, read back from the prior file itself
    trained = set(prior.patients)
    overlap = trained & set(attacked_patients)
    print(f"prior: {prior_path.name}, {prior.header['training']['num_images']} images of {len(trained)} "
          f"patients, trained in {train_s:.0f}s; patients shared with the attacked ones: {len(overlap)}")
    prior.check_disjoint(attacked_patients)
    assert not overlap

    results = []
    for f in futures:
        r = f.result()
        truth = ds.batch([r["index"]])
        rec = apply_postprocessing(r["rec"], prior)
        m_raw = score(truth.images, truth.labels, rec.extras["without_postprocessing"], rec.labels)
        m = score(truth.images, truth.labels, rec.images, rec.labels)
        results.append({"obf": r["obf"], "index": r["index"], "patient": truth.patient_ids[0],
                        "psnr_raw": m_raw["psnr"], "ssim_raw": m_raw["ssim"], "psnr": m["psnr"],
                        "ssim": m["ssim"], "attack_s": r["seconds"]})
        print(f"  {r['obf']:<9} image {r['index']:>5}: PSNR {m_raw['psnr']:.2f} -> {m['psnr']:.2f} dB, "
              f"SSIM {m_raw['ssim']:.3f} -> {m['ssim']:.3f}", flush=True)
    pool.shutdown()
    if a.json:
        write_json(Path(a.json), {"args": vars(a), "degradation": degradation, "results": results})

    print(f"\nROG with vs. without the learned prior: {a.size} px chest X-rays (Kaggle train split), lenet5 "
          f"(random init), FedSGD B = 1, labels inferred (iDLG), obfuscation known to the attacker, "
          f"{a.iterations} ROG iterations, 1 restart; prior trained on {len(trained)} other patients "
          f"({a.steps} steps). Means over {len(attacked)} images. PSNR in dB (data range 1); SSIM Gaussian "
          f"window σ 1.5.\n")
    print("| obfuscation | PSNR without | PSNR with prior | PSNR gain | SSIM without | SSIM with prior | SSIM gain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in a.obfuscations:
        rs = [r for r in results if r["obf"] == o]
        pr, pp = np.mean([r["psnr_raw"] for r in rs]), np.mean([r["psnr"] for r in rs])
        sr, sp = np.mean([r["ssim_raw"] for r in rs]), np.mean([r["ssim"] for r in rs])
        print(f"| {OBFUSCATIONS[o][0]} | {pr:.2f} | {pp:.2f} | {pp - pr:+.2f} | {sr:.3f} | {sp:.3f} | {sp - sr:+.3f} |")
    print(f"\n(total {time.perf_counter() - t0:.0f}s on a shared machine)")
    if not a.prior:
        prior_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
