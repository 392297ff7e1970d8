"""The ``gradleak`` command."""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import UserError
from .files import absent_parts, check_output, remove_new
from .logs import to_console
from .validation import parse_assignment

# What the running command's outputs create (files and folders absent before it started): removed if it fails.
_NEW: list[Path] = []


def _output(path, kind: str = "file", what: str = "--out") -> Path:
    """Check an output target before any work (:func:`gradleak.files.check_output`) and remember what writing
    it creates, so that a failed command leaves nothing new."""
    p = check_output(path, kind, what)
    _NEW.extend(absent_parts(p))
    return p


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2, as every other user error."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix("gradleak").strip()
        print(f"gradleak: error: {sub + ': ' if sub else ''}{' '.join(message.split())} "
              f"(see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (or mps)."""
    t = text.strip().lower()
    if not _DEVICE.match(t):
        raise argparse.ArgumentTypeError(f"unknown device '{text}' (expected cpu, cuda or cuda:N)")
    if t == "cpu":
        return t
    import torch

    if t == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("device 'mps' is not available on this machine (use cpu)")
        return t
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device '{text}': CUDA is not available on this machine (use cpu)")
    index = int(t.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device '{text}': this machine has {torch.cuda.device_count()} CUDA "
                                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return t


def _kv(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value read as YAML 1.2 (``1e-3`` is a number)."""
    try:
        return parse_assignment(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _indices(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _number(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return v


def _positive_float(text: str) -> float:
    v = _number(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return v


def _non_negative_float(text: str) -> float:
    v = _number(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'")
    return v


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return v


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _seed(text: str) -> int:
    v = _non_negative_int(text)
    if v >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2^63, got '{text}'")
    return v


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


# ---------------------------------------------------------------------------------------------- capture
def cmd_capture(a: argparse.Namespace) -> int:
    from .capture import capture_batch
    from .federated import Protocol
    from .obfuscation import parse_spec

    out = _output(a.out, "file", "--out")
    truth_path = _output(a.truth or out.parent / "truth.npz", "file", "--truth")
    if truth_path.resolve() == out.resolve():
        raise UserError(f"--truth and --out name the same file {out}; the truth goes to a file of its own")
    specs = [parse_spec(s) for s in a.obfuscation or []]
    proto = Protocol(algorithm=a.algorithm, local_steps=a.local_steps, local_lr=a.local_lr,
                     local_batch_size=a.local_batch_size, sends_buffers=a.sends_buffers,
                     per_example_clip=a.per_example_clip, num_clients_averaged=a.num_clients_averaged)
    c = capture_batch(a.data, protocol=proto, indices=a.indices, batch_size=a.batch_size, seed=a.seed, size=a.size,
                      arch=a.arch, num_classes=a.num_classes, model_state=a.model_state, model_seed=a.model_seed,
                      labels_known=a.labels_known, obfuscations=specs)
    c.save(out, truth_path)
    obs, k = c.observation, proto.num_clients_averaged
    clients = f", {k} clients x {obs.protocol.images_per_client} images averaged" if k > 1 else ""
    applied = ", ".join(o["name"] for o in obs.obfuscation) or "none"
    victim = f"{obs.model['arch']} from {a.model_state}" if a.model_state else obs.model["arch"]
    print(f"observation: {out}  ({victim}, {proto.algorithm}, B={obs.num_images}{clients}, obfuscation {applied}, "
          f"{c.bits} bits/update)")
    print(f"truth:       {truth_path}  (never read by attacks; pass it to 'gradleak attack --truth')")
    return 0


def cmd_obfuscate(a: argparse.Namespace) -> int:
    import torch

    from . import observation
    from .obfuscation import Context, apply, parse_spec, resolve_all

    _output(a.out, "file", "--out")
    specs = [parse_spec(s) for s in a.spec]
    resolve_all(specs)
    obs = observation.load(a.observation)
    generator = torch.Generator().manual_seed(int(a.seed))
    update, records, bits = apply(specs, obs.update, generator, Context.from_protocol(obs.protocol))
    obs.update = update
    obs.obfuscation = list(obs.obfuscation) + records
    observation.save(obs, a.out)
    print(f"{a.out}: applied {', '.join(r['name'] for r in records)} to {a.observation} "
          f"({bits} bits/update); obfuscation now {[o['name'] for o in obs.obfuscation]}")
    return 0


# ----------------------------------------------------------------------------------------------- attack
def cmd_attack(a: argparse.Namespace) -> int:
    from . import observation
    from .attacks import canonical, resolve_settings, run_attack
    from .capture import load_truth
    from .experiment.outputs import write_reconstruction

    _output(a.out, "folder", "--out")
    obs = observation.load(a.observation)
    truth = load_truth(a.truth, obs, observation_path=a.observation) if a.truth else None
    overrides = dict(a.set or [])
    for key in ("iterations", "time_budget", "restarts"):
        if getattr(a, key) is not None:
            overrides[key] = getattr(a, key)
    if a.time_budget is not None and a.iterations is None:
        overrides["iterations"] = None
    name = canonical(a.attack)
    resolve_settings(name, overrides)  # fail on bad settings before any work or output
    prior = None
    if a.prior:
        from .prior import Prior

        prior = Prior.load(a.prior)
        prior.check_images(obs.image_shape)
        if truth is not None:
            prior.check_disjoint(truth.patient_ids)
    ref_ds, ref_note, guesses, aux = None, None, None, None
    if truth is not None:
        from .experiment.reference import blind_baseline, data_spec, load_reference

        if a.reference_data:
            ref_ds = load_reference(a.reference_data, size=int(obs.image_shape[-1]), where="--reference-data")
        else:
            spec = data_spec((obs.meta or {}).get("data"))
            try:
                ref_ds = load_reference(spec, where="the observation's data")
            except UserError as e:
                ref_note = f"{e}; pass --reference-data"
            if ref_ds is None and ref_note is None:
                ref_note = "the observation does not say which data set it came from; pass --reference-data"
        if ref_ds is not None:
            guesses, aux = blind_baseline(ref_ds, truth, seed=a.seed)
    out = Path(a.out)
    existed = out.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        rec = run_attack(name, obs, overrides, seed=a.seed, device=a.device, progress=not a.quiet,
                         postprocess=prior)
        extra = {"observation": str(Path(a.observation).resolve()), **({"prior": str(a.prior)} if prior else {}),
                 "obfuscation": obs.obfuscation, "protocol": obs.protocol.header(), "model": obs.model,
                 "data_description": (obs.meta or {}).get("data"),
                 "bits": ((obs.obfuscation[-1].get("update_bits") if obs.obfuscation else None)
                          or 32 * sum(int(v.numel()) for v in obs.update.values())),
                 **({"truth": str(Path(a.truth).resolve())} if truth is not None else {})}
        metrics = write_reconstruction(staging, rec, truth, extra=extra, guesses=guesses, reference=aux)
        if metrics is not None and ref_ds is not None:
            from .experiment.outputs import write_json
            from .experiment.reference import measure_reid

            perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
            metrics["reid"] = measure_reid(rec.images[perm], truth, ref_ds, seed=a.seed)
            write_json(staging / "metrics.json", metrics)
        elif metrics is not None:
            metrics["baseline_note"] = metrics["reid_note"] = f"not measured: {ref_note}"
            from .experiment.outputs import write_json

            write_json(staging / "metrics.json", metrics)
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            shutil.move(str(f), out / f.name)
    except BaseException:
        if not existed and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    conv = {True: "converged", False: "stopped before converging", None: "too few iterations to judge "
            "convergence"}[rec.converged]
    print(f"{name}: {rec.iterations} iterations in {rec.seconds:.1f}s ({conv}), labels {rec.threat_model['labels']}")
    if metrics:
        raw = metrics.get("without_postprocessing")
        if raw:
            print(f"without post-processing: PSNR {raw['psnr']:.2f} dB  SSIM {raw['ssim']:.4f}")
        print(("with post-processing:    " if raw else "")
              + f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}"
              + (f"  label accuracy {metrics['label_accuracy']:.2f}" if "label_accuracy" in metrics else ""))
        from .experiment.reference import reference_summary

        reference_summary(metrics)
        if metrics.get("baseline_note"):
            print(f"blind baseline and re-identification {metrics['baseline_note']}")
    print(f"wrote {out}/reconstruction.npz, reconstruction.png" + (", metrics.json" if metrics else ""))
    return 0


# ------------------------------------------------------------------------------------------------ prior
def _excluded_patients(a: argparse.Namespace) -> list[str]:
    """Patients named by --exclude-patients and in each --exclude-from file (truth.npz or one id a line), as
    the pseudonyms the data sets use (a pseudonym given stays as it is)."""
    from .data.pseudonym import as_pseudonym

    out = [p.strip() for p in (a.exclude_patients or "").split(",") if p.strip()]
    for f in a.exclude_from or []:
        path = Path(f)
        if not path.is_file():
            raise UserError(f"--exclude-from: file not found: {path}")
        if path.suffix == ".npz":
            from .capture import load_truth

            out += load_truth(path).patient_ids
            continue
        try:
            out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--exclude-from: {path} is not a text file of patient ids ({e})") from None
    return [as_pseudonym(p) for p in out]


def cmd_prior_train(a: argparse.Namespace) -> int:
    from .data import load_dataset
    from .prior import train_prior

    out = _output(a.out, "file", "--out")
    excluded = _excluded_patients(a)
    ds = load_dataset(a.data, size=a.size)
    degradation, calibration = {}, None
    if a.calibrate_like:
        from . import observation
        from .experiment.calibrate import calibrate_like

        obs = observation.load(a.calibrate_like)
        print(f"calibrating the degradation: ROG on {a.calibrate_images} auxiliary batch(es) captured as "
              f"{a.calibrate_like} ({obs.model['arch']}, {obs.protocol.algorithm}, obfuscation "
              f"{', '.join(r['name'] for r in obs.obfuscation) or 'none'})")
        fit = calibrate_like(obs, ds, exclude_patients=excluded, images=a.calibrate_images,
                             attack_settings={"iterations": a.calibrate_iterations}, seed=a.seed)
        degradation, calibration = fit["degradation"], fit["calibration"]
        print("calibrated degradation: " + ", ".join(f"{k}={v}" for k, v in degradation.items()))
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

    from .prior import load_prior_file

    _, header = load_prior_file(a.prior)
    t = dict(header["training"])
    pts = t.pop("patients", [])
    t.pop("loss_curve", None)
    print(json.dumps({**header, "training": {**t, "patients": f"{len(pts)} patients"}}, indent=2))
    return 0


# -------------------------------------------------------------------------------------------------- run
def cmd_run(a: argparse.Namespace) -> int:
    from .experiment import config
    from .experiment.run import run_experiment

    cfg = config.load(a.config, overrides=dict(a.set or []))
    _output(cfg["output_dir"], "folder", f"{a.config}: output_dir")
    folder, metrics = run_experiment(cfg, progress=not a.quiet)
    g = metrics.get("gain_over_baseline") or {}
    gain = (f"  (over the blind baseline: {g['psnr_db']:+.2f} dB, SSIM {g['ssim']:+.4f})"
            if g.get("psnr_db") is not None else "")
    print(f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}{gain}  ->  {folder}")
    return 0


def cmd_utility(a: argparse.Namespace) -> int:
    from .experiment import utility

    overrides = dict(a.set or [])
    if a.eval_data is not None:
        overrides["eval_data"] = a.eval_data
    if a.save_rounds is not None:
        overrides["save_rounds"] = a.save_rounds
    cfg = utility.load(a.config, overrides=overrides)
    out = _output(a.out, "folder", "--out") if a.out else None
    if out is None:
        _output(cfg["output_dir"], "folder", f"{a.config}: output_dir")
    res = utility.run_utility(cfg, progress=not a.quiet, folder=out)
    f = res["final"] or {}
    eps = res["epsilon"]
    print(f"final model (round {res['final_round']}): ROC AUC {f.get('roc_auc', float('nan')):.4f}  "
          f"accuracy {f.get('accuracy', float('nan')):.4f}  sensitivity {f.get('sensitivity', float('nan')):.3f}  "
          f"specificity {f.get('specificity', float('nan')):.3f}  F1 {f.get('f1', float('nan')):.3f}  "
          f"loss {f.get('loss', float('nan')):.4f}")
    b = res["best"] or {}
    print(f"best round {res['best_round']} by {res['monitor']}: ROC AUC {b.get('roc_auc', float('nan')):.4f}  "
          f"accuracy {b.get('accuracy', float('nan')):.4f}" + ("  (stopped early)" if res["stopped_early"] else ""))
    print(f"bits per round {res['bits_per_round']:.4g} (per update {res['bits_per_update']:.4g}, dense "
          f"{res['dense_bits_per_update']})" + (f"  epsilon {eps:.3f} (delta {res['delta']:g})" if eps is not None else ""))
    print(f"files: {res['folder']}/ (utility.json, learning_curves.png, model.pt)")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .experiment.sweep import load_spec, run_sweep

    _output(a.out, "folder", "--out")
    spec = load_spec(a.spec, overrides=dict(a.set or []))
    summary = run_sweep(spec, a.out, backend=a.backend, address=a.address, workers=a.workers,
                        progress=not a.quiet, source=str(a.spec))
    ok = summary.cells - len(summary.failed)
    print(f"{summary.cells} cells: {summary.skipped} already done, {summary.ran} run, "
          f"{len([f for f in summary.failed if f[0].startswith('cell')])} failed ({summary.seconds:.0f}s)")
    for what, err in summary.failed:
        print(f"  failed: {what}: {err}")
    print(f"results: {summary.folder}/results.jsonl, results.csv")
    if not a.no_report:
        from .report.render import write_report
        path = write_report(summary.folder)
        print(f"report:  {path}")
    return 0 if ok == summary.cells else 1


def cmd_report(a: argparse.Namespace) -> int:
    from .report.render import write_report

    folder = Path(a.experiment)
    if not folder.is_dir():
        raise UserError(f"experiment folder not found: {folder}" if not folder.exists() else
                        f"{folder} is a file; give a sweep folder or an experiment folder")
    out = _output(a.out or folder / "report.html", "file", "--out")
    path = write_report(folder, out=out)
    print(f"report: {path}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .experiment.demo import demo

    demo(out_root=_output(a.out, "folder", "--out"), iterations=a.iterations, quiet=a.quiet)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from . import observation

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


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradleak", description="Reconstruct private images from federated "
                                "updates (as a curious server would) and measure what leaked.")
    p.add_argument("--version", action="version", version=f"gradleak {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("capture", help="victim side: compute a client's update on a batch and save the observation")
    c.add_argument("--data", default="phantoms", help="data set spec, e.g. phantoms, kaggle:PATH,split=train, "
                   "medmnist:FILE.npz,split=val, folder:PATH, dicom:PATH (default: phantoms)")
    c.add_argument("--size", type=_positive_int, default=None, help="image size in px (default: the spec's, else 64)")
    c.add_argument("--indices", type=_indices, default=None, help="comma-separated data set indices")
    c.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images drawn with --seed when no --indices (default 4, as in experiment configs)")
    c.add_argument("--seed", type=_seed, default=0, help="seed for the batch choice and obfuscation noise")
    c.add_argument("--arch", default=None, help="victim model (lenet5, lenet_zhu, convnet, resnet18, resnet18_nobn; "
                   "default lenet5, or the --model-state file's)")
    c.add_argument("--num-classes", type=_positive_int, default=None, help="default 2, or the --model-state file's")
    c.add_argument("--model-state", default=None, metavar="MODEL.pt",
                   help="victim weights from a model file (e.g. model.pt of 'gradleak utility'): attack a trained "
                        "model instead of a random one; --size defaults to the model's image size")
    c.add_argument("--model-seed", type=_seed, default=0, help="seed of the model's random initialisation")
    c.add_argument("--algorithm", choices=["fedsgd", "fedavg"], default="fedsgd")
    c.add_argument("--local-steps", type=_positive_int, default=1)
    c.add_argument("--local-lr", type=_non_negative_float, default=0.0)
    c.add_argument("--local-batch-size", type=_positive_int, default=None)
    c.add_argument("--sends-buffers", action="store_true", help="the client also sends BatchNorm running statistics")
    c.add_argument("--labels-known", action="store_true", help="the threat model grants the server the labels")
    c.add_argument("--obfuscation", action="append", metavar="SPEC", help="obfuscation the client applies, "
                   "NAME:key=value,... (e.g. qsgd:levels=16, topk:keep=0.01, sign, gaussian:clip=1,"
                   "noise_multiplier=0.01); repeat to compose, applied in order")
    c.add_argument("--num-clients-averaged", type=_positive_int, default=1, metavar="K",
                   help="K clients with --batch-size images each; the server sees only their mean update")
    c.add_argument("--per-example-clip", type=_positive_float, default=None, metavar="C",
                   help="DP-SGD style: clip each image's gradient to L2 norm C before averaging")
    c.add_argument("--out", required=True, help="observation file to write (e.g. obs.pt)")
    c.add_argument("--truth", default=None, help="ground-truth file (default: truth.npz beside --out)")
    c.set_defaults(func=cmd_capture)

    o = sub.add_parser("obfuscate", help="apply obfuscations to an existing observation file")
    o.add_argument("--observation", required=True, help="observation file to read")
    o.add_argument("--spec", required=True, action="append", metavar="SPEC",
                   help="NAME:key=value,... (e.g. qsgd:levels=16, topk:keep=0.01, sign, uniform:bits=8); "
                   "repeat to compose, applied in order")
    o.add_argument("--out", required=True, help="observation file to write (may equal --observation)")
    o.add_argument("--seed", type=_seed, default=0, help="seed of the obfuscation's randomness (default 0)")
    o.set_defaults(func=cmd_obfuscate)

    t = sub.add_parser("attack", help="attacker side: reconstruct images from an observation file")
    t.add_argument("--observation", required=True)
    t.add_argument("--attack", default="auto",
                   help="attack: auto (the strongest the model allows: linear-layer disaggregation + feature "
                        "inversion + refinement, else optimisation), rog, inverting_gradients (ig), dlg or idlg "
                        "(default auto)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--truth", default=None, help="truth.npz to score against (metrics.json)")
    t.add_argument("--iterations", type=_positive_int, default=None)
    t.add_argument("--time-budget", type=_positive_float, default=None, help="wall-clock seconds")
    t.add_argument("--restarts", type=_positive_int, default=None)
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE", help="override a preset setting")
    t.add_argument("--prior", default=None, metavar="PRIOR_FILE",
                   help="learned post-processing ('gradleak prior train'); results are reported with and without "
                        "it, and with --truth the prior must not have been trained on an attacked patient")
    t.add_argument("--reference-data", default=None, metavar="SPEC",
                   help="with --truth: the attacker's reference data set (e.g. kaggle:PATH,split=train): its "
                        "non-attacked patients give the blind baseline, and it is the identified gallery of "
                        "patient re-identification (default: the data set the observation names)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_attack)

    pr = sub.add_parser("prior", help="ROG's learned post-processing: train or inspect a chest X-ray prior")
    prs = pr.add_subparsers(dest="prior_command", required=True, metavar="ACTION")
    pt = prs.add_parser("train", help="train a prior on auxiliary (public) images, attacked patients excluded")
    pt.add_argument("--data", required=True, help="data set spec of the auxiliary images, e.g. "
                    "kaggle:PATH,split=train or phantoms:n=512")
    pt.add_argument("--size", type=_positive_int, default=64, help="image size in px (default 64)")
    pt.add_argument("--out", required=True, help="prior file to write (safetensors + JSON header)")
    pt.add_argument("--exclude-patients", default=None, metavar="ID,ID",
                    help="patients never to train on: ids as the data name them, or their pseudonyms (pt-...)")
    pt.add_argument("--exclude-from", action="append", metavar="FILE",
                    help="exclude the patients of a truth.npz or of a text file (one id or pseudonym a line); "
                         "repeatable")
    pt.add_argument("--limit", type=_positive_int, default=None, help="use at most this many images (whole patients)")
    pt.add_argument("--steps", type=_positive_int, default=1500)
    pt.add_argument("--batch-size", type=_positive_int, default=32)
    pt.add_argument("--crop", type=_non_negative_int, default=32, help="train on random crops of this side (0: whole images)")
    pt.add_argument("--lr", type=_positive_float, default=2e-3)
    pt.add_argument("--width", type=_positive_int, default=16, help="base channels of the U-Net (default 16)")
    pt.add_argument("--label-conditioned", action="store_true", help="condition the prior on the image's label")
    pt.add_argument("--num-classes", type=_positive_int, default=2)
    pt.add_argument("--loss", choices=["l1", "l2"], default="l1", help="training loss (l2 is what PSNR measures)")
    pt.add_argument("--degradation", type=_kv, action="append", metavar="KEY=VALUE",
                    help="degradation setting: scale_factor, latent_noise, contrast, brightness, pixel_noise "
                         "(wins over a calibrated value)")
    pt.add_argument("--calibrate-like", default=None, metavar="OBS",
                    help="fit the degradation to ROG outputs for auxiliary images captured as this observation "
                         "was (architecture, weights, protocol, obfuscation); excluded patients are never used")
    pt.add_argument("--calibrate-images", type=_positive_int, default=8,
                    help="auxiliary batches for --calibrate-like (default 8)")
    pt.add_argument("--calibrate-iterations", type=_positive_int, default=100,
                    help="ROG iterations per calibration attack (default 100)")
    pt.add_argument("--checkpoint-every", type=_positive_int, default=100,
                    help="steps between checkpoints (PRIOR.ckpt); rerun the same command to resume")
    pt.add_argument("--seed", type=_seed, default=0)
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=cmd_prior_train)
    pi = prs.add_parser("inspect", help="print a prior file's header")
    pi.add_argument("prior")
    pi.set_defaults(func=cmd_prior_inspect)

    r = sub.add_parser("run", help="run an experiment YAML (capture -> attack -> metrics) into experiments/")
    r.add_argument("config")
    r.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. attack.settings.iterations=100")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_run)

    u = sub.add_parser("utility", help="federated training of the classifier under an obfuscation: what the "
                       "defence costs the model (utility.json, learning curves, model.pt)")
    u.add_argument("config", help="utility config YAML (see examples/utility_*.yaml)")
    u.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. federation.rounds=5")
    u.add_argument("--eval-data", default=None, metavar="SPEC",
                   help="evaluate on this data set (e.g. kaggle:PATH,split=test) instead of held-out patients")
    u.add_argument("--save-rounds", type=_indices, default=None, metavar="R1,R2",
                   help="also keep model_rR.pt after these rounds (victims for 'attack at round r')")
    u.add_argument("--out", default=None, help="experiment folder to create (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_utility)

    w = sub.add_parser("sweep", help="run a grid of experiments (resumable; local processes or Ray) into a folder")
    w.add_argument("spec", help="sweep YAML: a base experiment config and a grid of values")
    w.add_argument("--out", required=True, help="sweep folder (rerun with the same folder to resume)")
    w.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray tasks")
    w.add_argument("--address", default=None, help="Ray cluster address (default: start Ray on this machine)")
    w.add_argument("--workers", type=_positive_int, default=None,
                   help="parallel cells (default: one per CPU core; with Ray, the CPUs of a local Ray)")
    w.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help="override a spec value by dotted key, e.g. base.attack.settings.iterations=50")
    w.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="write report.html for a sweep folder or an experiment folder")
    rp.add_argument("experiment", help="a sweep folder (results.jsonl) or an experiment folder (metrics.json)")
    rp.add_argument("--out", default=None, help="HTML file to write (default: EXPERIMENT/report.html)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the built-in demonstration on synthetic chest radiographs")
    d.add_argument("--out", default="experiments", help="folder for the demo's experiment (default experiments)")
    d.add_argument("--iterations", type=_positive_int, default=None, help="attack iterations (default: the demo's)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="print an observation file's header")
    i.add_argument("observation")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    to_console()  # progress messages; --quiet only turns the progress bars off
    _NEW.clear()
    try:
        try:
            return int(args.func(args) or 0)
        except BaseException:
            remove_new(_NEW)
            raise
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"gradleak: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradleak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
