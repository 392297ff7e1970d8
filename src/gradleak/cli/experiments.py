"""Experiment subcommands: ``run`` (one experiment config), ``utility`` (what an obfuscation costs the model),
``sweep`` (a grid of experiments), ``report`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .arguments import _output


def cmd_run(a: argparse.Namespace) -> int:
    from ..experiment import config
    from ..experiment.run import run_experiment

    cfg = config.load(a.config, overrides=dict(a.set or []))
    _output(cfg["output_dir"], "folder", f"{a.config}: output_dir")
    folder, metrics = run_experiment(cfg, progress=not a.quiet)
    g = metrics.get("gain_over_baseline") or {}
    gain = (f"  (over the blind baseline: {g['psnr_db']:+.2f} dB, SSIM {g['ssim']:+.4f})"
            if g.get("psnr_db") is not None else "")
    print(f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}{gain}  ->  {folder}")
    return 0


def cmd_utility(a: argparse.Namespace) -> int:
    from ..experiment import utility

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
    _print_utility(res)
    return 0


def _print_utility(res: dict) -> None:
    """The utility run's summary: the final and the best model, bits per round, epsilon and the files."""
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


def cmd_sweep(a: argparse.Namespace) -> int:
    from ..experiment.sweep import load_spec, run_sweep

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
        from ..report.render import write_report
        path = write_report(summary.folder)
        print(f"report:  {path}")
    return 0 if ok == summary.cells else 1


def cmd_report(a: argparse.Namespace) -> int:
    from ..report.render import write_report

    folder = Path(a.experiment)
    if not folder.is_dir():
        raise UserError(f"experiment folder not found: {folder}" if not folder.exists() else
                        f"{folder} is a file; give a sweep folder or an experiment folder")
    out = _output(a.out or folder / "report.html", "file", "--out")
    path = write_report(folder, out=out)
    print(f"report: {path}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ..demo import demo

    demo(out_root=_output(a.out, "folder", "--out"), iterations=a.iterations, quiet=a.quiet)
    return 0
