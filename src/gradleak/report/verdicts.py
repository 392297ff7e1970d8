"""Verdicts in plain words, as pure functions over a setting's numbers (see docs/verdicts.md).

A reconstruction leaks only what it recovers beyond the attacker's blind guess (the mean auxiliary image,
:mod:`gradleak.metrics.baseline`), so image verdicts are judged on the *gain over that baseline*, never on
raw SSIM: ``ssim_skill = (SSIM - baseline SSIM) / (1 - baseline SSIM)``, the share of the gap between
the blind guess and the original that the attack closed.

* images **recognisable**: ``ssim_skill >= 0.5`` (the reconstruction is nearer the original than the
  blind guess by at least half the distance the guess leaves);
* images **partly recognisable**: ``ssim_skill >= 0.2``;
* **not recognisable** otherwise (a reconstruction equal to the baseline has skill 0).

Risk, per setting, for the attack that leaks most:

* **high**: images recognisable, or at least half of the patients re-identified (leave-the-image-out,
  top-1) clearly better than a random ranking;
* **moderate**: images partly recognisable, or patients re-identified clearly better than a random ranking;
* **inconclusive** (instead of low): the attack stopped before converging -- an attack that stopped early
  can show a leak, never its absence --, or ``auto`` found a layer whose update leaks whole batches but
  did not separate it into the images (its fallback's images then show what that attack reached, not what
  the update holds), or ``auto``'s images do not reproduce an exact update, or the entries a sparsifying client
  sent (their simulated update is no nearer the received one than a batch of uniform grey images gives), or
  there is no blind baseline to judge the images against;
* **low**: none of the above, with every attack converged.

"Clearly better": one-sided binomial test against the chance level, p < 0.05 after a Bonferroni
correction for picking the strongest of the rankings.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

RECOGNISABLE_SKILL = 0.5
PARTLY_SKILL = 0.2
HIGH_REID = 0.5

#: Attacks from the strongest to the weakest; names not listed are shown as tried but not ranked.
ATTACK_STRENGTH = ("auto", "rog", "inverting_gradients", "idlg", "dlg")

RISK_ORDER = {"low": 0, "inconclusive": 1, "moderate": 2, "high": 3}

INCONCLUSIVE = "inconclusive: the attack stopped before converging"
#: Why a setting is inconclusive where ``auto`` found a layer that leaks whole batches (a linear layer into a
#: ReLU) and did not separate its update into the images. Real X-rays, ``lenet5``, B = 32, 240 s: under relative
#: noise 0.1 (tune draw) the fallback converged at 18.96 dB against a blind 17.60, no image recognisable and no
#: patient re-identified clearly better than chance, and under top-k 10 % (report draw) ROG converged at 14.33
#: dB against a blind 17.27: both low risk by the other rules, where at B = 16 (report draw, 240 s, blind 16.9)
#: the same obfuscations separate and reach 32.8 and 37.3 dB (top-k 10 % separates at B = 32 too since the
#: separation's integer programming: 31.34 dB there against the blind 17.27).
UNSEPARATED = "inconclusive: the update of a layer that leaks whole batches did not separate into the images"
#: Why a setting is inconclusive where ``auto``'s images do not reproduce the exact update they came from, or the
#: entries a sparsifying client sent (their simulated update no nearer the received one than uniform grey images
#: give, :func:`gradleak.attacks.auto.update_fit`):
#: e.g. a separation of FedAvg local steps that overshoot (real X-rays, 64 px, B = 4, 5 steps of learning rate 0.4,
#: tune batches 0 / 1: 19.60 / 21.95 dB against a blind 18.81 / 17.90, no image recognisable, relative residual 5.30 /
#: 10.63 against grey's 1.00), where at the learning rate 0.1 the same batches give 47.98 and 46.02 dB.
UNFIT = "inconclusive: the attack's images do not reproduce the update they were read from"


def num(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def above_chance(hits: int | None, n: int | None, chance: float | None, rankings: int = 3) -> bool:
    """Whether ``hits`` of ``n`` re-identifications beat a random ranking: one-sided binomial test at
    p < 0.05, Bonferroni-corrected for the choice of the strongest of ``rankings`` rankings."""
    if not n or hits is None or chance is None:
        return False
    from scipy.stats import binomtest

    p = binomtest(int(hits), int(n), min(max(float(chance), 1e-12), 1.0), alternative="greater").pvalue
    return p * max(1, rankings) < 0.05


def image_level(ssim_skill: float | None) -> str | None:
    """``recognisable``, ``partly`` or ``not`` from the SSIM gain over the blind baseline (None: unknown)."""
    s = num(ssim_skill)
    if s is None:
        return None
    if s >= RECOGNISABLE_SKILL:
        return "recognisable"
    if s >= PARTLY_SKILL:
        return "partly"
    return "not"


def image_phrase(level: str | None) -> str:
    return {"recognisable": "images recognisable",
            "partly": "images partly recognisable (coarse anatomy beyond the blind guess)",
            "not": "images not recognisable (no clearer than the blind guess)",
            None: "images not judged (no blind baseline)"}[level]


def reid_significant(s: dict[str, Any]) -> bool:
    return above_chance(s.get("reid_hits"), s.get("reid_n"), s.get("chance"),
                        max(1, len(s.get("reid_rankings") or [])))


def all_converged(s: dict[str, Any]) -> bool:
    conv = s.get("converged") or []
    return bool(conv) and all(c is True for c in conv)


def risk(s: dict[str, Any]) -> str:
    """The risk level of one attack's numbers on one setting (see the module docstring).

    ``s`` holds ``ssim_skill``, ``reid_hits``, ``reid_n``, ``chance``, ``reid_rankings`` and
    ``converged`` (one entry per cell: True, False or None); ``unseparated`` (optional): in how many cells
    ``auto`` left a leaky layer's update unseparated; ``unfit`` (optional): in how many its images did not
    reproduce the exact update (or a sparsifying client's sent entries)."""
    level = image_level(s.get("ssim_skill"))
    rate = (s["reid_hits"] / s["reid_n"]) if s.get("reid_n") else None
    significant = reid_significant(s)
    if level == "recognisable" or (significant and rate is not None and rate >= HIGH_REID):
        return "high"
    if level == "partly" or significant:
        return "moderate"
    if not all_converged(s) or level is None or s.get("unseparated") or s.get("unfit"):
        return "inconclusive"
    return "low"


def strength_rank(attack: str) -> int | None:
    base = str(attack).split(" + ")[0].strip()
    return ATTACK_STRENGTH.index(base) if base in ATTACK_STRENGTH else None


def strongest_tried(attacks: Iterable[str]) -> tuple[str | None, list[str]]:
    """The strongest attack among ``attacks`` (by :data:`ATTACK_STRENGTH`) and the stronger ones not run."""
    names = list(dict.fromkeys(str(a) for a in attacks))
    ranked = [(strength_rank(a), a) for a in names if strength_rank(a) is not None]
    if not ranked:
        return (names[0] if names else None), list(ATTACK_STRENGTH)
    best_rank = min(r for r, _ in ranked)
    # prefer the variant with a prior when both ran
    best = sorted([a for r, a in ranked if r == best_rank], key=lambda a: (" + " not in a, a))[0]
    return best, list(ATTACK_STRENGTH[:best_rank])


def budget_text(s: dict[str, Any]) -> str:
    """``inverting_gradients: 200 iterations in 12 s (0.06 s/iteration), converged``."""
    it, sec, spi = num(s.get("iterations")), num(s.get("seconds")), num(s.get("seconds_per_iteration"))
    conv = s.get("converged") or []
    parts = []
    if it is not None:
        parts.append(f"{it:.0f} iterations" + (f" in {sec:.0f} s" if sec is not None else "")
                     + (f" ({spi:.3g} s/iteration)" if spi is not None else ""))
    elif sec is not None:
        parts.append(f"{sec:.0f} s")
    if conv:
        n_true = sum(c is True for c in conv)
        if n_true == len(conv):
            parts.append("converged" if len(conv) == 1 else f"converged in all {len(conv)} runs")
        elif all(c is None for c in conv):
            parts.append("too few iterations to judge convergence")
        else:
            parts.append("stopped before converging" if len(conv) == 1
                         else f"converged in {n_true} of {len(conv)} runs")
    else:
        parts.append("convergence not recorded")
    unseparated = s.get("unseparated")
    if unseparated:  # auto found a layer that leaks whole batches and did not separate its update
        layers = ", ".join(f"'{name}'" for name in s.get("unseparated_layers") or []) or "the leaky layer"
        parts.append(f"{layers} not separated into the images"
                     + (f" in {unseparated} of {len(conv)} runs" if len(conv) > 1 else ""))
    unfit = s.get("unfit")
    if unfit:  # auto's images do not reproduce the exact update (or sent entries) they were read from
        residual = num(s.get("unfit_residual"))
        grey = num(s.get("unfit_grey"))
        parts.append("its images do not reproduce the update" + (f" in {unfit} of {len(conv)} runs" if len(conv) > 1
                                                                 else "")
                     + (f" (relative residual {residual:.3g}" + (f" against uniform grey images' {grey:.3g})"
                                                                 if grey is not None else ")")
                        if residual is not None else ""))
    noise = s.get("inputs_like_noise")
    if noise:  # auto separated an input that is no image's (half its energy negative)
        parts.append(f"{noise} separated input{'s' if noise > 1 else ''} read as noise, not an image")
    budget = ", ".join(parts)
    return f"{s.get('attack')}: {budget}" if s.get("attack") else budget


__all__ = ["RECOGNISABLE_SKILL", "PARTLY_SKILL", "HIGH_REID", "ATTACK_STRENGTH", "RISK_ORDER", "INCONCLUSIVE",
           "UNFIT", "UNSEPARATED", "num", "above_chance", "image_level", "image_phrase", "reid_significant",
           "all_converged", "risk", "strength_rank", "strongest_tried", "budget_text"]
