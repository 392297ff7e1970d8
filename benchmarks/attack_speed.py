"""Attack speed: iterations per second of each attack x victim architecture x image size.

Each cell runs the attack with R restarts as one batched problem and, in the same run and interleaved
with it, as a plain Python loop of R single-restart runs of the same attack (same settings, same number
of iterations). Throughput is restart-iterations per second of the optimisation loop only (the setup —
building the simulator, inferring labels — is excluded from both), the median over repeats; the
ratio batched / loop is what to compare across machines.

A second table times the matching objective alone (one simulated update's cosine distance to the
observed one, forward and backward) in the bound dot-product form the attacks use against the
element-wise form it replaced. A third times what each iteration of the linear-layer leak's feature
inversion evaluates (the leaky layer's pre-ReLU input for B images, forward and backward, through the
model's own weights) with the convolutions in the default layout against channels-last, the layout the
simulator keeps its model in on a CPU.

    python benchmarks/attack_speed.py                       # defaults: small, a few minutes on 2 cores
    python benchmarks/attack_speed.py --archs lenet5 resnet18_nobn --sizes 64 128 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradleak.attacks import canonical, run_attack  # noqa: E402
from gradleak.attacks.objectives import cosine_matching  # noqa: E402
from gradleak.attacks.simulate import Simulator  # noqa: E402
from gradleak.capture import capture  # noqa: E402
from gradleak.federated import Protocol  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402


def observation(arch: str, size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, size, size, generator=g)
    labels = torch.arange(batch) % 2
    obs, _ = capture(images, labels, arch=arch, protocol=Protocol(), model_seed=seed)
    return obs


def time_attack(name: str, obs, restarts: int, iterations: int, batched: bool, device: str) -> float:
    """Restart-iterations per second of the optimisation loop."""
    settings = {"iterations": iterations, "time_budget": None}
    if batched:
        rec = run_attack(name, obs, {**settings, "restarts": restarts}, seed=0, device=device, progress=False)
        return restarts * rec.iterations / rec.seconds
    seconds = 0.0
    done = 0
    for r in range(restarts):
        rec = run_attack(name, obs, {**settings, "restarts": 1}, seed=r, device=device, progress=False)
        seconds += rec.seconds
        done += rec.iterations
    return done / seconds


def elementwise_cosine(sim, target):
    """The element-wise form of 1 - cos (the foundation's implementation), for comparison."""
    dot = ns = nt = 0.0
    for k, t in target.items():
        s = sim[k]
        dot = dot + (s * t).sum()
        ns = ns + s.pow(2).sum()
        nt = nt + t.pow(2).sum()
    return 1 - dot / (ns.sqrt() * torch.as_tensor(nt).sqrt()).clamp_min(1e-12)


def time_objective(obs, batch: int, repeats: int, device: str) -> tuple[float, float]:
    sim = Simulator(obs, device)
    bound = cosine_matching(sim.target)
    y = (torch.arange(batch) % 2).to(sim.device)
    x = torch.rand(1, batch, *sim.image_shape, generator=torch.Generator().manual_seed(1)).to(sim.device)
    x.requires_grad_(True)
    forms = {"bound": lambda u, xr: bound(u), "elementwise": lambda u, xr: elementwise_cosine(u, sim.target)}
    times = {k: [] for k in forms}
    for _ in range(repeats + 1):
        for k, fn in forms.items():
            x.grad = None
            t = time.perf_counter()
            sim.batched(fn, x, y).sum().backward()
            if sim.device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return tuple(statistics.median(times[k][1:]) for k in forms)


def time_inversion(obs, repeats: int, device: str) -> tuple[float, float] | None:
    """Median seconds of one forward and backward of ``leaky_preactivation`` for the observation's batch,
    default layout and channels-last (None where the model has no leaky layer)."""
    sim = Simulator(obs, device)
    if not hasattr(sim.model, "leaky_preactivation"):
        return None
    layouts = {"default": copy.deepcopy(sim.model).to(memory_format=torch.contiguous_format),
               "channels_last": copy.deepcopy(sim.model).to(memory_format=torch.channels_last)}
    x = torch.rand(sim.num_images, *sim.image_shape, generator=torch.Generator().manual_seed(1)).to(sim.device)
    x.requires_grad_(True)
    times = {k: [] for k in layouts}
    for _ in range(repeats + 1):
        for k, model in layouts.items():
            for p in model.parameters():
                p.requires_grad_(False)
            x.grad = None
            t = time.perf_counter()
            model.leaky_preactivation(x).pow(2).mean().backward()
            if sim.device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return tuple(statistics.median(times[k][1:]) for k in layouts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", nargs="+", default=["ig", "dlg", "rog"])
    p.add_argument("--archs", nargs="+", default=["lenet_zhu", "lenet5"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    p.add_argument("--batch", type=int, default=1, help="images per observation (default 1)")
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5, help="iterations per timed run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cell; the median is reported")
    p.add_argument("--inversion-batch", type=int, default=4, help="images per inversion step (default 4)")
    p.add_argument("--inversion-repeats", type=int, default=30, help="timed inversion steps per layout")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# gradleak attack speed ({a.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads)\n")
    print(f"B={a.batch} image(s) per observation, R={a.restarts} restarts, {a.iterations} iterations per run, "
          f"median of {a.repeats} repeats; restart-iterations per second of the optimisation loop.\n")
    print("| attack | arch | size | batched (it/s) | per-restart loop (it/s) | batched / loop |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for arch in a.archs:
        for size in a.sizes:
            obs = observation(arch, size, a.batch)
            for name in a.attacks:
                batched, loop = [], []
                time_attack(name, obs, a.restarts, 1, True, a.device)  # warm-up
                for _ in range(a.repeats):
                    batched.append(time_attack(name, obs, a.restarts, a.iterations, True, a.device))
                    loop.append(time_attack(name, obs, a.restarts, a.iterations, False, a.device))
                b, l = statistics.median(batched), statistics.median(loop)
                print(f"| {canonical(name)} | {arch} | {size} | {b:.2f} | {l:.2f} | {b / l:.2f} |", flush=True)
    print("\nMatching objective alone (cosine; simulate the update, compare, backward), median seconds:\n")
    print("| arch | size | bound dot-product form (s) | element-wise form (s) | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for arch in a.archs:
        for size in a.sizes:
            obs = observation(arch, size, a.batch)
            bound, elem = time_objective(obs, a.batch, a.repeats, a.device)
            print(f"| {arch} | {size} | {bound:.4f} | {elem:.4f} | {elem / bound:.2f} |", flush=True)
    print(f"\nFeature inversion's step (the leaky layer's pre-ReLU input, forward and backward, "
          f"B = {a.inversion_batch}), median seconds over {a.inversion_repeats} repeats:\n")
    print("| arch | size | default layout (s) | channels-last (s) | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for arch in a.archs:
        for size in a.sizes:
            got = time_inversion(observation(arch, size, a.inversion_batch), a.inversion_repeats, a.device)
            if got is None:
                print(f"| {arch} | {size} | – | – | no leaky layer |", flush=True)
                continue
            default, last = got
            print(f"| {arch} | {size} | {default:.4f} | {last:.4f} | {default / last:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "attack_speed.py"))
