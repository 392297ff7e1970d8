"""What each defence costs the pneumonia classifier: federated training on real chest X-rays, per defence.

The set-up (the same for every defence): the Kaggle chest X-ray train split at 64 px from
``../shared/data/chest_xray``, 20 % of its patients held out for evaluation, the rest split IID by patient
among 10 clients that all take part in every round, FedAvg (one local epoch, mini-batches of 32, local
learning rate 0.05), a small ConvNet (width 8, depth 4, pooling after every block, BatchNorm statistics
averaged by the server). Every client update goes through the defence with ``gradleak.obfuscation.apply``,
as in an attack capture. Prints a Markdown table of ROC AUC, accuracy, bits sent per round and the
client-level epsilon spent, and writes it (with every run's experiment folder) under ``--out``.

    python benchmarks/utility.py                                  # every defence, 15 rounds
    python benchmarks/utility.py --defences none,qsgd16 --rounds 5
    python benchmarks/utility.py --list                           # the defences and their specs

Run from the repository root with gradleak importable (``pip install -e .`` or ``PYTHONPATH=src``).
Timings depend on the machine's load: the script prints the load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradleak.experiment import utility  # noqa: E402
from gradleak.experiment.outputs import write_json, write_text  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402

DELTA = 1e-5

#: defence name -> (obfuscation specs, description for the table)
DEFENCES: dict[str, tuple[list[dict], str]] = {
    "none": ([], "no obfuscation"),
    "qsgd16": ([{"name": "qsgd", "levels": 16}], "QSGD, 16 levels, max-norm"),
    "qsgd4": ([{"name": "qsgd", "levels": 4}], "QSGD, 4 levels, max-norm"),
    "sign": ([{"name": "sign", "scaled": True}], "signSGD, each tensor scaled by its mean |delta|"),
    "sign_unscaled": ([{"name": "sign"}], "signSGD, +-1 per entry (server_lr 0.001)"),
    "topk10": ([{"name": "topk", "keep": 0.1}], "top-k, 10 % per tensor"),
    "topk1": ([{"name": "topk", "keep": 0.01}], "top-k, 1 % per tensor"),
    "dp8": ([{"name": "gaussian", "clip": 0.25, "target_epsilon": 8.0, "delta": DELTA}],
            "Gaussian, clip 0.25, client-level DP eps 8"),
    "dp1": ([{"name": "gaussian", "clip": 0.25, "target_epsilon": 1.0, "delta": DELTA}],
            "Gaussian, clip 0.25, client-level DP eps 1"),
}
DEFAULT = "none,qsgd16,qsgd4,sign,topk10,topk1,dp8,dp1"
#: server settings a defence needs (anything else keeps the defaults below)
SERVER = {"sign_unscaled": {"server_lr": 0.001}}


def config(defence: str, rounds: int, data: str, out: Path, seed: int, threads: int | None) -> dict:
    specs, _ = DEFENCES[defence]
    user = {
        "name": f"utility-{defence}",
        "seed": seed,
        "threads": threads,
        "output_dir": str(out),
        "data": {"source": "kaggle", "path": data, "split": "train", "size": 64},
        "holdout": 0.2,
        "model": {"arch": "convnet", "options": {"width": 8, "depth": 4, "pool_first": True}},
        "federation": {"engine": "local", "num_clients": 10, "partition": "iid", "clients_per_round": 1.0, "rounds": rounds,
                       "algorithm": "fedavg", "local_epochs": 1, "local_lr": 0.05, "local_batch_size": 32,
                       "sends_buffers": True, **SERVER.get(defence, {})},
        "obfuscation": specs,
        "evaluation": {"monitor": "roc_auc"},
    }
    return utility.from_dict(user, source=f"benchmark {defence}")


def fmt_bits(b: float) -> str:
    return f"{b / 1e6:.3f} M"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--defences", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"),
                   help="Kaggle chest_xray folder (default ../shared/data/chest_xray)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "benchmark-utility"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: fastest on a shared machine; 0 = torch's default)")
    p.add_argument("--list", action="store_true", help="print the defences and exit")
    a = p.parse_args(argv)
    if a.list:
        for name, (specs, desc) in DEFENCES.items():
            print(f"{name:14s} {desc:50s} {json.dumps(specs)}")
        return 0
    names = [d.strip() for d in a.defences.split(",") if d.strip()]
    unknown = [d for d in names if d not in DEFENCES]
    if unknown:
        p.error(f"unknown defence {unknown[0]!r} (known: {', '.join(DEFENCES)})")
    if not Path(a.data).is_dir():
        p.error(f"data folder not found: {a.data}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {d: config(d, a.rounds, a.data, out, a.seed, a.threads or None) for d in names}  # fail fast
    rows, results = [], {}
    for d in names:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = utility.run_utility(cfgs[d], progress=sys.stderr.isatty())
        minutes = (time.perf_counter() - t0) / 60
        load1 = os.getloadavg()[0]
        f, b = res["final"], res["best"]
        eps = res["epsilon"]
        results[d] = {"folder": res["folder"], "final": f, "best_round": res["best_round"], "best": b,
                      "bits_per_round": res["bits_per_round"], "bits_per_update": res["bits_per_update"],
                      "dense_bits_per_update": res["dense_bits_per_update"], "epsilon": eps, "delta": res["delta"],
                      "minutes": minutes, "load_before": load0, "load_after": load1,
                      "obfuscation": DEFENCES[d][0], "rounds": res["rounds_run"]}
        rows.append(f"| {d} | {DEFENCES[d][1]} | {f['roc_auc']:.4f} | {f['accuracy']:.4f} | "
                    f"{f['sensitivity']:.3f} / {f['specificity']:.3f} | {b['roc_auc']:.4f} (r{res['best_round']}) | "
                    f"{fmt_bits(res['bits_per_round'])} ({res['bits_per_update'] / res['dense_bits_per_update']:.3f}x dense) | "
                    + (f"{eps:.2f}" if eps is not None else "-") + f" | {minutes:.1f} |")
        print(f"{d}: AUC {f['roc_auc']:.4f}, accuracy {f['accuracy']:.4f}, {minutes:.1f} min "
              f"(load {load0:.1f} -> {load1:.1f}) -> {res['folder']}", flush=True)
    head = (f"Final model after {a.rounds} rounds (FedAvg, 10 clients, Kaggle train split at 64 px, 20 % of patients "
            f"held out: ROC AUC and accuracy at threshold 0.5 on them). Bits: upload of all 10 clients per round. "
            f"epsilon: client-level, delta {DELTA:g}, RDP accountant, sample rate 1.\n\n"
            "| defence | obfuscation | ROC AUC | accuracy | sensitivity / specificity | best ROC AUC (round) | "
            "bits / round | epsilon | minutes |\n|---|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows) + "\n"
    print("\n" + table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_text(out / f"table-{stamp}.md", table)
    write_json(out / f"results-{stamp}.json", {"rounds": a.rounds, "seed": a.seed, "threads": a.threads,
                                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "utility.py"))
