"""Differential-privacy accounting for the sampled Gaussian mechanism, through Opacus's accountants.

A schedule is ``steps`` releases of a Gaussian mechanism with noise multiplier ``z`` (noise std divided
by the L2 sensitivity), each applied to a Poisson sample drawn with probability ``sample_rate``. In
federated learning with client-level noise, a step is a round and the sample rate is the probability that
a client takes part in a round; in DP-SGD a step is an optimiser step and the sample rate is
batch size / data set size. One unsampled release (an update a client sends once) is
``sample_rate=1, steps=1``.

``accountant`` is ``"rdp"`` (Rényi DP, Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled
Gaussian) or ``"prv"`` (privacy random variables, Gopi, Lee & Wutschitz 2021), both as implemented in
``opacus.accountants``. Opacus is imported on first use (it takes a few seconds).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

from ..errors import UserError

ACCOUNTANTS = ("rdp", "prv")

#: Precision of the search for a noise multiplier: the ε of the returned multiplier lies in
#: [target - EPSILON_TOLERANCE, target] (Opacus's binary search).
EPSILON_TOLERANCE = 0.01


def _check(sample_rate: float, steps: int, delta: float, accountant: str) -> tuple[float, int, float, str]:
    if accountant not in ACCOUNTANTS:
        raise UserError(f"unknown DP accountant '{accountant}' (use one of {', '.join(ACCOUNTANTS)})")
    try:
        q, t, d = float(sample_rate), steps, float(delta)
    except (TypeError, ValueError):
        raise UserError(f"DP schedule needs numbers, got sample_rate={sample_rate!r}, delta={delta!r}") from None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or int(t) != t or int(t) < 1:
        raise UserError(f"DP steps/rounds must be a positive integer, got {steps!r}")
    if not 0 < q <= 1:
        raise UserError(f"DP sample_rate must lie in (0, 1], got {sample_rate!r}")
    if not 0 < d < 1:
        raise UserError(f"DP delta must lie in (0, 1), got {delta!r}")
    return q, int(t), d, accountant


@lru_cache(maxsize=256)
def _epsilon(z: float, q: float, steps: int, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(z, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def _noise_multiplier(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε of ``steps`` sampled Gaussian releases with ``noise_multiplier`` at ``delta`` (Opacus's accountant).

    Returns ``inf`` for a zero noise multiplier (no privacy). A numerical failure of the accountant
    (PRV with very little noise) is a :class:`UserError` suggesting the RDP accountant.
    """
    q, t, d, acc = _check(sample_rate, steps, delta, accountant)
    try:
        z = float(noise_multiplier)
    except (TypeError, ValueError):
        raise UserError(f"noise_multiplier must be a number, got {noise_multiplier!r}") from None
    if not z >= 0 or not math.isfinite(z):
        raise UserError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if z == 0:
        return math.inf
    try:
        return _epsilon(z, q, t, d, acc)
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise UserError(f"the {acc} accountant cannot compute epsilon for noise multiplier {z:g} "
                        f"(sample rate {q:g}, {t} steps): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        + ("; try accountant=rdp" if acc != "rdp" else "")) from None


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's search precision) whose ε after the schedule is at most
    ``target_epsilon``: Opacus's ``get_noise_multiplier`` with ``epsilon_tolerance`` =
    :data:`EPSILON_TOLERANCE`, so ``epsilon_spent(result, ...)`` lies in [target - 0.01, target].
    """
    q, t, d, acc = _check(sample_rate, steps, delta, accountant)
    try:
        eps = float(target_epsilon)
    except (TypeError, ValueError):
        raise UserError(f"target_epsilon must be a number, got {target_epsilon!r}") from None
    if not eps > 0 or not math.isfinite(eps):
        raise UserError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    try:
        return _noise_multiplier(eps, d, q, t, acc)
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise UserError(f"no noise multiplier reaches epsilon={eps:g} at delta={d:g} with sample rate {q:g} "
                        f"over {t} steps ({acc}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


__all__ = ["ACCOUNTANTS", "EPSILON_TOLERANCE", "epsilon_spent", "noise_multiplier_for"]
