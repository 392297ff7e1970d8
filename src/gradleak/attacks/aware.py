"""Obfuscation-aware matching: objectives chosen from what the server knows the client did.

(Filled in with the obfuscation suite.)
"""

from __future__ import annotations

from typing import Any

from ..observation import Observation
from .objectives import Matching, Tensors, plain


def for_observation(obs: Observation, target: Tensors, kind: str, knows: bool,
                    settings: dict[str, Any] | None = None) -> Matching:
    """The matching for ``obs``: the plain ``kind`` (cosine or l2) unless the attacker knows the
    obfuscation and an aware form applies."""
    return plain(kind, target)
