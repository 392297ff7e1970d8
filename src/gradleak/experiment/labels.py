"""What a defence is called in tables and reports."""

from __future__ import annotations

from typing import Any


def setting_label(cfg: dict[str, Any]) -> str:
    """A short name of a cell's defence: its obfuscation(s) and, for FedAvg, the local training."""
    parts = []
    for o in cfg["capture"]["obfuscation"]:
        args = ", ".join(f"{k}={v}" for k, v in o.items() if k != "name")
        parts.append(f"{o['name']}({args})" if args else str(o["name"]))
    proto = cfg["capture"]["protocol"]
    if proto["algorithm"] == "fedavg":
        parts.insert(0, f"fedavg(local_steps={proto['local_steps']}, local_lr={proto['local_lr']})")
    return " + ".join(parts) if parts else "none"


def obfuscation_label(specs: list[dict[str, Any]]) -> str:
    return setting_label({"capture": {"obfuscation": specs, "protocol": {"algorithm": "fedsgd"}}})
