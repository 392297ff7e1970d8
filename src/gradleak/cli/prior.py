"""``gradleak prior``: train ROG's learned post-processing on auxiliary images, or print a prior file's
header."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .arguments import _output


def _excluded_patients(a: argparse.Namespace) -> list[str]:
    """Patients named by --exclude-patients and in each --exclude-from file (truth.npz or one id a line), as
    the pseudonyms the data sets use (a pseudonym given stays as it is)."""
    from ..data.pseudonym import as_pseudonym

    out = [p.strip() for p in (a.exclude_patients or "").split(",") if p.strip()]
    for f in a.exclude_from or []:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"--exclude-from: file not found: {path}")
        if path.suffix == ".npz":
            from ..capture import load_truth

            out += load_truth(path).patient_ids
            continue
        try:
            out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--exclude-from: {path} is not a text file of patient ids ({e})") from None
    return [as_pseudonym(p) for p in out]


def _calibrate(a: argparse.Namespace, ds, excluded: list[str]) -> tuple[dict, dict]:
    """--calibrate-like: the degradation fitted to ROG outputs on auxiliary batches captured as the named
    observation was, and the calibration's record."""
    from .. import observation
    from ..experiment.calibrate import calibrate_like

    obs = observation.load(a.calibrate_like)
    print(f"calibrating the degradation: ROG on {a.calibrate_images} auxiliary batch(es) captured as "
          f"{a.calibrate_like} ({obs.model['arch']}, {obs.protocol.algorithm}, obfuscation "
          f"{', '.join(r['name'] for r in obs.obfuscation) or 'none'})")
    fit = calibrate_like(obs, ds, exclude_patients=excluded, images=a.calibrate_images,
                         attack_settings={"iterations": a.calibrate_iterations}, seed=a.seed)
    print("calibrated degradation: " + ", ".join(f"{k}={v}" for k, v in fit["degradation"].items()))
    return fit["degradation"], fit["calibration"]


def cmd_prior_train(a: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..prior import train_prior
    from ..prior.degrade import FOR_ATTACK

    if a.calibrate_like and a.for_attack != "rog":
        raise UserError(f"--calibrate-like fits the degradation to ROG's outputs; a prior --for-attack "
                        f"{a.for_attack} starts from its own fitted settings (change them with --degradation)")
    out = _output(a.out, "file", "--out")
    excluded = _excluded_patients(a)
    ds = load_dataset(a.data, size=a.size)
    degradation, calibration = (_calibrate(a, ds, excluded) if a.calibrate_like
                                else (dict(FOR_ATTACK[a.for_attack]), None))
    degradation.update(dict(a.degradation or []))
    header = train_prior(ds, out, size=a.size, exclude_patients=excluded, limit=a.limit,
                         degradation=degradation, steps=a.steps, batch_size=a.batch_size,
                         crop=a.crop or None, lr=a.lr, seed=a.seed, width=a.width,
                         num_classes=a.num_classes if a.label_conditioned else 0, loss=a.loss,
                         calibration=calibration, checkpoint_every=a.checkpoint_every, progress=not a.quiet)
    t = header["training"]
    print(f"prior: {out}  ({header['size']} px, {t['num_images']} images of {t['num_patients']} patients, "
          f"{len(t['excluded_patients'])} patients excluded, {t['steps']} steps)")
    print(f"{t['loss'].upper()} on a held-out degraded batch: {t['eval_loss_identity']:.4f} as degraded -> "
          f"{t['eval_loss']:.4f} after the prior")
    return 0


def cmd_prior_inspect(a: argparse.Namespace) -> int:
    import json

    from ..prior import load_prior_file

    _, header = load_prior_file(a.prior)
    t = dict(header["training"])
    pts = t.pop("patients", [])
    t.pop("loss_curve", None)
    print(json.dumps({**header, "training": {**t, "patients": f"{len(pts)} patients"}}, indent=2))
    return 0
