"""Where the refinement on the leaky layer ends: how much of the images its objective holds, and how much a
start from nothing finds.

Under heavy noise (relative Gaussian σ0 = 1, QSGD 4) at B = 8 and 16 `auto` refines images on ``fc1``'s
received update itself (:func:`gradleak.attacks.linear_leak.refine_on_layer`: the update's relative squared
error of the images' own update plus total variation, the ReLU's gate annealed) from a blank start: at B = 16
nothing else separates, at B = 8 these images compete with the separation's by that objective. This runs that
refinement, with the true images in hand (a diagnostic: no attack reads them), from three starts:

- the true images: the objective's own optimum near the truth, the most this refinement can give;
- the true images' layout, area-downsampled to ``--layout`` pixels a side and upsampled bilinearly: how much
  a coarse start carries;
- a blank start (mid-grey with ``LAYER_BLANK_JITTER``, the first stages at half the side), one run;
- the attack's blank start (:func:`gradleak.attacks.linear_leak.refine_from_blank`): ``LAYER_BLANK_RUNS``
  runs from differently jittered mid-grey (the first the row above's start) in the same total time, their
  images paired and averaged; its objective is the lowest run's (what `auto` judges it by), the mean's own
  objective beside it.

A line per observation says how many of the clean update's singular values lie above the noise's threshold
``sigma (rows x columns)^(1/4)`` (``sigma`` the rms of the received update's difference from the clean one):
below it a direction of the update is lost in i.i.d. noise, so no spectral method sees it.

Each row gives the PSNR / SSIM of the images refined (true labels, the blank start's in class order,
paired by the metrics' Hungarian matching) and the objective the server computes (lower is better; it
never sees the truth). Where the objective is lower from the truth than from the blank start and the
PSNR far higher, the update holds more than the attack's optimisation finds; where the objective from
the blank start is the lower, the noise fits better than the truth. The leakage benchmark's victim and
draws (real chest X-rays of the train split, 64 px, ``lenet5`` at random initialisation, FedSGD):

    python benchmarks/refinement_ceiling.py --split report --batch-size 16 --obfuscations relgauss1 qsgd4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leakage import OBFUSCATIONS, blind_mean, cells, draw_arguments  # noqa: E402
from separation_ceiling import received_and_clean  # noqa: E402
from gradleak.attacks.linear_leak import (LAYER_BLANK_COARSE, LAYER_BLANK_JITTER, leaky_layer,  # noqa: E402
                                          observed_matrix, refine_from_blank, refine_on_layer)
from gradleak.attacks.simulate import Simulator  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.metrics import score  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402


def measure(batch, name: str, seconds: float, layout: int, seed: int
            ) -> tuple[tuple[int, int], list[tuple[str, dict, dict]]]:
    """How many of the clean update's singular values lie above the noise's threshold (and of how many),
    and the refinement from the truth, from its layout, from a blank start and as the attack runs it from
    blank starts: (start, metrics, info)."""
    obs, clean = received_and_clean(batch, name)
    sim = Simulator(obs)
    n, shape = sim.num_images, sim.image_shape
    layer = leaky_layer(sim)
    G, _, _ = observed_matrix(obs, sim, layer)
    G0, _, _ = observed_matrix(clean, Simulator(clean), layer)
    # a direction of a rank-n matrix whose singular value is below sigma (rows x columns)^(1/4) is lost in
    # i.i.d. noise of standard deviation sigma (the spiked-model threshold); sigma here is the noise's rms
    sigma = float((G - G0).pow(2).mean().sqrt())
    above = int((torch.linalg.svdvals(G0)[:n] > sigma * (G.shape[0] * G.shape[1]) ** 0.25).sum())
    if seconds <= 0:
        return (above, n), []
    s = torch.linalg.svdvals(G)
    noise_share = 1.0 - float(s[:n].pow(2).sum() / G.pow(2).sum())  # as `auto` weighs the smoothness prior
    order = torch.argsort(batch.labels, stable=True)  # the blank start's images come in class order
    truth, labels = batch.images[order], batch.labels[order]
    coarse = F.interpolate(F.interpolate(truth, size=(layout, layout), mode="area"), size=shape[-2:],
                           mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    jitter = 0.5 + LAYER_BLANK_JITTER * torch.randn((n, *shape), generator=g)
    blank = jitter.clamp(0, 1)
    out = []
    for start, images, side in (("truth", truth, 1), (f"layout {layout} px", coarse.clamp(0, 1), 1),
                                ("blank", blank, LAYER_BLANK_COARSE)):
        refined, info = refine_on_layer(sim, G, images, labels, noise_share=noise_share, time_limit=seconds,
                                        coarse=side)
        # the objective of the images returned (the start's where refining did not lower it)
        info["objective"] = info["objective_after"] if info["kept"] else info["objective_before"]
        out.append((start, score(truth, labels, refined, labels), info))
    refined, info = refine_from_blank(sim, G, labels, noise_share=noise_share, time_limit=seconds, generator=g,
                                      first=jitter)
    out.append((f"blank, mean of {info['runs']} runs (objective of the mean {info['mean_objective']:.6f})",
                score(truth, labels, refined, labels), {**info, "objective": info["objective_after"]}))
    return (above, n), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    draw_arguments(ap, batch_size=16)
    ap.add_argument("--obfuscations", nargs="+", default=["relgauss1", "qsgd4"],
                    choices=[k for k in OBFUSCATIONS if k not in ("topk10", "topk1", "fedavg5", "sign")])
    ap.add_argument("--seconds", type=float, default=110.0,
                    help="time limit of each refinement (0: the spectrum's line only)")
    ap.add_argument("--layout", type=int, default=8, help="side of the true images' layout start")
    ap.add_argument("--seed", type=int, default=1, help="seed of the blank start's jitter")
    a = ap.parse_args()
    ds = load_dataset(f"kaggle:{a.data},split=train", size=a.size)
    obs_list = cells(ds, a.split, 0, a.batches, a.batch_size)
    mean = blind_mean(ds, obs_list)  # the leakage benchmark's blind guess
    print(f"Refinement on the leaky layer, {a.seconds:g} s each, B = {a.batch_size}, {a.split} draw. Cells: PSNR "
          "(dB) / SSIM (Gaussian window), the objective the server computes (lower is better), iterations, "
          "whether the coldest stage stopped falling.\n")
    print("| batch | obfuscation | blind guess | start | refined | objective | iterations | converged |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    for b, (_, idx) in enumerate(obs_list):
        batch = ds.batch(idx)
        blind = score(batch.images, batch.labels, mean.expand_as(batch.images), batch.labels)
        for name in a.obfuscations:
            (above, n), rows = measure(batch, name, a.seconds, a.layout, a.seed)
            print(f"| {a.split} {b} | {OBFUSCATIONS[name][0]} | {blind['psnr']:.2f} / {blind['ssim']:.3f} | "
                  f"{above} of the clean update's {n} singular values above the noise's threshold | | | | |",
                  flush=True)
            for start, m, info in rows:
                print(f"| {a.split} {b} | {OBFUSCATIONS[name][0]} | {blind['psnr']:.2f} / {blind['ssim']:.3f} | "
                      f"{start} | {m['psnr']:.2f} / {m['ssim']:.3f} | {info['objective']:.6f} | "
                      f"{info['iterations']} | {'yes' if info['converged'] else 'no'} |", flush=True)


if __name__ == "__main__":
    sys.exit(exit_code(main, "refinement_ceiling.py"))
