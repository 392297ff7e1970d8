"""The ``gradleak`` argument parser: one small function per subcommand adds its options and its command."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from .arguments import (_device, _indices, _kv, _non_negative_float, _non_negative_int, _positive_float,
                        _positive_int, _seed)
from .attack import cmd_attack, cmd_inspect
from .experiments import cmd_demo, cmd_report, cmd_run, cmd_sweep, cmd_utility
from .prior import cmd_prior_inspect, cmd_prior_train
from .victim import cmd_capture, cmd_obfuscate

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit code 2, as every other user error."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix("gradleak").strip()
        print(f"gradleak: error: {sub + ': ' if sub else ''}{' '.join(message.split())} "
              f"(see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradleak", description="Reconstruct private images from federated "
                                "updates (as a curious server would) and measure what leaked.")
    p.add_argument("--version", action="version", version=f"gradleak {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_capture, _add_obfuscate, _add_attack, _add_prior, _add_run, _add_utility, _add_sweep,
                _add_report, _add_demo, _add_inspect):
        add(sub)
    return p


def _add_capture(sub) -> None:
    c = sub.add_parser("capture", help="victim side: compute a client's update on a batch and save the observation")
    c.add_argument("--data", default="phantoms", help="data set spec, e.g. phantoms, kaggle:PATH,split=train, "
                   "medmnist:FILE.npz,split=val, folder:PATH, dicom:PATH (default: phantoms)")
    c.add_argument("--size", type=_positive_int, default=None, help="image size in px (default: the spec's, else 64)")
    c.add_argument("--indices", type=_indices, default=None, help="comma-separated data set indices")
    c.add_argument("--batch-size", type=_positive_int, default=4,
                   help="images drawn with --seed when no --indices (default 4, as in experiment configs)")
    c.add_argument("--seed", type=_seed, default=0, help="seed for the batch choice and obfuscation noise")
    c.add_argument("--arch", default=None, help="victim model (lenet5, lenet_zhu, convnet, resnet18, resnet18_nobn, "
                   "mlp; default lenet5, or the --model-state file's)")
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


def _add_obfuscate(sub) -> None:
    o = sub.add_parser("obfuscate", help="apply obfuscations to an existing observation file")
    o.add_argument("--observation", required=True, help="observation file to read")
    o.add_argument("--spec", required=True, action="append", metavar="SPEC",
                   help="NAME:key=value,... (e.g. qsgd:levels=16, topk:keep=0.01, sign, uniform:bits=8); "
                   "repeat to compose, applied in order")
    o.add_argument("--out", required=True, help="observation file to write (may equal --observation)")
    o.add_argument("--seed", type=_seed, default=0, help="seed of the obfuscation's randomness (default 0)")
    o.set_defaults(func=cmd_obfuscate)


def _add_attack(sub) -> None:
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


def _add_prior(sub) -> None:
    pr = sub.add_parser("prior", help="ROG's learned post-processing: train or inspect a chest X-ray prior")
    prs = pr.add_subparsers(dest="prior_command", required=True, metavar="ACTION")
    _add_prior_train(prs)
    pi = prs.add_parser("inspect", help="print a prior file's header")
    pi.add_argument("prior")
    pi.set_defaults(func=cmd_prior_inspect)


def _add_prior_train(prs) -> None:
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
    pt.add_argument("--for-attack", choices=["rog", "auto"], default="rog",
                    help="the attack whose outputs the prior post-processes: rog (ROG's latent decoding, the "
                         "default degradation) or auto (the linear-layer leak's inverted images: milder "
                         "degradations at half the side)")
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


def _add_set(p: argparse.ArgumentParser, what: str, example: str) -> None:
    """--set KEY=VALUE (repeatable): override a value of the config or spec by dotted key."""
    p.add_argument("--set", type=_kv, action="append", metavar="KEY=VALUE",
                   help=f"override a {what} value by dotted key, e.g. {example}")


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run an experiment YAML (capture -> attack -> metrics) into experiments/")
    r.add_argument("config")
    _add_set(r, "config", "attack.settings.iterations=100")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_run)


def _add_utility(sub) -> None:
    u = sub.add_parser("utility", help="federated training of the classifier under an obfuscation: what the "
                       "defence costs the model (utility.json, learning curves, model.pt)")
    u.add_argument("config", help="utility config YAML (see examples/utility_*.yaml)")
    _add_set(u, "config", "federation.rounds=5")
    u.add_argument("--eval-data", default=None, metavar="SPEC",
                   help="evaluate on this data set (e.g. kaggle:PATH,split=test) instead of held-out patients")
    u.add_argument("--save-rounds", type=_indices, default=None, metavar="R1,R2",
                   help="also keep model_rR.pt after these rounds (victims for 'attack at round r')")
    u.add_argument("--out", default=None, help="experiment folder to create (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_utility)


def _add_sweep(sub) -> None:
    w = sub.add_parser("sweep", help="run a grid of experiments (resumable; local processes or Ray) into a folder")
    w.add_argument("spec", help="sweep YAML: a base experiment config and a grid of values")
    w.add_argument("--out", required=True, help="sweep folder (rerun with the same folder to resume)")
    w.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local worker processes (default) or Ray tasks")
    w.add_argument("--address", default=None, help="Ray cluster address (default: start Ray on this machine)")
    w.add_argument("--workers", type=_positive_int, default=None,
                   help="parallel cells (default: one per CPU core; with Ray, the CPUs of a local Ray)")
    _add_set(w, "spec", "base.attack.settings.iterations=50")
    w.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)


def _add_report(sub) -> None:
    rp = sub.add_parser("report", help="write report.html for a sweep folder or an experiment folder")
    rp.add_argument("experiment", help="a sweep folder (results.jsonl) or an experiment folder (metrics.json)")
    rp.add_argument("--out", default=None, help="HTML file to write (default: EXPERIMENT/report.html)")
    rp.set_defaults(func=cmd_report)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="the built-in demonstration on synthetic chest radiographs")
    d.add_argument("--out", default="experiments", help="folder for the demo's experiment (default experiments)")
    d.add_argument("--iterations", type=_positive_int, default=None,
                   help="attack iterations, and auto's inversion iterations per start (default: the demo's)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def _add_inspect(sub) -> None:
    i = sub.add_parser("inspect", help="print an observation file's header")
    i.add_argument("observation")
    i.set_defaults(func=cmd_inspect)
