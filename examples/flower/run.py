"""Federate chest X-rays over a few simulated hospitals on Flower, then attack what the server captured.

    python run.py                                   # synthetic phantoms, 3 hospitals, 3 rounds
    python run.py --data kaggle:/data/chest_xray,split=train --image-size 64
    python run.py --obfuscation topk:keep=0.1 --dp-noise 1.0 --dp-clip 0.5

Runs the apps of client_app.py and server_app.py with ``flwr.simulation.run_simulation`` (``flwr run .``
runs the same apps from pyproject.toml), then ``gradleak attack`` on one hospital's update of one round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # task.py and the apps, also in Flower's workers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import client_app  # noqa: E402
import server_app  # noqa: E402
from gradleak.figures.images import grid, save_png  # noqa: E402
from task import DEFAULTS, round_batch, settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULTS["data"], help="data spec (default %(default)s)")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image-size"])
    p.add_argument("--hospitals", type=int, default=DEFAULTS["num-hospitals"])
    p.add_argument("--rounds", type=int, default=DEFAULTS["num-server-rounds"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch-size"])
    p.add_argument("--obfuscation", action="append", metavar="SPEC",
                   help=f"what every hospital does to its update (repeatable; default {client_app.OBFUSCATIONS})")
    p.add_argument("--dp-noise", type=float, default=0.0, help="Flower's central DP noise multiplier (0: off)")
    p.add_argument("--dp-clip", type=float, default=DEFAULTS["dp-clip"], help="its server-side clip norm")
    p.add_argument("--out", default="flower-run", help="output folder (default %(default)s)")
    p.add_argument("--attack-round", type=int, default=None, help="round to attack (default: the last)")
    p.add_argument("--attack-hospital", type=int, default=0)
    p.add_argument("--attack-seconds", type=float, default=120, help="the attack's time budget (default %(default)s)")
    a = p.parse_args(argv)
    out = Path(a.out)
    overrides = {"data": a.data, "image-size": a.image_size, "num-hospitals": a.hospitals,
                 "num-server-rounds": a.rounds, "batch-size": a.batch_size, "dp-noise": a.dp_noise,
                 "dp-clip": a.dp_clip, "capture-dir": str(out / "captured")}
    run_simulation(server_app.make_app(overrides),
                   client_app.make_app(a.obfuscation or client_app.OBFUSCATIONS, overrides),
                   num_supernodes=a.hospitals, backend_config={"client_resources": {"num_cpus": 1}})
    captured = [c for c in json.loads((out / "captured" / "captures.json").read_text()) if "file" in c]  # not refused
    r = a.attack_round or max(c["round"] for c in captured)
    target = next(c for c in captured if c["round"] == r and c["client"] == a.attack_hospital)
    print(f"captured {len(captured)} updates; attacking hospital {a.attack_hospital}'s update of round {r}: "
          f"{target['num_images']} images, obfuscation {', '.join(target['obfuscation']) or 'none'}")
    folder = out / f"attack-round{r}-hospital{a.attack_hospital}"
    attack = [sys.executable, "-m", "gradleak.cli", "attack", "--observation", str(out / "captured" / target["file"]),
              "--out", str(folder), "--time-budget", str(a.attack_seconds)]
    rc = subprocess.run(attack).returncode
    if rc == 0:  # only this simulation knows the hospital's images: put them above what the server rebuilt
        truth, _ = round_batch(settings({}, overrides), a.attack_hospital, r)
        with np.load(folder / "reconstruction.npz") as z:
            rebuilt = torch.from_numpy(z["images"])
        save_png(grid([truth, rebuilt]), folder / "truth-vs-reconstruction.png")
        print(f"top row the hospital's images, bottom row the reconstruction: {folder / 'truth-vs-reconstruction.png'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
