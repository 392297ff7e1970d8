"""Where the linear-layer separation ends: how much of each image's ``fc1`` input an update carries.

For each observation (the leakage benchmark's victim and draws: real chest X-rays of the train split,
64 px, ``lenet5`` at random initialisation, FedSGD, B images) this compares, with the true images in
hand (a diagnostic: no attack reads them):

- the singular values of the clean ``fc1`` update and of the received one. The separation works on the
  received update's top-B singular subspace; where a clean singular value lies below the noise's, that
  direction is lost, which the cosines of the principal angles between the two subspaces show;
- how many images ``separate`` (the attack's own search, with the same time limit as ``auto`` at a
  60 s budget) finds;
- a ceiling for the separation: the relative error of each image's input ``a_i h_i / N`` estimated by
  least squares over every row of the update *with the true ReLU patterns given*. No search for the
  patterns gives a least-squares estimate closer than this; only the noise model can (the likelihood
  re-estimation of a quantized update), or the rest of the update (the convolution layers' gradients);
- whether the attack's global pattern search (``search_patterns``, which ``auto`` runs where the
  dual vectors leave images unseparated) finds the true patterns: its best residual beside the true
  patterns', how well its patterns agree with the true ones, and the inputs' error with its patterns.

    python benchmarks/separation_ceiling.py --split tune --batches 1 --obfuscations none qsgd16 qsgd4 relgauss1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from leakage import OBFUSCATIONS, cells, draw_arguments  # noqa: E402
from gradleak.attacks.disaggregate import _top_singular, search_patterns, separate  # noqa: E402
from gradleak.attacks.linear_leak import observed_matrix  # noqa: E402
from gradleak.attacks.simulate import Simulator  # noqa: E402
from gradleak.capture import capture  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.errors import exit_code  # noqa: E402


def pattern_search(G: torch.Tensor, v: torch.Tensor, true: torch.Tensor) -> dict:
    """The attack's global pattern search (:func:`gradleak.attacks.disaggregate.search_patterns`) against
    the true patterns: its best residual beside the true patterns' least-squares residual in the same
    projection, how many starts reached its best, and how well the found patterns agree with the true
    ones."""
    n = true.shape[1]
    found, info = search_patterns(G, v, n, seed=0)
    _, _, vh = _top_singular(G, info["dimensions"])  # the search's projection of the rows
    Gp = G @ vh.T
    A = v[:, None] * true
    truth_residual = float((A @ torch.linalg.lstsq(A, Gp).solution - Gp).pow(2).sum())
    agree = torch.tensor([[float((found[:, i] == true[:, j]).double().mean()) for j in range(n)] for i in range(n)])
    return {"residual": info["residual"], "truth_residual": truth_residual, "found": found,
            "hits": info["reached_by"], "agreement": [float(a) for a in agree.max(dim=1).values],
            "match": agree.argmax(dim=1)}


def received_and_clean(batch, name: str):
    """The leakage benchmark's observation of ``batch`` under obfuscation ``name``, and the same without it."""
    _, specs, proto = OBFUSCATIONS[name]
    return tuple(capture(batch.images, batch.labels, arch="lenet5", protocol=proto, model_seed=0, obfuscations=ob,
                         obfuscation_seed=0, labels_known=False)[0] for ob in (specs, []))


def measure(batch, name: str, time_limit: float) -> dict:
    obs, clean = received_and_clean(batch, name)
    sim = Simulator(obs)
    model, n = sim.model, sim.num_images
    G, observed, _ = observed_matrix(obs, sim, "fc1")
    G0, _, _ = observed_matrix(clean, Simulator(clean), "fc1")
    if observed is not None and not bool(observed.all()):
        raise SystemExit(f"{name}: a sparsified update has no dense singular subspace to compare")
    v = (model.classifier.weight[1] - model.classifier.weight[0]).detach().double()
    W = model.fc1.weight.detach().double()
    with torch.no_grad():
        x = (batch.images - model.input_mean) / model.input_std
        H = model.leaky_input(x).double()
        a = torch.softmax(model(batch.images).double(), dim=1)[:, 1] - batch.labels.double()  # forward normalises
    truth = a[:, None] * H / n  # the rows a separation recovers: a_i h_i / N
    patterns = (H @ W.T > 0).double().T  # rows x images
    _, s, vh = _top_singular(G.double(), n + 1)
    _, s0, vh0 = _top_singular(G0.double(), n)
    angles = torch.linalg.svdvals(vh[:n] @ vh0[:n].T)
    sep = separate(G, n, row_scale=v, weight=W, generator=torch.Generator().manual_seed(0), time_limit=time_limit)
    keep = v.abs() > 0.1 * v.pow(2).mean().sqrt()
    A = v[keep][:, None] * patterns[keep]
    X = torch.linalg.lstsq(A, G[keep].double()).solution
    ceiling = (X - truth).norm(dim=1) / truth.norm(dim=1)
    search = pattern_search(G[keep].double(), v[keep], patterns[keep])
    Xs = torch.linalg.lstsq(v[keep][:, None] * search["found"], G[keep].double()).solution
    searched = (Xs - truth[search["match"]]).norm(dim=1) / truth[search["match"]].norm(dim=1)
    return {"search": {**{k: search[k] for k in ("residual", "truth_residual", "hits", "agreement")},
                       "error": [float(t) for t in searched]},
            "clean": [float(t) for t in s0], "received": [float(t) for t in s[: n + 1]],
            "angles": [float(t) for t in angles], "separated": int(sep.info["separated"]),
            "ceiling": [float(t) for t in ceiling]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    draw_arguments(ap, batch_size=4)
    ap.add_argument("--obfuscations", nargs="+", default=["none", "qsgd16", "qsgd4", "relgauss1"],
                    choices=[k for k in OBFUSCATIONS if k not in ("topk10", "topk1", "fedavg5")])
    ap.add_argument("--separation-seconds", type=float, default=15.75,
                    help="the search's time limit (auto gives it 0.35 of 0.75 of its budget: 15.75 s of 60)")
    a = ap.parse_args()
    ds = load_dataset(f"kaggle:{a.data},split=train", size=a.size)
    print("| batch | obfuscation | clean singular values | received | cos principal angles | separated "
          "| ceiling: rel. error with true patterns | pattern search: residual (true patterns') | "
          "pattern agreement | rel. error with found patterns |")
    print("| --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- |")
    for b, (_, idx) in enumerate(cells(ds, a.split, 0, a.batches, a.batch_size)):
        batch = ds.batch(idx)
        for name in a.obfuscations:
            r = measure(batch, name, a.separation_seconds)

            def fmt(xs):
                return " ".join(f"{x:.3g}" for x in xs)
            print(f"| {a.split} {b} | {OBFUSCATIONS[name][0]} | {fmt(r['clean'])} | {fmt(r['received'])} | "
                  f"{fmt(r['angles'])} | {r['separated']} of {a.batch_size} | {fmt(r['ceiling'])} | "
                  f"{r['search']['residual']:.4g} ({r['search']['truth_residual']:.4g}; best reached by "
                  f"{r['search']['hits']} of 300 starts) | {fmt(r['search']['agreement'])} | {fmt(r['search']['error'])} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(exit_code(main, "separation_ceiling.py"))
