"""Whole-batch leakage through a linear layer: disaggregate its update, then invert each image's input.

A victim network that declares ``leaky_linear`` (the name of a ``Linear`` layer whose output goes
through a ReLU), ``leaky_input(x)`` (normalised images -> that layer's input) and ``after_leaky(z)``
(that layer's pre-activation output -> logits) leaks every image of a batch (``leaky_input_is_image``: the
layer's inputs are the pixels, whose signSGD supports show nothing):

1. the observed weight update of the layer is split into per-image inputs (:mod:`.disaggregate`); a
   FedAvg weight delta is read as ``-delta / (lr * steps)``; a sparsified update is separated on a
   dense block of sent entries (of rows merged by pattern where the values are exact, their patterns
   enumerated), and every column is then solved from its own sent entries, which are
   exact; where the update was quantized, the inputs are re-estimated by maximum likelihood given the
   ReLU patterns (:func:`likelihood`, :func:`.disaggregate.reestimate`);
2. sign, scale and label of each image follow from what the server knows: for a layer feeding a
   two-class classifier (``leaky_feeds_classifier``) the subset-sum structure gives ``a_i h_i / N``
   exactly, the features are non-negative (post-ReLU) so the sign of ``a_i = p_i - y_i`` gives the
   label, and ``|a_i|`` solves ``a = softmax(head(h / a))_1 - y``;
3. each recovered input is inverted to its image through the layers before it (one batched L-BFGS
   problem on the pixels, projected on [0, 1], coarse to fine, from several starting batches:
   :func:`invert_best_of`); where the layer's inputs are the pixels and a sparsifier sent exact values,
   there is nothing to invert, and the pixels it left unsent are filled instead (:func:`fill_pixels`);
4. under heavy Gaussian-type noise, or heavy quantization of a batch large for the layer, the inverted
   images are refined to the layer's received update itself, each image's ReLU gate its own
   (:func:`refine_on_layer`).

Where the protocol rescales each image's term (per-example clipping, clipping of the whole update,
FedAvg with local mini-batches or several steps), ``|a_i|`` cannot be read off exactly: the sign (and so
the label) still holds, and the inversion then matches directions only (cosine).

Models without such a layer (global-pooling CNNs, ResNets), and classifiers of more than two classes,
are left to optimisation (:func:`leak` returns None).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import scipy.optimize
import torch
import torch.nn.functional as F

from .. import obfuscation
from ..federated.arithmetic import fedavg_gradient_scale
from ..observation import Observation
from .aware import _per_tensor, entry_likelihood, obfuscated, steps, unsent_bounds
from .disaggregate import (COMPLETE_MAX_CHOICES, COMPLETE_MAX_FOUND, LIKE_NOISE, complete_block, label_exhaustive,
                           merge_equal_rows, negative_share, nonneg_separate, reestimate, separate, sign_supports,
                           solve_sent_columns)
from .labels import count_based
from .regularizers import contrast_free_tv, total_variation
from .simulate import Simulator


@dataclass
class Leak:
    """What the layer gave away: per-image inputs (``features``, in no particular order), their labels,
    the images inverted from them, and how."""

    layer: str
    images: torch.Tensor
    labels: torch.Tensor | None
    features: torch.Tensor
    scale_known: bool
    info: dict[str, Any] = field(default_factory=dict)


def leaky_layer(sim: Simulator) -> str | None:
    """The name of the model's leaky linear layer, or None when the architecture has none."""
    name = getattr(sim.model, "leaky_linear", None)
    if not name or f"{name}.weight" not in sim.target:
        return None
    return name


def observed_matrix(obs: Observation, sim: Simulator, layer: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The layer's weight update as a mean gradient (m x n), and the mask of its sent entries where it
    was sparsified (None otherwise)."""
    G = sim.target[f"{layer}.weight"].double().cpu()
    info: dict[str, Any] = {}
    p = sim.protocol
    if p.algorithm == "fedavg":
        G = G * fedavg_gradient_scale(p)
        info["fedavg"] = "delta read as -delta / (lr * steps)"
    sparsifiers = [st for st in steps(obs, sim.target) if st.ob.family == "sparsify"]
    observed = None
    if sparsifiers:
        observed = G != 0
        for st in sparsifiers:  # random-k rescales what it keeps (to stay unbiased)
            res = _per_tensor((st.values or {}).get("rescale"), f"{layer}.weight")
            if res:
                G = G / float(res)
        info["sent"] = round(float(observed.double().mean()), 6)
    return G, observed, info


def likelihood(obs: Observation, sim: Simulator, layer: str):
    """The per-entry likelihood of the layer's received update (:func:`.aware.entry_likelihood`) where one
    quantizer is the only obfuscation of one client's update; else None (Gaussian noise, the exact
    update: least squares already is the likelihood; sparsifiers, sign: handled elsewhere)."""
    read = steps(obs, sim.target)
    if len(read) != 1 or sim.protocol.num_clients_averaged > 1:
        return None
    name = f"{layer}.weight"
    return entry_likelihood(read[0], name, sim.target[name], fedavg_gradient_scale(sim.protocol))


class _NoBlock(Exception):
    """The sent entries hold no dense block to separate on."""


def _blocks(O: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense blocks of sent entries (rows x columns, every entry sent), most rows first: the k rows that
    sent most and the columns all of them sent, and the k columns sent by most rows and the rows that
    sent all of them, for a ladder of k."""
    rows_by_count = torch.argsort(O.double().sum(dim=1), descending=True)
    cols_by_count = torch.argsort(O.double().sum(dim=0), descending=True)
    found: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for k in (512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6):
        R = rows_by_count[: min(k, len(rows_by_count))]
        C = torch.nonzero(O[R].all(dim=0)).reshape(-1)
        if len(R) > n and len(C) > n:
            found.setdefault((len(R), len(C)), (R, C))
        C = cols_by_count[: min(k, len(cols_by_count))]
        R = torch.nonzero(O[:, C].all(dim=1)).reshape(-1)
        if len(R) > n and len(C) > n:
            found.setdefault((len(R), len(C)), (R, C))
    # most rows first: the more rows, the more distinct ReLU patterns, and a block with few of them
    # admits spurious splits (the columns only add equations)
    return [found[key] for key in sorted(found, key=lambda rc: (-rc[0], -rc[1]))]


#: :func:`_greedy_blocks` starts from this many of the rows that sent most, looks at this many candidates a step, and
#: grows a block this many rows past the first of rank N (each a block of its own).
GREEDY_STARTS = 4
GREEDY_CANDIDATES = 64
GREEDY_PAST = 2


def _greedy_blocks(R: torch.Tensor, O: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense blocks of rank ``n`` grown one row at a time: from one of the ``GREEDY_STARTS`` rows that sent most,
    the row that keeps the most columns all of them sent is added, among those that raise the block's rank while
    it is below ``n`` (``R``: the rows' exact values where ``O`` is set), then ``GREEDY_PAST`` rows more; each block
    of rank ``n`` on the way is kept (most columns first), at most ``1 + GREEDY_PAST`` a start. Under random-k each
    row sends its own random columns, and the rows that sent most (:func:`_blocks`) share few: at B = 8 (`lenet5`,
    report batch, random-k 10 %, 102 merged rows) none of their blocks has more rows and columns than images, and
    the nine that sent most share 66 columns at rank 7; the first block of rank 8 from the rank's side seeds
    :func:`.disaggregate.complete_block`'s growth to every row."""
    def rank(rows: list[int], cols: torch.Tensor) -> int:
        return int(torch.linalg.matrix_rank(R[rows][:, cols], rtol=1e-6)) if bool(cols.any()) else 0

    found: dict[tuple[tuple[int, ...], int], tuple[torch.Tensor, torch.Tensor]] = {}
    for first in torch.argsort(O.sum(dim=1), descending=True)[:GREEDY_STARTS].tolist():
        order, common, rk, past = [first], O[first].clone(), 1, 0
        while past <= GREEDY_PAST:
            shared = (O & common[None]).sum(dim=1)
            shared[order] = -1  # taken already
            pick = None
            for j in torch.argsort(shared, descending=True)[:GREEDY_CANDIDATES].tolist():
                if int(shared[j]) < n:
                    break
                cols = common & O[j]
                r2 = rank(order + [j], cols)
                if r2 > rk or (rk >= n and r2 >= n):
                    pick = (j, cols, r2)
                    break
            if pick is None:
                break
            order.append(pick[0])
            common, rk = pick[1], pick[2]
            if rk >= n:  # n rows of rank n already seed the growth
                found.setdefault((tuple(order), int(common.sum())),
                                 (torch.tensor(order), torch.nonzero(common).reshape(-1)))
                past += 1
    return [found[key] for key in sorted(found, key=lambda key: -key[1])]


def _patterns(G: torch.Tensor, O: torch.Tensor, v: torch.Tensor, X: torch.Tensor, known: torch.Tensor,
              M: torch.Tensor) -> torch.Tensor:
    """The ReLU pattern of every row still unread (all zero in ``M``) that sent at least N entries in
    the known columns of ``X`` (N x columns): the least-squares subset weights, rounded to 0/1."""
    n = X.shape[0]
    M = M.clone()
    for j in torch.nonzero(M.sum(dim=1) == 0).reshape(-1).tolist():
        cols = torch.nonzero(O[j] & known).reshape(-1)
        if len(cols) < n:
            continue
        sol = torch.linalg.lstsq(X[:, cols].T, (G[j, cols] / v[j])[:, None]).solution[:, 0]
        M[j] = (sol > 0.5).double()
    return M


#: The share of its time limit the sparse separation spends trying blocks (on the tune draw under top-k
#: 1 % the block that fitted was found after 4.7 s of a 21 s limit).
BLOCK_SHARE = 0.4
#: Without a time limit: the row sets all blocks together may draw (:func:`.disaggregate.separate`'s own
#: bound for one search).
SEPARATE_TRIALS = 400_000


def _fit_block(G: torch.Tensor, O: torch.Tensor, v: torch.Tensor, XB: torch.Tensor, C: torch.Tensor, n: int
               ) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """Every column from a block's separation ``XB`` (n x |C|, exact ``a_i h_i / N`` on the columns
    ``C``): each row's ReLU pattern read from the block's columns it sent, each column solved from its
    own sent rows, the rows left read from the columns solved so far, until nothing changes. Returns the
    inputs (0 on unsolved columns), the mask of solved columns, the relative residual on the sent
    entries of the rows read, the rounds taken, and every row's pattern (0 where unread)."""
    inC = torch.zeros(G.shape[1], dtype=torch.bool)
    inC[C] = True
    XC = torch.zeros(n, G.shape[1], dtype=torch.float64)
    XC[:, C] = XB
    M = _patterns(G, O, v, XC, inC, torch.zeros(len(v), n, dtype=torch.float64))
    rounds = 0
    while True:  # columns from the rows read so far, then rows from the columns solved so far
        rounds += 1
        X, known = solve_sent_columns(G, O, M * v[:, None])
        M_new = _patterns(G, O, v, X, known, M)
        if bool((M_new == M).all()) or rounds >= 5:
            break
        M = M_new
    fitted = O[:, known] & (M.sum(dim=1) > 0)[:, None]
    pred = (M * v[:, None]) @ X[:, known]
    resid = (float(((pred - G[:, known]) * fitted).norm() / (G[:, known] * fitted).norm().clamp_min(1e-300))
             if bool(fitted.any()) else math.inf)  # nothing fitted: no evidence of a fit
    return X, known, resid, rounds, M


#: With a ``choose`` (:func:`_sparse_separation`), up to this many labelings of one block that fit every sent
#: entry exactly are judged by it, at most ``CHOOSE_MAX_IMAGES`` images; :func:`_by_relu_patterns` judges them
#: where the images times their pixels are at most ``CHOOSE_MAX_UNKNOWNS`` (each labeling one least-squares
#: fill: 0.3 s at B = 4 and 64 px) and for at most ``CHOOSE_SHARE`` of the leak's time, the first always.
CHOOSE_MOST = 8
CHOOSE_MAX_IMAGES = 8
CHOOSE_MAX_UNKNOWNS = 32768
CHOOSE_SHARE = 0.1


def _sparse_separation(G: torch.Tensor, observed: torch.Tensor, v: torch.Tensor, n: int,
                       generator: torch.Generator, time_limit: float | None, exact: bool = True,
                       choose: Callable[[list[tuple[torch.Tensor, ...]]], tuple[int, list[float]]] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], tuple[torch.Tensor, ...]]:
    """Separation of a sparsified update from its sent entries alone (they are exact).

    The rows are separated on a dense, exact block of sent entries (:func:`_blocks`), which gives each
    image's input on the block's columns; each active row's ReLU pattern is then read from the block's
    columns it sent, every column is solved by least squares over the rows it sent,
    ``G[j, k] = v_j sum_i m_ji x_ik``, and the patterns of rows that sent too few of the block's columns
    are read from the columns solved so far, until nothing changes (:func:`_fit_block`). With exact
    values the rows of one pattern are first merged (:func:`.disaggregate.merge_equal_rows`: under
    top-k 1 % each row sends a few columns, a pattern's rows together hundreds) and the merged blocks'
    patterns enumerated (:func:`.disaggregate.label_exhaustive`); then the rows as sent are tried, each
    block with a short search. Which block separates depends on the images' patterns, so the blocks
    are tried, most rows first, and a separation counts only when the solved columns reproduce the sent
    entries of every row they were solved from (relative residual below 1e-6: the sent values are
    exact, a wrong split of the block leaves a residual of percents) and at least as many columns were
    solved as the dense block has (under random-k a block of few columns can leave too few rows read to
    solve more, and a residual over two columns says nothing: ``blocks_degenerate``).
    ``exact=False`` (the sent values were quantized or noised after the sparsifier): the best-fitting
    separation is kept whatever its residual, among those that solved that many columns. Returns the rows
    ``x_i = a_i h_i / N`` (0 where unknown), the mask of the columns solved, what was done, and, with exact
    values, the sent subset sums of every row whose pattern was read (patterns, values ``G_jk / v_j``, sent mask:
    :func:`invert_features`'s ``sums``; and those rows' indices in the layer; None otherwise). ``choose`` (exact
    values, at most ``CHOOSE_MAX_IMAGES`` images): where several labelings of a block fit every sent entry exactly
    (a block of few distinct rows), it gets their ``sums`` (up to ``CHOOSE_MOST``) and returns the index of the one
    to keep and a score per labeling (``info["labelings_fitting"]``, ``labelings_scores``, ``labelings_kept``)."""
    start = time.perf_counter()
    choosing = choose is not None and exact and n <= CHOOSE_MAX_IMAGES
    live = observed.any(dim=1)
    O, Gl, vl = observed[live], G[live], v[live]
    # where to look for blocks: with exact values, first the rows merged by pattern (a pattern's rows
    # together send far more columns than any one does), each block's patterns enumerated; then the
    # rows themselves, as they came
    sources = []
    if exact:  # (where nothing merged, the rows as sent are the same blocks: enumerated, then searched)
        Rm, Om, _ = merge_equal_rows(torch.where(O, Gl / vl[:, None], torch.zeros_like(Gl)), O)
        sources.append(("merged", Rm, Om, torch.ones(len(Rm), dtype=G.dtype)))
    if not exact or len(Rm) < len(Gl):
        sources.append(("rows", Gl, O, vl))
    plan = [(name, Gs, Os, vs, R, C) for name, Gs, Os, vs in sources for R, C in _blocks(Os, n)]
    if exact:  # then the merged rows' blocks of full rank, grown a row at a time (random-k past B = 4)
        ones = sources[0][3]  # the merged rows' scale (they are G / v already)
        seen = {(tuple(R.tolist()), len(C)) for name, *_, R, C in plan if name == "merged"}
        greedy = [("merged, grown by rank", Rm, Om, ones, R, C) for R, C in _greedy_blocks(Rm, Om, n)
                  if (tuple(R.tolist()), len(C)) not in seen]
        at = sum(1 for p in plan if p[0] == "merged")
        plan = plan[:at] + greedy + plan[at:]
    if not plan:
        raise _NoBlock("the sent entries hold no dense block to separate on")
    largest = max((len(R), len(C)) for *_, R, C in plan)
    grown_tried: set[tuple[int, int]] = set()
    per_try = None if time_limit is None else max(0.5, time_limit / 8)
    # without a time limit, the blocks share the row sets one search would draw (each at least four chunks)
    trials = None if time_limit is not None else max(SEPARATE_TRIALS // len(plan), 4 * 4096)
    best = None
    tried = degenerate = 0
    for name, Gs, Os, vs, R, C in plan:
        if time_limit is not None and tried and time.perf_counter() - start > BLOCK_SHARE * time_limit:
            break  # a block that fits stops the search at once: past this, leave the time to the fallback
        tried += 1
        block = Gs[R][:, C]
        # merged rows are distinct exact subset sums: every pattern of the block enumerated (no row need
        # show one image alone), each labeling then judged on all the rows
        # past EXHAUSTIVE_MAX_RANK images the patterns are found by integer programming: the share of the
        # time left for the blocks (the first block always gets it)
        lattice = None if time_limit is None else max(per_try, BLOCK_SHARE * time_limit - (time.perf_counter() - start))
        labelings = [(XB, C, "enumeration", {"separated": n})
                     for XB in (label_exhaustive(block, n, time_limit=lattice) if name != "rows" else [])]
        if not labelings and name != "rows":
            # past B = 8 the densest blocks admit too many patterns: grown to every row and column their
            # sent entries reach, the rows they reach rule most out (each grown block enumerated once; a block
            # grown by rank is a seed of its own, whose completion's error differs from another's: under random-k
            # at B = 8 the completions from three of twelve seeds of one report batch gave the images, measured with a
            # duplicate tolerance of 1e-3; at 1e-4 the fifth seed is the first whose completion does)
            Rg, Cg, grown = complete_block(Gs, Os, R, C, n)
            if len(Rg) > len(R) and (name != "merged" or (len(Rg), len(Cg)) not in grown_tried):
                grown_tried.add((len(Rg), len(Cg)))
                how = {"separated": n, "grown": [len(Rg), len(Cg)]}
                labelings = [(XB, Cg, "enumeration of the grown block", how)
                             for XB in label_exhaustive(grown, n, max_choices=COMPLETE_MAX_CHOICES,
                                                        max_found=COMPLETE_MAX_FOUND, time_limit=lattice,
                                                        duplicates=True)]
        if not labelings:
            if len(R) <= n or len(C) <= n:  # a seed of rank n for the growth alone: too small to search
                continue
            sep = separate(block, n, row_scale=vs[R], generator=generator, time_limit=per_try, max_trials=trials)
            if sep.info["separated"] < n:  # the per-row patterns below need every image's input
                continue
            labelings = [(sep.X, C, "search", sep.info)]
        fitting = []  # with a choose: the labelings of this block that fit every sent entry exactly
        for XB, Cl, method, found in labelings:
            if time_limit is not None and (best is not None or fitting or degenerate) and \
                    time.perf_counter() - start > BLOCK_SHARE * time_limit:
                break
            X, known, resid, rounds, M = _fit_block(Gl, O, vl, XB, Cl, n)
            if int(known.sum()) < max(n, len(C)):  # fewer columns than the dense block has: a residual over
                degenerate += 1  # almost nothing says nothing
                continue
            cand = (X, known, {**found, "block_method": method, "block_rows": name,
                               "block": [int(len(R)), int(len(C))], "pattern_rounds": rounds}, resid, M)
            if choosing and resid < 1e-6:
                fitting.append(cand)
                if len(fitting) < CHOOSE_MOST:
                    continue
                break
            if best is None or resid < best[3]:
                best = cand
            if resid < 1e-6:
                break
        if len(fitting) > 1:
            pick, scores = choose([_sent_sums(c[4], O, Gl, vl, live) for c in fitting])
            best = fitting[pick]
            best[2].update({"labelings_fitting": len(fitting), "labelings_scores": [round(x, 4) for x in scores],
                            "labelings_kept": pick})
        elif fitting:
            best = fitting[0]
            best[2]["labelings_fitting"] = 1
        if best is not None and best[3] < 1e-6:
            break
    if best is None or (exact and best[3] > 1e-4):
        raise _NoBlock(f"none of the {tried} dense blocks of sent entries tried (largest "
                       f"{largest[0]} x {largest[1]}) separated all {n} images"
                       + ("" if best is None else f" consistently (best residual on the sent entries {best[3]:.2g})"))
    X, known, info, resid, M = best
    sums = _sent_sums(M, O, Gl, vl, live) if exact else None
    if exact:
        info["rows_merged"] = [int(live.sum()), len(Rm)]  # live rows, the groups they merged into
    if degenerate:
        info["blocks_degenerate"] = degenerate  # fitted, but solved fewer columns than their block has
    info.update({"blocks_tried": tried, "sent_residual": resid, "columns_solved": int(known.sum()),
                 "columns": int(G.shape[1]), "seconds": round(time.perf_counter() - start, 3)})
    return X, known, info, sums


def _sent_sums(M: torch.Tensor, O: torch.Tensor, Gl: torch.Tensor, vl: torch.Tensor, live: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    """The sent subset sums of the rows whose patterns ``M`` were read (:func:`_sparse_separation`'s ``sums``):
    their patterns, sent values ``G_jk / v_j`` (0 where not sent), sent mask and indices in the layer."""
    read = M.sum(dim=1) > 0  # the rows whose patterns were read: their sent entries are exact subset sums
    return (M[read], torch.where(O[read], Gl[read] / vl[read, None], torch.zeros_like(Gl[read])), O[read],
            torch.nonzero(live).reshape(-1)[read])


def local_drift(p) -> bool:
    """Whether the client's update sums gradients taken at different weights (FedAvg with several local
    steps or mini-batches): its rows are then subset sums only up to the weights' drift."""
    return p.algorithm == "fedavg" and (int(p.local_steps) > 1 or p.local_batch_size is not None)


def settled(obs: Observation, info: dict[str, Any]) -> bool:
    """Whether the separation leaves nothing for gradient matching on the whole update: every image
    separated from an obfuscated or multi-step update (the inverted batch matches the rank-N denoised
    inputs; matching the whole update would only fit its noise). A sparsified update counts too, though
    only some columns were solved, where its sent values are exact: on the tune draw (B = 4, 60 s) the
    refinement did not lower the matching loss on the two batches checked under top-k 10 %, and under
    top-k 1 % it lowered it on two of three batches while costing 0.9 and 4.9 dB (the sparse entries of
    every layer leave the images freer than the inversion's smoothness prior does). Noised or quantized
    after the sparsifier, it is refined as before.
    An exact update is not settled: matching it sharpens what the inversion found."""
    exact = not obfuscated(obs) and not local_drift(obs.protocol)
    if "columns_solved" in info and not info.get("sent_exact", False):
        return False  # a sparsified update noised after the sparsifier: its split is only the best-fitting
    return int(info.get("separated", 0)) == obs.num_images and not exact


def clients_rounding_cell(obs: Observation, sim: Simulator, layer: str) -> float | None:
    """Where K > 1 clients each rounded their own update to their own grid (a deterministic quantizer whose
    record gives each tensor's ``scale``, the step: ``uniform``; QSGD's ``scale`` is a norm) and that is the
    only obfuscation: the most a column of the layer's mean update, read as a mean gradient
    (:func:`observed_matrix`), can be off where one client alone has nonzero values in it, ``max_k step_k /
    K`` (the other clients send exact zeros there, and that client's rounding error is within its step).
    The mean is on no grid of its own, so :func:`.disaggregate.column_patterns` cannot find the step in it;
    the records give it. None otherwise (one client: the columns show the grid themselves)."""
    k = int(sim.protocol.num_clients_averaged)
    read = steps(obs, sim.target)
    if k <= 1 or len(read) != 1 or read[0].ob.family != "quantize" or read[0].ob.stochastic:
        return None
    record, name = obs.obfuscation[read[0].index - 1], f"{layer}.weight"
    per_client = record.get("per_client") or [record] * k
    cells = [_per_tensor(c.get("scale", record.get("scale")), name) for c in per_client]
    if len(cells) != k or any(c is None or not float(c) > 0 for c in cells):
        return None
    return max(float(c) for c in cells) / k * abs(fedavg_gradient_scale(sim.protocol))


def exact_scale(obs: Observation, sim: Simulator) -> bool:
    """Whether every image's term enters the layer's update with weight exactly 1/N: FedSGD (or FedAvg
    with one full-batch step), no per-example clipping, no clipping of the whole update."""
    p = sim.protocol
    one_step = not local_drift(p)
    clipped = p.per_example_clip is not None or any(not obfuscation.get(r["name"]).recovers_scale(r)
                                                    for r in obs.obfuscation)
    return one_step and not clipped


def _fix_subset(sim: Simulator, layer: str, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels from subset-sum rows ``a_i h_i / n`` (two classes, non-negative inputs)."""
    lin = getattr(sim.model, layer)
    W = lin.weight.detach().double().cpu()
    b = None if lin.bias is None else lin.bias.detach().double().cpu()
    feats, labels = [], []
    grid = torch.logspace(-6, 0, 3000, dtype=torch.float64)
    for x in rows:
        g = x * n  # = a h
        a_sign = 1.0 if float(g.sum()) >= 0 else -1.0
        y = 0 if a_sign > 0 else 1
        Wg = W @ g

        def residual(a: torch.Tensor) -> torch.Tensor:
            z = Wg[None, :] / a[:, None]
            if b is not None:
                z = z + b
            with torch.no_grad():
                logits = sim.model.after_leaky(z.float().to(sim.device)).double().cpu()
            p1 = torch.softmax(logits, dim=-1)[:, 1]
            return (1 - (p1 - y) / a).abs()  # relative: a -> 0 with p1 -> y is no solution

        a = a_sign * grid  # candidate a in (0, 1] or [-1, 0): a coarse grid, then a fine one around the root
        res = residual(a)
        # the layers after fc1 are positively homogeneous (ReLU, no bias), so the logits of h / a grow as
        # 1 / |a| and the equation has a second, spurious root at a tiny |a| (inputs hundreds of times
        # larger than any image gives) where the softmax saturates: the true one is the root of largest |a|
        padded = torch.cat([res[:1], res, res[-1:]])
        roots = torch.nonzero((res < 0.05) & (res <= padded[:-2]) & (res <= padded[2:])).reshape(-1)
        k = int(roots[-1]) if len(roots) else int(res.argmin())
        fine = torch.linspace(float(a[max(k - 1, 0)]), float(a[min(k + 1, len(a) - 1)]), 2001, dtype=torch.float64)
        best = float(fine[int(residual(fine).argmin())])
        feats.append(g / best)
        labels.append(y)
    return torch.stack(feats), torch.tensor(labels, dtype=torch.int64)


#: The margin of the support objective (:func:`invert_features` with ``support=True``), a fraction of the
#: median magnitude of the layer's pre-ReLU input at mid-grey. The hinge is met by images of too little
#: contrast: at 0.1, the least-squares fit of the true images on the inverted ones had slopes 1.04 to
#: 1.16 (tune draw, B = 4, 60 s). Leak stage, 0.1 -> 0.2 (blind 18.8 / 17.9 / 17.5 dB): 26.2 / 28.1 / 25.8
#: -> 26.5 / 28.2 / 26.2 dB (slopes 1.02 to 1.13); B = 2, 30 s, two batches: 26.1 / 25.4 -> 26.3 / 25.6.
#: At 0.27 27.6 dB on batch 1, at 0.4 (slopes 0.97 to 1.06) 0.1 to 0.9 dB below 0.1 on all three.
#: With the contrast-free prior (:func:`invert_features`) 0.2 still leads: 0.1 26.9 / 28.7 / 26.4 dB,
#: 0.2 27.3 / 28.9 / 27.0.
SUPPORT_MARGIN = 0.2
#: The margin of signSGD's comparisons in the support inversion (``mixed``): ``sum_i a_i h_i`` over a
#: mixed pair's images, relative to ``sum_i |a_i| h_i`` (tune draw, B = 4, 60 s, batches 0 and 1: 0.02
#: and 0.15 at weight 3 within 0.1 dB of 0.05 at weight 1).
SIGN_MIXED_MARGIN = 0.05
#: Their weight beside the supports' hinge. Tune draw, B = 4, 60 s, the leak stage alone, blind
#: 18.8 / 17.9 / 17.5 dB: without 25.2 / 27.3 / 25.8 dB, weight 1 26.3 / 28.1 / 25.8, weight 10
#: 26.4 / 27.9 / 25.8 (batch 2's images share one label: nothing to compare).
SIGN_MIXED = 1.0
#: The weight of the units each image switches on and off in the support inversion, where the supports
#: were read from the update's columns (``units``; past ``SIGN_COLUMNS_PAST`` images). B = 16, 240 s,
#: `auto`, without -> with: tune batch 0 20.34 -> 20.67 dB (weight 10: 20.63; blind 17.4), report batch
#: 20.6 -> 21.25 (blind 16.9).
SIGN_UNITS = 1.0


def invert_features(sim: Simulator, targets: torch.Tensor, *, scale_known: bool, iterations: int,
                    time_limit: float | None = None, chunk: int = 100, mask: torch.Tensor | None = None,
                    tv_weight: torch.Tensor | float | None = None, init: torch.Tensor | None = None,
                    coarse: int | None = None, support: bool = False, coupling: torch.Tensor | None = None,
                    sums: tuple[torch.Tensor, ...] | None = None, sums_weight: float = 1.0,
                    mixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, mixed_weight: float = 1.0,
                    units: torch.Tensor | None = None, units_weight: float = 1.0
                    ) -> tuple[torch.Tensor, list[tuple[int, float]], str, torch.Tensor]:
    """Images in [0, 1] whose inputs to the leaky layer match ``targets`` (N x n): relative squared
    error when the scale is known, else one minus cosine. One batched L-BFGS problem (strong Wolfe line
    search) for all images, projected on [0, 1] every ``chunk`` iterations; stops after ``iterations``,
    after ``time_limit`` seconds, or when a chunk improves the loss by less than 0.01 %; ``mask`` (n,
    boolean) keeps only the features that are known. ``tv_weight`` (one number, or one per image) adds
    that much total variation per image; with the scale unknown it is contrast-free within each
    L-BFGS call (:func:`.regularizers.contrast_free_tv`, each image's contrast where the call starts;
    the objective returned has the plain one, its value at the images returned): the objective then
    leaves the contrast free, and plain total variation would pull it down (the true images were 4 to
    18 % more contrasted than the inverted ones under top-k 1 %, 4 to 16 % under signSGD at a margin of
    0.1 and 2 to 13 % at 0.2, measured on the tune draw as the least-squares slope of the truth on
    them; 0 to 2 % with the contrast-free prior). ``init``: the images to start from (default:
    mid-grey).
    ``coarse``: optimise a ``coarse`` x ``coarse`` image per channel, bilinearly upsampled (the first
    phase of :func:`invert_coarse_to_fine`). ``support``: ``targets`` are 0/1 supports (signSGD's leak,
    :func:`.disaggregate.sign_supports`), and each image's objective is the mean squared hinge of the
    layer's input before its ReLU (``leaky_preactivation``) on the side of 0 the support says, with a
    margin of ``SUPPORT_MARGIN`` times its median magnitude at mid-grey; a target of 0.5 leaves that
    input free (a stand-in's columns whose side is not known, or an entry the columns' reading left
    open). ``coupling`` (N x N, with the scale known): the images' relative errors
    ``E_i = (h_i - t_i) / |t_i|`` are weighed jointly, ``sum_ij K_ij <E_i, E_j>`` (:func:`noise_coupling`),
    each image's objective its row of that sum (they add up to the whole; one image's may be below 0).
    ``sums`` (a sparsified update, scale unknown):
    ``(P, S, O, ...)``, the 0/1 patterns of the update's rows whose patterns were read (G x N), their exact
    sent values (G x n, subset sums of ``a_i h_i / N``) and which were sent: the batch's relative
    squared error on the sent entries, the images' scales fitted by least squares, is added times
    ``sums_weight`` and N, each row's error shared among its active images (a column sent by too few
    rows to be solved still says what its subset sums are). ``mixed`` (only with ``support``):
    ``(F, D, labels)``, signSGD's comparisons of the images' inputs
    (:attr:`.disaggregate.SignSeparation.mixed`: which images each holds, M x N in the order of
    ``targets``, and the sign of ``sum_i a_i h_i`` over them on every column of its union, M x n, 0
    elsewhere) and the images' labels; with ``a_i = p_i - y_i`` from the model at the images each
    L-BFGS call starts from (fixed within the call, so that its line search sees one objective), the
    mean squared hinge of ``sum_i a_i h_ik / sum_i |a_i| h_ik`` on the side the sign says, margin
    ``SIGN_MIXED_MARGIN``, is added times ``mixed_weight``, each comparison's hinge shared among its
    images and the whole scaled to N times the mean over comparisons. ``units`` (only with ``support``;
    N x the layer's outputs): which of the layer's units each image switches on (1), off (0) or either
    (0.5), :attr:`.disaggregate.SignSeparation.units`; the mean squared hinge of the layer's output
    before its ReLU on that side, margin ``SUPPORT_MARGIN`` times its median magnitude at mid-grey, is
    added times ``units_weight``. Returns the images,
    (iteration, mean loss per image) pairs, why it stopped (``converged``, ``time`` or ``iterations``)
    and each image's final objective."""
    model = sim.model
    C, H, W = sim.image_shape
    t = targets.float().to(sim.device)
    sel = None if mask is None else torch.nonzero(mask.reshape(-1)).reshape(-1).to(sim.device)
    if sel is not None:
        t = t[:, sel]
    tn = t.pow(2).sum(dim=1).clamp_min(1e-30)
    tv = None if tv_weight is None else \
        torch.as_tensor(tv_weight, dtype=torch.float32).to(sim.device).expand(t.shape[0])
    x = torch.full((t.shape[0], C, H, W), 0.5) if init is None else init.float().clone()
    if coarse is not None:
        x = F.interpolate(x, size=(coarse, coarse), mode="area")
    x = x.to(sim.device).requires_grad_(True)
    K = None if coupling is None else coupling.float().to(sim.device)
    if sums is not None:
        keep = sums[2].any(dim=0)
        sP = sums[0].double()
        sO = sums[2][:, keep].double()
        sS = sums[1][:, keep].double() * sO
        # the scales' normal equations, A_ij = sum_k h_ik h_jk W_ijk and b_i = sum_k h_ik V_ik, with the
        # pattern sums W_ijk = sum_g P_gi P_gj O_gk and V = P^T S fixed
        sW = torch.einsum("gi,gj,gk->ijk", sP, sP, sO).to(sim.device)
        sV = (sP.T @ sS).to(sim.device)
        s_share = (sP / sP.sum(dim=1, keepdim=True).clamp_min(1)).float().to(sim.device)  # a row's images
        s_norm = float(sS.pow(2).sum().clamp_min(1e-300))
        sP, sO, sS = sP.float().to(sim.device), sO.float().to(sim.device), sS.float().to(sim.device)
        sel_sums = torch.nonzero(keep).reshape(-1).to(sim.device)
    margin = None
    if (mixed is not None or units is not None) and not support:
        raise ValueError("mixed comparisons and units are signSGD's: they need support=True")
    if mixed is not None:
        mF = mixed[0].float().to(sim.device)
        mD = mixed[1].float().to(sim.device)
        m_on = (mD != 0).float()
        m_count = m_on.sum(dim=1).clamp_min(1)
        m_share = (mF / mF.sum(dim=1, keepdim=True).clamp_min(1)).T * (mF.shape[1] / mF.shape[0])  # N x M
        m_y = mixed[2].float().to(sim.device)
        head = getattr(model, model.leaky_linear)

        def mixed_scales(h: torch.Tensor) -> torch.Tensor:  # each image's a_i = p_i - y_i at inputs h
            with torch.no_grad():
                return torch.softmax(model.after_leaky(head(h.detach())), dim=-1)[:, 1] - m_y
    fixed_a: list[torch.Tensor | None] = [None]  # the a_i one L-BFGS call holds fixed (its objective's)
    contrast: list[torch.Tensor | None] = [None]  # each image's standard deviation where a call starts

    def smoothness(img: torch.Tensor) -> torch.Tensor:  # outside a call: the plain total variation
        if scale_known or contrast[0] is None:
            return total_variation(img, per_image=True)
        return contrast_free_tv(img, contrast[0])
    if support:
        with torch.no_grad():
            grey = torch.full((1, C, H, W), 0.5, device=sim.device)
            t_known = (2 * t - 1).abs()  # 0.5: an input whose side is not known, left free
            u_grey = model.leaky_preactivation((grey - model.input_mean) / model.input_std)
            margin = SUPPORT_MARGIN * float(u_grey.abs().median().clamp_min(1e-12))
            if units is not None:
                u_head = getattr(model, model.leaky_linear)
                u_t = units.float().to(sim.device)
                u_known = (2 * u_t - 1).abs()
                u_count = u_known.sum(dim=1).clamp_min(1)
                u_margin = SUPPORT_MARGIN * float(u_head(F.relu(u_grey)).abs().median().clamp_min(1e-12))

    def image() -> torch.Tensor:
        return x if coarse is None else F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

    start = time.perf_counter()
    history: list[tuple[int, float]] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the weights are the server's, fixed: no weight gradients
        p.requires_grad_(False)

    def per_image() -> torch.Tensor:
        img = image()
        if support:
            u = model.leaky_preactivation((img - model.input_mean) / model.input_std)
            loss = (t_known * (t * F.relu(margin - u).pow(2) + (1 - t) * F.relu(u + margin).pow(2))).mean(dim=1) \
                / margin ** 2
            if mixed is not None:  # the mixed rows' comparisons, with each image's a_i at the current images
                h = F.relu(u)
                a = fixed_a[0] if fixed_a[0] is not None else mixed_scales(h)
                num = (mF * a[None, :]) @ h
                den = (mF * a.abs()[None, :]) @ h
                ratio = num / (den + 1e-6 * float(den.detach().mean().clamp_min(1e-30)))
                per = (F.relu(SIGN_MIXED_MARGIN - mD * ratio).pow(2) * m_on).sum(dim=1) / m_count
                loss = loss + mixed_weight * (m_share @ per)
            if units is not None:  # the units each image switches on and off
                z = u_head(F.relu(u))
                hinge = u_t * F.relu(u_margin - z).pow(2) + (1 - u_t) * F.relu(z + u_margin).pow(2)
                loss = loss + units_weight * (u_known * hinge).sum(dim=1) / u_count / u_margin ** 2
            return loss if tv is None else loss + tv * smoothness(img)
        h = model.leaky_input((img - model.input_mean) / model.input_std)
        joint = None
        if sums is not None:  # the sent subset sums, each image's scale fitted by least squares
            hs = h[:, sel_sums]
            hd = hs.double()
            A = (sW * hd[:, None, :] * hd[None, :, :]).sum(dim=2)
            b = (sV * hd).sum(dim=1)
            ridge = 1e-9 * A.diagonal().mean().clamp_min(1e-300)
            c = torch.linalg.solve(A + ridge * torch.eye(len(b), dtype=A.dtype, device=A.device), b).float()
            s_rows = ((sP @ (c[:, None] * hs)) * sO - sS).pow(2).sum(dim=1) / s_norm
            # each row's error shared among its active images, times N: they add up to N times the
            # batch's relative error, and an image's own objective is its share
            joint = len(c) * (s_share.T @ s_rows)
        if sel is not None:
            h = h[:, sel]
        if scale_known and K is not None:
            E = (h - t) / tn.sqrt()[:, None]
            loss = (K * (E @ E.T)).sum(dim=1)
        elif scale_known:
            loss = (h - t).pow(2).sum(dim=1) / tn
        else:
            loss = 1 - F.cosine_similarity(h, t, dim=1)
        if joint is not None:
            loss = loss + sums_weight * joint
        if tv is not None:
            loss = loss + tv * smoothness(img)
        return loss

    def objective() -> torch.Tensor:
        return per_image().sum()

    stop = "iterations"
    try:
        done = 0
        per_iteration = None
        while done < int(iterations):
            elapsed = time.perf_counter() - start
            if time_limit is not None and done > 0 and elapsed >= time_limit:
                stop = "time"
                break
            steps = min(chunk, int(iterations) - done)
            if time_limit is not None:  # a first short chunk measures the cost, later ones fit what is left
                steps = min(steps, 10) if per_iteration is None else \
                    max(1, min(steps, int((time_limit - elapsed) / max(per_iteration, 1e-9))))
            opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, history_size=50, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-15)

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = objective()
                loss.backward()
                return loss

            if not scale_known:  # the contrast the smoothness prior holds within this call
                with torch.no_grad():
                    contrast[0] = image().flatten(1).std(dim=1)
            if mixed is not None:  # one objective per call: the a_i at the images it starts from
                with torch.no_grad():
                    fixed_a[0] = mixed_scales(F.relu(model.leaky_preactivation(
                        (image() - model.input_mean) / model.input_std)))
            t0 = time.perf_counter()
            opt.step(closure)
            fixed_a[0] = None
            contrast[0] = None
            ran = int(opt.state[x].get("n_iter", steps)) if x in opt.state else steps
            done += max(1, ran)
            per_iteration = (time.perf_counter() - t0) / max(1, ran)
            with torch.no_grad():
                x.clamp_(0, 1)
                history.append((done, float(objective()) / t.shape[0]))
            if history[-1][1] < 1e-12 or (len(history) > 1 and
                                          abs(history[-2][1] - history[-1][1]) <= 1e-4 * history[-2][1]):
                stop = "converged"  # the last chunk changed the loss by less than 0.01 %
                break
        with torch.no_grad():
            final = per_image().detach().cpu()
            out = image().clamp(0, 1).detach().cpu()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out, history, stop, final


#: The coarse phase of :func:`invert_coarse_to_fine`: a quarter of the image side, a third of the time.
COARSE_FACTOR = 4
COARSE_SHARE = 1 / 3


#: The last share of the time and iterations of :func:`invert_coarse_to_fine` with ``anneal``.
ANNEAL_SHARE = 1 / 3
#: The smoothness prior's factor there where the values inverted are exact (a sparsified update's sent
#: entries, :func:`leak`). Tune draw, B = 4, 60 s, the leak stage alone, without -> with (blind
#: 18.8 / 17.9 / 17.5 dB): top-k 1 % 26.5 / 28.4 / 25.1 -> 27.2 / 28.9 / 25.6 dB (factor 0, from a
#: script patching the inversion: 27.5 / 28.9 / 25.7), top-k 10 % 36.5 / 37.5 / 35.2 -> 37.7 / 38.1 /
#: 37.2 dB. A lower weight throughout instead was worse: top-k 10 % lost 1.3 to 2.8 dB at a sixth of it,
#: top-k 1 % gained 0.4 to 0.6 dB.
SPARSE_ANNEAL = 0.1


def invert_coarse_to_fine(sim: Simulator, targets: torch.Tensor, *, iterations: int,
                          time_limit: float | None = None, init: torch.Tensor | None = None,
                          anneal: float | None = None, **kw
                          ) -> tuple[torch.Tensor, list[tuple[int, float]], str, torch.Tensor]:
    """:func:`invert_features` first on images of a quarter of the side (bilinearly upsampled: a third of the
    time and of the iterations), then at full resolution from there (the rest of both). The full-resolution
    problem has many poor local minima (a patch where every ReLU after the first convolution is dead gets no
    gradient); the coarse image settles the layout first. On the tune draw (B = 4, exact features, 12 s per
    inversion) it took the images from 31 / 132 / 52 / 39 dB to 140 / 140 / 140 / 103 dB on one batch and from
    51 / 140 / 40 / 28 dB to 140 / 140 / 67 / 95 dB on another. Images smaller than 16 px go straight to full
    resolution.

    With ``anneal`` (and a ``tv_weight``), the coarse and fine phases take the first
    ``1 - ANNEAL_SHARE`` of the time and iterations, and a last phase at full resolution continues from
    there with the total variation times ``anneal``: where the values are exact the smoothness prior
    settles the layout, then lets the images fit them closer. The history's last entries are the
    annealed objective's; the objective returned is the unannealed one's at the images returned (the
    starts are compared and averaged on it, as measured; where less than 5 % of the time is left for
    the last phase, it is skipped)."""
    if anneal is not None and kw.get("tv_weight") is not None:
        t0 = time.perf_counter()
        last = max(1, int(iterations * ANNEAL_SHARE))
        images, history, _, _ = _coarse_then_fine(
            sim, targets, iterations=max(1, iterations - last), init=init,
            time_limit=None if time_limit is None else (1 - ANNEAL_SHARE) * time_limit, **kw)
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is not None and left < 0.05 * time_limit:  # the first phases overran: no time to anneal
            _, _, _, final = invert_features(sim, targets, iterations=0, init=images, **kw)
            return images, history, "time", final
        annealed = {**kw, "tv_weight": torch.as_tensor(kw["tv_weight"]) * anneal}
        images, more, stop, _ = invert_features(sim, targets, iterations=last, time_limit=left, init=images,
                                                **annealed)
        done = history[-1][0] if history else 0
        _, _, _, final = invert_features(sim, targets, iterations=0, init=images, **kw)
        return images, history + [(done + k, loss) for k, loss in more], stop, final
    return _coarse_then_fine(sim, targets, iterations=iterations, time_limit=time_limit, init=init, **kw)


def _coarse_then_fine(sim: Simulator, targets: torch.Tensor, *, iterations: int,
                      time_limit: float | None = None, init: torch.Tensor | None = None, **kw
                      ) -> tuple[torch.Tensor, list[tuple[int, float]], str, torch.Tensor]:
    """The coarse and fine phases of :func:`invert_coarse_to_fine`."""
    C, H, W = sim.image_shape
    side = min(H, W) // COARSE_FACTOR
    if side < 4:
        return invert_features(sim, targets, iterations=iterations, time_limit=time_limit, init=init, **kw)
    t0 = time.perf_counter()
    coarse = max(1, int(iterations * COARSE_SHARE))
    start, _, _, _ = invert_features(sim, targets, iterations=coarse,
                                     time_limit=None if time_limit is None else COARSE_SHARE * time_limit,
                                     init=init, coarse=side, **kw)
    left = None if time_limit is None else max(1e-3, time_limit - (time.perf_counter() - t0))
    # ``iterations`` bounds both phases together (the coarse ones are the cheaper)
    return invert_features(sim, targets, iterations=max(1, iterations - coarse), time_limit=left, init=start, **kw)


def _start(k: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
    """The k-th starting batch of the inversion: mid-grey, uniform noise, dark grey, light grey, then
    fresh noise."""
    if k == 0:
        return None
    if k in (2, 3):
        return torch.full(shape, 0.25 if k == 2 else 0.75)
    return torch.rand(shape, generator=generator)


#: The inversion's result per image is the mean of every start whose objective is within this factor of
#: the best start's. Where the inputs are noisy, the starts settle on different images that fit them
#: equally well (objectives within 1-11 % of each other), and their mean is closer to the truth than any
#: one of them; a start that settled far off (30 to 60 times the best objective) is left out. Tune draw,
#: B = 4, 60 s, the leak stage alone, best start -> mean (blind 18.8 / 17.9 / 17.5 dB on batches 0 / 1 / 2):
#: σ0 = 1 26.3 / 27.3 / 20.1 -> 27.4 / 28.2 / 21.1 dB, QSGD 4 26.5 / 29.2 / 19.0 -> 27.7 / 29.6 / 18.9,
#: signSGD 25.0 / 27.0 / 25.5 -> 25.2 / 27.3 / 25.7; batch 0: σ0 = 0.1 38.3 -> 39.1, QSGD 16 33.5 -> 34.3,
#: FedAvg 5 steps 17.6 -> 17.8, top-k 10 % +0.1 dB, 8 bit +0.0 (batches 1 and 2: +0.2, +0.5).
AVERAGE_WITHIN = 1.5


def mean_of_close(results: torch.Tensor, fits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per image, the mean of the starts' ``results`` (starts x images x ...) whose objective ``fits``
    (starts x images) is within ``AVERAGE_WITHIN`` times the lowest, measured against the lowest's
    magnitude (a coupled objective may be below 0); the lowest is always in, a NaN never. Returns the
    images and how many starts each averages."""
    best = fits.nan_to_num(float("inf")).min(dim=0).values
    close = (fits <= best) | (fits - best <= (AVERAGE_WITHIN - 1) * best.abs())
    weight = close.to(results.dtype).view(*close.shape, *([1] * (results.dim() - 2)))
    return (results * weight).sum(0) / weight.sum(0), [int(c) for c in close.sum(0)]


#: With a time limit, the inversion runs up to this many times its ``starts`` while time is left.
EXTRA_STARTS = 4


def invert_best_of(sim: Simulator, targets: torch.Tensor, *, starts: int, generator: torch.Generator,
                  time_limit: float | None = None, **kw) -> tuple[torch.Tensor, list[tuple[int, float]], str,
                                                                   dict[str, Any]]:
    """:func:`invert_features` from up to ``starts`` starting batches (:func:`_start`) while time is
    left, keeping for each image the mean of the results whose objective is within ``AVERAGE_WITHIN``
    times its lowest (the server can compute it; it never sees the truth; with a ``coupling`` an image's
    objective is its row of a joint sum and may be below 0, so the distance to the lowest is measured
    against the lowest's magnitude). The inversion is not convex: from mid-grey, one image of a batch
    sometimes settles where its inputs fit 30 to 60 times worse than from another start (on real X-rays
    under 8-bit rounding, B = 4: 6e-4 against 1e-5 in one minus cosine, 28 dB against 45 dB where the
    blind guess scores 17.9 dB), which the other starts catch and the mean leaves out. Every start is
    coarse to fine (:func:`invert_coarse_to_fine`). Each start gets an equal share of the time left (one
    image that settles slowly would otherwise hold the whole batch), a start runs only while half a share
    is left, and none when every image already fits to 1e-8 (an exact update). Returns the images, the
    first start's history, its stop reason, how many starts ran and improved an image, each image's
    lowest objective over the starts (the best start's, not the mean's), and how many starts were
    averaged per image."""
    t0 = time.perf_counter()
    starts = max(1, int(starts))
    images, history, stop, best = invert_coarse_to_fine(
        sim, targets, time_limit=None if time_limit is None else time_limit / starts, **kw)
    first = time.perf_counter() - t0
    longest = first
    ran, improved = 1, 0
    pool, losses = [images], [best]  # every start's result, for the mean
    # with a time limit, starts that converge early leave time: fresh noise starts use it (up to
    # EXTRA_STARTS times as many), each while the longest start so far would still fit
    most = starts if time_limit is None else EXTRA_STARTS * starts
    while ran < most and float(best.max()) > 1e-8:
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is not None and ran < starts and left < 0.5 * min(first, time_limit / starts):
            break
        if left is not None and ran >= starts and left < longest:
            break
        share = None if left is None else (left / (starts - ran) if ran < starts else time_limit / starts)
        t1 = time.perf_counter()
        cand, _, _, loss = invert_coarse_to_fine(sim, targets, time_limit=share,
                                                 init=_start(ran, tuple(images.shape), generator), **kw)
        longest = max(longest, time.perf_counter() - t1)
        pool.append(cand)
        losses.append(loss)
        better = loss < best
        best = torch.where(better, loss, best)
        ran += 1
        improved += int(better.sum())
    averaged = [1] * images.shape[0]
    if len(pool) > 1:
        images, averaged = mean_of_close(torch.stack(pool), torch.stack(losses))
    return images, history, stop, {"starts": ran, "improved_by_other_starts": improved, "averaged": averaged,
                                   "objective": [float(b) for b in best]}


#: The share of the leak's time the choice of supports (or of the columns' patterns) may take where it
#: searches by swaps (B = 8 and 16 on the tune and report draws).
SIGN_SEARCH_SHARE = 0.1
#: Total variation of the support inversion (signSGD), relative to its hinge objective.
SIGN_TV = 0.03


def _sign_leak(obs: Observation, sim: Simulator, layer: str, *, generator: torch.Generator, start: float,
               time_limit: float | None, settled_time_limit: float | None, invert_iterations: int,
               invert_tv: float, invert_starts: int) -> Leak:
    """signSGD: each image's support from the signs of the layer's update
    (:func:`.disaggregate.sign_supports`), inverted to images that switch on those inputs and no other
    (:func:`invert_features` with ``support=True``), with the mixed rows' comparisons, or where the
    supports were read from the update's columns the units each image switches on. Only where the
    signs are the whole obfuscation of one client's FedSGD gradient (a weight delta's signs are the
    gradient's flipped, and a zero's +1 with them) and the model exposes its layer's pre-ReLU input."""
    n = sim.num_images
    blank = torch.full((n, *sim.image_shape), 0.5)
    p = sim.protocol
    why = None
    if len(steps(obs, sim.target)) != 1:
        why = "signs combined with another obfuscation"
    elif p.algorithm != "fedsgd" or p.num_clients_averaged > 1:
        why = "signs of a weight delta or of several clients' updates"
    elif not hasattr(sim.model, "leaky_preactivation"):
        why = f"{type(sim.model).__name__} does not expose its layer's pre-ReLU input"
    elif getattr(sim.model, "leaky_input_is_image", False):
        why = "the layer's inputs are the pixels, positive almost everywhere, so their supports show no image"
    if why is not None:
        return Leak(layer=layer, images=blank, labels=None, features=torch.zeros(n, 0), scale_known=False,
                    info={"separated": 0, "separation_seconds": 0.0, "note": f"signSGD: {why}, not read"})
    w2 = sim.model.classifier.weight.detach().double().cpu()
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    sep = sign_supports(sim.target[f"{layer}.weight"].double().cpu(), w2[1] - w2[0], n, seed=seed,
                        time_limit=None if time_limit is None else SIGN_SEARCH_SHARE * time_limit)
    info = dict(sep.info)
    info["separation_seconds"] = info.pop("seconds")
    feats = sep.supports.double()
    if sep.known is not None:  # a stand-in's columns shared with the images inside it, or the entries the
        # columns' reading left open: their side left free
        feats[~sep.known] = 0.5
    if int(info["separated"]) == 0:
        return Leak(layer=layer, images=blank, labels=None, features=feats, scale_known=False, info=info)
    if time_limit is not None and settled_time_limit is not None and int(info["separated"]) == n:
        time_limit = max(time_limit, settled_time_limit)  # nothing after the inversion needs the rest
    left = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - start))
    images, history, stop, sinfo = invert_best_of(sim, feats, starts=invert_starts, generator=generator,
                                                  scale_known=False, iterations=invert_iterations,
                                                  time_limit=left, support=True, tv_weight=invert_tv * SIGN_TV,
                                                  mixed=None if sep.mixed is None or not SIGN_MIXED else
                                                  (*sep.mixed, sep.labels), mixed_weight=SIGN_MIXED,
                                                  units=None if not SIGN_UNITS else sep.units, units_weight=SIGN_UNITS)
    info.update({"inversion_starts": sinfo["starts"], "inversion_improved_by_other_starts":
                 sinfo["improved_by_other_starts"], "inversion_averaged": sinfo["averaged"],
                 "inversion_iterations": history[-1][0] if history else 0,
                 "inversion_stop": stop, "seconds": round(time.perf_counter() - start, 3)})
    return Leak(layer=layer, images=images, labels=sep.labels, features=feats, scale_known=False,
                info={**info, "inversion_history": history})


#: Where the separated inputs' mean estimated relative error (``feature_noise``) is at least this, the
#: inversion weighs their errors jointly (:func:`noise_coupling`), with ``COUPLED_TV`` times the smoothness
#: prior. Tune draw, B = 4, 60 s, the leak stage alone, coupling off -> on, blind 18.8 / 17.9 / 17.5 dB:
#: σ0 = 1 25.8 / 26.8 / 19.9 -> 26.3 / 27.3 / 20.1 dB, QSGD 4 26.4 / 29.2 / 16.6 -> 26.5 / 29.2 / 19.0 dB;
#: batch 2's figure moves by 2 to 3 dB from run to run with the patterns the search lands on, so the gain
#: claimed is batches 0 and 1's. At QSGD 16 and σ0 = 0.1 (errors of a few percent) the coupled problem
#: converged slower within the budget and lost 1.8 and 4.0 dB on the mean: not used there.
COUPLED_NOISE = 0.3
COUPLED_TV = 0.3


def noise_coupling(v: torch.Tensor, patterns: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How the separated inputs' errors are correlated (N x N, unit diagonal), for
    :func:`invert_features`' ``coupling``. The inputs are the least-squares fit of ``G = A X`` with
    ``A = diag(v) M`` (the rows' scales times their ReLU patterns); with the same noise on every entry of
    ``G`` their errors have covariance proportional to ``(A^T A)^-1``, and the likelihood of inputs ``X``
    is ``tr((X - X_hat)^T A^T A (X - X_hat))``. Images whose patterns overlap (on chest X-rays most units
    are active for every image: correlations of 0.8 to 0.9) have strongly anti-correlated errors: their sum
    is known far better than each. The matrix is ``A^T A`` normalised to a unit diagonal, in the inversion's
    units (each input divided by its scale, whose sign is the label's: ``+`` for class 0)."""
    A = v.double()[:, None] * patterns.double()
    S = A.T @ A
    d = S.diagonal().sqrt().clamp_min(1e-300)
    sgn = _label_signs(labels)
    return S / d[:, None] / d[None, :] * sgn[:, None] * sgn[None, :]


def _label_signs(labels: torch.Tensor) -> torch.Tensor:
    """The sign of each image's ``a_i = p_i - y_i`` (two classes): + for class 0, - for class 1."""
    return torch.where(labels == 0, 1.0, -1.0).double()


#: Total variation per unknown fraction of the leaky layer's columns (a sparsified update): on the tune
#: draw (B = 4, top-k 10 %, half the columns unknown) 0.03 was the best weight of 0.01 to 0.3 on all
#: three batches, 6 to 9 dB above none.
SPARSE_TV = 0.06
#: The weight of a sparsified update's sent subset sums in the inversion (:func:`invert_features`'s
#: ``sums``), beside the solved columns' cosine. Tune draw, top-k 1 %, B = 4, the leak stage alone in
#: 54 s (blind 18.8 / 17.9 / 17.5 dB): without the sums 25.3 / 27.3 / 22.6 dB, weight 1
#: 26.6 / 28.5 / 25.1, weight 10 26.7 / 29.0 / 24.9.
SPARSE_SUMS = 1.0


#: A layer whose inputs are the pixels (``leaky_input_is_image``), sparsified with exact sent values
#: (:func:`fill_pixels`): the weight of the pixels' squared differences to their neighbours beside the
#: sent entries' relative squared error (times ``FILL_DATA``), of the unsent entries' excess over the
#: sparsifier's bound (relative, times ``FILL_DATA`` and ``FILL_BOUND``) and of the ReLU patterns read
#: (``FILL_RELU``, the mean squared hinge of each row's pre-activation on the side its pattern says, in
#: units of the median magnitude over the rows and images). Tune draw, B = 4, top-k 10 %, the leak stage
#: alone in 45 s (blind 18.8 / 17.9 / 17.5 dB): 25.1 / 27.2 / 19.0 dB; without the bound and the patterns
#: 23.5 / 25.9 / 17.6; the smoothness at a tenth 25.2 / 26.6 / 18.8.
FILL_DATA = 1e4
FILL_SMOOTH = 1e-3
FILL_BOUND = 1.0
FILL_RELU = 10.0
#: L-BFGS-B iterations per call of :func:`fill_pixels`' second stage (each call starts from the last one's
#: pixels; the calls run until one converges, the time is spent or ``FILL_CALLS`` have run).
FILL_CHUNK = 100
FILL_CALLS = 50
#: Past this many unknowns (pixels times images) the first stage's least squares are solved iteratively
#: (LSQR, ``FILL_LSQR`` iterations at most) instead of directly: the direct solve took 11 s at 64 px and
#: B = 16 (65,536 unknowns), and its fill-in grows faster than the system.
FILL_DIRECT = 131072
FILL_LSQR = 2000


@functools.lru_cache(maxsize=4)
def _grid_differences(C: int, H: int, W: int, n: int = 1):
    """The horizontal and vertical neighbour differences of C x H x W images (flattened), a sparse matrix; with
    ``n`` > 1, of ``n`` images stored pixel-major (each pixel's ``n`` values together). Cached: the labelings
    judged by :func:`_by_relu_patterns` each fill the same shape (read-only, never modified in place)."""
    import scipy.sparse as sparse

    def steps_of(length: int):
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(length - 1, length))
    dx = sparse.kron(sparse.eye(C * H), steps_of(W))
    dy = sparse.kron(sparse.kron(sparse.eye(C), steps_of(H)), sparse.eye(W))
    D = sparse.vstack([dx, dy]).tocsr()
    return D if n == 1 else sparse.kron(D, sparse.eye(n)).tocsr()


def fill_pixels(sim: Simulator, layer: str, sums: tuple[torch.Tensor, ...], n: int, *, bound: float | None,
                time_limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The images of a sparsified update of a layer whose inputs are the pixels, where the sent values are
    exact and the update's scale is (FedSGD): nothing to invert, every sent entry of a row whose ReLU
    pattern was read is a subset sum of ``z_i = a_i x_i / N``, ``x_i`` image i's pixels.

    1. ``z`` by least squares on those sums, each image's pixel differences to its neighbours weighed by
       ``FILL_SMOOTH`` (a sparse linear system, pixel by pixel and image by image): a pixel the sums give
       is theirs, one they leave open (an unsent column: top-k sends the bright ones) is filled from its
       neighbours; ``|a_i|`` and the label then follow as for an exact update (:func:`_fix_subset`).
    2. The pixels, in [0, 1] with those scales, by L-BFGS-B from there: the sent sums again, the
       sparsifier's bound on every unsent entry of those rows (``bound``: top-k's smallest sent
       magnitude, pruning's threshold; None for random-k), each row's ReLU pattern (its pre-activation
       ``w_j . x_i`` on the side the pattern says) and the same smoothness, until it converges or
       ``time_limit`` (from the call's start) is spent.

    ``sums``: :func:`_sparse_separation`'s (patterns, sent values ``G_jk / v_j``, sent mask, the rows'
    indices in the layer). Returns the images (N x C x H x W), their labels and what was done."""
    import scipy.sparse as sparse
    import scipy.sparse.linalg as sparse_linalg

    start = time.perf_counter()
    P, S, O, rows = (t.cpu() for t in sums)
    P, S = P.double(), S.double()
    C, H, W = sim.image_shape
    npx = C * H * W
    # 1. least squares on the sent sums, unknowns z[k * N + i] (pixel-major: each pixel's N values together)
    eq_rows, eq_cols = torch.nonzero(O, as_tuple=True)
    A = sparse.csr_matrix((P[eq_rows].numpy().reshape(-1),
                           (torch.arange(len(eq_rows)).repeat_interleave(n).numpy(),
                            (eq_cols[:, None] * n + torch.arange(n)[None, :]).numpy().reshape(-1))),
                          shape=(len(eq_rows), npx * n))
    Dn = _grid_differences(C, H, W, n)
    b = S[eq_rows, eq_cols].numpy()
    ridge = 1e-9 * FILL_SMOOTH  # an image (or channel) that no sum reaches: its level, else free, held at 0
    if npx * n <= FILL_DIRECT:
        z = sparse_linalg.spsolve((A.T @ A + FILL_SMOOTH * (Dn.T @ Dn) + ridge * sparse.eye(npx * n)).tocsc(),
                                  A.T @ b)
    else:
        stacked = sparse.vstack([A, FILL_SMOOTH ** 0.5 * Dn]).tocsr()
        z = sparse_linalg.lsqr(stacked, torch.cat([torch.from_numpy(b), torch.zeros(Dn.shape[0], dtype=torch.float64)])
                               .numpy(), damp=ridge ** 0.5, iter_lim=FILL_LSQR)[0]
    Z = torch.from_numpy(z).reshape(npx, n).T.contiguous()
    feats, labels = _fix_subset(sim, layer, Z, n)
    c = (Z * feats).sum(dim=1) / feats.pow(2).sum(dim=1).clamp_min(1e-300)  # z_i = c_i x_i, c_i = a_i / N
    first = time.perf_counter() - start
    # 2. the pixels in [0, 1] with the scales fixed
    Pc = P * c[None, :]
    Sd, Od = S, O.double()
    norm = float((Sd * Od).pow(2).sum().clamp_min(1e-300))
    w2 = sim.model.classifier.weight.detach().double().cpu()
    over_bound = None if bound is None else (bound / (w2[1] - w2[0])[rows].abs().clamp_min(1e-300))[:, None]
    Wr = getattr(sim.model, layer).weight.detach().double().cpu()[rows]
    lin_bias = getattr(sim.model, layer).bias
    br = None if lin_bias is None else lin_bias.detach().double().cpu()[rows][:, None]
    x0 = feats.clamp(0, 1)
    with torch.no_grad():
        U0 = Wr @ x0.T + (0 if br is None else br)
    unit = float(U0.abs().median().clamp_min(1e-12))

    def objective(flat):
        x = torch.from_numpy(flat).requires_grad_(True)
        X = x.view(n, npx)
        R = Pc @ X
        loss = FILL_DATA * ((R - Sd) * Od).pow(2).sum() / norm
        if over_bound is not None:
            loss = loss + FILL_DATA * FILL_BOUND * (torch.relu(R.abs() - over_bound) * (1 - Od)).pow(2).sum() / norm
        U = Wr @ X.T + (0 if br is None else br)
        loss = loss + FILL_RELU * ((P * torch.relu(-U) + (1 - P) * torch.relu(U)) / unit).pow(2).mean()
        img = X.view(n, C, H, W)
        loss = loss + FILL_SMOOTH * ((img[..., 1:] - img[..., :-1]).pow(2).sum()
                                     + (img[..., 1:, :] - img[..., :-1, :]).pow(2).sum())
        loss.backward()
        return float(loss.detach()), x.grad.numpy()

    flat = x0.reshape(-1).numpy().copy()
    box = scipy.optimize.Bounds(0.0, 1.0)  # every pixel in [0, 1]
    iterations, stop, per_iteration = 0, "iterations", None
    for _ in range(FILL_CALLS):
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is not None and (left <= 0 or (per_iteration is not None and left < per_iteration)):
            stop = "time"
            break
        chunk = FILL_CHUNK  # with a time limit, a first short call measures the cost and later ones fit what is left
        if left is not None:
            chunk = 10 if per_iteration is None else max(1, min(FILL_CHUNK, int(left / per_iteration)))
        t_call = time.perf_counter()
        res = scipy.optimize.minimize(objective, flat, jac=True, method="L-BFGS-B", bounds=box,
                                      options={"maxiter": chunk})
        flat, iterations = res.x, iterations + int(res.nit)
        per_iteration = (time.perf_counter() - t_call) / max(1, int(res.nit))
        if res.nit < chunk:  # ended on its own: converged, or its line search found no lower point
            stop = "converged" if res.success else "stalled"
            break
    images = torch.from_numpy(flat).float().view(n, C, H, W)
    info = {"fill_seconds": round(first, 3), "fill_iterations": iterations, "fill_stop": stop,
            "fill_bound": bound is not None}
    return images, labels, info


def _by_relu_patterns(sim: Simulator, layer: str, n: int, time_limit: float | None = None):
    """A ``choose`` for :func:`_sparse_separation` where the layer's inputs are the pixels: each labeling's
    images from :func:`fill_pixels`' least squares alone, judged by how often their own ReLU pattern on the rows
    read (the sign of ``w_j . x_i``) differs from the labeling's; the lowest share is kept. Report draw, mlp,
    B = 4, top-k 10 %, batch 2: eight labelings of a block of seven distinct rows fit every sent entry exactly,
    their images' patterns differ from theirs on 3.9 to 28 % of the pairs (the images' own labelings, where
    one alone fits, 4.8 to 5.1 % on the report draw's other two batches and tune batch 2), and the one at
    3.9 % gives 17.7 dB against the first's 11.4 (least squares alone; blind guess 17.17)."""
    lin = getattr(sim.model, layer)
    W = lin.weight.detach().double().cpu()
    b = None if lin.bias is None else lin.bias.detach().double().cpu()

    def choose(candidates: list[tuple[torch.Tensor, ...]]) -> tuple[int, list[float]]:
        scores = []
        start = time.perf_counter()
        for sums in candidates:  # in the order found; past the time limit the rest are not judged
            if scores and time_limit is not None and time.perf_counter() - start > time_limit:
                break
            images, _, _ = fill_pixels(sim, layer, sums, n, bound=None, time_limit=0.0)
            P, _, _, rows = sums
            U = W[rows] @ images.flatten(1).double().T + (0 if b is None else b[rows][:, None])
            scores.append(float(((U > 0).double() != P.double()).double().mean()))
        return min(range(len(scores)), key=scores.__getitem__), scores
    return choose


#: The share of the leak's time for judging the separations that fit the update about equally (the
#: global pattern search's runners-up, :data:`.disaggregate.RUNNERS_UP`): each is inverted once from
#: mid-grey in an equal part of it, and the one whose images' own update of the layer is nearest the
#: received one is kept (a separation that mixes the images' inputs, or reads their patterns wrong, is
#: one no batch of images can produce: images that reproduce its inputs switch other units of the layer
#: on). Tune draw, B = 4, 60 s, the leak stage alone (blind 18.8 / 17.9 / 17.5 dB): on batch 2 under
#: relative noise σ0 = 1 three seeds of the search gave 17.1 / 21.0 / 18.2 dB (inversion objectives
#: 0.31 / 0.14 / 0.23), judged by the inversion's objective 24.0 / 24.3 / 24.0 dB; under QSGD 4 17.9 ->
#: 21.5 dB. There the consistent search's reading (inputs at cosine 0.823 to 0.872 with the truth)
#: inverted to images whose update was the nearest (relative squared error 0.656 against 0.664 to 0.687
#: for the others, in the leak stage with the generator seeded 0), while its inversion objective was
#: second to a reading with two images wrong (0.063 against 0.056). Batches 0 and 1 (both noises) have
#: no runner-up within reach of their best fit and are unchanged.
SCREEN_SHARE = 0.25


def _noise_tv(invert_tv: float, noise: list[float] | None, coupling: torch.Tensor | None) -> torch.Tensor | None:
    """The inversion's total variation per image: ``invert_tv`` times each input's estimated relative
    error (None for an exact update), times ``COUPLED_TV`` where the errors are weighed jointly."""
    tv = None if not noise else invert_tv * torch.tensor(noise, dtype=torch.float32).nan_to_num(0.0)
    return tv * COUPLED_TV if tv is not None and coupling is not None else tv


def _screen(sim: Simulator, prepared: list, G: torch.Tensor, layer: str, *, scale_known: bool, invert_tv: float,
            iterations: int, time_limit: float | None) -> tuple[int, dict[str, Any]]:
    """Which of the ``prepared`` separations (features, labels, coupling, feature noise, ...) images
    reproduce best. The separations with the fewest inputs that read as noise (:data:`LIKE_NOISE`) are
    judged; each is inverted once, coarse to fine from mid-grey. Where they have none, the one whose
    images' update of ``layer`` (with their labels) is nearest the received one ``G`` (as
    :func:`observed_matrix` reads it; where the scale is not known, at the scale that fits it best) is
    kept; where each has one, the lowest inversion objective is (an input fitted to the noise inverts to
    an image whose update fits the noise too). Returns the index and what was compared."""
    noisy = [int((negative_share(feats.double()) > LIKE_NOISE).sum()) for feats, *_ in prepared]
    judged = [c for c in range(len(prepared)) if noisy[c] == min(noisy)]
    objectives, errors = {}, {}
    scale = fedavg_gradient_scale(sim.protocol)
    total = float(G.pow(2).sum().clamp_min(1e-300))
    for c in judged:
        feats, labels, coupled, noise, _ = prepared[c]
        images, _, _, final = invert_coarse_to_fine(
            sim, feats, iterations=iterations, scale_known=scale_known,
            time_limit=None if time_limit is None else time_limit / len(judged),
            tv_weight=_noise_tv(invert_tv, noise, coupled), coupling=coupled)
        objectives[c] = round(float(final.mean()), 6)
        with torch.no_grad():
            own = sim.update(images.to(sim.device), labels.to(sim.device))[f"{layer}.weight"].double().cpu() * scale
        if not scale_known:  # the update's scale is not the images' (clipping, several local steps)
            own = own * float((own * G).sum() / own.pow(2).sum().clamp_min(1e-300))
        errors[c] = round(float((own - G).pow(2).sum()) / total, 6)
    by = errors if min(noisy) == 0 else objectives
    pick = min(judged, key=lambda c: by[c])
    return pick, {"inputs_like_noise": noisy, "update_errors": [errors.get(c) for c in range(len(prepared))],
                  "objectives": [objectives.get(c) for c in range(len(prepared))],
                  "judged_by": "update" if min(noisy) == 0 else "inversion objective"}


#: The share of the leak's time for :func:`refine_on_layer` where it runs (heavy additive noise, or
#: heavy quantization where ``LAYER_QUANTIZED_ROWS`` allows).
LAYER_REFINE_SHARE = 0.2
#: :func:`refine_on_layer`'s total variation per image, per unit of the update's noise share (the
#: least-squares objective is the update's relative squared error, whose floor is that share). Tune draw,
#: relative noise σ0 = 1, B = 4, the leak stage with 48 s then 12 s of it (blind 18.8 / 17.9 / 17.5 dB):
#: without 27.5 / 28.2 / 24.0 dB; 0.003: 27.0 / 27.8 / 25.2; 0.006: 28.1 / 28.7 / 25.6; 0.01: 28.5 /
#: 29.3 / 25.4; 0.025: 28.1 / 29.1 / 24.8. Under QSGD 4 (not Gaussian: the inputs are re-estimated by
#: its own likelihood, and least squares is not it) 0.01 cost 0.2 to 0.3 dB at B = 4, so under quantizers
#: it runs only at larger batches (``LAYER_QUANTIZED_ROWS``).
LAYER_TV = 0.01
#: Its annealing: the ReLU's gate is a sigmoid of the pre-activation over a temperature falling
#: geometrically from the first to the second factor times the median |pre-activation|, in this many
#: stages of equal time.
LAYER_TEMPERATURES = (0.3, 0.01)
LAYER_STAGES = 10
#: Under a quantizer the refinement runs only where the layer has fewer rows than this many per possible
#: ReLU pattern of the batch (rows / 2^N: 32 for lenet5's 512 rows at B = 4, 2 at B = 8), where the readings
#: average few rows each. Tune draw, QSGD 4 (least squares is not its likelihood), the leak stage with and
#: without its share: B = 4, 60 s, 27.7 / 26.6 -> 27.4 / 26.4 dB on batches 0 and 2 (batch 1 too little
#: noise to run; blind 18.8 / 17.5); B = 8, 240 s, 19.5 / 17.8 -> 22.1 / 19.1 dB (blind 18.4 / 16.4). With
#: 0.4 of the time instead of 0.2 at B = 8: 22.4 / 19.3 dB; under σ0 = 1 (B = 8, 240 s, blind as above) 0.2
#: gave 18.0 / 15.6 -> 19.5 / 16.75 dB and 0.5 19.56 / 16.93: kept at 0.2, as chosen at B = 4.
LAYER_QUANTIZED_ROWS = 8
#: Without a time limit, the L-BFGS calls (of up to 30 iterations) per stage.
LAYER_CALLS = 3
#: Where the layer has few rows per possible pattern (``LAYER_QUANTIZED_ROWS``), the readings mislead the
#: inversion, and :func:`refine_on_layer` from mid-grey (each pixel jittered by ``LAYER_BLANK_JITTER``:
#: identical images would stay identical) runs right after the separation, with up to this share of the
#: time left, on the label counts from the classifier's update; the inverted images of the first reading,
#: refined in what is left, compete with it by the same objective (where nothing separated, the fallback
#: optimisation attack does). Tune draw, B = 8, 240 s, batches 0 / 1 (blind 18.4 / 16.4 dB), the leak
#: stage before -> after: σ0 = 1 19.5 / 16.75 -> 22.5 / 17.3 dB, QSGD 4 22.1 / 19.1 -> 23.3 / 18.4.
LAYER_BLANK_SHARE = 0.7
#: The blank start runs its first ``LAYER_COARSE_STAGES`` stages (the hotter gates) on images of half the
#: side, upsampled bilinearly, then the rest at full size. Tune draw, B = 8, 120 s of the blank start alone,
#: count labels, batches 0 / 1 (blind 18.4 / 16.4 dB), full size throughout -> half the side first:
#: σ0 = 1 19.5 / 16.9 -> 23.6 / 16.9 dB, QSGD 4 20.4 / 19.4 -> 25.8 / 19.7, the objective lower in all four;
#: a quarter of the side: 22.7 / 16.9 and 23.8 / 17.6. B = 16, batch 0 (blind 17.4): σ0 = 1 17.1 -> 16.6,
#: QSGD 4 17.6 -> 17.6, the objective lower in both.
LAYER_BLANK_COARSE = 2
LAYER_COARSE_STAGES = 5
LAYER_BLANK_JITTER = 0.05
#: The blank start runs this many times, from differently jittered mid-grey, each in an equal share of its
#: time, and returns the mean of the runs' images (paired across runs within each label by pixel distance,
#: :func:`paired_mean`). Under heavy noise every run also fits the noise, each differently, and their mean is
#: closer to the truth than any one of them (as the inversion's starts, ``AVERAGE_WITHIN``); the mean fits
#: less of the noise, so its objective is above every run's (as the true images' own is), and the blank
#: start competes by its best run's objective. Tune draw, 110 s of the blank start alone, true labels, one
#: run -> the mean of three: B = 16, batches 0 / 1 / 2 (blind about 17.4 dB), σ0 = 1 16.57 / 16.98 / 16.43
#: -> 17.44 / 17.63 / 16.91 dB, QSGD 4 18.07 / 18.93 / 18.86 -> 18.35 / 19.02 / 18.86; B = 8, batches 0 / 1
#: (blind 18.4 / 16.4), σ0 = 1 23.04 / 16.86 -> 23.68 / 18.21, QSGD 4 25.58 / 20.18 -> 24.87 / 21.08. `auto`,
#: 240 s, B = 8, the same two batches: σ0 = 1 23.89 / 17.31 -> 23.35 / 18.46, QSGD 4 24.65 / 18.27 -> 25.77 /
#: 19.59; B = 16, batch 0 (blind 17.37): σ0 = 1 17.00 -> 17.69, QSGD 4 17.75 -> 17.85 (docs/attacks.md, step 3).
LAYER_BLANK_RUNS = 3


def layer_update(sim: Simulator, images: torch.Tensor, labels: torch.Tensor, *, temperature: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' own update of the leaky layer (two classes, the layer feeding the classifier), in
    factored form: ``(C, H)`` with the update ``C^T H`` (``C``: N x rows, ``H``: N x inputs), row j of
    image i's term ``v_j m_ij a_i h_i / N`` with ``v = w[1] - w[0]``, ``m_ij`` the ReLU's gate and
    ``a_i = p_i - y_i``. ``temperature``: the gate is ``sigmoid(z / temperature)`` of the pre-activation
    ``z`` instead of ``z > 0``, so that moving an image can switch units on or off smoothly."""
    model = sim.model
    head = getattr(model, model.leaky_linear)
    h = model.leaky_input((images - model.input_mean) / model.input_std)
    z = head(h)
    a = torch.softmax(model.after_leaky(z), dim=-1)[:, 1] - labels.to(z.dtype)
    w2 = model.classifier.weight
    v = (w2[1] - w2[0]).to(z.dtype)
    gate = (z > 0).to(z.dtype) if temperature is None else torch.sigmoid(z / temperature)
    return gate * v[None, :] * a[:, None] / images.shape[0], h


def _layer_objective(sim: Simulator, G: torch.Tensor, labels: torch.Tensor, noise_share: float):
    """:func:`refine_on_layer`'s objective of a batch of images (and a gate temperature)."""
    Gf = G.float().to(sim.device)
    norm = float(Gf.pow(2).sum().clamp_min(1e-30))
    y = labels.to(sim.device)
    tv = LAYER_TV * float(noise_share)

    def objective(img: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        C, H = layer_update(sim, img, y, temperature=temperature)
        fit = ((C @ C.T) * (H @ H.T)).sum() - 2 * ((C @ Gf) * H).sum() + norm
        return fit / norm + tv * total_variation(img, per_image=True).sum()
    return objective


def layer_fit(obs: Observation, sim: Simulator, layer: str, images: torch.Tensor, labels: torch.Tensor, *,
              noise_share: float) -> float:
    """:func:`refine_on_layer`'s objective of ``images`` with ``labels`` on the layer's received update:
    how a competitor's images are judged against those refined from a blank start."""
    G, _, _ = observed_matrix(obs, sim, layer)
    with torch.no_grad():
        return float(_layer_objective(sim, G, labels, noise_share)(images.float().to(sim.device)))


def refine_on_layer(sim: Simulator, G: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *,
                    noise_share: float, time_limit: float | None, coarse: int = 1
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The images refined to the leaky layer's received update ``G`` itself (FedSGD, the scale exact,
    Gaussian-type noise, or a quantizer's where least squares still gains, :data:`LAYER_QUANTIZED_ROWS`):
    the update's relative squared error ``|C^T H - G|^2 / |G|^2`` of the images'
    own update (:func:`layer_update`), plus ``LAYER_TV * noise_share`` total variation per image, by
    L-BFGS on the pixels (projected on [0, 1]) while the ReLU's gate anneals from a soft sigmoid to the
    step (``LAYER_TEMPERATURES``, ``LAYER_STAGES``, each an equal part of ``time_limit``, or
    ``LAYER_CALLS`` L-BFGS calls without one). Unlike the separation it reads no patterns: each
    image's units switch on where its own pre-activation says, so a row the separation gave to the
    wrong one of two alike images is corrected where the images' pixels allow. The least-squares
    inputs the inversion matched carry the noise of every row they were solved from; here the noise
    is weighed as it entered, once per entry. ``coarse`` > 1: the first ``LAYER_COARSE_STAGES`` stages
    move images of 1/``coarse`` the side (area-downsampled, matched bilinearly upsampled), the rest the
    full images. The images returned are the refined ones where they lower the objective (with the step
    gate), else ``images``."""
    model = sim.model
    dev = sim.device
    tv = LAYER_TV * float(noise_share)
    objective = _layer_objective(sim, G, labels, noise_share)
    start = time.perf_counter()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the weights are the server's, fixed
        p.requires_grad_(False)
    try:
        x = images.float().to(dev).clone()
        with torch.no_grad():
            before = float(objective(x))
            head = getattr(model, model.leaky_linear)
            scale = float(head(model.leaky_input((x - model.input_mean) / model.input_std)).abs().median())
        hot, cold = LAYER_TEMPERATURES
        iterations = 0
        evaluations = [0, 0.0]  # closure calls and their seconds, to fit each L-BFGS call in its stage's time
        size = tuple(x.shape[-2:])
        low = tuple(max(1, d // coarse) for d in size)
        for k in range(LAYER_STAGES):
            temperature = max(scale, 1e-12) * hot * (cold / hot) ** (k / max(1, LAYER_STAGES - 1))
            if coarse > 1 and k == 0:  # the first stages on images of 1/coarse the side, upsampled
                x = F.interpolate(x.detach(), size=low, mode="area")
            if coarse > 1 and k == LAYER_COARSE_STAGES:
                x = F.interpolate(x.detach(), size=size, mode="bilinear", align_corners=False).clamp(0, 1)
            x.requires_grad_(True)
            full = (lambda p: p) if tuple(x.shape[-2:]) == size else (
                lambda p: F.interpolate(p, size=size, mode="bilinear", align_corners=False))
            opt = torch.optim.LBFGS([x], lr=1, max_iter=30, history_size=50, line_search_fn="strong_wolfe")

            def closure():
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = objective(full(x), temperature)
                loss.backward()
                evaluations[0] += 1
                evaluations[1] += time.perf_counter() - t0
                return loss

            end = None if time_limit is None else start + time_limit * (k + 1) / LAYER_STAGES
            last = None
            settled_here = False
            for _ in range(LAYER_CALLS if end is None else 10 ** 9):
                if end is not None:
                    left = end - time.perf_counter()
                    if left <= 0:
                        break
                    # a call of up to 30 iterations must not run past the stage's end: a short first call
                    # times the evaluations, the later ones take what fits in the time left
                    fits = int(left / (evaluations[1] / evaluations[0])) if evaluations[0] else 3
                    opt.param_groups[0]["max_eval"] = max(1, fits)
                    opt.param_groups[0]["max_iter"] = max(1, min(30, fits))
                opt.step(closure)
                with torch.no_grad():
                    x.clamp_(0, 1)
                    now = float(objective(full(x), temperature))
                if last is not None and abs(last - now) <= 1e-7 * abs(last):
                    settled_here = True
                    break
                last = now
            iterations += int(opt.state[x].get("n_iter", 0)) if x in opt.state else 0
        with torch.no_grad():
            x = full(x.detach()).clamp(0, 1)
            after = float(objective(x))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = after < before
    info = {"objective_before": round(before, 6), "objective_after": round(after, 6), "kept": kept,
            "noise_share": round(float(noise_share), 4), "tv": round(tv, 6), "iterations": iterations,
            "converged": settled_here,  # the last (coldest) stage stopped falling before its time ran out
            "seconds": round(time.perf_counter() - start, 3)}
    return (x.detach().cpu().clamp(0, 1) if kept else images), info


def paired_mean(results: list[torch.Tensor], labels: torch.Tensor, reference: int = 0) -> torch.Tensor:
    """The mean of several batches of images of the same ``labels`` whose order within a label is arbitrary
    (runs of :func:`refine_on_layer` from different starts): each batch's images of a label are paired with
    the ``reference`` batch's by least total squared distance (Hungarian), then averaged."""
    ref = results[reference]
    total = ref.clone()
    for k, other in enumerate(results):
        if k == reference:
            continue
        perm = torch.arange(ref.shape[0])
        for c in labels.unique():
            idx = (labels == c).nonzero().flatten()
            cost = torch.cdist(ref[idx].flatten(1).double(), other[idx].flatten(1).double()).pow(2)
            rows, cols = scipy.optimize.linear_sum_assignment(cost.numpy())
            perm[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
        total += other[perm]
    return total / len(results)


def refine_from_blank(sim: Simulator, G: torch.Tensor, labels: torch.Tensor, *, noise_share: float,
                      time_limit: float | None, generator: torch.Generator, runs: int | None = None,
                      first: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`refine_on_layer` from ``runs`` (default ``LAYER_BLANK_RUNS``, read at the call, as the module's other
    settings are) differently jittered mid-grey starts (``LAYER_BLANK_JITTER``;
    identical images would stay identical; ``first``, where given, is the first run's, before clamping),
    each in an equal share of ``time_limit``, half the side first (``LAYER_BLANK_COARSE``). Returns the mean
    of the runs that lowered the objective (:func:`paired_mean`, paired with the lowest of them) and the
    record of that lowest run, with ``objective_after`` its objective (what the blank start competes by),
    ``mean_objective`` the returned images', ``runs`` how many ran and ``averaged`` how many the mean
    holds, the iterations and seconds of all runs; where no run lowered the objective, the start of the
    run that ended lowest and its record."""
    n, runs = labels.shape[0], max(1, int(LAYER_BLANK_RUNS if runs is None else runs))
    t0 = time.perf_counter()
    results, records = [], []
    for k in range(runs):
        start = (first if k == 0 and first is not None else
                 0.5 + LAYER_BLANK_JITTER * torch.randn((n, *sim.image_shape), generator=generator)).clamp(0, 1)
        share = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - t0)) / (runs - k)
        images, record = refine_on_layer(sim, G, start, labels, noise_share=noise_share, time_limit=share,
                                         coarse=LAYER_BLANK_COARSE)
        results.append(images)
        records.append(record)
    kept = [k for k in range(len(records)) if records[k]["kept"]]
    best = min(kept or range(len(records)), key=lambda k: records[k]["objective_after"])
    kept = kept or [best]
    images = paired_mean([results[k] for k in kept], labels.cpu(), reference=kept.index(best))
    with torch.no_grad():
        mean_objective = float(_layer_objective(sim, G, labels, noise_share)(images.float().to(sim.device)))
    info = {**records[best], "mean_objective": round(mean_objective, 6), "runs": len(records),
            "averaged": len(kept), "iterations": sum(r["iterations"] for r in records),
            "seconds": round(time.perf_counter() - t0, 3)}
    return images, info


def _few_rows(G: torch.Tensor, n: int) -> bool:
    """Whether the layer has fewer than ``LAYER_QUANTIZED_ROWS`` rows per possible ReLU pattern of ``n``."""
    return G.shape[0] < LAYER_QUANTIZED_ROWS * 2 ** n


def _on_layer(obs: Observation, sim: Simulator, G: torch.Tensor, info: dict[str, Any], *, exact: bool) -> bool:
    """Whether :func:`refine_on_layer` runs on a separation (``info``): heavy Gaussian-type noise, or
    quantization of a batch with few of the layer's rows per possible ReLU pattern (:func:`_few_rows`),
    on a one-step update whose scale is exact, every image separated."""
    n = sim.num_images
    family = _one_step_family(obs, sim, exact=exact)
    noise = info.get("feature_noise")
    return (int(info.get("separated", 0)) == n
            and (family == "noise" or (family == "quantize" and _few_rows(G, n)))
            and bool(noise) and sum(noise) / len(noise) >= COUPLED_NOISE)


def _from_blank(obs: Observation, sim: Simulator, G: torch.Tensor, info: dict[str, Any], *, exact: bool) -> bool:
    """Whether :func:`refine_on_layer` also runs from a blank start: the layer has few rows per possible
    pattern (:func:`_few_rows`) and either the inverted images are refined too (:func:`_on_layer`) or
    nothing separated from a one-step update of exact scale under Gaussian-type noise or a quantizer."""
    if not _few_rows(G, sim.num_images):
        return False
    if int(info.get("separated", 0)) == 0:
        return _one_step_family(obs, sim, exact=exact) in ("noise", "quantize")
    return _on_layer(obs, sim, G, info, exact=exact)


def _one_step_family(obs: Observation, sim: Simulator, *, exact: bool) -> str | None:
    """The last obfuscation's family of a one-step update whose scale is exact (None for any other update,
    or where nothing obfuscated it): where the layer's own update can be matched."""
    if not exact or local_drift(sim.protocol):
        return None
    families = [st.ob.family for st in steps(obs, sim.target)]
    return families[-1] if families else None


def _blank_labels_note(obs: Observation) -> str:
    """Where the labels of the images refined from a blank start came from."""
    return ("known (given with the observation)" if obs.labels is not None
            else "counts from the classifier's update (the blank start's images in class order)")


def _noise_share(G: torch.Tensor, info: dict[str, Any], n: int) -> float:
    """The update's energy outside its top ``n`` singular directions (the separation's spectrum)."""
    top = torch.tensor(info["spectrum"][:n], dtype=torch.float64).pow(2).sum()
    return 1.0 - float(top / G.double().pow(2).sum().clamp_min(1e-300))


def leak(obs: Observation, sim: Simulator, *, generator: torch.Generator, time_limit: float | None = None,
         invert_iterations: int = 5000, invert_tv: float = 1.0, invert_starts: int = 4,
         settled_time_limit: float | None = None) -> Leak | None:
    """Disaggregate and invert; None when the model has no leaky linear layer feeding a two-class
    classifier (``leaky_linear`` and ``leaky_feeds_classifier``). ``settled_time_limit``: the time the
    whole leak may take instead of ``time_limit`` when the separation turns out :func:`settled` (no
    later stage would use the rest)."""
    layer = leaky_layer(sim)
    if layer is None or not (sim.num_classes == 2 and bool(getattr(sim.model, "leaky_feeds_classifier", False))):
        return None
    start = time.perf_counter()
    # the inversion's random starts get their own generator, drawn before the (time-limited) search
    g_invert = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    n = sim.num_images
    if any(st.ob.family == "sign" for st in steps(obs, sim.target)):
        return _sign_leak(obs, sim, layer, generator=g_invert, start=start, time_limit=time_limit,
                          settled_time_limit=settled_time_limit, invert_iterations=invert_iterations,
                          invert_tv=invert_tv, invert_starts=invert_starts)
    G, observed, info = observed_matrix(obs, sim, layer)
    w2 = sim.model.classifier.weight.detach().double().cpu()
    v = w2[1] - w2[0]
    share = None if time_limit is None else 0.35 * time_limit
    known = None
    coupling = None
    blank = None  # images refined on the layer from a blank start, its info, their labels
    sums = None
    exact = exact_scale(obs, sim)
    if observed is not None and (bool(observed.all()) or sim.protocol.num_clients_averaged > 1):
        # noise after the sparsifier, or several clients' masks averaged: the sent values are not exact
        observed = None
    if observed is None:
        W = getattr(sim.model, layer).weight.detach().double().cpu()
        # several local steps move the weights between the gradients they sum: the rows are subset sums
        # only up to that drift. The 0/1 search judges its dual vectors by their spread alone there, not
        # against the noise, and the global pattern search reads what they miss (tune draw, FedAvg with 5
        # local steps, B = 4, 60 s: without it 1 / 0 / 2 of 4 images separated, 14.8 / 10.1 / 10.4 dB; with
        # it 17.5 / 18.5 / 23.2, blind 18.8 / 17.9 / 17.5), given half the separation's share (its global
        # search may take half again). The inputs are still non-negative with zeros, though, and the
        # non-negative separation reads them by those in the rest of the share, seeded by what the 0/1
        # search found (the same batches, 45 s, the leak stage: inputs at cosine 0.974 to 1.000 with the
        # images' own, 47.6 / 45.8 / 32.7 dB); where it declines, the 0/1 search's separation stands
        drift = local_drift(sim.protocol)
        # its own generator, drawn before the (time-limited) 0/1 search consumes a varying number of draws
        g_zeros = (torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                   if drift else None)
        t_sep = time.perf_counter()
        sep = separate(G, n, row_scale=v, weight=W, generator=generator,
                       time_limit=None if share is None else (0.5 if drift else 1.0) * share,
                       fit_factor=None if drift else 5.0, global_search=True,
                       cell=clients_rounding_cell(obs, sim, layer))
        if drift:  # the 0/1 search's inputs, off by the drift, seed the non-negative separation: an image
            # whose basin its random starts rarely reach is then read from a near start (what the 0/1 search
            # overran comes out of the inversion's time, not the budget's)
            seeds = torch.cat([sep.X] + [alt[0] for alt in sep.alternatives])
            by_zeros = nonneg_separate(G, n, row_scale=v, generator=g_zeros, seeds=seeds,
                                       time_limit=None if share is None
                                       else max(0.1 * share, share - (time.perf_counter() - t_sep)))
            if by_zeros is not None:
                by_zeros.info["subset_sum_search"] = {k: sep.info[k] for k in ("separated", "trials", "seconds")}
                by_zeros.info["seconds"] = round(time.perf_counter() - t_sep, 3)  # both searches
                sep = by_zeros
        info.update(sep.info)
        if _from_blank(obs, sim, G, info, exact=exact):
            if time_limit is not None and settled_time_limit is not None:  # nothing after the leak but a competitor
                time_limit = max(time_limit, settled_time_limit)
            g_blank = torch.Generator().manual_seed(g_invert.initial_seed() + 1)  # the inversion's starts stay
            first = 0.5 + LAYER_BLANK_JITTER * torch.randn((n, *sim.image_shape), generator=g_blank)
            # the labels where the server has them, else the counts from the classifier's update: a reading of
            # few rows can take a noise-like input for an image of the other class (tune draw, B = 8, 240 s,
            # sigma0 = 1, batch 1: 15.0 dB with the first reading's labels against 17.3 with the counts, blind
            # 16.4), and from a blank start only the counts matter
            blank_labels = (obs.labels.to(torch.int64) if obs.labels is not None else count_based(sim, g_blank))
            blank = (*refine_from_blank(sim, G, blank_labels, noise_share=_noise_share(G, info, n),
                                        generator=g_blank, first=first, time_limit=None if time_limit is None else
                                        LAYER_BLANK_SHARE * max(0.0, time_limit - (time.perf_counter() - start))),
                     blank_labels)
        like = None if sep.patterns is None or local_drift(sim.protocol) else likelihood(obs, sim, layer)

        def prepare(X: torch.Tensor, patterns: torch.Tensor | None, noise_now: list[float] | None, limit):
            """One separation's inputs to invert: features, labels, the coupling of their errors."""
            rinfo = None
            if like is not None:  # the patterns are known: the inputs that make the received entries likeliest
                A = v[:, None] * patterns
                rows = A.abs().sum(dim=1) > 0
                X, rinfo = reestimate(G[rows], A[rows], X, lambda R, d: like(R, rows, d), time_limit=limit)
                # feature_noise stays the projection's estimate (on the tune draw the re-estimated inputs'
                # error was 12 to 35 % below the projection's), so the smoothness prior below is if anything
                # a little strong
            if exact:
                feats, labels = _fix_subset(sim, layer, X, n)
            else:
                labels = torch.tensor([0 if float(x.sum()) >= 0 else 1 for x in X], dtype=torch.int64)
                feats = X * _label_signs(labels)[:, None]
            # heavy noise: the inputs' errors are weighed jointly, as the update's likelihood weighs them
            coupled = None
            if exact and patterns is not None and noise_now and sum(noise_now) / len(noise_now) >= COUPLED_NOISE:
                coupled = noise_coupling(v, patterns, labels)
            return feats, labels, coupled, noise_now, rinfo

        limit = None if time_limit is None else 0.15 * time_limit
        cands = [(sep.X, sep.patterns, sep.info.get("feature_noise"))] + list(sep.alternatives)
        if blank is not None:  # the first reading only, in the time the blank start left
            cands = cands[:1]
            limit = None if time_limit is None else 0.15 * max(0.0, time_limit - (time.perf_counter() - start))
        prepared = [prepare(*c, None if limit is None else limit / len(cands)) for c in cands]
        if len(prepared) > 1:  # separations that fit the update about equally: judged by their images
            pick, compared = _screen(sim, prepared, G, layer, scale_known=exact, invert_tv=invert_tv,
                                     iterations=invert_iterations,
                                     time_limit=None if time_limit is None else SCREEN_SHARE * time_limit)
            info["screened"] = {"separations": len(prepared), **compared, "chosen": pick}
            prepared = [prepared[pick]]
            if pick > 0:  # the runner-up's own noise estimates
                info["feature_noise"] = prepared[0][3]
        feats, labels, coupling, _, rinfo = prepared[0]
        if rinfo is not None:
            info["reestimated"] = rinfo
        if sep.patterns is not None:  # an input with half its energy negative is noise, not an image's
            negative = negative_share(feats.double())
            info["negative_share"] = [round(float(x), 4) for x in negative]
            info["like_noise"] = int((negative > LIKE_NOISE).sum())
        scale_known = exact
        if coupling is not None:
            info["inversion_coupled"] = True
    else:  # sparsified: exact values on the sent entries, nothing known elsewhere
        t_sep = time.perf_counter()
        last = steps(obs, sim.target)[-1].ob.family == "sparsify"  # the sent values are exact
        pixels = last and exact and getattr(sim.model, "leaky_input_is_image", False)
        judge = (_by_relu_patterns(sim, layer, n, None if time_limit is None else CHOOSE_SHARE * time_limit)
                 if pixels and n * G.shape[1] <= CHOOSE_MAX_UNKNOWNS else None)
        try:
            X, known, sinfo, sums = _sparse_separation(G, observed, v, n, generator, share, exact=last, choose=judge)
        except _NoBlock as e:
            X, known, sums = torch.zeros(n, G.shape[1], dtype=torch.float64), None, None
            sinfo = {"separated": 0, "seconds": round(time.perf_counter() - t_sep, 3), "note": str(e)}
        info.update(sinfo)
        info["sent_exact"] = last
        labels = torch.tensor([0 if float(x.sum()) >= 0 else 1 for x in X], dtype=torch.int64)
        feats = X * _label_signs(labels)[:, None]  # a_i h_i up to |a_i|: h_i >= 0
        scale_known = False
        if sums is not None and pixels and int(info.get("separated", 0)) == n:  # the pixels: nothing to invert
            info["separation_seconds"] = info.pop("seconds")
            st = steps(obs, sim.target)[-1]
            bound = (unsent_bounds(sim.target, st.values)[f"{layer}.weight"]  # in the update's units, G's in
                     * abs(fedavg_gradient_scale(sim.protocol))  # a mean gradient's (one FedAvg step: -1 / lr)
                     if st.ob.bounds_unsent and st.values is not None else None)
            if time_limit is not None and settled_time_limit is not None:  # nothing after it needs the rest
                time_limit = max(time_limit, settled_time_limit)
            images, labels, finfo = fill_pixels(sim, layer, sums, n, bound=bound, time_limit=None if time_limit is None
                                                else max(0.0, time_limit - (time.perf_counter() - start)))
            info.update(finfo)
            info.update({"inversion": "none: the layer's inputs are the pixels, the unsent ones filled",
                         "inversion_iterations": finfo["fill_iterations"], "inversion_stop": finfo["fill_stop"],
                         "seconds": round(time.perf_counter() - start, 3)})
            return Leak(layer=layer, images=images, labels=labels, features=images.flatten(1).double(),
                        scale_known=True, info=info)
    info["separation_seconds"] = info.pop("seconds")
    if int(info.get("separated", 0)) == 0:  # nothing to invert: the caller falls back to optimisation (which
        # competes with the images refined from a blank start where those ran)
        if blank is not None:
            info["layer_refinement"] = {"from_blank": blank[1]}
            info["labels"] = _blank_labels_note(obs)
            info["seconds"] = round(time.perf_counter() - start, 3)
            return Leak(layer=layer, images=blank[0], labels=blank[2], features=feats, scale_known=scale_known,
                        info=info)
        return Leak(layer=layer, images=torch.full((n, *sim.image_shape), 0.5), labels=None, features=feats,
                    scale_known=scale_known, info=info)
    if time_limit is not None and settled_time_limit is not None and settled(obs, info):
        time_limit = max(time_limit, settled_time_limit)
    left = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - start))
    if left is not None and int(info.get("separated", 0)) < n:  # mixtures: leave time to the fallback
        left = min(left, 0.25 * time_limit)
    # heavy Gaussian-type noise (or quantization of a batch with few of the layer's rows per possible ReLU
    # pattern, LAYER_QUANTIZED_ROWS) on a one-step update whose scale is exact: the inverted images are
    # refined to the received update itself (refine_on_layer), in a share of the time
    on_layer = known is None and _on_layer(obs, sim, G, info, exact=exact)
    if on_layer and left is not None:
        left = (1 - LAYER_REFINE_SHARE) * left
    # the noisier an input, the more the inversion leans on smooth images: total variation weighted by
    # each input's estimated relative error (none for an exact update)
    noise = info.get("feature_noise")
    tv = _noise_tv(invert_tv, noise, coupling)
    if known is not None:  # and it fills what the unsent columns leave open
        unknown = 1.0 - float(known.double().mean())
        tv = (0.0 if tv is None else tv) + invert_tv * SPARSE_TV * unknown
    images, history, stop, sinfo = invert_best_of(sim, feats, starts=invert_starts, generator=g_invert,
                                                  scale_known=scale_known, iterations=invert_iterations,
                                                  time_limit=left, mask=known, tv_weight=tv, coupling=coupling,
                                                  sums=sums, sums_weight=SPARSE_SUMS,
                                                  anneal=None if sums is None else SPARSE_ANNEAL)
    if on_layer:
        images, info["layer_refinement"] = refine_on_layer(
            sim, G, images, labels, noise_share=_noise_share(G, info, n),
            time_limit=None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - start)))
        if blank is not None:  # the lower objective wins (the server computes both; it never sees the truth)
            mine = info["layer_refinement"]
            won = blank[1]["objective_after"] < (mine["objective_after"] if mine["kept"] else mine["objective_before"])
            info["layer_refinement"] = {**mine, "from_blank": {**blank[1], "won": won}}
            if won:
                images, labels = blank[0], blank[2]
                info["labels"] = _blank_labels_note(obs)
    info["inversion_starts"] = sinfo["starts"]
    info["inversion_improved_by_other_starts"] = sinfo["improved_by_other_starts"]
    info["inversion_averaged"] = sinfo["averaged"]
    info["inversion_iterations"] = history[-1][0] if history else 0
    info["inversion_stop"] = stop
    if sums is not None:
        info["inversion_anneal"] = SPARSE_ANNEAL
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Leak(layer=layer, images=images, labels=labels, features=feats, scale_known=scale_known,
                info={**info, "inversion_history": history})
