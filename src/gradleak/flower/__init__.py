"""gradleak on Flower: obfuscate in a real ClientApp, capture on a real server, train on Flower's engine.

    from gradleak.flower import obfuscation_mod, CaptureStrategy
    client = ClientApp(mods=[obfuscation_mod(["qsgd:levels=16"])])           # the client's obfuscation
    strategy = CaptureStrategy(FedAvg(), "captured/", model={"arch": "lenet5", "num_classes": 2,
                                                              "in_channels": 1, "image_size": 64})

- :func:`obfuscation_mod` (:mod:`.mod`): a Flower mod applying gradleak obfuscations to training replies;
- :class:`CaptureStrategy` (:mod:`.capture`): a strategy wrapper writing each received update as an
  Observation file that ``gradleak attack`` reads;
- :func:`train_reply` (:mod:`.client`): a ClientApp train function's body computing gradleak's client
  update (FedSGD / FedAvg, per-example clipping);
- :func:`simulate` (:mod:`.engine`): :func:`gradleak.federated.simulation.simulate` on Flower's
  simulation engine.

Flower is an optional dependency (``pip install 'gradleak[flower]'``). This package imports without it
(:func:`available` says whether it is there); its functions need it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

INSTALL = "pip install 'gradleak[flower]'"
ENGINES = ("flower", "local")

_EXPORTS = {
    "obfuscation_mod": ".mod", "ObfuscationMod": ".mod", "noise_generator": ".mod",
    "CaptureStrategy": ".capture", "observation_from_reply": ".capture", "central_dp": ".capture",
    "train_reply": ".client", "simulate": ".engine",
}


def available() -> bool:
    """Whether Flower (with its simulation engine) is installed."""
    return importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def choose_engine(requested: str | None) -> tuple[str, str | None]:
    """The federation engine of a utility run and a note on the choice: ``requested`` when given
    (``flower`` needs Flower installed), else ``flower`` when it is installed and ``local`` when not, or
    when this process already runs Ray (a Ray sweep worker: Flower's engine starts and stops its own)."""
    from ..errors import UserError

    if requested is not None and requested not in ENGINES:
        raise UserError(f"federation.engine must be one of {', '.join(ENGINES)}, got '{requested}'")
    if requested == "flower" and not available():
        raise UserError(f"federation.engine is flower, but Flower is not installed ({INSTALL})")
    if requested is not None:
        return requested, None
    if not available():
        return "local", f"Flower is not installed, so the built-in loop ran ({INSTALL} for Flower's engine)"
    if _ray_running():
        return "local", "Ray already runs in this process, so the built-in loop ran (Flower's engine runs its own Ray)"
    return "flower", None


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not available():
        raise ImportError(f"gradleak.flower.{name} needs Flower: {INSTALL}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["ENGINES", "INSTALL", "available", "choose_engine", *_EXPORTS]
