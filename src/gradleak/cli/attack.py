"""Attacker-side subcommands: ``attack`` (reconstruct the images of an observation file, scored against a
truth file when one is given) and ``inspect`` (an observation file's header)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..errors import UserError
from .arguments import _output


class _Reference(NamedTuple):
    """The attacker's reference data set for a scored attack: the blind baseline's guesses and auxiliary
    images, and the gallery of re-identification; without it, ``note`` says why nothing was measured."""

    dataset: Any = None
    note: str | None = None
    guesses: Any = None
    aux: Any = None


def cmd_attack(a: argparse.Namespace) -> int:
    from .. import observation
    from ..attacks import run_attack
    from ..capture import load_truth

    _output(a.out, "folder", "--out")
    obs = observation.load(a.observation)
    truth = load_truth(a.truth, obs, observation_path=a.observation) if a.truth else None
    name, overrides = _settings(a)  # fail on bad settings before any work or output
    prior = _load_prior(a.prior, obs, truth) if a.prior else None
    reference = _reference(a, obs, truth) if truth is not None else _Reference()
    out = Path(a.out)
    with _staged(out) as staging:
        rec = run_attack(name, obs, overrides, seed=a.seed, device=a.device, progress=not a.quiet,
                         postprocess=prior)
        metrics = _write_results(staging, a, obs, rec, truth, prior, reference)
    _print_attack(name, rec, metrics, out)
    return 0


def _settings(a: argparse.Namespace) -> tuple[str, dict]:
    """The attack's canonical name and its setting overrides (--set, then --iterations, --time-budget and
    --restarts), checked against the attack's settings."""
    from ..attacks import canonical, resolve_settings

    overrides = dict(a.set or [])
    for key in ("iterations", "time_budget", "restarts"):
        if getattr(a, key) is not None:
            overrides[key] = getattr(a, key)
    if a.time_budget is not None and a.iterations is None:
        overrides["iterations"] = None
    name = canonical(a.attack)
    resolve_settings(name, overrides)
    return name, overrides


def _load_prior(path: str, obs, truth):
    """The --prior file, checked to fit the observation's images and, with a truth file, to have been trained
    on none of the attacked patients."""
    from ..prior import Prior

    prior = Prior.load(path)
    prior.check_images(obs.image_shape)
    if truth is not None:
        prior.check_disjoint(truth.patient_ids)
    return prior


def _reference(a: argparse.Namespace, obs, truth) -> _Reference:
    """The reference data set (--reference-data, else the data set the observation names) and the blind
    baseline drawn from it; a note instead where there is none."""
    from ..experiment.reference import blind_baseline, data_spec, load_reference

    ref_ds, note = None, None
    if a.reference_data:
        ref_ds = load_reference(a.reference_data, size=int(obs.image_shape[-1]), where="--reference-data")
    else:
        spec = data_spec((obs.meta or {}).get("data"))
        try:
            ref_ds = load_reference(spec, where="the observation's data")
        except UserError as e:
            note = f"{e}; pass --reference-data"
        if ref_ds is None and note is None:
            note = "the observation does not say which data set it came from; pass --reference-data"
    if ref_ds is None:
        return _Reference(note=note)
    guesses, aux = blind_baseline(ref_ds, truth, seed=a.seed)
    return _Reference(ref_ds, note, guesses, aux)


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out``: its files move into ``out`` when the block succeeds; when it fails,
    ``out`` is removed again if the block created it and it is empty. The staging folder never stays."""
    existed = out.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            shutil.move(str(f), out / f.name)
    except BaseException:
        if not existed and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_results(staging: Path, a: argparse.Namespace, obs, rec, truth, prior,
                   reference: _Reference) -> dict | None:
    """Write the reconstruction and, with a truth file, metrics.json (with re-identification where there is
    a reference data set) into ``staging``; the metrics, or None without a truth file."""
    from ..experiment.outputs import write_json, write_reconstruction

    extra = {"observation": str(Path(a.observation).resolve()), **({"prior": str(a.prior)} if prior else {}),
             "obfuscation": obs.obfuscation, "protocol": obs.protocol.header(), "model": obs.model,
             "data_description": (obs.meta or {}).get("data"),
             "bits": ((obs.obfuscation[-1].get("update_bits") if obs.obfuscation else None)
                      or 32 * sum(int(v.numel()) for v in obs.update.values())),
             **({"truth": str(Path(a.truth).resolve())} if truth is not None else {})}
    metrics = write_reconstruction(staging, rec, truth, extra=extra, guesses=reference.guesses,
                                   reference=reference.aux)
    if metrics is None:
        return None
    if reference.dataset is not None:
        from ..experiment.reference import measure_reid

        perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
        metrics["reid"] = measure_reid(rec.images[perm], truth, reference.dataset, seed=a.seed)
    else:
        metrics["baseline_note"] = metrics["reid_note"] = f"not measured: {reference.note}"
    write_json(staging / "metrics.json", metrics)
    return metrics


def _print_attack(name: str, rec, metrics: dict | None, out: Path) -> None:
    """The attack's summary: budget and convergence, the scores with and without post-processing, the blind
    baseline and re-identification, the files written."""
    conv = {True: "converged", False: "stopped before converging", None: "too few iterations to judge "
            "convergence"}[rec.converged]
    print(f"{name}: {rec.iterations} iterations in {rec.seconds:.1f}s ({conv}), labels {rec.threat_model['labels']}")
    if rec.threat_model.get("attack_pipeline"):  # auto: what it read the update with (the leaking layer, a split)
        print(f"pipeline: {rec.threat_model['attack_pipeline']}")
    if metrics:
        raw = metrics.get("without_postprocessing")
        if raw:
            print(f"without post-processing: PSNR {raw['psnr']:.2f} dB  SSIM {raw['ssim']:.4f}")
        print(("with post-processing:    " if raw else "")
              + f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}"
              + (f"  label accuracy {metrics['label_accuracy']:.2f}" if "label_accuracy" in metrics else ""))
        from ..experiment.reference import reference_summary

        reference_summary(metrics)
        if metrics.get("baseline_note"):
            print(f"blind baseline and re-identification {metrics['baseline_note']}")
    print(f"wrote {out}/reconstruction.npz, reconstruction.png" + (", metrics.json" if metrics else ""))


def cmd_inspect(a: argparse.Namespace) -> int:
    from .. import observation

    obs = observation.load(a.observation)
    n = sum(v.numel() for v in obs.update.values())
    print(f"format     {observation.FORMAT}")
    print(f"model      {obs.model}")
    print(f"protocol   {obs.protocol.header()}")
    print(f"labels     {'given: ' + str(obs.labels.tolist()) if obs.labels is not None else 'not given'}")
    print(f"obfuscation {obs.obfuscation or 'none'}")
    print(f"update     {len(obs.update)} tensors, {n} entries")
    print(f"buffers    {'sent' if obs.buffers is not None else 'not sent'}")
    print(f"data       {obs.data}")
    return 0
