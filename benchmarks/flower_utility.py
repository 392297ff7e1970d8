"""Flower's engine against the built-in loop: one utility config, the same seeds, a few obfuscations.

Runs ``gradleak utility`` (``gradleak.experiment.utility.run_utility``) twice per obfuscation and seed,
once with ``federation.engine: flower`` (every client a virtual Flower node on Ray) and once with
``federation.engine: local`` (the clients one after another in this process), and prints a Markdown table:
the final ROC AUC of each engine, the wall-clock of each run (median over the seeds) and the ratio
flower / local, then the medians over every run of each engine. Without random obfuscations the two engines
give the same numbers; with noise, ``qsgd`` or ``randk`` they draw other (equally distributed) values.

The data: the Kaggle chest X-ray train split from ``../shared/data/chest_xray`` when it is there (20 % of
its patients held out for evaluation), else the synthetic phantoms. The federation: IID by patient,
every client in every round, FedAvg (one local epoch, mini-batches of 32, local learning rate 0.05), a
small ConvNet. The built-in loop runs on one torch thread (``threads: 1``), as each Flower node does.

    nice -n 5 python benchmarks/flower_utility.py                        # 4 clients, 3 rounds, 32 px
    python benchmarks/flower_utility.py --obfuscations none,topk10 --seeds 0,1 --rounds 5
    python benchmarks/flower_utility.py --dry-run                        # check the configs, run nothing

Run from the repository root with gradleak and Flower importable (``pip install -e '.[flower]'`` or
``PYTHONPATH=src``). Timings depend on the machine's load: the script prints the load average of every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradleak.experiment import utility  # noqa: E402
from gradleak.experiment.outputs import write_json, write_text  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402

KAGGLE = ROOT.parent / "shared" / "data" / "chest_xray"

#: obfuscation name -> specs
OBFUSCATIONS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "qsgd16": [{"name": "qsgd", "levels": 16}],
    "topk10": [{"name": "topk", "keep": 0.1}],
    "gaussian": [{"name": "gaussian", "clip": 0.5, "noise_multiplier": 0.3}],
}
ENGINES = ("local", "flower")


def data_spec(choice: str, size: int) -> dict[str, Any]:
    """``auto``: the Kaggle train split when it is there, else the phantoms."""
    if choice == "auto":
        choice = "kaggle" if KAGGLE.is_dir() else "phantoms"
    if choice == "kaggle":
        return {"source": "kaggle", "path": str(KAGGLE), "split": "train", "size": size}
    return {"source": "phantoms", "n": 400, "size": size}


def config(obf: str, engine: str, seed: int, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    user = {
        "name": f"flower-utility-{obf}-{engine}-s{seed}",
        "seed": seed,
        "threads": 1,
        "output_dir": str(out),
        "data": data_spec(a.data, a.size),
        "holdout": 0.2,
        "model": {"arch": "convnet", "options": {"width": 8, "depth": 3, "pool_first": True}},
        "federation": {"num_clients": a.clients, "partition": "iid", "clients_per_round": 1.0, "rounds": a.rounds,
                       "algorithm": "fedavg", "local_epochs": 1, "local_lr": 0.05, "local_batch_size": 32,
                       "sends_buffers": True, "engine": engine},
        "obfuscation": OBFUSCATIONS[obf],
    }
    return utility.from_dict(user, source=f"benchmark {obf} on {engine}")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = utility.run_utility(cfg, progress=sys.stderr.isatty())
    return {"engine": res["engine"]["name"], "roc_auc": res["final"]["roc_auc"], "loss": res["final"]["loss"],
            "wall_s": time.perf_counter() - t0, "rounds_s": sum(r["seconds"] for r in res["rounds"]),
            "load_before": load, "load_after": os.getloadavg()[0], "folder": res["folder"]}


def table(results: dict[tuple[str, str, int], dict[str, Any]], obfs: list[str], seeds: list[int]) -> str:
    med = statistics.median
    rows = ["| obfuscation | ROC AUC local | ROC AUC flower | loss equal | local s | flower s | flower / local |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in obfs:
        loc = [results[o, "local", s] for s in seeds]
        flo = [results[o, "flower", s] for s in seeds]
        auc = " / ".join(f"{r['roc_auc']:.4f}" for r in loc), " / ".join(f"{r['roc_auc']:.4f}" for r in flo)
        same = all(x["loss"] == y["loss"] for x, y in zip(loc, flo))
        tl, tf = med(r["wall_s"] for r in loc), med(r["wall_s"] for r in flo)
        rows.append(f"| {o} | {auc[0]} | {auc[1]} | {'yes' if same else 'no'} | {tl:.1f} | {tf:.1f} | {tf / tl:.2f} |")
    per = {e: [r for (_, eng, _), r in results.items() if eng == e] for e in ENGINES}
    wall = {e: med(r["wall_s"] for r in per[e]) for e in ENGINES}
    loop = {e: med(r["rounds_s"] for r in per[e]) for e in ENGINES}
    rows += ["", f"median over {len(per['local'])} runs per engine: wall-clock local {wall['local']:.1f} s, "
             f"flower {wall['flower']:.1f} s, ratio flower / local {wall['flower'] / wall['local']:.2f}; "
             f"rounds only (Ray start-up and data loading left out) local {loop['local']:.1f} s, "
             f"flower {loop['flower']:.1f} s, ratio {loop['flower'] / loop['local']:.2f}"]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obfuscations", default=",".join(OBFUSCATIONS),
                   help=f"comma-separated, of {', '.join(OBFUSCATIONS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every seed runs on both engines")
    p.add_argument("--data", choices=("auto", "kaggle", "phantoms"), default="auto")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "experiments" / "benchmark-flower-utility"))
    p.add_argument("--dry-run", action="store_true", help="check every config and print the plan")
    a = p.parse_args(argv)
    obfs = [o.strip() for o in a.obfuscations.split(",") if o.strip()]
    if unknown := [o for o in obfs if o not in OBFUSCATIONS]:
        p.error(f"unknown obfuscation {unknown[0]!r} (known: {', '.join(OBFUSCATIONS)})")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = Path(a.out)
    cfgs = {(o, e, s): config(o, e, s, a, out) for s in seeds for o in obfs for e in ENGINES}  # fail fast
    print(f"data {cfgs[obfs[0], 'local', seeds[0]]['data']}; {a.clients} clients, {a.rounds} rounds, "
          f"{len(cfgs)} runs; {os.cpu_count()} CPUs")
    if a.dry_run:
        return 0
    results = {}
    for key in cfgs:
        results[key] = r = run(cfgs[key])
        print(f"{key[0]:9s} {key[1]:6s} seed {key[2]}: ROC AUC {r['roc_auc']:.4f}, {r['wall_s']:.1f} s "
              f"(rounds {r['rounds_s']:.1f} s), load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
    text = table(results, obfs, seeds)
    print(text)
    write_text(out / "flower_utility.md", text + "\n")
    write_json(out / "flower_utility.json", {f"{o}/{e}/{s}": r for (o, e, s), r in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "flower_utility.py"))
