"""Linear-layer disaggregation: split a batch's weight update into the images' own contributions.

A linear layer ``z = W h (+ b)`` trained on a batch of N images has the weight update
``G = sum_i d_i h_i^T`` (``d_i`` the loss gradient at the layer's output for image i, divided by N): a
matrix of rank at most N whose row space is spanned by the images' inputs ``h_i``. When a ReLU follows
the layer, each ``d_i`` is zero wherever image i leaves a unit inactive (about half of them at random
initialisation), so ``G = D X`` with every column of ``D`` sparse. This is the structure exploited by
R-GAP (Zhu & Blaschko 2021), the Cocktail Party Attack (Kariyappa et al. 2023) and SPEAR (Dimitrov et
al. 2024); the procedure here follows SPEAR's idea, written from the mathematics:

1. project the (possibly noisy, quantised or completed) update on its top N singular vectors,
   ``G ~ P V^T`` with ``P = U S``;
2. sample sets of N - 1 rows of ``P``; if all of them are rows where one image i is inactive, the null
   vector ``q`` of those rows makes ``P q`` proportional to ``d_i`` (sparse); a random set gives a dense
   vector, so sparsity tells the two apart;
3. refine each sparse candidate by least squares over its whole estimated zero set (hundreds of rows
   instead of N - 1: this is what makes it robust to noise), merge duplicates, keep the N sparsest;
4. ``X = Q^{-1} V^T`` recovers every ``h_i`` up to sign and scale, fixed later from what the server
   knows (:mod:`.linear_leak`).

Sparsified updates (top-k, random-k, pruning) are first completed to rank N on their sent entries
(:func:`complete`). Everything here is plain linear algebra on tensors; nothing depends on a model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Separation:
    """``D`` (m x r): each image's output-gradient column; ``X`` (r x n): each image's input row, with
    ``D X`` the rank-r projection of the update. Columns and rows are in the same order; each pair is
    known only up to ``(d, x) -> (d / c, c x)``."""

    D: torch.Tensor
    X: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


def complete(G: torch.Tensor, observed: torch.Tensor, rank: int, iterations: int = 40,
             bound: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank-``rank`` completion of ``G`` from its ``observed`` entries (hard impute: fill the missing
    entries from the current rank-r estimate, project again). ``bound``: the missing entries are known
    to be at most this large in magnitude (top-k and pruning reveal it), so the fill is clipped to it."""
    G = G.double()
    obs = observed.bool()
    est = torch.where(obs, G, torch.zeros_like(G))
    # the observed entries carry the mass of the matrix: start from their projection, rescaled to the
    # fraction observed (the unbiased fill of a random mask)
    frac = float(obs.double().mean())
    low = _rank_project(est / max(frac, 1e-6), rank, generator)
    for _ in range(int(iterations)):
        fill = low if bound is None else low.clamp(-bound, bound)
        est = torch.where(obs, G, fill)
        low = _rank_project(est, rank, generator)
    return low


def _rank_project(M: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if min(M.shape) <= 3 * rank + 10:
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            u, s, v = torch.svd_lowrank(M, q=rank + 8, niter=4)
        vh = v.T
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _null_vectors(rows: torch.Tensor) -> torch.Tensor:
    """Unit null vectors of a batch of (r-1) x r matrices (the last right singular vector)."""
    _, _, vh = torch.linalg.svd(rows, full_matrices=True)
    return vh[..., -1, :]


def _subset_refine(P: torch.Tensor, v: torch.Tensor, q: torch.Tensor, rounds: int = 8
                   ) -> tuple[torch.Tensor, float, float]:
    """Refine a dual vector ``q`` so that ``P q = v * l`` with every level ``l_j`` 0 or 1: assign each
    row to the nearer level, solve least squares for ``q`` over all rows (rows weighted by ``|v_j|``,
    as the noise of the update is the same in every row), repeat. Returns (q, spread, fraction in the
    1-set), ``spread`` the ``|v|``-weighted RMS distance of ``P q / v`` to the assigned levels."""
    w = (P @ q) / v
    for _ in range(rounds):
        one = w > 0.5
        if int(one.sum()) == 0 or int((~one).sum()) == 0:
            break
        q_new = torch.linalg.lstsq(P, (v * one.double())[:, None]).solution[:, 0]
        w_new = (P @ q_new) / v
        done = bool(((w_new > 0.5) == one).all())
        q, w = q_new, w_new
        if done:
            break
    one = w > 0.5
    spread = float(((v * (w - one.double())).pow(2).sum() / v.pow(2).sum()).sqrt())
    return q, spread, float(one.double().mean())


def separate(G: torch.Tensor, rank: int, *, row_scale: torch.Tensor,
             generator: torch.Generator | None = None, max_trials: int = 400_000,
             chunk: int = 4096, time_limit: float | None = None, max_spread: float = 0.2) -> Separation:
    """Split ``G`` (m x n) into ``rank`` output-gradient columns and their input rows.

    ``row_scale``: the layer feeds a ReLU and then a two-class classifier, whose weight difference
    ``v = w[1] - w[0]`` is the row scale. Every row of ``diag(1/v) G`` is then a *subset sum*
    ``sum_{i active} a_i h_i / N`` of per-image generators: the dual vectors ``q_i`` make
    ``diag(1/v) P q_i`` exactly 0/1 (the ReLU pattern of image i), and the rows of ``X`` come out with
    their true scale ``a_i h_i / N``. (Sparsity alone, SPEAR's criterion for a general layer, is not
    used: on chest X-rays the images' ReLU patterns are so alike that spurious sparse combinations win.)

    Sampling stops
    when every image has been found twice, after ``max_trials`` row sets, or after ``time_limit``
    seconds. ``info["separated"]`` counts the distinct columns found; when fewer than ``rank``, the rest
    are completed with the remaining directions (their rows are mixtures, not single images).
    """
    start = time.perf_counter()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    Gd = G.double()
    m, n = Gd.shape
    r = int(rank)
    if r < 1 or r > min(m, n):
        raise ValueError(f"rank {r} does not fit a {m} x {n} update")
    if min(m, n) > 3 * r + 10:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            u, s, v = torch.svd_lowrank(Gd, q=r + 10, niter=6)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(Gd, full_matrices=False)
    P, Vh = u[:, :r] * s[:r], vh[:r]
    spectrum = [float(x) for x in s[: r + 1]]
    mode = "subset sums"
    v = row_scale.double().reshape(-1)
    if True:
        keep = v.abs() > 0.1 * v.pow(2).mean().sqrt()
        Pk, vk = P[keep], v[keep]
        Pt = Pk / vk[:, None]
        norms = P[keep].norm(dim=1)
        live = norms > 0.2 * torch.quantile(norms, 0.9)  # rows no image activates carry no constraint
        rows = Pt[live] / Pt[live].norm(dim=1, keepdim=True).clamp_min(1e-300)
    mr = rows.shape[0]
    found: list[tuple[torch.Tensor, float]] = []  # (q, quality: higher is better)
    hits: list[int] = []
    trials = 0

    def consider(q: torch.Tensor) -> None:
        q, spread, frac = _subset_refine(Pk, vk, q)
        spreads.append(spread)
        if spread > max_spread or not 0 < frac < 1:
            return
        col, quality = Pk @ q, -spread
        for t, (qf, zf) in enumerate(found):
            other = Pk @ qf
            if abs(float(torch.dot(col, other))) > 0.98 * float(col.norm() * other.norm()):
                hits[t] += 1
                if quality > zf:
                    found[t] = (q, quality)
                return
        found.append((q, quality))
        hits.append(1)

    if r == 1:
        found, hits = [(torch.ones(1, dtype=torch.float64), 1.0)], [2]
    spreads: list[float] = []
    while r > 1 and trials < max_trials and mr >= r - 1:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        k = min(chunk, max_trials - trials)
        idx = torch.rand(k, mr, generator=g).argsort(dim=1)[:, : r - 1]
        qs = _null_vectors(rows[idx])  # k x r
        trials += k
        if True:
            w = Pt[live] @ qs.T  # mr x k: should be 0 on the sampled rows and one other value elsewhere
            big = w.abs() >= w.abs().amax(dim=0, keepdim=True) * 0.5
            alpha = torch.where(big, w, torch.zeros_like(w)).sum(dim=0) / big.sum(dim=0).clamp_min(1)
            wn = w / alpha.where(alpha != 0, torch.ones_like(alpha))
            close = ((wn.abs() < 0.3) | ((wn - 1).abs() < 0.3)).double().mean(dim=0)
            best = torch.argsort(close, descending=True)[:16]
            cands = [qs[j] / alpha[j] for j in best.tolist() if float(close[j]) > 0.6]
        for q in cands:
            consider(q)
        if len(found) >= r:
            top = sorted(range(len(found)), key=lambda t: -found[t][1])[:r]
            if all(hits[t] >= 2 and -found[t][1] < 0.25 * max_spread for t in top):
                break
    # keep the r best that are linearly independent
    order = sorted(range(len(found)), key=lambda t: -found[t][1])
    chosen: list[int] = []
    for t in order:
        cand = torch.stack([found[c][0] for c in chosen + [t]], dim=1)
        if int(torch.linalg.matrix_rank(cand, rtol=1e-6)) == len(chosen) + 1:
            chosen.append(t)
        if len(chosen) == r:
            break
    separated = len(chosen)
    cols = [found[c][0] for c in chosen]
    if separated < r:  # complete the basis with directions orthogonal to what was found
        basis = torch.stack(cols, dim=1) if cols else torch.zeros(r, 0, dtype=torch.float64)
        full, _ = torch.linalg.qr(torch.cat([basis, torch.eye(r, dtype=torch.float64)], dim=1))
        cols += [full[:, j] for j in range(separated, r)]
    Q = torch.stack(cols, dim=1)
    D = P @ Q
    X = torch.linalg.solve(Q, Vh)
    return Separation(D=D, X=X,
                      info={"mode": mode, "separated": separated, "trials": trials, "spectrum": spectrum,
                            "seconds": round(time.perf_counter() - start, 3),
                            "best_spreads": sorted(spreads)[:2 * r]})
