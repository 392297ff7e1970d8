"""Leakage benchmark: how much of real chest X-rays each attack recovers under each obfuscation.

Victim: real images from the Kaggle chest X-ray train split (``../shared/data/chest_xray``, resized to
64 px), ``lenet5`` at random initialisation (seed 0), one client, FedSGD on B = 1 and B = 4 images, the
update obfuscated as listed (the ``fedavg5`` column is instead FedAvg with 5 full-batch local SGD steps
of learning rate 0.1, or ``--fedavg-lr``, no obfuscation). The obfuscation noise and the attack use fixed
seeds; every cell gets the same wall-clock budget per observation (``--time-budget``) and iteration cap.

Threat model: an honest-but-curious server that knows the architecture and the weights it sent; labels
are NOT given (inferred from the update: iDLG for B = 1, count-based for B = 4, or optimised jointly by
DLG); no BatchNorm in the victim. "plain IG" is Inverting Gradients unaware of the obfuscation (plain
cosine against the received update, a FedAvg delta read as one gradient step); every other row knows
the obfuscation (obfuscation-aware objective, FedAvg unrolled).

Metrics: PSNR (data range 1) and SSIM (Gaussian window, sigma 1.5), means over the images, after
Hungarian pairing of reconstructions to originals for B = 4; label accuracy as a multiset overlap.
Patient re-identification, as ``gradleak run`` measures it: each paired reconstruction ranks an
identified gallery (every image of the attacked patients plus a seeded sample of other patients' images,
256 in all) by MSE and by SSIM; top-1 counts the reconstructions whose nearest gallery image, with the
attacked image itself left out, is another image of the same patient (among those whose patient has
one; "–" where no attacked patient has another image); IIP (Yin et al. 2021) those whose nearest
gallery image of the same label is the attacked image itself. Top-1 is the distance's that
re-identified more patients, IIP the distance's that identified more images; the blind baseline is
ranked the same way.

``--clients K`` makes each observation K clients' (secure aggregation): each client computes and obfuscates
its own update on its own images (one, or ``--batch-size``), and the server sees only the mean of the K
updates, which holds K times as many images. The draw is one client's extended, so 4 clients of 4 images
hold the images of one client's batch of 16.

    python benchmarks/leakage.py --split report --images 0 --batches 1 --batch-size 4 --clients 4 \
        --time-budget 240 --attacks auto ig_plain rog --obfuscations none qsgd16

Images are drawn from the train split only, with two disjoint seeded draws: ``--split tune`` (for
choosing hyper-parameters) and ``--split report`` (for reporting). Never tune on the report draw.

    python benchmarks/leakage.py --split report --images 2 --batches 1 --time-budget 60

The ``rog_prior`` row is ROG followed by its learned post-processing prior (``gradleak attack --prior``),
from the same ROG run as the ``rog`` row when both are asked for. The prior is read from ``--prior FILE``
or, when that file does not exist yet, trained there first on images of the train split's other patients:
every patient of the attacked images is excluded, and the benchmark reads the prior file's patient list
back and stops if any attacked patient trained it. ``benchmarks/prior_gain.py`` measures the prior's gain
on its own, on a wider set of images.

    python benchmarks/leakage.py --split report --images 1 --batches 0 --attacks ig_plain rog rog_prior \
        --prior /tmp/leakage_prior.safetensors

The ``auto_prior`` row is ``auto`` followed by a learned prior of the same network trained for what the
leak's inversion leaves (``--auto-prior FILE``, trained there first like ``--prior``, on the same images
and with the same patient check; ``gradleak prior train --for-attack auto``: milder degradations at half
the image side, fitted on the tune draw), from the same ``auto`` run as the ``auto`` row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradleak.attacks import apply_postprocessing, run_attack  # noqa: E402
from gradleak.capture import Truth, capture  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.experiment.outputs import write_json  # noqa: E402
from gradleak.experiment.reference import measure_reid  # noqa: E402
from gradleak.federated import Protocol  # noqa: E402
from gradleak.metrics import score  # noqa: E402
from gradleak.metrics.baseline import blind_guesses  # noqa: E402
from gradleak.prior import Prior, train_prior  # noqa: E402
from gradleak.prior.degrade import LEAK_DEGRADATION  # noqa: E402
from gradleak.errors import UserError, exit_code  # noqa: E402

#: The fedavg5 column's local learning rate unless --fedavg-lr says otherwise.
FEDAVG_LR = 0.1
OBFUSCATIONS: dict[str, tuple[str, list[dict], Protocol]] = {
    "none": ("none", [], Protocol()),
    "qsgd16": ("QSGD 16 levels", [{"name": "qsgd", "levels": 16}], Protocol()),
    "qsgd4": ("QSGD 4 levels", [{"name": "qsgd", "levels": 4}], Protocol()),
    "uniform8": ("uniform 8 bit", [{"name": "uniform", "bits": 8}], Protocol()),
    "sign": ("signSGD", [{"name": "sign"}], Protocol()),
    "topk10": ("top-k 10 %", [{"name": "topk", "keep": 0.1}], Protocol()),
    "topk1": ("top-k 1 %", [{"name": "topk", "keep": 0.01}], Protocol()),
    "randk10": ("random-k 10 %", [{"name": "randk", "keep": 0.1}], Protocol()),
    "relgauss": ("Gaussian, relative σ0 = 0.1", [{"name": "relative_gaussian", "sigma0": 0.1}], Protocol()),
    "relgauss1": ("Gaussian, relative σ0 = 1", [{"name": "relative_gaussian", "sigma0": 1.0}], Protocol()),
    "fedavg5": ("FedAvg τ = 5", [], Protocol("fedavg", local_steps=5, local_lr=FEDAVG_LR)),
}

PLAIN = {"attacker_knows_obfuscation": False, "unroll_local_steps": False}
ATTACKS: dict[str, tuple[str, str, dict]] = {
    "auto": ("auto (disaggregation + inversion + refinement)", "auto", {}),
    "ig_plain": ("plain IG (obfuscation unknown)", "inverting_gradients", PLAIN),
    "ig": ("IG, obfuscation-aware", "inverting_gradients", {}),
    "dlg": ("DLG, obfuscation-aware", "dlg", {}),
    "rog": ("ROG (no post-processing), obfuscation-aware", "rog", {}),
    "rog_prior": ("ROG + learned prior, obfuscation-aware", "rog", {}),
    "auto_prior": ("auto + learned prior (leak regime)", "auto", {}),
}
#: The rows that post-process another row's run with a learned prior, and that row.
PRIOR_ROWS = {"rog_prior": "rog", "auto_prior": "auto"}

TRAIN_SIZE_SEED = {"tune": 1, "report": 2}
PRIOR_STEPS = 1500


def _prior(ds, a, attacked_patients: list[str], row: str = "rog_prior") -> Prior:
    """A prior row's prior: ``--prior`` (rog_prior, ROG's default degradation, L1) or ``--auto-prior``
    (auto_prior, :data:`gradleak.prior.degrade.LEAK_DEGRADATION`, fitted on the tune draw, squared error), trained there first when missing, never
    trained on an attacked patient."""
    own = a.prior if row == "rog_prior" else a.auto_prior
    stem = "gradleak_leakage_prior" if row == "rog_prior" else "gradleak_leakage_auto_prior"
    path = Path(own) if own else Path(tempfile.gettempdir()) / f"{stem}_{a.size}.safetensors"
    if not path.exists():
        print(f"training the {row} prior on up to {a.prior_images} images of patients other than the "
              f"{len(attacked_patients)} attacked ones -> {path}", file=sys.stderr, flush=True)
        extra = {} if row == "rog_prior" else {"degradation": LEAK_DEGRADATION, "loss": "l2"}
        train_prior(ds, path, size=a.size, exclude_patients=attacked_patients, limit=a.prior_images,
                    steps=a.prior_steps, seed=0, progress=False, **extra)
    prior = Prior.load(path)
    prior.check_disjoint(attacked_patients)  # raises (exit 2) if an attacked patient trained it
    print(f"prior {path}: trained on {len(prior.patients)} patients, none of the {len(attacked_patients)} "
          f"attacked", file=sys.stderr, flush=True)
    return prior


def draw(n_available: int, split: str, count: int) -> list[int]:
    """Disjoint seeded draws of train-split indices: the tune draw never overlaps the report draw."""
    tune = np.random.default_rng(TRAIN_SIZE_SEED["tune"]).permutation(n_available)[:64]
    if split == "tune":
        return [int(i) for i in tune[:count]]
    rest = np.setdiff1d(np.arange(n_available), tune)
    return [int(i) for i in np.random.default_rng(TRAIN_SIZE_SEED["report"]).permutation(rest)[:count]]


def cells(dataset, split: str, n_single: int, n_batches: int, batch_size: int = 4,
          clients: int = 1) -> list[tuple[int, list[int]]]:
    """The observations: ``n_single`` of one image per client and ``n_batches`` of ``batch_size`` per client,
    as (images per client, the ``clients`` clients' images one client after the other). One client's
    observations are the draw's first images in order; ``clients`` K extends each to K times as many, so K
    clients of B images hold the images one client of K * B would."""
    k = int(clients)
    idx = draw(len(dataset), split, (n_single + batch_size * n_batches) * k)
    out = [(1, idx[k * s: k * s + k]) for s in range(n_single)]
    rest, n = idx[n_single * k:], batch_size * k
    out += [(batch_size, rest[n * b: n * b + n]) for b in range(n_batches)]
    return out


def draw_arguments(ap, *, batch_size: int) -> None:
    """The options of the victim and draw the diagnostic scripts share with this benchmark: ``--data``,
    ``--split`` (the tune draw by default), ``--batches``, ``--batch-size`` and ``--size``."""
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    ap.add_argument("--split", choices=["tune", "report"], default="tune")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--size", type=int, default=64)


def blind_mean(dataset, obs_list: list[tuple[int, list[int]]], count: int = 512) -> torch.Tensor:
    """The blind guess: the mean of ``count`` seeded training images, none of those ``obs_list`` attacks (the
    attacker's guess without the update)."""
    attacked = {i for _, idx in obs_list for i in idx}
    aux = [i for i in np.random.default_rng(7).permutation(len(dataset)).tolist() if i not in attacked][:count]
    return blind_guesses(dataset.batch(aux).images)["mean_image"]


def reidentification(ds, idx: list[int], batch, rec_images: torch.Tensor, metrics: dict) -> dict:
    """Patient re-identification of the reconstructions paired as ``metrics`` (``score``) paired them:
    the strongest distance's top-1 and IIP hits, how many could be re-identified, and chance."""
    perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
    truth = Truth(images=batch.images, labels=batch.labels, patient_ids=[str(ds.patient_ids[i]) for i in idx],
                  names=list(batch.names), indices=list(idx))
    r = measure_reid(rec_images.detach().cpu().float()[perm], truth, ds)
    best = r.get("strongest") or {}
    iip = max((int(v["iip_hits"]) for v in r["by_distance"].values() if "iip_hits" in v), default=0)
    return {"reid_top1_hits": best.get("top1_hits"), "reid_n": r["num_with_other_images"],
            "iip_hits": iip, "iip_n": len(idx), "reid_distance": best.get("distance"),
            "reid_chance_top1": r.get("chance_top1")}


def _of(result: dict, batch: int, clients: int, lr: float = FEDAVG_LR) -> bool:
    """Whether a result is of ``clients`` clients' observations of ``batch`` images each (results written
    before K clients were measured are one client's), a FedAvg one at local learning rate ``lr``."""
    return (result["B"] == batch and int(result.get("clients", 1)) == clients
            and (result["obf"] != "fedavg5" or float(result.get("fedavg_lr", FEDAVG_LR)) == lr))


def reid_table(results: dict, batch: int, attacks: list[str], obfs: list[str], clients: int = 1,
               lr: float = FEDAVG_LR) -> str:
    """Patient top-1 hits / images whose patient has another image, and IIP hits / images, summed over
    the observations."""
    head = "| attack | " + " | ".join(OBFUSCATIONS[o][0] for o in obfs) + " |"
    lines = [head, "| --- |" + " ---: |" * len(obfs)]
    for a in attacks:
        row = []
        for o in obfs:
            rs = [r for r in results.values() if _of(r, batch, clients, lr) and r["attack"] == a and r["obf"] == o
                  and r.get("iip_n") is not None]
            if not rs:
                row.append("–")
                continue
            top, n = sum(int(r["reid_top1_hits"] or 0) for r in rs), sum(int(r["reid_n"]) for r in rs)
            iip, m = sum(int(r["iip_hits"]) for r in rs), sum(int(r["iip_n"]) for r in rs)
            row.append(f"{top}/{n} / {iip}/{m}" if n else f"– / {iip}/{m}")
        label = "blind baseline (mean auxiliary image)" if a == "blind" else ATTACKS[a][0]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    chance = [r["reid_chance_top1"] for r in results.values()
              if _of(r, batch, clients, lr) and r.get("reid_chance_top1")]
    if chance:
        lines.append(f"\nChance of a top-1 patient hit by a random ranking: {float(np.mean(chance)):.3f}.")
    return "\n".join(lines)


def table(results: dict, batch: int, attacks: list[str], obfs: list[str], clients: int = 1,
          lr: float = FEDAVG_LR) -> str:
    def cell(a, o):
        rs = [r for r in results.values() if _of(r, batch, clients, lr) and r["attack"] == a and r["obf"] == o]
        if not rs:
            return None
        return (float(np.mean([r["psnr"] for r in rs])), float(np.mean([r["ssim"] for r in rs])),
                float(np.mean([r["label_accuracy"] for r in rs])), len(rs))

    head = "| attack | " + " | ".join(OBFUSCATIONS[o][0] for o in obfs) + " |"
    lines = [head, "| --- |" + " ---: |" * len(obfs)]
    for a in attacks:
        row = []
        for o in obfs:
            c = cell(a, o)
            row.append("–" if c is None else f"{c[0]:.1f} / {c[1]:.3f} / {c[2]:.2f}")
        label = "blind baseline (mean auxiliary image)" if a == "blind" else ATTACKS[a][0]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    gains = []
    for o in obfs:
        base = cell("ig_plain", o)
        names = [a for a in attacks if a not in ("ig_plain", "blind")]
        others = [(c, a) for c, a in zip([cell(a, o) for a in names], names) if c is not None]
        if base is None or not others:
            gains.append("–")
            continue
        best, who = max(others, key=lambda t: t[0][0])
        gains.append(f"{best[0] - base[0]:+.1f} dB ({who})")
    lines.append("| best aware − plain IG (PSNR) | " + " | ".join(gains) + " |")
    over = []
    for o in obfs:
        base, top = cell("blind", o), [cell(a, o) for a in attacks if a != "blind"]
        top = [c for c in top if c is not None]
        over.append("–" if base is None or not top else f"{max(c[0] for c in top) - base[0]:+.1f} dB")
    lines.append("| best − blind baseline (PSNR) | " + " | ".join(over) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Leakage of real chest X-rays per attack and obfuscation.")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"),
                   help="Kaggle chest X-ray folder (default ../shared/data/chest_xray); the train split is used")
    p.add_argument("--split", choices=["tune", "report"], default="report")
    p.add_argument("--images", type=int, default=2, help="B = 1 observations (one image each)")
    p.add_argument("--batches", type=int, default=1, help="batch observations (of --batch-size images)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch observation (default 4)")
    p.add_argument("--clients", type=int, default=1, metavar="K",
                   help="K clients, each with its own images (one, or --batch-size), the server seeing only the mean "
                        "of their updates, as under secure aggregation (default 1)")
    p.add_argument("--blind-images", type=int, default=512,
                   help="auxiliary images (never the attacked ones) whose mean is the blind baseline")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds per attack per observation")
    p.add_argument("--iterations", type=int, default=None, help="iteration cap per attack (default: preset's)")
    p.add_argument("--restarts", type=int, default=None, help="restarts (default: preset's)")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--obfuscations", nargs="+", default=list(OBFUSCATIONS), choices=list(OBFUSCATIONS))
    p.add_argument("--set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override a setting of one row, e.g. rog.lr=0.1 (repeatable)")
    p.add_argument("--json", default=None, help="write (and with --resume, reuse) per-observation results here")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fedavg-lr", type=float, default=FEDAVG_LR,
                   help=f"local learning rate of the fedavg5 column (default {FEDAVG_LR:g}; its effective step on "
                        f"fc1's output grows with fc1's input, four times from 64 to 128 px)")
    p.add_argument("--prior", default=None, help="prior file for the rog_prior row (trained there first if "
                   "it does not exist)")
    p.add_argument("--auto-prior", default=None, help="prior file for the auto_prior row (trained there first "
                   "if it does not exist)")
    p.add_argument("--prior-images", type=int, default=3000, help="images (other patients) the prior trains on")
    p.add_argument("--prior-steps", type=int, default=PRIOR_STEPS, help="prior training steps")
    a = p.parse_args(argv)
    if a.clients < 1:
        raise UserError(f"--clients must be a positive integer, got {a.clients}")
    if not (math.isfinite(a.fedavg_lr) and a.fedavg_lr > 0):
        raise UserError(f"--fedavg-lr must be a positive number, got {a.fedavg_lr:g}")

    import yaml
    extra: dict[str, dict] = {}
    for s in a.set:
        k, v = s.split("=", 1)
        row, key = k.split(".", 1)
        extra.setdefault(row, {})[key] = yaml.safe_load(v)

    ds = load_dataset(f"kaggle:{a.data},split=train", size=a.size)
    obs_list = cells(ds, a.split, a.images, a.batches, a.batch_size, a.clients)
    blind = blind_mean(ds, obs_list, a.blind_images)
    attacked_patients = sorted({ds.patient_ids[i] for _, idx in obs_list for i in idx})
    priors = {row: _prior(ds, a, attacked_patients, row) for row in PRIOR_ROWS if row in a.attacks}
    json_path = Path(a.json) if a.json else None
    results: dict = {}
    if json_path and a.resume and json_path.exists():
        results = json.loads(json_path.read_text())["results"]
        for r in results.values():  # NaN (the blind guess's label accuracy) was written as null
            r.update({k: float("nan") for k in ("psnr", "ssim", "label_accuracy") if r.get(k, 0.0) is None})
    # one client's keys as before; K clients' name K (K clients of B images hold one client's K * B)
    clients_key = f"|K{a.clients}" if a.clients > 1 else ""
    clients_tag = f" x {a.clients} clients" if a.clients > 1 else ""
    started = time.time()
    for o in a.obfuscations:
        _, specs, proto = OBFUSCATIONS[o]
        proto = dataclasses.replace(proto, num_clients_averaged=a.clients)
        lr_key = ""
        if proto.algorithm == "fedavg" and a.fedavg_lr != FEDAVG_LR:  # the default's keys as before
            proto = dataclasses.replace(proto, local_lr=a.fedavg_lr)
            lr_key = f"|lr{a.fedavg_lr!r}"  # every digit: two rates never share a key
        lr_field = {"fedavg_lr": proto.local_lr} if proto.algorithm == "fedavg" else {}
        for B, idx in obs_list:
            batch = ds.batch(idx)
            obs, _ = capture(batch.images, batch.labels, arch=a.arch, protocol=proto, model_seed=0,
                             obfuscations=specs, obfuscation_seed=0, labels_known=False)
            recs: dict = {}
            bkey = f"{o}|blind|{','.join(map(str, idx))}{clients_key}{lr_key}"
            if bkey not in results:
                guess = blind.expand_as(batch.images)
                m = score(batch.images, batch.labels, guess, batch.labels)
                results[bkey] = {"obf": o, "attack": "blind", "B": B, "clients": a.clients, "indices": idx,
                                 **lr_field, "psnr": m["psnr"],
                                 "ssim": m["ssim"], "label_accuracy": float("nan"),
                                 **reidentification(ds, idx, batch, guess, m)}
            for name in a.attacks:
                key = f"{o}|{name}|{','.join(map(str, idx))}{clients_key}{lr_key}"
                if key in results:
                    continue
                _, attack, overrides = ATTACKS[name]
                row = PRIOR_ROWS.get(name, name)
                settings = {**overrides, "time_budget": a.time_budget, "iterations": a.iterations,
                            **extra.get(row, {})}
                if a.restarts:
                    settings["restarts"] = a.restarts
                rec = recs.get(row) or run_attack(attack, obs, settings, seed=0, device=a.device, progress=False)
                recs[row] = rec
                if name in PRIOR_ROWS:
                    rec = apply_postprocessing(dataclasses.replace(rec, extras=dict(rec.extras),
                                                                     threat_model=dict(rec.threat_model)), priors[name])
                m = score(batch.images, batch.labels, rec.images, rec.labels)
                results[key] = {"obf": o, "attack": name, "B": B, "clients": a.clients, "indices": idx,
                                **lr_field, "psnr": m["psnr"],
                                "ssim": m["ssim"], "label_accuracy": m.get("label_accuracy", float("nan")),
                                "iterations": rec.iterations, "seconds": rec.seconds,
                                "objective": rec.threat_model.get("objective"), "converged": rec.converged,
                                "pipeline": (rec.extras.get("pipeline") or {}).get("note"),
                                "stages": (rec.extras.get("pipeline") or {}).get("stages"),
                                # auto on an exact update: how near its images' update comes, against grey's
                                "fit": (rec.extras.get("pipeline") or {}).get("fit"),
                                **reidentification(ds, idx, batch, rec.images, m)}
                print(f"[{time.time() - started:6.0f}s] {o:9s} B={B}{clients_tag} {name:9s} {idx}: "
                      f"PSNR {m['psnr']:.2f} "
                      f"SSIM {m['ssim']:.3f} labels {m.get('label_accuracy', float('nan')):.2f} "
                      f"({rec.iterations} it, {rec.threat_model.get('objective')})", file=sys.stderr, flush=True)
                if json_path:
                    write_json(json_path, {"args": vars(a), "results": results})
    print(f"# gradleak leakage benchmark ({a.split} draw of the train split)\n")
    who = ("one client" if a.clients == 1 else f"{a.clients} clients, the server seeing only the mean of their "
           f"updates (each obfuscated by its client)")
    fedavg = (f" (5 full-batch local steps of learning rate {a.fedavg_lr:g})" if "fedavg5" in a.obfuscations
              else "")
    print(f"{a.arch} at random initialisation, {a.size} px real chest X-rays, {who}; FedSGD unless "
          f"FedAvg{fedavg}; "
          f"labels inferred, not given; no BatchNorm. Budget per attack and observation: {a.time_budget:g} s"
          + (f", at most {a.iterations} iterations" if a.iterations else "")
          + f" (torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}).\n")
    print("Cells: PSNR (dB) / SSIM (Gaussian σ = 1.5) / label accuracy, means over the observations.\n")
    for B in sorted({b for b, _ in obs_list}):
        n = len([1 for b, _ in obs_list if b == B])
        if n:
            size = f"B = {B}" if a.clients == 1 else f"{a.clients} clients x B = {B} ({a.clients * B} images)"
            print(f"## {size} ({n} observation{'s' if n > 1 else ''})\n")
            print(table(results, B, ["blind"] + a.attacks, a.obfuscations, a.clients, a.fedavg_lr) + "\n")
            print("Patient re-identification (leave-the-image-out, the stronger of MSE and SSIM ranking; "
                  "– where no attacked patient has another image): "
                  "top-1 patient hits / images whose patient has another image in the gallery, and IIP "
                  "(the attacked image nearest among its label's) / images, summed over the observations.\n")
            print(reid_table(results, B, ["blind"] + a.attacks, a.obfuscations, a.clients, a.fedavg_lr) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "leakage.py"))
