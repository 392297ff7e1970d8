"""Linear-layer disaggregation: split a batch's weight update into the images' own contributions.

A linear layer ``z = W h (+ b)`` trained on a batch of N images has the weight update
``G = sum_i d_i h_i^T`` (``d_i`` the loss gradient at the layer's output for image i, divided by N): a
matrix of rank at most N whose row space is spanned by the images' inputs ``h_i``. When a ReLU follows
the layer and a two-class classifier follows the ReLU, ``d_i = v * m_i * a_i / N`` with ``v`` the
classifier's weight difference (known to the server), ``m_i`` image i's ReLU pattern (0/1) and ``a_i``
a scalar, so every row of ``diag(1/v) G`` is a *subset sum* of the vectors ``a_i h_i / N``. The same
linear-layer leakage drives R-GAP (Zhu & Blaschko 2021), the Cocktail Party Attack (Kariyappa et al.
2023) and SPEAR (Dimitrov et al. 2024); the procedure here is written from the mathematics:

1. project the (possibly noisy or quantised) update on its top N singular vectors, ``G ~ P V^T``;
   the patterns its columns show (an input only one or two images have, :func:`column_patterns`; exact
   or rounded updates) are the first candidates;
2. the dual vectors ``q`` that make ``diag(1/v) P q`` take two values only (0, and 1 where image i is
   active) are vertices of the polytope ``0 <= diag(1/v) P q <= 1``: linear programmes with random row
   weights reach them (:func:`_lp_dual`), and sets of N - 1 rows are sampled (if all of them are rows
   where one image i is inactive, their null vector is one, which a random set's is not);
3. refine each such candidate by least squares over all rows, each row assigned to the nearer of the
   levels 0 and 1 (hundreds of rows instead of N - 1: this is what makes it robust to noise), merge
   duplicates, keep the N that fit best (and, among sets that fit equally, the one whose inputs
   reproduce their own ReLU patterns);
4. ``X = Q^{-1} V^T`` gives every ``a_i h_i / N``, sign and scale included;
5. with every pattern known, :func:`reestimate` can replace ``X`` by the inputs that make the received
   entries likeliest under the obfuscation's own noise model (a rounding cell, QSGD's levels).

Exact sent entries of a sparsified update (:mod:`.linear_leak` runs that path) have two more tools
here: :func:`merge_equal_rows` merges the rows of one pattern (they agree on every column they share),
:func:`label_exhaustive` enumerates the patterns of a block of distinct exact subset sums, one
image at a time, without needing a row where one image is active alone, and :func:`complete_block`
grows a dense block to every row and column its sent entries reach in rank N (past B = 8 the densest
block admits too many patterns; the rows it reaches rule most of them out).

Everything here is plain linear algebra on tensors; nothing depends on a model.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
import torch
from scipy.sparse import coo_matrix


@dataclass
class Separation:
    """``X`` (r x n): each separated image's row ``a_i h_i / N`` (its input to the layer times its scalar
    output-gradient factor), in no particular order; ``info`` says how many were separated and how."""

    X: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    #: (m x n, 0/1) each row's ReLU pattern as the dual vectors read it, for every row of the update
    #: (rows with a tiny row scale included), when every image separated; else None
    patterns: torch.Tensor | None = None
    #: Other separations that fit the update almost as well (the global pattern search's runners-up,
    #: :data:`RUNNERS_UP`), each as ``(X, patterns, feature_noise)``, best fit first
    alternatives: list[tuple[torch.Tensor, torch.Tensor, list[float]]] = field(default_factory=list)


def _top_singular(G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of a wide or tall matrix from the eigen-decomposition of its small
    Gram matrix (deterministic, no random range finder)."""
    wide = G.shape[0] <= G.shape[1]
    A = G if wide else G.T
    evals, evecs = torch.linalg.eigh(A @ A.T)
    order = torch.argsort(evals, descending=True)[:k]
    s = evals[order].clamp_min(0).sqrt()
    u = evecs[:, order]
    vh = (u.T @ A) / s.clamp_min(1e-300)[:, None]
    return (u, s, vh) if wide else (vh.T, s, u.T)


def _consistency(Q: torch.Tensor, Pk: torch.Tensor, vk: torch.Tensor, WV: torch.Tensor,
                 vsum: torch.Tensor) -> float:
    """How well the inputs ``X = Q^-1 V^T`` reproduce the ReLU patterns the dual vectors ``Q`` read off
    the rows: the fraction of (row, image) pairs where ``s_i W_j x_i > 0`` iff image i is active in row j,
    ``s_i`` the sign that makes ``x_i`` non-negative on the whole (``W V`` and ``V^T 1`` precomputed)."""
    try:
        Qinv = torch.linalg.inv(Q)
    except RuntimeError:
        return -1.0
    sign = torch.sign(Qinv @ vsum)
    pre = (WV @ Qinv.T) * sign  # rows x images: W_j x_i with x_i made non-negative
    active = (Pk @ Q) / vk[:, None] > 0.5
    return float(((pre > 0) == active).double().mean())


def _most_consistent(found: list, chosen: list[int], Pk: torch.Tensor, vk: torch.Tensor, WV: torch.Tensor,
                     vsum: torch.Tensor, max_spread: float, rounds: int = 4, pool: list[int] | None = None
                     ) -> list[int]:
    """Greedy swaps among the fitting dual vectors (``pool``; default: all within ``max_spread``) towards
    the most ReLU-consistent set."""
    def q_of(idx):
        return torch.stack([found[t][0] for t in idx], dim=1)

    best = _consistency(q_of(chosen), Pk, vk, WV, vsum)
    pool = [t for t in (range(len(found)) if pool is None else pool)
            if -found[t][1] <= max_spread and t not in chosen]
    for _ in range(rounds):
        improved = False
        for pos in range(len(chosen)):
            for t in list(pool):
                trial = chosen[:pos] + [t] + chosen[pos + 1:]
                Q = q_of(trial)
                if int(torch.linalg.matrix_rank(Q, rtol=1e-6)) < len(trial):
                    continue
                score = _consistency(Q, Pk, vk, WV, vsum)
                if score > best + 1e-9:
                    pool.remove(t)
                    pool.append(chosen[pos])
                    chosen, best, improved = trial, score, True
        if not improved:
            break
    return chosen


def _distinct_rows(rows: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One row per ReLU pattern: rows of ``diag(1/v) P`` that are the same subset sum (equal up to their
    ``noise``, the root-sum-square noise of each row) are merged into their inverse-variance weighted mean.

    On chest X-rays many units are active for every image of a batch (or for none), so the live rows
    hold many copies of a few patterns; drawing the (N - 1)-row sets from the distinct patterns instead
    makes a set that isolates one image far likelier (at N = 16 on real X-rays, with 114 of 396 live
    rows active for all sixteen images and 230 distinct patterns, an estimated 1 in 400,000 row sets
    becomes 1 in 3,000)."""
    order = torch.argsort(noise)
    floor = 1e-7 * rows.norm(dim=1)
    reps: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    weights: list[float] = []
    spread: list[float] = []
    for j in order.tolist():
        x, nj = rows[j], float(noise[j]) + float(floor[j])
        w = 1.0 / (nj * nj)
        if reps:
            d = (torch.stack(reps) - x).norm(dim=1)
            tol = 3.0 * torch.sqrt(torch.tensor(spread, dtype=rows.dtype) ** 2 + nj * nj)
            k = int(torch.argmin(d - tol))
            if float(d[k]) <= float(tol[k]):
                sums[k] = sums[k] + w * x
                weights[k] += w
                reps[k] = sums[k] / weights[k]
                spread[k] = weights[k] ** -0.5
                continue
        reps.append(x.clone())
        sums.append(w * x)
        weights.append(w)
        spread.append(nj)
    return torch.stack(reps) if reps else rows[:0]


#: The least noise :func:`_feature_noise` lets a row carry, a fraction of the median row's.
NOISE_FLOOR = 0.1


def _feature_noise(v: torch.Tensor, M: torch.Tensor, noise: torch.Tensor, X: torch.Tensor) -> list[float]:
    """Each separated input's expected relative error from the update's noise: with the ReLU patterns
    ``M`` (rows x N) known, an input's entries are a weighted mean over the rows where its image is
    active, ``G ~ diag(v) M X``, whose variance for per-entry row noise ``noise`` is
    ``(A^T diag(1/noise) A)^-1`` with ``A = diag(v) M``; the relative error of row i is
    ``sqrt(n * var_i) / |X_i|`` (0 for an exact update). Each row's noise is at least ``NOISE_FLOOR``
    times the median of the rows' that carry any: a row a quantizer sent as all zeros has no energy
    outside the rank-N subspace, yet it is no exact constraint. Under QSGD 4 at B = 8 (tune draw, batch
    1, 240 s) 115 of the 469 rows kept were such; the reading chosen made images active there, seven of
    its eight inputs read as exact (1e-5), the inversion dropped its smoothness prior and scored 16.1 dB
    (blind 16.4). With the floor they read 0.45 to 0.64, and the leak's inversion 17.8 dB."""
    if float(noise.max()) <= 0:
        return [0.0] * len(X)
    A = v[:, None] * M
    w = 1.0 / noise.clamp_min(NOISE_FLOOR * float(noise[noise > 0].median()))
    normal = A.T @ (w[:, None] * A)
    try:
        var = torch.linalg.inv(normal).diagonal().clamp_min(0)
    except RuntimeError:
        return [float("nan")] * len(X)
    return [float(x) for x in (X.shape[1] * var).sqrt() / X.norm(dim=1).clamp_min(1e-300)]


#: An update's columns (:func:`column_patterns`): an entry of ``diag(1/v) G`` counts as zero below
#: ``COLUMN_ZERO`` times its column's largest, and two entries as one level within ``COLUMN_LEVEL`` of
#: each other (relative); at most ``COLUMN_CANDIDATES`` times the rank distinct patterns are handed on,
#: those most columns show first.
COLUMN_ZERO = 1e-6
COLUMN_LEVEL = 1e-4
COLUMN_CANDIDATES = 4
#: On a rounding grid (every entry within ``COLUMN_GRID`` cells of a multiple of the smallest nonzero
#: magnitude): a column's level needs at least ``COLUMN_ROWS`` nonzero rows, and up to
#: ``COLUMN_GRID_CANDIDATES`` times the rank patterns are handed on (each column shows only the rows
#: that did not round to 0, so one image's columns show many partial patterns).
COLUMN_GRID = 1e-3
COLUMN_ROWS = 20
COLUMN_GRID_CANDIDATES = 16
#: Only a fine grid, at least this many cells up to the largest entry (8-bit rounding: 127): under a coarse
#: one (QSGD 4: 4) a cell's tolerance lets columns fed by several images pass for one, and on 8 phantoms
#: (32 px) 12 candidates fit the noise test where 8 images were, their inputs' noise estimates 0.003 to 0.04
#: against 0.25 to 0.77 from the global search's reading.
COLUMN_GRID_CELLS = 100
#: Past this many images random row sets rarely hold N - 1 rows where one image is inactive (at B = 32 on
#: real X-rays the sampling separated none in 240 s): where the columns leave at most ``SEARCH_MAX_RANK``
#: images unread, :func:`separate` hands them to the global search without sampling.
SAMPLE_MAX_RANK = 16


def column_patterns(G: torch.Tensor, v: torch.Tensor, rank: int, *, chunk: int = 4096, cell: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ReLU patterns an update shows in its columns (m x s, 0/1, distinct; s may be 0), and on which
    rows each is known (m x s, bool).

    Column k of ``diag(1/v) G`` is ``sum_i m_i x_ik`` (``m_i`` image i's pattern, ``x_ik = a_i h_ik / N``,
    ``h_ik >= 0`` a ReLU's output). Where only one image has input k the column is ``x_ik m_i``: one level
    on the rows where that image is active, exact zeros elsewhere. Where two have it, three levels
    ``x_ik``, ``x_jk`` and their sum: the rows at the first or the sum are image i's pattern, those at the
    second or the sum image j's. On real X-rays (tune draw, 64 px, ``lenet5``, an exact update) every image
    has an input of its own at B = 16 (3 to 150 each) and at B = 32 (1 to 114); at B = 64 the columns fed
    by one image show 55 of the 64 patterns, with those fed by two 63 (and 3 patterns that are no image's,
    which :func:`separate`'s fit test turns down), in under two seconds.

    An update rounded to a fine grid (every entry a multiple of its smallest nonzero magnitude, the cell,
    and at least ``COLUMN_GRID_CELLS`` cells up to the largest: 8-bit rounding, not QSGD's few levels)
    keeps the single level within a cell on each row, ``|G_jk / v_j - x| <= cell / |v_j|`` (rounding to
    nearest or stochastic): a column whose rows' intervals meet shows the pattern of
    its nonzero rows (at least ``COLUMN_ROWS`` of them), known there and where ``|v_j x|`` is over two
    cells (an active row would not have rounded to 0); the rest of the rows are open (``known`` False),
    and the dual vectors' refinement settles them. Report draw, B = 32, uniform 8 bit: 340 such columns,
    31 of the 32 patterns fit after the refinement. Other noise breaks the level: nothing is shown.

    ``cell``: the step, where the caller knows it and the update shows no grid of its own (the mean of K
    clients' updates, each rounded to its own grid: ``max_k step_k / K`` bounds a column one client alone
    sent); the columns are then read as on a grid of that step (still only a fine one)."""
    Gd = G.double()
    vd = v.double().reshape(-1)
    safe = torch.where(vd != 0, vd, torch.ones_like(vd))
    found: dict[bytes, tuple[torch.Tensor, torch.Tensor, int]] = {}
    nothing = torch.zeros(Gd.shape[0], 0, dtype=torch.float64), torch.zeros(Gd.shape[0], 0, dtype=torch.bool)

    def add(pattern: torch.Tensor, known: torch.Tensor | None = None) -> None:
        key = pattern.numpy().tobytes()
        old = found.get(key)
        found[key] = (pattern, known if known is not None else torch.ones_like(pattern),
                      1 + (old[2] if old else 0))

    def same(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:  # one level (relative)
        return (a - b).abs() <= COLUMN_LEVEL * torch.maximum(a.abs(), torch.as_tensor(b).abs())

    sent = Gd[Gd != 0].abs()
    if cell is not None:  # the step known: a fine one reads the columns as on a grid
        on_grid = cell > 0 and len(sent) > 0 and float(sent.max()) >= COLUMN_GRID_CELLS * cell
    else:
        cell = float(sent.min()) if len(sent) else 0.0
        cells = Gd / max(cell, 1e-300)
        on_grid = cell > 0 and float(cells.abs().max()) >= COLUMN_GRID_CELLS and \
            float((cells - cells.round()).abs().max()) < COLUMN_GRID
        del cells
    if not on_grid and len(sent) == Gd.numel():  # no exact zero anywhere: noise, no level to read
        return nothing
    for c0 in range(0, Gd.shape[1], chunk):
        Gc = Gd[:, c0:c0 + chunk]
        C = torch.where(vd[:, None] != 0, Gc / safe[:, None], torch.zeros(1, dtype=Gd.dtype))
        if on_grid:  # the rows' intervals of the level meet
            on = (Gc != 0) & (vd[:, None] != 0)
            width = cell / safe.abs()[:, None]
            low = torch.where(on, C - width, torch.full_like(C, -math.inf)).amax(dim=0)
            high = torch.where(on, C + width, torch.full_like(C, math.inf)).amin(dim=0)
            single = (on.sum(dim=0) >= COLUMN_ROWS) & (low <= high) & ((low > 0) | (high < 0))
            for k in torch.nonzero(single).reshape(-1).tolist():
                x = 0.5 * float(low[k] + high[k])
                add(on[:, k], on[:, k] | (vd.abs() * abs(x) > 2 * cell))
            continue
        C = torch.where(C.abs() > COLUMN_ZERO * C.abs().amax(dim=0, keepdim=True), C, torch.zeros(1, dtype=Gd.dtype))
        S = C.sort(dim=0).values
        step = ~same(S[1:], S[:-1])  # a new level starts
        levels = step.sum(dim=0) + 1 - (C == 0).any(dim=0).long()  # distinct nonzero values
        on = C != 0
        for k in torch.nonzero((levels == 1) & (on.sum(dim=0) > 1)).reshape(-1).tolist():
            add(on[:, k])
        for k in torch.nonzero(levels == 3).reshape(-1).tolist():
            col, sk = C[:, k], S[:, k]
            values = [float(x) for x in sk[torch.cat([torch.ones(1, dtype=torch.bool), step[:, k]])] if x != 0]
            for a, b, both in ((values[0], values[1], values[2]), (values[0], values[2], values[1]),
                               (values[1], values[2], values[0])):
                if math.isclose(a + b, both, rel_tol=COLUMN_LEVEL):  # image i at a, j at b, both where they meet
                    at_both = same(col, both)
                    add(same(col, a) | at_both)
                    add(same(col, b) | at_both)
                    break
    # the most often shown first; on a grid, the most rows known first
    ranked = sorted(found.values(), key=lambda pkc: (-pkc[2], -int(pkc[1].sum())))
    ranked = ranked[: (COLUMN_GRID_CANDIDATES if on_grid else COLUMN_CANDIDATES) * int(rank)]
    if not ranked:
        return nothing
    return torch.stack([p[0] for p in ranked], dim=1).double(), torch.stack([p[1] for p in ranked], dim=1).bool()


def _null_vectors(rows: torch.Tensor) -> torch.Tensor:
    """Unit null vectors of a batch of (r-1) x r matrices: the last column of the complete QR factor of
    the transpose, orthogonal to every row (five times faster than an SVD for a batch of small ones)."""
    q, _ = torch.linalg.qr(rows.transpose(-1, -2), mode="complete")
    return q[..., -1]


def _subset_refine(P: torch.Tensor, v: torch.Tensor, q: torch.Tensor, rounds: int = 8
                   ) -> tuple[torch.Tensor, float, float]:
    """Refine a dual vector ``q`` so that ``P q = v * l`` with every level ``l_j`` 0 or 1: assign each
    row to the nearer level, solve least squares for ``q`` over all rows (rows weighted by ``|v_j|``,
    as the noise of the update is the same in every row), repeat. Returns (q, spread, fraction in the
    1-set), ``spread`` the ``|v|``-weighted RMS distance of ``P q / v`` to the assigned levels."""
    w = (P @ q) / v
    for _ in range(rounds):
        one = w > 0.5
        if int(one.sum()) == 0:
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


#: The dual vectors found by linear programming (:func:`_lp_dual`): at most ``LP_SHARE`` of the separation's
#: time limit and ``LP_MOST`` times the rank programmes in all; they stop after ``LP_STALL`` times the rank in a
#: row without a new candidate that fits, and after ``LP_NONE`` times the rank where none fits (heavy noise,
#: where no vertex is a dual vector). A vertex counts only where it fits its
#: levels within ``LP_FIT`` times what the noise alone gives (the sampled row sets' bound is ``fit_factor``, 5):
#: the programmes seek what fits, and under noise reach near-patterns that pass the looser bound (on 8
#: phantoms under QSGD 4 a set of 8 such, each input at cosine 0.89 to 0.95 with the truth, whose estimated
#: noise, 0.04, hid that it needed the refinement on the layer: 11.5 dB against 18.2 without them; within
#: 2.5 times they read only some images there, which are dropped: 18.0 dB). On real X-rays under ``mlp`` (its
#: inputs the pixels, the images' ReLU patterns nearly alike: of 512 units 168 switch on for some of 16 images,
#: not all, report draw) the sampled sets of N - 1 rows isolate 14 of 16 images in 11 s, and 126 programmes
#: find all 16 exactly in 1.3 s (B = 32: all 32).
LP_SHARE = 0.5
LP_STALL = 25
LP_MOST = 100
LP_NONE = 4
LP_FIT = 2.5


def _lp_box(Y: np.ndarray) -> tuple[Any, np.ndarray]:
    """The elastic box ``0 <= Y q <= 1`` of :func:`_lp_dual` as ``A x <= b`` over ``x = (q, below, above)``,
    built once per separation."""
    m = Y.shape[0]
    eye = scipy.sparse.identity(m, format="csr")
    zero = scipy.sparse.csr_matrix((m, m))
    Ys = scipy.sparse.csr_matrix(Y)
    A = scipy.sparse.vstack([scipy.sparse.hstack([-Ys, -eye, zero]),
                             scipy.sparse.hstack([Ys, zero, -eye])]).tocsr()
    return A, np.concatenate([np.zeros(m), np.ones(m)])


def _lp_dual(Y: np.ndarray, box: tuple[Any, np.ndarray], anchor: int, weights: np.ndarray,
             time_limit: float | None = None) -> np.ndarray | None:
    """One candidate dual vector by linear programming: ``q`` minimising ``weights . (Y q)`` over
    ``{q : 0 <= Y q <= 1, Y[anchor] q = 1}``, the box made elastic (a row's excess over it costs four times
    ``sum |weights|``, more than any row's weight can gain, so the programme is bounded and a noisy update
    still gives a solution; where rows are nearly parallel the optimum may leave the box a little, which
    the least-squares refinement of every candidate absorbs).

    A true dual vector of image i (``Y q_i`` its ReLU pattern, every entry 0 or 1) is such a vertex, reached
    from every anchor row where image i is active for many weights, where a random set of N - 1 rows
    isolates it only with probability (share of rows without image i)^(N - 1). ``box``: :func:`_lp_box` of
    ``Y``. ``None`` where the solver fails."""
    m, r = Y.shape
    A, b = box
    penalty = 4.0 * float(np.abs(weights).sum())
    res = scipy.optimize.linprog(np.concatenate([weights @ Y, np.full(2 * m, penalty)]), A_ub=A, b_ub=b,
                                 A_eq=np.concatenate([Y[anchor], np.zeros(2 * m)])[None], b_eq=[1.0],
                                 bounds=[(None, None)] * r + [(0, None)] * (2 * m), method="highs",
                                 options={} if time_limit is None else {"time_limit": max(0.01, time_limit)})
    return res.x[:r] if res.status == 0 else None


#: An input of the layer is a ReLU's output, non-negative: the least-squares inputs of true patterns keep
#: 7 to 18 % of their energy on negative entries even under relative noise σ0 = 1 (tune batch 2 and the
#: report batch, B = 4), the inputs the search's readings got right 2 to 20 %, while an input that fits
#: only the noise (a reading whose free input absorbs it, its cosine with every image 0.004 to 0.07) has
#: 45 to 50 %, as noise would. Past this share the leak's result says the input is no image
#: (``info["like_noise"]``; the separation still counts it), and the ReLU-consistent pattern search
#: prefers readings with fewer such inputs (:func:`search_patterns`).
LIKE_NOISE = 0.3


def negative_share(feats: torch.Tensor) -> torch.Tensor:
    """Each input's share of its energy on negative entries (its rows made non-negative on the whole)."""
    X = feats * torch.where(feats.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(feats.dtype)
    return X.clamp(max=0).pow(2).sum(dim=1) / X.pow(2).sum(dim=1).clamp_min(1e-300)


#: The global pattern search (:func:`search_patterns`): random starts, and the dimension of the row space
#: it works in. On the tune draw (B = 4, QSGD 4 and relative noise σ0 = 1), where the dual-vector search
#: separated 1 or 2 of 4 images, its best (found by 1 to 6 of 300 starts) fit at least as well as the
#: true patterns, with 94.5 to 100 % of the rows' patterns right.
SEARCH_STARTS = 300
#: After the starts, the best patterns are perturbed (a random ``PERTURB_FRACTION`` of the rows given
#: random patterns) and the alternating least squares rerun from there, ``PERTURB_ROUNDS`` times, each kept
#: when it fits better (an iterated local search: the starts land in nearby local minima). On the tune
#: draw under QSGD 4 (B = 4, 8 batches) it took one batch from a worse fit than the true patterns to as
#: good a fit, its inputs' mean relative error from 0.39 to 0.37 (true patterns: 0.37); the other seven
#: and all eight under relative noise σ0 = 1 did not change by more than 0.01.
PERTURB_ROUNDS = 300
PERTURB_FRACTION = 0.05
SEARCH_DIMENSIONS = 32
#: The largest batch the global pattern search enumerates the subset sums of (2^N per row).
SEARCH_MAX_RANK = 8
#: Past ``SEARCH_MAX_RANK`` images, how many of the dual vectors' separated images, those that fit the
#: noise worst, have their patterns read again by the search (from the dual vectors' reading). Under
#: heavy noise a combination of nested patterns passes the fit test: on the report draw at B = 16 under
#: QSGD 16, 16 candidates fit, one a second, worse copy of an image (its spread 4.8 times the noise's,
#: the true images' 1.6 to 3.3 times) in place of an image never found.
RESEARCHED = 4
#: Where the noise alone would spread the separated images' 0/1 levels by at most this, the update is
#: exact up to round-off, and no fitting image is doubted.
EXACT_SPREAD = 1e-5
#: Where the noise leaves the weak directions lost, readings of the patterns that differ on a fifth of
#: the rows fit the update almost equally, and the best fit is not the likeliest to be the images: on
#: the tune draw's batch 2 under relative noise σ0 = 1 (B = 4), three seeds of the search ended at
#: residuals 7.246 / 7.255 / 7.248 with images of 17.1 / 21.0 / 18.2 dB, the worst fit giving the best
#: images. The search hands on up to ``RUNNERS_UP`` other readings within ``RUNNER_UP_WITHIN``
#: (relative) of its best residual, for the caller to judge by what the residual cannot see
#: (:func:`.linear_leak.leak`: which inputs a batch of images can produce).
RUNNERS_UP = 3
RUNNER_UP_WITHIN = 0.01
#: Two minima read different images when their patterns differ on more than this share of the rows
#: (:func:`pattern_distance`); closer ones are one reading with a few rows changed. At 0.02 the
#: runners-up on that batch were 2 to 4 % from the best and their images alike (inversion objectives
#: within 0.5 % of each other); at 0.08 they differ from it on 18 to 22 % of the rows.
RUNNER_UP_DISTINCT = 0.08
#: The weight of the ReLU's log-likelihood beside the residual in the consistent search
#: (:func:`search_patterns`' ``weight``). On the tune draw's batch 2 under QSGD 4 (B = 4, four images of
#: one label) the plain search's best reading fit the update better than the true patterns (residual
#: 8820 against 8875 in the diagnostic's projection) and read two images wrong (inputs at cosine 0.005
#: and 0.42 with the truth); the true patterns are the more consistent with the ReLU (0.845 of the
#: (row, image) pairs against 0.675). At 0.3 the consistent search, polished, read all four (0.823 to
#: 0.872, as the true patterns' least-squares inputs do); at 1 it moved off the true reading (0.715 to
#: 0.863). On batches 0, 1 and 3 to 7 both searches end on the same reading. Under relative noise
#: σ0 = 1 it did not help: on batches 2 and 5 the readings both searches found fit better than the true
#: patterns under either objective, one image wrong in each. The benchmark's tune draw, QSGD 4, B = 4,
#: 60 s, ``auto``, before -> after (with the screen judging by the images' update,
#: :data:`.linear_leak.SCREEN_SHARE`): 27.8 / 29.7 / 19.9 -> 27.8 / 29.7 / 26.6 dB (blind 18.8 / 17.9 /
#: 17.5); σ0 = 1 27.4 / 28.3 / 21.5 both times.
CONSISTENCY = 0.3
#: The consistent search's reading is handed on where it differs from the best and every runner-up on
#: more than this share of the rows: it is judged by another criterion, so a reading nearer than
#: ``RUNNER_UP_DISTINCT`` may still read an image the others miss.
CONSISTENT_DISTINCT = 0.01


def pattern_distance(M1: torch.Tensor, M2: torch.Tensor) -> float:
    """The share of entries where two pattern matrices (rows x images, 0/1) differ, their images paired
    to agree most (the images of a separation come in no particular order)."""
    agree = M1.T.double() @ M2.double() + (1 - M1.T.double()) @ (1 - M2.double())  # images x images
    r, c = scipy.optimize.linear_sum_assignment(-agree.numpy())
    return 1.0 - float(agree[r, c].sum()) / float(M1.numel())


def _subsets(r: int) -> torch.Tensor:
    """The 2^r ReLU patterns of r images (2^r x r, 0/1)."""
    return torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * r).reshape(-1, r)


def _nearest_subsets(R: torch.Tensor, X: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """For each row of ``R``, the pattern whose subset sum of the rows of ``X`` is nearest (rows x r)."""
    S = subsets @ X
    return subsets[(R.pow(2).sum(1)[:, None] - 2 * R @ S.T + S.pow(2).sum(1)[None]).argmin(1)]


def search_patterns(G: torch.Tensor, v: torch.Tensor, rank: int, *, seed: int, starts: int = SEARCH_STARTS,
                    dimensions: int = SEARCH_DIMENSIONS, time_limit: float | None = None,
                    runners_up: list | None = None, fixed: torch.Tensor | None = None,
                    first: torch.Tensor | None = None, weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Every row's ReLU pattern (m x rank, 0/1) by a global search: alternating least squares on the rows
    of ``diag(1/v) G`` projected on their top ``dimensions`` singular directions (each row's pattern the
    nearest of the 2^rank subset sums of the current inputs, the inputs the least-squares fit to the
    patterns), from ``starts`` random patterns, keeping the lowest residual, then perturbed and refitted
    from the best (``PERTURB_ROUNDS``). The projection keeps the
    weak directions that tell alike images apart (the top-rank projection loses them under heavy noise)
    and makes a start cheap. None when no start keeps full rank. ``runners_up`` (a list, filled in):
    the other local minima the starts reached whose residual is within ``RUNNER_UP_WITHIN`` of the
    best's and differ from it on more than ``RUNNER_UP_DISTINCT`` of the rows (:func:`pattern_distance`),
    as ``(patterns, residual)``, best first, at most ``RUNNERS_UP``; minima closer than that to each
    other count once, as the better of them.

    ``fixed`` (m x f, 0/1): the patterns of f images already known (the dual vectors' separated images);
    only the other ``rank - f`` columns are searched (2^(rank - f) subset sums per row, whatever the
    rank), the known columns' inputs refitted with them. The patterns returned hold the known columns
    first; the runners-up are judged on the searched columns. ``first`` (m x (rank - f), 0/1): the first
    start's patterns instead of random ones (a reading to polish: the best is then at least as good a
    fit as the local minimum it leads to).

    ``weight`` (m x n, the layer's weight rows for the rows of ``G``; no bias): a second search judges
    each row's pattern also by the ReLU it must come from: image i is active in row j exactly where
    ``w_j . h_i > 0``. With the current inputs' errors (their least-squares covariance, the noise level
    read off the singular values past the projection) each ``w_j . x_i`` says how likely image i is
    active there, and each row takes the pattern that minimises its residual over twice the noise
    variance less ``CONSISTENCY`` times that log-likelihood. Its best reading (the lowest cost among the
    starts whose least-squares inputs have the fewest that read as noise, :data:`LIKE_NOISE`: a free
    input can absorb the noise and lower both terms), polished by the plain alternating least squares
    (a local minimum of the residual, like any other) unless the polish lets an input read as noise,
    becomes the best when it fits better and is handed on as a runner-up otherwise (when it differs
    from the best and every other runner-up by more than ``CONSISTENT_DISTINCT``), whatever its
    residual: the residual cannot tell it from the best (``info["consistent"]``). With a time limit the
    plain search has half of it.
    The layer must have no bias (the ReLU's side of 0 is then independent of the inputs' scale)."""
    start = time.perf_counter()
    m, n = G.shape
    r = int(rank)
    Mf = torch.zeros(m, 0, dtype=torch.float64) if fixed is None else fixed.double()
    f = Mf.shape[1]
    if not 0 <= f < r:
        raise ValueError(f"{f} known patterns leave nothing of rank {r} to search")
    k = max(r, min(int(dimensions), m - 1, n - 1))
    extra_k = min(2 * k, m - 1, n - 1) - k if weight is not None else 0
    _, sv, vh = _top_singular(G, k + max(extra_k, 0))
    # the noise variance of a projected entry: the energy of the directions past the projection
    noise = float(sv[k:].pow(2).sum()) / (extra_k * m) if extra_k > 0 else 0.0
    vh = vh[:k]
    Gp = G @ vh.T
    R = Gp / v[:, None]
    subsets = _subsets(r - f)
    g = torch.Generator().manual_seed(int(seed))
    consistent = weight is not None and noise > 1e-12 * float(sv[0]) ** 2 / m
    if consistent:  # each row's w_j in the projection, and the sign that makes an input non-negative
        WV = weight.double() @ vh.T
        wn = WV.norm(dim=1)
        ones = vh.sum(dim=1)

    def relu_cost(M: torch.Tensor, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Minus the log-likelihood of each searched pattern of each row (m x 2^(r - f)) under the ReLU
        of the inputs ``X`` (projected), their errors ``noise * (A^T A)^-1``."""
        tau = (torch.linalg.inv(A.T @ A).diagonal() * noise).clamp_min(1e-300).sqrt()[f:]
        Xs = X[f:]
        z = (WV @ Xs.T) * torch.sign(Xs @ ones)[None, :] / (wn[:, None] * tau[None, :]).clamp_min(1e-300)
        return -(torch.special.log_ndtr(z) @ subsets.T + torch.special.log_ndtr(-z) @ (1 - subsets).T)

    def als(M: torch.Tensor, relu: bool = False) -> tuple[torch.Tensor | None, float]:
        for _ in range(50):
            A = v[:, None] * torch.cat([Mf, M], dim=1)
            if int(torch.linalg.matrix_rank(A)) < r:
                return None, float("inf")
            X = torch.linalg.lstsq(A, Gp).solution
            if relu:  # each row's residual over twice the noise variance, less the ReLU's log-likelihood
                S = subsets @ X[f:]
                Rr = R - Mf @ X[:f]
                res = (Rr.pow(2).sum(1)[:, None] - 2 * Rr @ S.T + S.pow(2).sum(1)[None]) * v[:, None] ** 2
                nearest = subsets[(res / (2 * noise) + CONSISTENCY * relu_cost(M, X, A)).argmin(1)]
            else:  # per row: a row weight would not change its argmin
                nearest = _nearest_subsets(R - Mf @ X[:f], X[f:], subsets)
            if bool((nearest == M).all()):
                break
            M = nearest
        A = v[:, None] * torch.cat([Mf, M], dim=1)
        fit = float((A @ X - Gp).pow(2).sum())
        if relu:
            idx = (M * 2 ** torch.arange(r - f - 1, -1, -1, dtype=torch.float64)).sum(1).long()
            fit = fit / (2 * noise) + CONSISTENCY * float(relu_cost(M, X, A).gather(1, idx[:, None]).sum())
        return M, fit

    best, residuals = None, []
    minima: list[tuple[torch.Tensor, float]] = []  # distinct local minima, for the runners-up

    def remember(M: torch.Tensor | None, res: float) -> None:
        # minima that read the same images (patterns within RUNNER_UP_DISTINCT of each other) count once,
        # as the better of them
        if runners_up is None or M is None:
            return
        for t, (Mq, q) in enumerate(minima):
            if pattern_distance(M, Mq) <= RUNNER_UP_DISTINCT:
                if res < q:
                    minima[t] = (M, res)
                    minima.sort(key=lambda mq: mq[1])
                return
        minima.append((M, res))
        minima.sort(key=lambda mq: mq[1])
        del minima[RUNNERS_UP + 1:]

    # with the consistent search to follow, the plain one has half the time
    plain_limit = None if time_limit is None else time_limit * (0.5 if consistent else 1.0)
    for s in range(int(starts)):
        M, res = als(first.double().clone() if s == 0 and first is not None else
                     (torch.rand(m, r - f, generator=g) < 0.5).double())
        remember(M, res)
        # the same patterns in another column order fit equally: the first start to reach them wins
        # (float round-off must not pick among them)
        if M is not None and (best is None or res < best[1] * (1 - 1e-9)):
            best = (M, res)
        residuals.append(res)
        if plain_limit is not None and time.perf_counter() - start > plain_limit:
            break
    kicks = improved = 0
    while best is not None and kicks < PERTURB_ROUNDS and not (plain_limit is not None and
                                                             time.perf_counter() - start > plain_limit):
        kicks += 1
        M = best[0].clone()
        flip = torch.rand(m, generator=g) < PERTURB_FRACTION
        M[flip] = (torch.rand(int(flip.sum()), r - f, generator=g) < 0.5).double()
        M, res = als(M)
        remember(M, res)
        if M is not None and res < best[1] * (1 - 1e-9):
            best = (M, res)
            improved += 1
    if best is None:
        return None, {"starts": len(residuals), "seconds": round(time.perf_counter() - start, 3)}
    extra: dict[str, Any] = {}
    reading = None  # the consistent search's best, polished

    def like_noise(M: torch.Tensor) -> int:
        """How many of the reading's whole inputs (least squares on every column of ``G``) read as noise
        (:data:`LIKE_NOISE`)."""
        A = v[:, None] * torch.cat([Mf, M], dim=1)
        try:
            X = torch.linalg.solve(A.T @ A, A.T @ G)
        except RuntimeError:
            return r
        return int((negative_share(X) > LIKE_NOISE).sum())

    if consistent:  # the same number of starts again, each row also judged by its ReLU
        cbest, costs, noisy = None, [], []
        for _ in range(int(starts)):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            M, c = als((torch.rand(m, r - f, generator=g) < 0.5).double(), relu=True)
            if M is not None:
                costs.append(c)
                noisy.append(like_noise(M))
                # the fewest inputs that read as noise first, then the lowest cost
                if cbest is None or (noisy[-1], c) < (cbest[2], cbest[1] * (1 - 1e-9)):
                    cbest = (M, c, noisy[-1])
        if cbest is not None:
            M, res = als(cbest[0].clone())  # polished: a local minimum of the residual
            polished = True
            if M is not None and like_noise(M) > cbest[2]:  # the polish let an input fit the noise: unpolished
                A = v[:, None] * torch.cat([Mf, cbest[0]], dim=1)
                M, res, polished = cbest[0], float((A @ torch.linalg.lstsq(A, Gp).solution - Gp).pow(2).sum()), False
            if M is not None:
                extra["consistent"] = {"starts": len(costs), "residual": round(res / best[1] - 1, 6),
                                       "distance": round(pattern_distance(M, best[0]), 4),
                                       "reached_by": sum(x <= cbest[1] * (1 + 1e-9) for x in costs),
                                       "like_noise": cbest[2], "starts_without_noise": noisy.count(0),
                                       "polished": polished}
                remember(M, res)
                reading = (M, res)
                if res < best[1] * (1 - 1e-9):
                    best = reading
    if runners_up is not None:
        ups = [(M, q) for M, q in minima if q <= best[1] * (1 + RUNNER_UP_WITHIN)
               and pattern_distance(M, best[0]) > RUNNER_UP_DISTINCT]
        if reading is not None and all(pattern_distance(reading[0], M) > CONSISTENT_DISTINCT
                                       for M, _ in ups + [best]):
            ups.append(reading)  # whatever its residual
        runners_up.extend((torch.cat([Mf, M], dim=1), q) for M, q in ups)
    return torch.cat([Mf, best[0]], dim=1), {"starts": len(residuals), "residual": best[1], "dimensions": k,
                                             **({"known": f} if f else {}),
                     "reached_by": sum(x <= best[1] * (1 + 1e-9) for x in residuals),
                     "perturbations": kicks, "perturbations_improved": improved, **extra,
                     "seconds": round(time.perf_counter() - start, 3)}


def _setup(G: torch.Tensor, rank: int, generator: torch.Generator | None
           ) -> tuple[torch.Generator, torch.Tensor, int]:
    """A separation's generator (seed 0 by default), the update in double precision and the checked rank."""
    Gd = G.double()
    m, n = Gd.shape
    r = int(rank)
    if r < 1 or r >= min(m, n):
        raise ValueError(f"rank {r} does not fit a {m} x {n} update")
    return (generator if generator is not None else torch.Generator().manual_seed(0)), Gd, r


def separate(G: torch.Tensor, rank: int, *, row_scale: torch.Tensor, weight: torch.Tensor | None = None,
             generator: torch.Generator | None = None, max_trials: int | None = None,
             chunk: int = 4096, time_limit: float | None = None, max_spread: float = 0.2,
             fit_factor: float | None = 5.0, global_search: bool = False, cell: float | None = None) -> Separation:
    """Split ``G`` (m x n) into ``rank`` output-gradient columns and their input rows.

    ``row_scale``: the layer feeds a ReLU and then a two-class classifier, whose weight difference
    ``v = w[1] - w[0]`` is the row scale. Every row of ``diag(1/v) G`` is then a *subset sum*
    ``sum_{i active} a_i h_i / N`` of per-image generators: the dual vectors ``q_i`` make
    ``diag(1/v) P q_i`` exactly 0/1 (the ReLU pattern of image i), and the rows of ``X`` come out with
    their true scale ``a_i h_i / N``. (Sparsity alone, SPEAR's criterion for a general layer, is not
    used: on chest X-rays the images' ReLU patterns are so alike that spurious sparse combinations win.)
    The dual vectors are candidates from the columns (:func:`column_patterns`), then vertices of linear
    programmes (:func:`_lp_dual`, ``info["lps"]``; where they read only some images of a noisy update,
    what fits only within the noise is dropped, ``info["lp_dropped"]``), then null vectors of sampled
    row sets (``info["trials"]``).

    ``weight`` (the layer's weight matrix, m x n): when several sets of dual vectors fit (nested ReLU
    patterns make a subset-sum decomposition ambiguous), keep the set whose inputs reproduce their own
    ReLU patterns best (``W h_i > 0`` exactly where image i is active), SPEAR's consistency check.

    A candidate counts as an image when its spread about the levels 0/1 is at most ``fit_factor`` times
    what the update's noise alone would give (``info["noise_level"]``; with ``fit_factor=None``, at most
    ``max_spread``: for updates whose rows are subset sums only approximately).

    Sampling stops when every image has been found twice, after ``max_trials`` row sets (default:
    400,000 without a time limit, none with one), after ``time_limit`` seconds, or after a third of them
    with nothing that fits. ``info["separated"]`` counts the images found; when fewer than ``rank``, the
    rest are completed with the remaining directions (their rows are mixtures, not single images).
    ``info["feature_noise"]`` (when all separated) is each row's expected relative error.

    ``global_search``: where the dual vectors leave images unseparated, :func:`search_patterns` reads
    every row's pattern instead, and the inputs are the least-squares fit to them over all rows
    (``info["global_search"]`` says so; ``info["separated"]`` then counts every image). Past
    ``SEARCH_MAX_RANK`` images, where the dual vectors found all but at most that many, their patterns
    are kept except the ``RESEARCHED`` that fit worst (spread relative to the noise); those, starting
    from the dual vectors' reading, and the missing images' patterns are searched
    (``info["researched"]``).

    ``cell``: the rounding step the columns are read with where the update shows none of its own
    (:func:`column_patterns`).
    """
    start = time.perf_counter()
    if max_trials is None:  # a time limit bounds the search; without one, this many row sets
        max_trials = 400_000 if time_limit is None else 2**62
    g, Gd, r = _setup(G, rank, generator)
    m, n = Gd.shape
    u, s, vh = _top_singular(Gd, r + 1)
    P, Vh = u[:, :r] * s[:r], vh[:r]
    spectrum = [float(x) for x in s[: r + 1]]
    v = row_scale.double().reshape(-1)
    keep = v.abs() > 0.1 * v.pow(2).mean().sqrt()  # rows with a tiny |v_j| only amplify noise
    Pk, vk = P[keep], v[keep]
    Pt = Pk / vk[:, None]
    norms = Pk.norm(dim=1)
    live = norms > 0.05 * torch.quantile(norms, 0.9)  # rows no image activates carry no constraint
    # the noise each projected row carries: its energy outside the rank-r subspace, spread over n - r
    # directions, times the r directions kept (zero for an exact update)
    outside = (Gd[keep].pow(2).sum(dim=1) - Pk.pow(2).sum(dim=1)).clamp_min(0) / max(n - r, 1)
    distinct = _distinct_rows(Pt[live], (outside[live] * r).sqrt() / vk[live].abs())
    # the spread a true dual vector q would show from the noise alone is |q| * noise_level
    noise_level = float(outside.sum().sqrt() / vk.norm())
    rows = distinct / distinct.norm(dim=1, keepdim=True).clamp_min(1e-300)
    mr = rows.shape[0]
    found: list[tuple[torch.Tensor, float]] = []  # (q, quality: higher is better)
    hits: list[int] = []
    origin: list[str] = []  # where each candidate's dual vector came from: columns, programmes, sampled rows
    trials = 0

    def consider(q: torch.Tensor, seen: int = 1, within: float | None = None, source: str = "sample") -> None:
        q, spread, frac = _subset_refine(Pk, vk, q)
        spreads.append(spread)
        if spread > max_spread or frac <= 0 or (frac >= 1 and r > 1):
            return
        if within is not None and spread > max(within * noise_level * float(q.norm()), 1e-6):
            return
        col, quality = Pk @ q, -spread
        for t, (qf, zf) in enumerate(found):
            other = Pk @ qf
            if abs(float(torch.dot(col, other))) > 0.98 * float(col.norm() * other.norm()):
                hits[t] += seen
                if quality > zf:
                    found[t], origin[t] = (q, quality), source
                return
        found.append((q, quality))
        hits.append(seen)
        origin.append(source)

    spreads: list[float] = []

    def fits(t: int) -> bool:
        """Whether candidate t fits its 0/1 levels as well as the update's noise allows (a true dual
        vector shows a spread of 1-2.5 times ``noise_level * |q|`` on real X-rays; a spurious two-level
        combination of nested patterns, more than 20 times)."""
        q, quality = found[t]
        if fit_factor is None:
            return -quality <= max_spread
        return -quality <= max(fit_factor * noise_level * float(q.norm()), 1e-6)
    if r == 1 and mr:  # one image: every live row is that image's value, so 1 / (any row) is the dual vector
        consider(1.0 / Pt[live][int(Pt[live].abs().argmax())].reshape(1))
    shown = 0
    if r > 1:  # the patterns the update's columns show (inputs only one or two images have; an exact or finely
        # rounded update): their dual vectors, each counted as found twice
        Mc, Kc = column_patterns(Gd, v, r, cell=cell)
        for j in range(Mc.shape[1]):
            on = Kc[keep, j]  # each on the rows where it is known
            if int(on.sum()) >= r:
                consider(torch.linalg.lstsq(Pt[on], Mc[keep, j][on][:, None]).solution[:, 0], seen=2,
                         source="columns")
        shown = sum(fits(t) for t in range(len(found)))

    def independent() -> int:  # how many independent directions the candidates that fit span
        good = [found[t][0] for t in range(len(found)) if fits(t)]
        return int(torch.linalg.matrix_rank(torch.stack(good, dim=1), rtol=1e-6)) if good else 0

    def twice() -> bool:  # N independent candidates that fit, and N of them found twice
        good = [t for t in range(len(found)) if fits(t)]
        return len(good) >= r and sum(hits[t] >= 2 for t in good) >= r and independent() == r
    lps, lp_dropped = 0, 0
    if r > 1 and shown < r and mr >= r and fit_factor is not None:  # the dual vectors as vertices of linear
        # programmes (not where the rows are subset sums only roughly, fit_factor None: local steps' drift)
        rng = np.random.default_rng(g.initial_seed())  # its own stream: the sampling below draws as without it
        Y, stall = distinct.numpy(), 0
        box = _lp_box(Y)
        while lps < LP_MOST * r and stall < LP_STALL * r and not twice():
            if time_limit is not None and time.perf_counter() - start > LP_SHARE * time_limit:
                break
            if lps >= LP_NONE * r and not any(fits(t) for t in range(len(found))):
                break  # nothing fits: the noise hides the levels (the sampling has its own third of the time)
            before = sum(fits(t) for t in range(len(found)))
            # row weights: positive (fewest rows active), negative (most) and signed, in turn
            weights = rng.standard_normal(mr) if lps % 3 == 2 else rng.exponential(size=mr) * (1 - 2 * (lps % 3))
            q = _lp_dual(Y, box, int(rng.integers(mr)), weights,
                         None if time_limit is None else LP_SHARE * time_limit - (time.perf_counter() - start))
            lps += 1
            if q is not None:
                consider(torch.from_numpy(q), within=LP_FIT, source="lp")
            stall = 0 if sum(fits(t) for t in range(len(found))) > before else stall + 1
        if independent() < r:  # a partial reading of a noisy update: the vertices that
            # fit within its noise but not exactly are as likely near-patterns as patterns (under σ0 = 1 at
            # B = 16 some fit within 2.2 times the noise with 10 % of their rows wrong); only exact ones stay
            keep_found = [t for t in range(len(found)) if origin[t] != "lp" or -found[t][1] <= EXACT_SPREAD]
            lp_dropped = sum(fits(t) for t in range(len(found))) - sum(fits(t) for t in keep_found)
            found[:], hits[:], origin[:] = ([found[t] for t in keep_found], [hits[t] for t in keep_found],
                                            [origin[t] for t in keep_found])
    # where the columns and programmes leave at most what the global search reads, past SAMPLE_MAX_RANK it reads
    # them at once (on a noisy update, sampled sets found twice would only add near-patterns to choose from)
    have = independent()
    sample = have < r and not (global_search and r > SAMPLE_MAX_RANK and have >= r - SEARCH_MAX_RANK)
    sampling_start = time.perf_counter()
    while r > 1 and trials < max_trials and mr >= r - 1 and sample:
        now = time.perf_counter()
        if time_limit is not None and (now - start > time_limit or (
                now - sampling_start > 0.3 * (time_limit - (sampling_start - start)) and
                not any(fits(t) for t in range(len(found))))):
            break  # out of time, or nothing fits after a third of what the programmes left: to the fallback
        k = min(chunk, max_trials - trials)
        idx = torch.rand(k, mr, generator=g).topk(r - 1, dim=1).indices  # r - 1 distinct patterns per set
        qs = _null_vectors(rows[idx])  # k x r
        trials += k
        w = distinct @ qs.T  # mr x k: should be 0 on the sampled rows and one other value elsewhere
        big = w.abs() >= w.abs().amax(dim=0, keepdim=True) * 0.5
        alpha = torch.where(big, w, torch.zeros_like(w)).sum(dim=0) / big.sum(dim=0).clamp_min(1)
        wn = w / alpha.where(alpha != 0, torch.ones_like(alpha))
        close = ((wn.abs() < 0.3) | ((wn - 1).abs() < 0.3)).double().mean(dim=0)
        best = torch.argsort(close, descending=True)[:16]
        cands = [qs[j] / alpha[j] for j in best.tolist() if float(close[j]) > 0.6]
        for q in cands:
            consider(q)
        good = [t for t in range(len(found)) if fits(t)]
        if len(good) >= r and sum(hits[t] >= 2 for t in good) >= r and trials >= 4 * chunk:
            break
    # keep the r best that are linearly independent, those that fit to the noise first
    order = sorted(range(len(found)), key=lambda t: (not fits(t), -found[t][1]))
    chosen: list[int] = []
    for t in order:
        cand = torch.stack([found[c][0] for c in chosen + [t]], dim=1)
        if int(torch.linalg.matrix_rank(cand, rtol=1e-6)) == len(chosen) + 1:
            chosen.append(t)
        if len(chosen) == r:
            break
    good = [t for t in range(len(found)) if fits(t)]
    if weight is not None and len(good) > len(chosen) == r and all(fits(t) for t in chosen):
        chosen = _most_consistent(found, chosen, Pk, vk, weight.double()[keep] @ Vh.T, Vh.sum(dim=1), max_spread,
                                  pool=good)
    separated = sum(1 for t in chosen if fits(t))
    chosen = sorted(chosen, key=lambda t: not fits(t))
    cols = [found[c][0] for c in chosen]
    if len(cols) < r:  # complete the basis with directions orthogonal to what was found
        basis = torch.stack(cols, dim=1) if cols else torch.zeros(r, 0, dtype=torch.float64)
        full, _ = torch.linalg.qr(torch.cat([basis, torch.eye(r, dtype=torch.float64)], dim=1))
        cols += [full[:, j] for j in range(len(cols), r)]
    Q = torch.stack(cols, dim=1)
    X = torch.linalg.solve(Q, Vh)
    patterns = feature_noise = None
    extra: dict[str, Any] = {}
    if separated == r:  # every row's ReLU pattern, as the dual vectors read it
        safe = torch.where(v != 0, v, torch.ones_like(v))
        patterns = torch.where(v[:, None] != 0, (P @ Q) / safe[:, None] > 0.5, False).double()
    alternatives = []
    big = r > SEARCH_MAX_RANK
    # the spread the noise alone gives each separated image's levels: round-off for an exact update
    from_noise = [noise_level * float(found[c][0].norm()) for c in chosen[:separated]]
    expected = max(from_noise, default=0.0)
    if global_search and r > 1 and (separated >= r - SEARCH_MAX_RANK if big else separated < r) and \
            not (big and separated == r and expected <= EXACT_SPREAD):
        others: list = []
        known = first = None
        if big:  # the patterns of the images the dual vectors missed, and of the RESEARCHED worst-fitting
            ratio = [-found[c][1] / max(e, 1e-300) for c, e in zip(chosen[:separated], from_noise)]
            order = sorted(range(separated), key=lambda j: ratio[j])
            # an exact update (no energy outside the rank-r subspace) leaves nothing to doubt
            doubt = 0 if expected <= EXACT_SPREAD else min(RESEARCHED, SEARCH_MAX_RANK - (r - separated))
            read = (Pk @ Q / vk[:, None] > 0.5).double()
            known = read[:, order[:separated - doubt]]
            first = torch.cat([read[:, order[separated - doubt:]],
                               (torch.rand(Pk.shape[0], r - separated, generator=g) < 0.5).double()], dim=1)
            extra["researched"] = {"missing": r - separated, "doubted": doubt,
                                   "doubted_fit": sorted(round(x, 3) for x in ratio)[separated - doubt:]}
        Mk, extra["global_search"] = search_patterns(
            Gd[keep], vk, r, seed=g.initial_seed() + 1,
            time_limit=None if time_limit is None else max(1.0, 0.5 * time_limit), runners_up=others, fixed=known,
            first=first, weight=None if weight is None else weight.double()[keep])
        if Mk is not None:
            def whole(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                Xm = torch.linalg.lstsq(vk[:, None] * M, Gd[keep]).solution
                # the rows with a tiny row scale too: the nearest subset sum of the inputs, or past
                # SEARCH_MAX_RANK images (2^N subset sums of whole rows would not fit in memory) each row's
                # least-squares coefficients rounded to 0/1, as the dual vectors read patterns
                tiny = ~keep & (v != 0)
                R = Gd[tiny] / v[tiny, None]
                pm = torch.zeros(m, r, dtype=torch.float64)
                pm[tiny] = (_nearest_subsets(R, Xm, _subsets(r)) if r <= SEARCH_MAX_RANK
                            else (torch.linalg.lstsq(Xm.T, R.T).solution.T > 0.5).double())
                pm[keep] = M
                return Xm, pm
            X, patterns = whole(Mk)
            separated = r
            for M, _ in others:
                Xm, pm = whole(M)
                alternatives.append((Xm, pm, _feature_noise(vk, M, outside, Xm)))
            extra["global_search"]["runners_up"] = [round(q / extra["global_search"]["residual"] - 1, 6)
                                                    for _, q in others]
    if patterns is not None:
        feature_noise = _feature_noise(vk, patterns[keep], outside, X)
    return Separation(X=X, patterns=patterns, alternatives=alternatives,
                      info={"separated": separated, "trials": trials, "lps": lps, "lp_dropped": lp_dropped,
                            "spectrum": spectrum,
                            "seconds": round(time.perf_counter() - start, 3),
                            "best_spreads": sorted(spreads)[:2 * r], "candidates": len(found),
                            "fitting": len(good), "noise_level": noise_level, "feature_noise": feature_noise,
                            "shown_by_columns": shown, **extra})


#: The non-negative separation (:func:`nonneg_separate`): an input counts as zero below ``NONNEG_ZERO``
#: times the median of its positive entries; each candidate is refined ``NONNEG_ROUNDS`` times; two
#: candidates whose inputs have a cosine above ``NONNEG_SAME`` are one image (distinct images' inputs on
#: the tune draw: cosine 0.91 at most at B = 4, 0.93 at B = 16); a candidate is an input only where the
#: energy of its negative entries is below ``NONNEG_NEGATIVE`` of its whole (true inputs under 5 local
#: steps, tune draw, B = 4 and 8: 2e-6 to 6e-5; under relative noise σ0 = 1 or QSGD 4 at B = 4 the search
#: in the top N directions found one candidate only, 3e-5 to 7e-3 negative and at cosine 0.93 to 0.95
#: with an image: the noise drowns the zeros, and :mod:`.linear_leak` uses this only under local drift).
NONNEG_ZERO = 0.1
NONNEG_ROUNDS = 12
NONNEG_SAME = 0.95
NONNEG_NEGATIVE = 1e-3
#: Random starts per image at least; then on until each image has been found ``NONNEG_HITS`` times (a
#: spurious combination: once or twice in a few hundred), up to the time limit, or without one up to
#: ``NONNEG_MORE`` times the least.
NONNEG_TRIALS = 50
NONNEG_MORE = 4
NONNEG_HITS = 3
#: The share of an image's row-coefficient energy that must lie on one side of 0 (its label's): true
#: inputs under 5 local steps on the tune draw, 0.94 to 1.000 (B = 4 and 8); an input mixed with an image
#: never found, 0.69.
NONNEG_SIGNED = 0.9
#: The share of live columns, those the found images explain best, that deflated starts draw from.
NONNEG_POOL = 0.25


def _nonneg_refine(V: torch.Tensor, w: torch.Tensor, rounds: int = NONNEG_ROUNDS
                   ) -> tuple[torch.Tensor, float, float] | None:
    """Refine a combination ``w`` of the row-space basis ``V`` (r x n, live columns) towards a
    non-negative input with zeros: the columns where ``w V`` is below ``NONNEG_ZERO`` times its median
    positive entry are taken as the input's zeros and ``w`` is made the null vector of them, repeatedly.
    (Small true entries below the threshold count as zeros: on an exact update the end point is off by
    about 1e-4 in relative terms. Polishing with a tenth of the threshold removed that and lost two of
    three FedAvg batches on the tune draw, whose true zeros are only near zero.) Returns (unit w with
    ``w V`` positive on the whole, negative energy share, zero share), or None where too few zeros are
    left."""
    r = V.shape[0]
    for k in range(rounds + 1):
        u = w @ V
        if float(u.sum()) < 0:
            u, w = -u, -w
        pos = u[u > 0]
        if pos.numel() < 2 * r:
            return None
        zero = u < NONNEG_ZERO * pos.median()
        if int(zero.sum()) < 2 * r:
            return None
        if k == rounds:
            break
        _, _, vh = torch.linalg.svd(V[:, zero].T, full_matrices=False)
        w = vh[-1]
    negative = float(u.clamp_max(0).pow(2).sum() / u.pow(2).sum().clamp_min(1e-300))
    return w, negative, float(zero.double().mean())


def _weight(f: list) -> int:
    """How often a candidate counts as found: its random starts' hits, and ``NONNEG_HITS`` at least where a
    seed (another separation's input) refined to it."""
    return max(f[3], NONNEG_HITS) if f[5] else f[3]


def _nonneg_choose(found: list, r: int) -> list:
    """The ``r`` linearly independent inputs found most often (each at least ``NONNEG_HITS`` times, a seeded
    one counted as that often), random starts' hits first."""
    chosen: list = []
    for f in sorted(found, key=lambda f: (-_weight(f), -f[3])):
        if _weight(f) < NONNEG_HITS or len(chosen) == r:
            break
        cand = torch.stack([c[1] for c in chosen + [f]])
        if int(torch.linalg.matrix_rank(cand, rtol=1e-6)) == len(chosen) + 1:
            chosen.append(f)
    return chosen


def _nonneg_assemble(chosen: list, Vh: torch.Tensor, G: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Scale, sign and patterns of the chosen inputs from the rows (see :func:`nonneg_separate`):
    (X, patterns, each image's sign consistency), X and patterns None where an image's row coefficients
    do not share one sign."""
    r = len(chosen)
    U = torch.stack([c[1] for c in chosen]) @ Vh  # r x n, unit rows, non-negative on the whole
    C = torch.linalg.lstsq(U.T, G.T).solution.T  # m x r: G ~ C U
    safe = torch.where(v != 0, v, torch.ones_like(v))
    rho = torch.where(v[:, None] != 0, C / safe[:, None], torch.zeros_like(C))
    weight = v.pow(2)[:, None]
    plus = (weight * rho.clamp_min(0).pow(2)).sum(dim=0)
    minus = (weight * rho.clamp_max(0).pow(2)).sum(dim=0)
    sign = torch.where(plus >= minus, 1.0, -1.0).double()
    consistency = torch.maximum(plus, minus) / (plus + minus).clamp_min(1e-300)
    if bool((consistency < NONNEG_SIGNED).any()):
        return None, None, consistency
    alpha = torch.zeros(r, dtype=torch.float64)
    for i in range(r):
        side = rho[:, i] * sign[i] > 0
        # the active rows' level: the v^2-weighted mean over the rows reaching half the side's typical value
        typical = float(rho[side, i].abs().median())
        active = side & (rho[:, i].abs() > 0.5 * typical)
        wts = weight[active, 0]
        alpha[i] = sign[i] * float((rho[active, i].abs() * wts).sum() / wts.sum())
    X = alpha[:, None] * U
    patterns = torch.where(v[:, None] != 0, rho / alpha[None, :] > 0.5, False).double()
    return X, patterns, consistency


def _deflated_pool(V: torch.Tensor, found: list, r: int) -> torch.Tensor | None:
    """Live columns where the images still missing are likely zero, to draw starts from: the images found
    ``NONNEG_HITS`` times explain each column's coefficients by least squares, and the columns they
    explain best (the lowest ``NONNEG_POOL`` share by relative residual) hold little of anything else.
    A missing image with few zeros is rarely reached from random live columns (on the report batch at
    B = 4 under FedAvg, searched in the top 4 directions, 3 of 600 starts): its zeros are a tenth of
    them. None where no image, or every image, is found yet."""
    known = [f for f in found if _weight(f) >= NONNEG_HITS]
    if not known or len(known) >= r:
        return None
    Hf = torch.stack([f[1] @ V for f in known])  # found inputs on the live columns
    coef = torch.linalg.lstsq(Hf.T, V.T).solution  # found x dimensions
    resid = (V - (Hf.T @ coef).T).norm(dim=0) / V.norm(dim=0).clamp_min(1e-300)
    count = max(V.shape[0], int(NONNEG_POOL * V.shape[1]))
    return torch.argsort(resid)[:count]


def nonneg_separate(G: torch.Tensor, rank: int, *, row_scale: torch.Tensor,
                    generator: torch.Generator | None = None, time_limit: float | None = None,
                    trials: int | None = None, seeds: torch.Tensor | None = None,
                    extra: int | None = None) -> Separation | None:
    """Separate ``G`` (m x n) by its inputs' signs instead of its rows' levels: every ``h_i`` is a ReLU's
    output, non-negative with many exact zeros (on chest X-rays a fifth to a third of the columns some
    image of the batch activates), and a combination of two or more images' inputs has fewer zeros, or
    negative entries. In the row space (the top right singular vectors, below) the inputs are the
    sparsest non-negative vectors: from as many random live columns as the space has dimensions less one
    (taken as zeros of one input, the start is their null vector), :func:`_nonneg_refine` converges to
    one ``h_i`` from most starts, each image found many times, a spurious combination rarely. Needs no
    0/1 row levels, so it holds where the rows are subset sums only approximately (several local steps
    of FedAvg: the weights drift between the gradients summed) and for any N (no enumeration of
    subsets).

    Starts are drawn (``NONNEG_TRIALS`` per image at least; exactly ``trials`` if given) until the
    ``rank`` distinct inputs found most often (hits summed over near-duplicates, each image kept at its
    candidate with the most zeros) have been found ``NONNEG_HITS`` times each and hold (below), or until
    ``time_limit`` has passed (without one, ``NONNEG_MORE`` times the least); after the least, every
    other start is drawn from the columns the images found so far explain best
    (:func:`_deflated_pool`). Their scale and sign come from the rows: the coefficients ``c_ij`` of
    ``G = C U`` divided by ``row_scale`` take the values 0 and ``a_i / N`` (up to drift), ``a_i`` the
    image's output-gradient factor, so they share one sign, the label's; the rows' weighted energy on
    either side gives it, the typical value on that side the scale, the rows reaching half of it the
    pattern.

    The search runs in the top ``rank + extra`` right singular directions (``extra`` default ``rank``;
    only those above round-off): under several local steps the images' inputs at the weights the server
    sent are not quite in the top ``rank`` (cosine 0.978 for one image of a tune batch at B = 8, and the
    refinement from it went to another image), but the top ``2 rank`` hold every one at cosine 0.9999
    or more, and the refinement from there stays at 0.9993 or more; the directions the drift adds are no
    sparse non-negative vectors. On that batch all 600 random starts in the top 16 directions passed the
    negativity test, each image reached 52 to 142 times (median cosine 0.998 or more); in the top 8 one
    image was never reached in 800.

    ``seeds`` (k x n): inputs another separation found (the 0/1 search's); each is refined here first,
    and an input a seed reaches counts as found ``NONNEG_HITS`` times however many seeds reach it, so
    that an image whose basin the random starts rarely reach can still be read exactly from a near
    start. (A seed that is a mixture may refine to a spurious input; the sign test below refuses a set
    that holds one.)

    Returns None where fewer than ``rank`` distinct inputs were found often enough, or where an image's
    coefficients do not share one sign (at least ``NONNEG_SIGNED`` of their energy on one side): a
    missing image then hides in the others' coefficients. ``info["sign_consistency"]`` gives each
    image's share."""
    start = time.perf_counter()
    g, Gd, r = _setup(G, rank, generator)
    m, n = Gd.shape
    extra = r if extra is None else int(extra)
    if extra < 0:
        raise ValueError(f"extra directions must be 0 or more, not {extra}")
    _, s, vh = _top_singular(Gd, min(r + extra, m - 1, n - 1))
    # the top r directions and the extra ones the update really has (not round-off of an exact rank r)
    Vh = vh[: max(r, int((s > 1e-6 * s[0]).sum()))]
    norms = Vh.norm(dim=0)
    live = norms > 0.05 * torch.quantile(norms, 0.9)
    V = Vh[:, live]
    if V.shape[1] < 4 * Vh.shape[0]:
        return None
    least = NONNEG_TRIALS * r if trials is None else int(trials)
    most = least if trials is not None else (2**62 if time_limit is not None else NONNEG_MORE * least)
    v = row_scale.double().reshape(-1)
    found: list[list] = []  # [unit input u (live columns), w, zero share, hits, version, seeded]
    done = 0
    result = None
    tried: set = set()
    pool = None

    def add(w: torch.Tensor, seeded: bool = False) -> None:
        res = _nonneg_refine(V, w)
        if res is None or res[1] > NONNEG_NEGATIVE:
            return
        w, _, zero_share = res
        u = w @ V
        u = u / u.norm()
        for f in found:
            if float(u @ f[0]) > NONNEG_SAME:
                f[3] += 0 if seeded else 1
                f[5] = f[5] or seeded
                if zero_share > f[2]:
                    f[0], f[1], f[2], f[4] = u, w, zero_share, f[4] + 1
                return
        found.append([u, w, zero_share, 0 if seeded else 1, 0, seeded])
    for x in ([] if seeds is None else seeds.double()):
        add(Vh @ x, seeded=True)
    while True:
        over = done >= most or (time_limit is not None and time.perf_counter() - start > time_limit)
        if len(found) >= r and (over or (done >= least and sorted(_weight(f) for f in found)[-r] >= NONNEG_HITS)):
            chosen = _nonneg_choose(found, r)
            key = frozenset((id(f), f[4]) for f in chosen)  # the set, each at its current representative
            if len(chosen) == r and key not in tried:  # a new set of the most-found inputs: does it hold?
                tried.add(key)
                result = _nonneg_assemble(chosen, Vh, Gd, v)
                if result[0] is not None:
                    break
        if over:
            break
        done += 1
        if done > least and done % 2 == 0 and (pool is None or done % 50 == 0):
            pool = _deflated_pool(V, found, r)
        k = V.shape[0] - 1  # columns taken as one input's zeros: its null vector is the start
        cols = torch.randperm(V.shape[1], generator=g)[:k]
        if pool is not None and done > least and done % 2 == 0:  # every other start: deflated
            cols = pool[torch.randperm(len(pool), generator=g)[:k]]
        add(_null_vectors(V[:, cols].T) if k else torch.ones(1, dtype=torch.float64))
    chosen = _nonneg_choose(found, r)
    info: dict[str, Any] = {"method": "nonneg", "dimensions": Vh.shape[0], "trials": done,
                            "seeds": 0 if seeds is None else len(seeds), "candidates": len(found),
                            "sets_tried": len(tried), "hits": [int(f[3]) for f in chosen],
                            "seeded": [bool(f[5]) for f in chosen],
                            "zero_share": [round(f[2], 4) for f in chosen]}
    if result is None or result[0] is None:
        return None
    X, patterns, consistency = result
    info["sign_consistency"] = [round(float(c), 4) for c in consistency]
    # each input's expected error from what the searched subspace leaves out of the rows (as :func:`separate`)
    keep = v.abs() > 0.1 * v.pow(2).mean().sqrt()
    outside = (Gd[keep].pow(2).sum(dim=1) - (Gd[keep] @ Vh.T).pow(2).sum(dim=1)).clamp_min(0) / max(n - len(Vh), 1)
    info["feature_noise"] = _feature_noise(v[keep], patterns[keep], outside, X)
    info.update({"separated": r, "seconds": round(time.perf_counter() - start, 3),
                 "spectrum": [float(x) for x in s[:r]]})
    return Separation(X=X, patterns=patterns, info=info)


def reestimate(G: torch.Tensor, A: torch.Tensor, X: torch.Tensor, loss, *, iterations: int = 25,
               time_limit: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Maximum-likelihood inputs given the subset-sum structure: ``X`` minimising
    ``sum_jk loss(G_pred - G)`` with ``G_pred = A X`` (``A = diag(v) M``, the rows' scales times their
    ReLU patterns, m x r), one small convex problem per column of ``G`` solved by damped Newton steps
    for all columns at once (in single precision: the residuals are a few rounding steps).

    ``loss(R, derivatives)`` -> the value entry-wise for the residual ``R`` (m x n), and with
    ``derivatives`` also its first and second derivative: the negative log-likelihood of the observed
    entries, which the caller knows from the obfuscation (a rounding cell, QSGD's stochastic levels).
    The rank-r projection behind ``X`` treats the noise as the same for every entry; a likelihood
    knows better: an entry rounded to 0 says the true value was small, which a least-squares fit to the
    rounded values ignores. Starts from ``X`` (the separation's estimate); each column only ever moves
    to a lower loss. Rows that no image activates do not depend on ``X``: leave them out. Returns X and
    what was done."""
    start = time.perf_counter()
    A, G = A.float(), G.float()
    r = A.shape[1]
    AA = (A[:, :, None] * A[:, None, :]).reshape(A.shape[0], r * r)
    eye = torch.eye(r, dtype=A.dtype)
    X = X.float().clone()
    value, g, h = loss(A @ X - G, True)
    total = value.double().sum(dim=0)
    first = float(total.sum())
    done = 0
    for done in range(1, int(iterations) + 1):
        grad = A.T @ g  # r x n
        H = (h.T @ AA).reshape(-1, r, r)
        H = H + 1e-6 * H.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None] * eye
        step = torch.linalg.solve(H, grad.T[..., None])[..., 0].T
        t = torch.ones(X.shape[1], dtype=X.dtype)
        for _ in range(8):  # halve each column's step until its loss does not grow
            new = loss(A @ (X - t * step) - G, False).double().sum(dim=0)
            worse = new > total
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        ok = new <= total
        X = torch.where(ok[None], X - t * step, X)
        gain = float((total - torch.where(ok, new, total)).sum())
        total = torch.where(ok, new, total)
        if gain <= 1e-5 * abs(first) or (time_limit is not None and time.perf_counter() - start > time_limit):
            break
        _, g, h = loss(A @ X - G, True)
    return X.double(), {"iterations": done, "loss_before": round(first, 6), "loss_after": round(float(total.sum()), 6),
                        "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------ exact sent entries (sparsifiers)
#: Two sent entries ``G_jk / v_j`` of one column count as equal below this difference relative to the larger
#: of them or, where that is larger, to the column's largest sent value (the update is computed in single
#: precision: rows of one pattern agree to about 1e-7 of the terms summed, which images of both signs can make
#: far larger than their sum: under random-k 10 % on `mlp`, B = 4, relative to the entries alone one pattern's
#: rows split into up to 6 groups, and no block separated).
EQUAL_TOLERANCE = 1e-5


def merge_equal_rows(R: torch.Tensor, O: torch.Tensor, tol: float = EQUAL_TOLERANCE
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of one ReLU pattern merged into one, from exact sent entries.

    ``R`` (m x n) holds ``G_jk / v_j`` where ``O`` says the entry was sent. Rows with the same pattern
    are the same subset sum, so they agree on every column both sent; rows of different patterns
    differ wherever an image in one set and not the other has a non-zero input. Pairs that share a
    column and agree on all they share are merged, those agreeing on most columns first, never two
    groups with a pair that disagrees on a shared column (inputs with zeros can make rows of two
    patterns agree where they meet, and a chain of such pairs would otherwise join patterns that
    conflict). Each group becomes one row, its value the mean of its members' and its sent columns
    their union (under top-k 1 % on real X-rays a pattern's rows each send a few columns, together
    hundreds). Returns the merged values, their mask, and each row's group index (m,)."""
    m, n = R.shape
    rows, cols = torch.nonzero(O, as_tuple=True)
    vals = R[rows, cols]
    # sort the entries by column, then value: runs of equal values within a column
    order = torch.argsort(vals, stable=True)
    order = order[torch.argsort(cols[order], stable=True)]
    r, c, x = rows[order], cols[order], vals[order]
    new = torch.ones(len(x), dtype=torch.bool)
    if len(x) > 1:
        # single precision's error is relative to the terms a column sums, not to their sum: where images of
        # both signs nearly cancel, rows of one pattern differ by more than ``tol`` of their value, so the
        # column's largest sent value sets a floor
        floor = torch.where(O, R.abs(), torch.zeros_like(R)).amax(dim=0)[c]
        gap = (x[1:] - x[:-1]).abs() > tol * torch.maximum(torch.maximum(x[1:].abs(), x[:-1].abs()), floor[1:])
        new[1:] = (c[1:] != c[:-1]) | gap
    run = torch.cumsum(new.long(), 0) - 1
    ones = np.ones(len(x))
    sent = coo_matrix((ones, (r.numpy(), c.numpy())), shape=(m, n)).tocsr()
    same = coo_matrix((ones, (r.numpy(), run.numpy())), shape=(m, int(run[-1]) + 1 if len(x) else 0)).tocsr()
    shared = (sent @ sent.T).toarray()
    agree = (same @ same.T).toarray()
    conflict = torch.from_numpy(agree < shared)
    i, j = np.nonzero(np.triu((agree == shared) & (shared > 0), k=1))
    group = list(range(m))

    def find(a: int) -> int:
        while group[a] != a:
            group[a] = group[group[a]]
            a = group[a]
        return a

    for k in np.argsort(-shared[i, j], kind="stable").tolist():
        a, b = find(int(i[k])), find(int(j[k]))
        if a == b or bool(conflict[a, b]):
            continue
        group[b] = a
        conflict[a] |= conflict[b]
        conflict[:, a] |= conflict[:, b]
    roots = torch.tensor([find(a) for a in range(m)], dtype=torch.long)
    _, index = torch.unique(roots, return_inverse=True)
    count = int(index.max()) + 1 if m else 0
    Og = torch.zeros(count, n, dtype=torch.bool).index_put_((index[rows], cols), torch.ones(len(rows), dtype=torch.bool))
    total = torch.zeros(count, n, dtype=R.dtype).index_put_((index[rows], cols), vals, accumulate=True)
    hits = torch.zeros(count, n, dtype=R.dtype).index_put_((index[rows], cols), torch.ones_like(vals), accumulate=True)
    return total / hits.clamp_min(1), Og, index


def solve_sent_columns(G: torch.Tensor, O: torch.Tensor, A: torch.Tensor, rtol: float = 1e-6
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every column of ``G = A X`` that its own sent rows determine (least squares over the rows whose
    entry ``O`` says was sent), and which these are: a column counts when the normal matrix of its sent
    rows has no eigenvalue below ``rtol`` times its largest (``A``: rows x n, ``X``: n x columns)."""
    n = A.shape[1]
    Od = O.to(A.dtype)
    X = torch.zeros(n, G.shape[1], dtype=A.dtype)
    known = torch.zeros(G.shape[1], dtype=torch.bool)
    eye = torch.eye(n, dtype=A.dtype)
    for lo in range(0, G.shape[1], 2048):
        hi = min(G.shape[1], lo + 2048)
        o = Od[:, lo:hi]  # rows x cols
        normal = torch.einsum("rc,ri,rj->cij", o, A, A)
        rhs = torch.einsum("rc,ri->ci", o * G[:, lo:hi], A)
        ev = torch.linalg.eigvalsh(normal)  # ascending; a column no row sent has an all-zero normal matrix
        ok = ev[:, 0] > rtol * ev[:, -1].clamp_min(1e-300)
        sol = torch.linalg.solve(normal + (~ok).to(A.dtype)[:, None, None] * eye, rhs[..., None])[..., 0]
        X[:, lo:hi] = torch.where(ok[:, None], sol, torch.zeros_like(sol)).T
        known[lo:hi] = ok
    return X, known


#: How far below the largest the smallest eigenvalue of a column's (or row's) normal matrix may lie in
#: :func:`complete_block`: the coordinates there are the block's own singular directions, whose values
#: span more than three decades at B = 16 (exact sums of float32 values keep about seven digits).
COMPLETE_RTOL = 1e-10
#: Above this relative residual on the sent entries reached, :func:`complete_block` stops growing: the
#: values are not exact subset sums of N inputs.
COMPLETE_RESIDUAL = 1e-5
#: The most choices and labelings :func:`label_exhaustive` weighs on a grown block (tune draw, top-k 1 %,
#: B = 16: 22 candidates, 74,613 choices in about 5 s, 609 labelings fit, 63 of them with one sign per
#: image).
COMPLETE_MAX_CHOICES = 250_000
COMPLETE_MAX_FOUND = 5_000


def complete_block(R: torch.Tensor, O: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, r: int,
                   rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense block of exact rank-r rows grown to every row and column its sent entries reach.

    ``R`` (m x n) holds exact values where ``O`` is set, every row a combination of r inputs; ``rows``
    x ``cols`` is a block with every entry sent. Each row gets coordinates in the block's r singular
    directions, each column its values there: a column is solved from the rows with coordinates that
    sent it, a row from the columns solved that it sent (at least r of either, of full rank), until
    neither grows. Returns the rows and columns reached (indices) and the completed block there (dense,
    of rank r, equal to ``R`` where sent), which :func:`label_exhaustive` can enumerate: under top-k 1 %
    at B = 16 on the tune draw a 40 x 32 block grows to 46 rows x 332 columns, which cuts the image
    patterns its rows admit from 63 to 22 (16 of them the images'). Returns the block itself where the
    values reached are not exact."""
    m = R.shape[0]
    block = R[rows][:, cols]
    _, _, Vt = torch.linalg.svd(block, full_matrices=False)
    U = torch.zeros(m, r, dtype=R.dtype)
    U[rows] = block @ Vt[:r].T
    known = torch.zeros(m, dtype=torch.bool)
    known[rows] = True
    reached = (rows, cols, block)
    for _ in range(rounds):
        Vc, solved = solve_sent_columns(R[known], O[known], U[known], COMPLETE_RTOL)
        Ur, found = solve_sent_columns(R[:, solved].T, O[:, solved].T, Vc[:, solved].T, COMPLETE_RTOL)
        sent = O[known][:, solved]
        given = R[known][:, solved]
        pred = U[known] @ Vc[:, solved]
        resid = float(((pred - given) * sent).norm() / (given * sent).norm().clamp_min(1e-300))
        if resid > COMPLETE_RESIDUAL:
            break
        reached = (torch.nonzero(known).reshape(-1), torch.nonzero(solved).reshape(-1), pred)
        grown = found & ~known
        if not bool(grown.any()):
            break
        U[grown] = Ur.T[grown]
        known |= grown
    return reached


#: The largest batch :func:`label_exhaustive` enumerates the patterns of (2^N candidate images per row)
#: one by one; past it they are found by integer programming (:func:`_lattice_patterns`), at most
#: ``LATTICE_MOST`` per image.
EXHAUSTIVE_MAX_RANK = 16
#: In a completed block (:func:`label_exhaustive`'s ``duplicates``), two rows a labeling reads as one pattern must
#: agree to this share of the block's largest row (its rows are completed to about 1e-5 of their own).
DUPLICATE_TOLERANCE = 1e-4
LATTICE_MOST = 3
#: And the most choices of N among more candidates than images it checks (under top-k 1 % at B = 8 on
#: the tune draw the largest blocks give 11 candidates, 165 choices).
EXHAUSTIVE_MAX_CHOICES = 20_000
#: The most labelings it returns (tune draw, top-k 1 %, B = 8: 32 fit a 26 x 16 block, one of them the
#: whole update).
EXHAUSTIVE_MAX_FOUND = 64
#: An input counts as one-signed in :func:`label_exhaustive` below this share of its norm on the other
#: sign (exact sums of float32 values: the images' own inputs reach 1e-6), and an entry as zero below this
#: share of its input's largest.
ONE_SIGN = 1e-4
ZERO_RELATIVE = 1e-5


def _lattice_patterns(C: torch.Tensor, r: int, tol: float, time_limit: float | None, most: int) -> torch.Tensor:
    """Every non-zero 0/1 vector ``a`` (r) that makes ``C a`` 0 or 1 in every row (within ``tol``), by
    mixed-integer programming (HiGHS through :func:`scipy.optimize.milp`): one feasible ``a`` at a time, each
    then cut off from the next search, until none is left, ``most`` are found or ``time_limit`` seconds
    pass. With many rows the images' patterns are the only ones: at B = 32 under top-k 10 % (tune draw)
    the 137 x 48 block of merged rows gives the 32 images' patterns and nothing else in about 15 s;
    under top-k 1 % the block grown to 59 x 146 gives 51, too many to choose 32 from. Returns them
    (found x r), sorted."""
    start = time.perf_counter()
    k = C.shape[0]
    link = scipy.sparse.hstack([scipy.sparse.csr_matrix(C.numpy()), -scipy.sparse.identity(k)]).tocsr()
    constraints = [scipy.optimize.LinearConstraint(link, -tol, tol),
                   scipy.optimize.LinearConstraint(np.concatenate([np.ones(r), np.zeros(k)])[None], 1, np.inf)]
    found: list[np.ndarray] = []
    while len(found) < most:
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            break
        res = scipy.optimize.milp(np.zeros(r + k), constraints=constraints, integrality=np.ones(r + k),
                                  bounds=scipy.optimize.Bounds(0, 1),
                                  options={} if left is None else {"time_limit": left})
        if res.x is None:  # none left (or the time ran out inside the search)
            break
        a = np.round(res.x[:r])
        found.append(a)
        # cut a off: at least one of its bits flipped
        cut = np.concatenate([np.where(a == 1, -1.0, 1.0), np.zeros(k)])
        constraints.append(scipy.optimize.LinearConstraint(cut[None], 1 - a.sum(), np.inf))
    if not found:
        return torch.zeros(0, r, dtype=C.dtype)
    return torch.from_numpy(np.array(sorted(found, key=lambda a: tuple(a.tolist())))).to(C.dtype)


def label_exhaustive(rows: torch.Tensor, r: int, tol: float = 1e-4, *, max_choices: int = EXHAUSTIVE_MAX_CHOICES,
                     max_found: int = EXHAUSTIVE_MAX_FOUND, time_limit: float | None = None,
                     duplicates: bool = False) -> list[torch.Tensor]:
    """Every image's input from exact, distinct subset-sum rows (k x n, rank r), by enumeration.

    r linearly independent rows (pivoted QR) are the basis; every other row is an exact combination
    ``c_j`` of them. If the basis rows' patterns are the 0/1 matrix ``A`` (r x r, invertible), row j's
    pattern is ``c_j A``: each image's column ``a`` of ``A`` (which basis rows it is active in) must make
    ``c_j . a`` 0 or 1 for every other row j. That condition is per image, so the 2^r - 1 possible columns
    are checked one by one (past ``EXHAUSTIVE_MAX_RANK`` images, found by integer programming within
    ``time_limit`` seconds); the images are r of the columns that pass, chosen so that every row comes
    out non-zero and distinct. Returns ``X = A^-1 B`` (r x n, each image's ``a_i h_i / N`` on these
    columns, in no particular order) for every choice that fits, those with one sign per image first
    (post-ReLU inputs are non-negative; a wrong choice can mix images of both signs), among them those
    with the most exact zeros (a ReLU's output has zeros, a mix of images only where all of them have
    one), then the closest to one sign: the caller tells them apart on the other rows. Empty when the
    rows have rank below r or more than ``max_choices`` choices are possible or more than
    ``max_found`` fit. This needs no row where one image is active alone: under top-k 1 % on real X-rays
    such rows often send nothing. The rows are distinct subset sums, so a choice that reads two of them as one
    pattern is wrong; ``duplicates`` (a block :func:`complete_block` completed): such a choice counts where the rows
    it reads as one agree to ``DUPLICATE_TOLERANCE`` of the block's largest row (two merged groups of one pattern),
    after the choices without."""
    k = rows.shape[0]
    if k < r:
        return []
    _, tri, piv = scipy.linalg.qr(rows.T.numpy(), pivoting=True, mode="economic")
    diag = np.abs(np.diag(tri))
    if len(diag) < r or diag[r - 1] <= 1e-9 * diag[0]:
        return []
    basis, rest = list(piv[:r]), list(piv[r:])
    Bm = rows[basis]
    C = torch.linalg.lstsq(Bm.T, rows[rest].T).solution.T if rest else torch.zeros(0, r, dtype=rows.dtype)
    if r <= EXHAUSTIVE_MAX_RANK:
        columns = _subsets(r)[1:].to(rows.dtype)  # every non-empty pattern, 2^r - 1 x r
        fit = columns @ C.T  # candidate x other rows
        ok = ((fit - fit.round()).abs() < tol).all(dim=1) & ((fit.round() == 0) | (fit.round() == 1)).all(dim=1)
        cand = columns[ok]
    else:  # 2^r columns are too many to check one by one: integer programming finds those that pass
        cand = _lattice_patterns(C, r, tol, time_limit, LATTICE_MOST * r)
    if len(cand) < r or math.comb(len(cand), r) > max_choices:
        return []
    found = []
    for choice in itertools.combinations(range(len(cand)), r):
        A = cand[list(choice)].T  # basis rows x images
        if abs(float(torch.linalg.det(A))) < 0.5:
            continue
        P = torch.cat([A, (C @ A).round()])
        if bool((P.sum(dim=1) == 0).any()):
            continue  # every row has an active image
        X = torch.linalg.solve(A, Bm)
        _, inverse, counts = torch.unique(P, dim=0, return_inverse=True, return_counts=True)
        repeated = counts[inverse] > 1  # rows read as one pattern with another
        if bool(repeated.any()):
            if not duplicates:
                continue
            # a completed block's rows of one pattern that the merging left apart (a lone row's error past its
            # tolerance) agree to the completion's error
            given = torch.cat([Bm, rows[rest]])
            err = (P[repeated] @ X - given[repeated]).norm(dim=1) / given.norm(dim=1).max().clamp_min(1e-300)
            if float(err.max()) > DUPLICATE_TOLERANCE:
                continue
        mixed = float((torch.minimum(X.clamp_min(0).norm(dim=1), (-X).clamp_min(0).norm(dim=1))
                       / X.norm(dim=1).clamp_min(1e-300)).max())
        zeros = int((X.abs() < ZERO_RELATIVE * X.abs().amax(dim=1, keepdim=True)).sum())
        found.append(((bool(repeated.any()), mixed > ONE_SIGN, -zeros, mixed), X))
        if len(found) > max_found:
            return []
    return [X for _, X in sorted(found, key=lambda f: f[0])]


# ------------------------------------------------------------------------------------------ signSGD
#: The most candidate families :func:`sign_supports` scores one by one (every choice of N of the
#: candidate sets); past it, or past ``SIGN_CHECKS``, it searches by swaps (:func:`_swap_search`). On
#: the tune draw at B = 4 the candidates number 4 to 18 (at most 3,060 families, under 0.1 s); at
#: B = 8, 13 and 94.
SIGN_FAMILIES = 50_000
#: And the most (choice, set to explain) pairs it checks one by one, about 0.7 µs each (at B = 4 on the
#: tune draw: up to 3,060 choices x 41 sets).
SIGN_CHECKS = 10_000_000
#: The swap search's random starts (each climbs until no single swap explains more): at most
#: ``SIGN_RESTARTS``, and it stops once ``SIGN_AGREE`` of them have ended on the best score, or at its time
#: limit (``SIGN_SEARCH_SECONDS`` by default). At B = 8 on the tune draw's batch 0 (94 candidates, about
#: 0.5 s a start; scored before the tie-break on unions) 20 starts ended at 32 sets explained, 2 of them
#: there (the chosen sets covering 7 of the 8 images, four exact); 37 starts (18 s) at 34 (7 images, five
#: exact and a stand-in exact on its known columns); 129 starts (60 s) at 34 too, 4 of them there. On the
#: report batch 18 of 20 starts ended on the best.
SIGN_RESTARTS = 1000
SIGN_AGREE = 5
SIGN_SEARCH_SECONDS = 30.0
#: Past this many images the supports are read from the update's columns (:func:`_column_supports`), not
#: chosen among its rows' sets: at B = 16 on the tune draw only 5 of the 16 supports show as a row's set,
#: while every image's ReLU pattern shows as a column's. `auto`, B = 16, 240 s, rows -> columns: report
#: batch 16.5 -> 20.6 dB (blind 16.9), tune batch 0 18.9 -> 20.3 (blind 17.4; its true supports inverted
#: alone, 180 s: 26.9); with the units each image switches on in the inversion (``linear_leak.SIGN_UNITS``)
#: 21.25 and 20.67. At B = 8 the columns were no better than the rows' choice with its stand-ins (tune
#: batches 0 / 1: 24.0 / 26.9 dB against 24.65 / 26.72; blind 18.4 / 16.4), so the rows stay there.
SIGN_COLUMNS_PAST = 8


@dataclass
class SignSeparation:
    """Each separated image's support (the inputs of the layer that are positive), its label, and how
    they were found."""

    supports: torch.Tensor  # n x K, bool
    labels: torch.Tensor  # n, int64: 0 where a_i > 0, 1 where a_i < 0
    info: dict[str, Any] = field(default_factory=dict)
    #: The mixed rows' comparisons: which separated images each explained mixed pair holds (M x n, bool)
    #: and the sign of ``sum_i a_i h_ik`` over them on every column of its union (M x K, +1 / -1, 0 off
    #: the union); None where nothing was separated or no mixed pair was explained
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None
    #: Where each support is known (n x K, bool): a chosen set that holds other chosen sets of its label
    #: stands in for an image no row shows alone, its union with theirs; on their columns its own side is
    #: not known. None: every support known everywhere
    known: torch.Tensor | None = None
    #: Which of the layer's units (its rows) each image switches on (1), off (0) or either (0.5), where the
    #: supports were read from the columns (each image's ReLU pattern on the rows that show its label);
    #: None otherwise
    units: torch.Tensor | None = None


def _bitsets(rows: torch.Tensor) -> list[int]:
    """Each boolean row as an integer bit set (column k is bit K - 1 - k)."""
    packed = np.packbits(rows.cpu().numpy().astype(np.uint8), axis=1)
    return [int.from_bytes(r.tobytes(), "big") for r in packed]


def _irreducible(S: list[int], label1: list[bool]) -> list[int]:
    """The sets that are not the union of the sets of their sign strictly inside them. A pure set of
    several images is the union of their supports, and where each of them is shown by a row of its own
    it is reducible; every support is irreducible (unless other images' supports cover it)."""
    out = []
    for d, Sd in enumerate(S):
        u = 0
        for c, Sc in enumerate(S):
            if c != d and label1[c] == label1[d] and Sc != Sd and (Sc & ~Sd) == 0:
                u |= Sc
        if u != Sd:
            out.append(d)
    return out


def _swap_search(score, n: int, nc: int, *, rng: np.random.Generator, restarts: int, agree: int,
                 deadline: float, first: list[int] | None = None) -> tuple[tuple[int, ...], Any, int, int]:
    """The best family of ``n`` of ``nc`` candidates ``score`` finds by hill climbing on single swaps
    (one member for a non-member, the first swap that scores higher taken) from up to ``restarts``
    random families (the first one ``first`` where given), until ``agree`` of them have ended on the best
    score, while ``time.perf_counter()`` is before ``deadline`` (a climb stops there too: the first start's
    family is returned however far it got). Returns the best family, its score, the starts run and how
    many ended on that score."""
    best, best_score, ran, at_best = None, None, 0, 0
    while ran < restarts and at_best < agree and (ran == 0 or time.perf_counter() < deadline):
        fam = sorted(first) if ran == 0 and first is not None else \
            sorted(rng.choice(nc, size=n, replace=False).tolist())
        sc = score(fam)
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            for pos in range(n):
                for c in range(nc):
                    if c in fam:
                        continue
                    trial = sorted(fam[:pos] + [c] + fam[pos + 1:])
                    s2 = score(trial)
                    if s2 > sc:
                        fam, sc, improved = trial, s2, True
                        break
                    if time.perf_counter() >= deadline:
                        break
                if time.perf_counter() >= deadline:
                    break
        ran += 1
        if best_score is None or sc > best_score:
            best, best_score, at_best = tuple(fam), sc, 1
        elif sc == best_score:
            at_best += 1
    return best, best_score, ran, at_best


def sign_supports(signs: torch.Tensor, v: torch.Tensor, n: int, *, seed: int = 0,
                  time_limit: float | None = None) -> SignSeparation:
    """Every image's support from the signs of a ReLU layer's weight update (signSGD).

    Row j of the update is ``v_j * sum_{i active} a_i h_i / N`` with ``h_i >= 0``, so its negative
    entries (``signs < 0``; signSGD sends +1 for a zero) form a set ``N_j``. Where every active image has
    ``a_i`` of the sign opposite to ``v_j``'s, ``N_j`` is the union of their supports (a *pure* set);
    where the active images' ``a_i`` differ in sign, ``N_j`` holds the columns where one side outweighs
    the other, and the same images under a ``v`` of the other sign give the complement within the union
    of their supports (a *mixed* pair: two disjoint sets whose union is a union of supports). A row with
    one active image whose ``a_i`` opposes ``v_j`` shows that image's support exactly, and the sign of
    ``v_j`` gives its label (``v_j > 0``: ``a_i < 0``, label 1).

    The candidates are the distinct sets that are not the union of the sets of their sign strictly inside
    them (:func:`_irreducible`: a union of supports each shown alone is no support). The N chosen as
    supports are those that explain the most distinct sets: a pure set by the union of the chosen sets of
    its sign inside it, and both sets of a mixed pair by the union of the chosen sets inside it, of both
    labels (ties: the most sets explained as a union of supports, not only as a pair's half; then the most
    rows explained). A half of a mixed pair taken for a support would explain
    itself, but not the support it stands in for: with two images whose both-active rows are as many as
    each one's own, counting the pair's halves as explained is what keeps the true supports ahead. Every
    choice is scored up to ``SIGN_FAMILIES`` choices and ``SIGN_CHECKS`` checks; past that the choice is
    searched by swaps (:func:`_swap_search`, starts from a generator seeded ``seed`` until
    ``SIGN_AGREE`` of them end on the best score, for at most ``time_limit`` seconds,
    ``SIGN_SEARCH_SECONDS`` by default). With fewer distinct sets than images nothing is separated
    (``info['note']`` says why).

    An image no row shows alone has no set of its own: the chosen set standing in for it is its union
    with other chosen sets of its label, and on their columns its side is not known (``known``).

    Every mixed pair the chosen supports explain also compares its images' inputs: ``sum_i a_i h_ik``
    over the chosen sets inside its union is positive on the set negative under ``v < 0`` and negative
    on the other (``mixed``: which images, and that sign on every column of the union)."""
    if n > SIGN_COLUMNS_PAST:
        return _column_supports(signs, v, n, seed=seed, time_limit=time_limit)
    start = time.perf_counter()
    live = v != 0
    neg = (signs[live] < 0)
    pos_v = (v[live] > 0)
    key = torch.cat([neg, pos_v[:, None]], dim=1)
    distinct, counts = torch.unique(key, dim=0, return_counts=True)
    sets, sig = distinct[:, :-1], distinct[:, -1]
    nonempty = sets.any(dim=1)
    sets, sig, counts = sets[nonempty], sig[nonempty], counts[nonempty]
    D = len(sets)
    info: dict[str, Any] = {"method": "sign supports", "distinct_sets": D, "separated": 0}
    empty = SignSeparation(torch.zeros(0, signs.shape[1], dtype=torch.bool), torch.zeros(0, dtype=torch.int64), info)
    if D < n:
        info["note"] = f"{D} distinct sets of negative signs for {n} images: fewer sets than images"
        info["seconds"] = round(time.perf_counter() - start, 3)
        return empty
    S_all = _bitsets(sets)
    label1_all = [bool(x) for x in sig.tolist()]  # v > 0: a pure set of images with a_i < 0
    cand = _irreducible(S_all, label1_all)
    if len(cand) < n:
        cand = list(range(D))
    nc = len(cand)
    S = [S_all[c] for c in cand]
    label1 = [label1_all[c] for c in cand]
    # targets: every distinct set (union of its own sign's supports) and every mixed pair (union of both)
    targets: list[tuple[int, int, bool]] = []  # (set, candidates inside it as a bit mask, mixed)
    pairs = [(d, e) for d in range(D) for e in range(D)
             if not label1_all[d] and label1_all[e] and (S_all[d] & S_all[e]) == 0]
    for T, mixed, same in [(S_all[d], False, label1_all[d]) for d in range(D)] + \
                          [(S_all[d] | S_all[e], True, None) for d, e in pairs]:
        inside = 0
        for c in range(nc):
            if (S[c] & ~T) == 0 and (mixed or label1[c] == same):
                inside |= 1 << c
        targets.append((T, inside, mixed))
    ones = sum(1 << c for c in range(nc) if label1[c])
    union_of: dict[int, int] = {}

    def union(mask: int) -> int:
        if mask not in union_of:
            if len(union_of) > 100_000:  # the swap search meets many masks: bound the memory
                union_of.clear()
            u, c, m = 0, 0, mask
            while m:
                if m & 1:
                    u |= S[c]
                m >>= 1
                c += 1
            union_of[mask] = u
        return union_of[mask]

    count = [int(x) for x in counts.tolist()]

    def score(fam) -> tuple[int, int, int]:
        fmask = sum(1 << c for c in fam)
        explained = set()  # the distinct sets explained, as a union of supports or as half of a mixed pair
        unions = 0  # those explained as a union of supports
        for t, (T, inside, mixed) in enumerate(targets):
            m = fmask & inside
            if m and union(m) == T and (not mixed or (m & ones and m & ~ones)):
                explained.update([t] if t < D else pairs[t - D])
                unions += t < D
        return len(explained), unions, sum(count[t] for t in explained)

    families = math.comb(nc, n)
    info.update({"candidates": nc, "mixed_pairs": len(pairs)})
    if families <= SIGN_FAMILIES and families * len(targets) <= SIGN_CHECKS:
        best, best_score, tied = None, (-1, -1, -1), 0
        for fam in itertools.combinations(range(nc), n):
            sc = score(fam)
            if sc > best_score:
                best, best_score, tied = fam, sc, 1
            elif sc == best_score:
                tied += 1
        info.update({"search": "exhaustive", "families_scored": families, "families_tied": tied})
    else:
        limit = SIGN_SEARCH_SECONDS if time_limit is None else time_limit
        best, best_score, ran, at_best = _swap_search(score, n, nc, rng=np.random.default_rng(seed),
                                                      restarts=SIGN_RESTARTS, agree=SIGN_AGREE,
                                                      deadline=start + limit)
        info.update({"search": "swaps", "families": families, "restarts": ran, "restarts_at_best": at_best})
    chosen = list(best)
    # every explained mixed pair compares its images: on the set negative under v < 0 the sum of
    # a_i h_i over them is positive, on the one negative under v > 0 negative
    fmask = sum(1 << c for c in chosen)
    mixed_images, mixed_signs = [], []
    for p, (d, e) in enumerate(pairs):
        T, inside, _ = targets[D + p]
        m = fmask & inside
        if not (m and union(m) == T and m & ones and m & ~ones):
            continue
        if any(union(m & ~(1 << c)) == T for c in chosen if m >> c & 1):
            continue  # a support inside the others' union: which images the rows hold is ambiguous
        mixed_images.append(torch.tensor([bool(m >> c & 1) for c in chosen]))
        mixed_signs.append(sets[d].to(torch.int8) - sets[e].to(torch.int8))
    mixed = None
    if mixed_images:
        mixed = (torch.stack(mixed_images), torch.stack(mixed_signs))
    supports = sets[[cand[c] for c in chosen]].clone()
    known = torch.ones_like(supports)
    for k, c in enumerate(chosen):  # a stand-in: the columns of the chosen sets of its label inside it
        for c2 in chosen:
            if c2 != c and label1[c2] == label1[c] and (S[c2] & ~S[c]) == 0:
                known[k] &= ~sets[cand[c2]]
    partial = int((~known.all(dim=1)).sum())
    info.update({"separated": n, "sets_explained": best_score[0], "mixed_compared": len(mixed_images),
                 "unions_explained": best_score[1], "rows_explained": best_score[2], "rows": int(live.sum()),
                 "stand_ins": partial,
                 "seconds": round(time.perf_counter() - start, 3)})
    return SignSeparation(supports, torch.tensor([int(label1[c]) for c in chosen], dtype=torch.int64), info,
                          mixed=mixed, known=known if partial else None)


def _column_supports(signs: torch.Tensor, v: torch.Tensor, n: int, *, seed: int = 0,
                     time_limit: float | None = None) -> SignSeparation:
    """:func:`sign_supports` read from the update's columns, for batches whose images mostly share their
    rows (``SIGN_COLUMNS_PAST``).

    On the rows with ``v_j > 0`` column k is negative where an active image of label 1 has input k and
    no image of label 0 outweighs it. On a *clean* column, one with no negative entry on the rows with
    ``v_j < 0`` (no image of label 0 shows input k), it is negative exactly on the union of the ReLU
    patterns (the rows where it is active) of the label-1 images that have input k: a column only one
    image has shows that image's pattern, and the patterns are the clean columns' distinct vectors that
    no union of the others strictly inside them makes (likewise with the signs swapped for label 0). The
    N chosen are those that explain the most clean columns, each side weighed by its share of its own (a
    column explained where the union of the chosen patterns of its side inside it is it); past
    ``SIGN_FAMILIES`` by :func:`_swap_search`, its first start the greedy choice (patterns added one by one,
    each the one explaining most).

    An image's support is then the columns negative on every row of its pattern. Where the patterns of
    its side inside a column cover its own, the column could be the others' alone, and where a column is
    not clean, cancellation by the other label may hide the image there: on both its side is left open
    (``known``). No mixed comparisons are read."""
    start = time.perf_counter()
    live = v != 0
    sides = [(1, v > 0), (0, v < 0)]
    neg = {label: signs[rows] < 0 for label, rows in sides}
    info: dict[str, Any] = {"method": "sign supports", "reading": "columns", "separated": 0}
    cands: list[int] = []  # each candidate pattern's label
    vectors: list[torch.Tensor] = []  # and the pattern, over its side's rows
    targets: list[tuple[int, torch.Tensor, int]] = []  # (label, clean column's vector, how many columns have it)
    clean: dict[int, torch.Tensor] = {}
    for label, _ in sides:
        clean[label] = ~neg[1 - label].any(dim=0) & neg[label].any(dim=0)
        distinct, counts = torch.unique(neg[label][:, clean[label]].T, dim=0, return_counts=True)
        bits = _bitsets(distinct)
        for c in _irreducible(bits, [True] * len(bits)):
            vectors.append(distinct[c])
            cands.append(label)
        targets += [(label, d, int(k)) for d, k in zip(distinct, counts.tolist())]
    nc = len(cands)
    info.update({"clean_columns": {str(label): int(clean[label].sum()) for label, _ in sides},
                 "candidates": nc, "rows": int(live.sum())})
    if nc < n:
        info.update({"note": f"{nc} patterns among the clean columns for {n} images: fewer than images",
                     "seconds": round(time.perf_counter() - start, 3)})
        return SignSeparation(torch.zeros(0, signs.shape[1], dtype=torch.bool), torch.zeros(0, dtype=torch.int64),
                              info)
    C = torch.zeros(nc, max(len(r) for r in vectors))  # patterns, zero-padded to one row count
    for c, vec in enumerate(vectors):
        C[c, :len(vec)] = vec.float()
    T = torch.zeros(len(targets), C.shape[1])
    for t, (_, vec, _) in enumerate(targets):
        T[t, :len(vec)] = vec.float()
    same = torch.tensor([[lt == lc for lc in cands] for lt, _, _ in targets])
    I = (same & ((C @ (1 - T).T).T == 0)).float()  # targets x candidates: the candidate's pattern inside
    # each side's share of its clean columns: a side with few images has few clean columns, and a choice
    # must not trade its patterns for vectors the other side's cancellations leave among its many
    weight = torch.tensor([k / max(1, int(clean[label].sum())) for label, _, k in targets], dtype=torch.float64)

    def score(fam) -> tuple[float, int]:
        f = list(fam)
        explained = ((I[:, f] @ C[f]) > 0).eq(T > 0).all(dim=1)
        return round(float(weight[explained].sum()), 9), int(explained.sum())

    families = math.comb(nc, n)
    if families <= SIGN_FAMILIES and families * len(targets) <= SIGN_CHECKS:
        best = max(itertools.combinations(range(nc), n), key=score)
        info.update({"search": "exhaustive", "families_scored": families})
    else:
        deadline = start + (SIGN_SEARCH_SECONDS if time_limit is None else time_limit)
        greedy: list[int] = []  # the first start: candidates added one by one, each the one explaining most
        while len(greedy) < n:
            rest = [c for c in range(nc) if c not in greedy]
            if time.perf_counter() >= deadline:  # out of time: the first of the others fill it
                greedy += rest[:n - len(greedy)]
                break
            greedy.append(max(rest, key=lambda c: score(greedy + [c])))
        best, _, ran, at_best = _swap_search(score, n, nc, rng=np.random.default_rng(seed), restarts=SIGN_RESTARTS,
                                             agree=SIGN_AGREE, deadline=deadline, first=greedy)
        info.update({"search": "swaps", "families": families, "restarts": ran, "restarts_at_best": at_best})
    supports, known, labels, units = [], [], [], []
    for label, rows in sides:
        mine = [c for c in best if cands[c] == label]
        if not mine:
            continue
        P = torch.stack([vectors[c] for c in mine]).double()  # images x rows of this side
        within = (P @ (~neg[label]).double()) == 0  # the columns negative on every row of each pattern
        inside = P.T @ within.double()  # rows x columns: how many patterns inside the column hold the row
        unclean = neg[1 - label].any(dim=0)
        for k in range(len(mine)):
            covered = (inside - P[k][:, None] * within[k].double()) > 0  # held by another pattern inside
            own = (P[k][:, None] * (~covered).double()).sum(dim=0) > 0  # a row of its pattern no other covers
            supports.append(within[k] & own)
            unit = torch.full((len(v),), 0.5, dtype=torch.float64)
            unit[rows] = P[k]
            units.append(unit)
            known.append((within[k] & own) | (~within[k] & ~unclean))
            labels.append(label)
    known_t = torch.stack(known)
    info.update({"separated": n, "clean_columns_explained": score(best)[0],
                 "open": round(float((~known_t).double().mean()), 3), "seconds": round(time.perf_counter() - start, 3)})
    return SignSeparation(torch.stack(supports), torch.tensor(labels, dtype=torch.int64), info, known=known_t,
                          units=torch.stack(units))
