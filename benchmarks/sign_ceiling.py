"""Where signSGD's leak ends: how much of each image's support the signs give, and what the inversion makes of it.

Under signSGD `auto` reads every image's *support* (the inputs of ``fc1`` that are positive) from the signs of
``fc1``'s update (:func:`gradleak.attacks.disaggregate.sign_supports`) and inverts those supports to images
(:func:`gradleak.attacks.linear_leak._sign_leak`). A row of the update shows an input's side only where the
images active in it do not outweigh each other, and at larger batches few rows are so: the reading leaves
entries open (the inversion leaves them free). This compares, with the true images in hand (a diagnostic: no
attack reads them):

- the reading: how many images it separated, the share of the support entries it leaves open, and how many of
  those it reads agree with the true supports (each read support matched to the image it agrees with most);
- the attack's leak stage as `auto` runs it (the reading, then the inversion, ``--seconds`` in all);
- the same inversion given every image's whole true support and ReLU pattern, in the same time: the most the
  inversion can make of a complete reading;
- how many support entries the leak's images get right, on the entries the reading read and on those it left
  open (the smoothness prior and the mixed rows' comparisons fill these).

Where the true supports give far more than the reading, what limits signSGD is the reading of the signs,
not the inversion or its time. The leakage benchmark's victim and draws (real chest X-rays of the train
split, 64 px, ``lenet5`` at random initialisation, FedSGD, labels inferred):

    python benchmarks/sign_ceiling.py --split tune --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leakage import blind_mean, cells, draw_arguments  # noqa: E402
from separation_ceiling import received_and_clean  # noqa: E402
from gradleak.attacks.linear_leak import (SIGN_TV, SIGN_UNITS, _sign_leak, invert_best_of,  # noqa: E402
                                          leaky_layer)
from gradleak.attacks.simulate import Simulator  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.metrics import score  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402


def true_signs(sim: Simulator, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's support (its ``fc1`` inputs that are positive) and ReLU pattern (``fc1``'s units it
    switches on)."""
    model = sim.model
    with torch.no_grad():
        u = model.leaky_preactivation((images - model.input_mean) / model.input_std)
        z = getattr(model, model.leaky_linear)(torch.relu(u))
    return u > 0, z > 0


def measure(batch, seconds: float, seed: int, starts: int) -> dict:
    """The reading's and the inversions' figures for one observation (see the module's docstring)."""
    obs, _ = received_and_clean(batch, "sign")
    sim = Simulator(obs)
    layer = leaky_layer(sim)
    supports, patterns = true_signs(sim, batch.images)
    t0 = time.perf_counter()
    found = _sign_leak(obs, sim, layer, generator=torch.Generator().manual_seed(seed), start=t0,
                       time_limit=seconds, settled_time_limit=None, invert_iterations=5000, invert_tv=1.0,
                       invert_starts=starts)
    out = {"separated": int(found.info["separated"]), "leak_seconds": time.perf_counter() - t0}
    if found.labels is None:
        return out
    feats = found.features
    read = feats != 0.5  # the entries the reading gave a side
    # each read support paired with the true image it agrees with most on its read entries
    agree = torch.stack([((feats[a][None] > 0.5) == supports)[:, read[a]].float().mean(dim=1)
                         for a in range(feats.shape[0])])
    rows, cols = scipy.optimize.linear_sum_assignment(-agree.numpy())
    out["open"] = float(1 - read.double().mean())
    out["read_right"] = float(((feats[rows] > 0.5) == supports[cols])[read[rows]].double().mean())
    out["leak"] = score(batch.images, batch.labels, found.images, found.labels)
    own, _ = true_signs(sim, found.images)
    right = own[rows] == supports[cols]
    out["leak_right_read"] = float(right[read[rows]].double().mean())
    out["leak_right_open"] = float(right[~read[rows]].double().mean()) if bool((~read).any()) else float("nan")
    images, _, _, _ = invert_best_of(sim, supports.double(), starts=starts,
                                     generator=torch.Generator().manual_seed(seed), scale_known=False,
                                     iterations=5000, time_limit=seconds, support=True, tv_weight=SIGN_TV,
                                     units=patterns.double() if SIGN_UNITS else None, units_weight=SIGN_UNITS)
    out["truth"] = score(batch.images, batch.labels, images, batch.labels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    draw_arguments(ap, batch_size=16)
    ap.add_argument("--seconds", type=float, default=200.0, help="time of the leak stage and of the inversion")
    ap.add_argument("--starts", type=int, default=4, help="inversion starts (auto's invert_starts)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    ds = load_dataset(f"kaggle:{a.data},split=train", size=a.size)
    obs_list = cells(ds, a.split, 0, a.batches, a.batch_size)
    mean = blind_mean(ds, obs_list)  # the leakage benchmark's blind guess
    print(f"signSGD's reading and inversion, B = {a.batch_size}, {a.split} draw, {a.seconds:g} s each. PSNR (dB) / "
          "SSIM (Gaussian window); support entries: the share right against the true supports.\n")
    print("| batch | blind guess | separated | entries open | read entries right | leak stage | its entries right "
          "(read / open) | inverted from the true supports |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for b, (_, idx) in enumerate(obs_list):
        batch = ds.batch(idx)
        blind = score(batch.images, batch.labels, mean.expand_as(batch.images), batch.labels)
        r = measure(batch, a.seconds, a.seed, a.starts)
        if "leak" not in r:
            print(f"| {a.split} {b} | {blind['psnr']:.2f} / {blind['ssim']:.3f} | 0 of {a.batch_size} | | | | | |",
                  flush=True)
            continue
        opened = "–" if np.isnan(r["leak_right_open"]) else f"{100 * r['leak_right_open']:.1f}"  # none left open
        print(f"| {a.split} {b} | {blind['psnr']:.2f} / {blind['ssim']:.3f} | {r['separated']} of {a.batch_size} | "
              f"{100 * r['open']:.1f} % | {100 * r['read_right']:.1f} % | {r['leak']['psnr']:.2f} / "
              f"{r['leak']['ssim']:.3f} | {100 * r['leak_right_read']:.1f} / {opened} % | "
              f"{r['truth']['psnr']:.2f} / {r['truth']['ssim']:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_code(main, "sign_ceiling.py"))
